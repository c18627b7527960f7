#!/usr/bin/env bash
# A GPU session's one call: build the C++ extension in place, run `vfuse bench gpu` and the
# visual-sequence profile on CUDA, and leave every result under OUT (default benchmarks/results).
#
#   OUT=/some/dir BUDGET=420 VFUSE_GIT_COMMIT=<commit> benchmarks/gpu_run.sh
#
# (VFUSE_GIT_COMMIT: the commit to record; a copy of the working tree on another machine may
# carry a stale .git.)
#
# Wheels the machine lacks (it has no internet; e.g. a setuptools new enough for pyproject's
# metadata) may be put in .whl/ beforehand: they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem --format=csv
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || tail -20 "$OUT/build.log"
python3 -m vfuse_kernels.cli bench gpu --out "$OUT" --budget "${BUDGET:-420}"
status=$?
timeout 90 python3 -m vfuse_kernels.cli profile-sequence --device cuda --quick --out "$OUT/profile" \
  --cache-dir /tmp/vfuse-family > "$OUT/profile.log" 2>&1 || tail -5 "$OUT/profile.log"
exit $status
