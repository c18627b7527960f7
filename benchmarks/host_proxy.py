"""Host time of the GPU (Triton) merge path, measured on a machine without a GPU: a proxy.

The Triton backend runs on CPU tensors under ``TRITON_INTERPRET=1``. Each kernel launch of one
call is recorded (which tensor arguments it changed, and to what); the timed calls then replay
the launches: a replayed launch copies back its recorded outputs of at most 4 KiB (the counts,
statuses and bracket ends that steer the host) and skips the rest. What is timed is the host's
own work per call (Python, argument handling, torch's CPU ops) without the kernels and without
Triton's launch cost, which the interpreter does not have. It compares host-side changes; it
is not the GPU host's time.

    python benchmarks/host_proxy.py --method ties --numel 262144 --models 3 --share 16

Prints the Triton launches and the torch ops outside kernels per call, and the median and
minimum µs per call. ``--share``: sample one key in that many (the GPU selector's 64 would leave
a small tensor without the sampled path; 16 at 2^18 keeps it, as at the suite's sizes).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ["VFUSE_BACKEND"] = "triton"

import argparse  # noqa: E402
import collections  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import vfuse_kernels as vk  # noqa: E402
from vfuse_kernels import selection  # noqa: E402
from vfuse_kernels.bench.merge import tie_heavy_inputs  # noqa: E402
from vfuse_kernels.triton import delta_merge as kernels  # noqa: E402
from vfuse_kernels.triton import magnitude_select  # noqa: E402

REPLAYED_BYTES = 4096


def _tensor_args(args, kwargs) -> list[torch.Tensor]:
    found = []
    for value in (*args, *kwargs.values()):
        found += [v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, torch.Tensor)]
    return found


class Launches:
    """Records one call's launches, then replays them (``replay``); ``names`` counts the kernels."""

    def __init__(self):
        self.tape, self.names, self.position, self.replay, self.copying = [], collections.Counter(), 0, False, False
        self._run = interpreter.InterpretedFunction.run
        launches = self

        def run(fn, *args, grid, warmup, **kwargs):
            tensors = _tensor_args(args, kwargs)
            if launches.replay:
                launches.copying = True
                for i, value in launches.tape[launches.position]:
                    tensors[i].copy_(value)
                launches.position, launches.copying = launches.position + 1, False
                return None
            before = [t.clone() for t in tensors]
            result = launches._run(fn, *args, grid=grid, warmup=warmup, **kwargs)
            launches.names[fn.fn.__name__] += 1
            launches.tape.append([(i, t.clone()) for i, (t, b) in enumerate(zip(tensors, before))
                                  if t.numel() * t.element_size() <= REPLAYED_BYTES and not torch.equal(t, b)])
            return result

        interpreter.InterpretedFunction.run = run


class TorchOps(TorchDispatchMode):
    """Counts the torch ops dispatched, but for the replay's copies (a replayed kernel runs no op)."""

    def __init__(self, launches: Launches):
        super().__init__()
        self.ops, self.launches = collections.Counter(), launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.launches.copying:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["ties", "task_arithmetic"], default="ties")
    parser.add_argument("--numel", type=int, default=1 << 18)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--share", type=int, default=16)
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args(argv)
    selection.SMALL = min(selection.SMALL, args.numel // 4)
    magnitude_select.DeviceSelector.SAMPLE_SHARE = args.share
    base, tuned = tie_heavy_inputs(args.numel, args.models, torch.bfloat16, torch.device("cpu"))
    out = torch.empty_like(base)
    weights = [1.0 / args.models] * args.models
    density = 0.3 if args.method == "ties" else 1.0
    ks = [int(density * args.numel)] * args.models

    def call():
        vk.delta_merge(base, tuned, weights, method=args.method, density=density, out=out)

    call()  # compiled, caches warm
    launches = Launches()
    out.zero_()
    call()  # recorded
    launches.replay = True
    with TorchOps(launches) as torch_ops:  # the implementation under the op, whose inner ops the op would hide
        launches.position = 0
        if args.method == "ties":
            kernels.select_then_merge(out, base, tuned, False, 1, True, 1.0, weights, ks, 0)
        else:
            kernels.merge(out, base, tuned, False, 0, 0, False, 1.0, weights, weights, [0] * args.models, None, 0)
    times = []
    for _ in range(args.calls):
        launches.position = 0
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    print(f"{args.method}, {args.models} x {args.numel} bf16: {sum(launches.names.values())} Triton launches "
          f"{dict(launches.names)}")
    print(f"torch ops outside kernels: {sum(torch_ops.ops.values())} {dict(sorted(torch_ops.ops.items()))}")
    print(f"host proxy per call: median {statistics.median(times) * 1e6:.0f} us, min {min(times) * 1e6:.0f} us")


if __name__ == "__main__":
    main()
