"""`vfuse bench gpu --quick`: the JSON format other tools read, every area contributing or becoming a
failed check (never crashing the suite), the distributed merge's byte comparison, malformed area
results, and pytest outcomes turned into checks."""
import json
import os
import signal
import sys

import pytest
import torch

from vfuse_kernels import cli
from vfuse_kernels.bench import gpu_suite
from vfuse_kernels.bench.common import device_slug

FAKE_AREA = """
def gpu_suite(device, quick):
    return {"checks": [{"name": "fake: op vs reference", "passed": True, "detail": f"{device.type} {quick}"}],
            "rows": [{"op": "fake_op", "impl": "vfuse", "median_ms": 1.5, "GB/s": float("nan")}],
            "targets": [{"area": "tokens", "name": "fake speedup", "value": 2.0, "target": ">= 1.5", "met": True}]}
"""
BROKEN_AREA = """
def gpu_suite(device, quick):
    raise ValueError(f"no kernel for {device.type}")
"""


def test_quick_suite_writes_the_json_every_area_contributing_or_failed(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_area.py").write_text(FAKE_AREA)
    (tmp_path / "broken_area.py").write_text(BROKEN_AREA)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.setattr(gpu_suite, "AREAS", {**gpu_suite.AREAS, "fake": "fake_area", "broken": "broken_area"})
    out = tmp_path / "out"
    code = cli.main(["bench", "gpu", "--quick", "--no-tests", "--out", str(out)])
    device = "cuda" if torch.cuda.is_available() else "cpu"

    names = sorted(os.listdir(out))
    stem = names[0].rsplit(".", 1)[0]
    assert names == [f"{stem}.json", f"{stem}.log", f"{stem}.md"]
    assert stem.startswith("gpu-suite-cpu-" if device == "cpu" else "gpu-suite-") and stem.endswith("-quick")
    data = json.loads((out / f"{stem}.json").read_text())
    assert stem == f"gpu-suite-{device_slug(torch.device(device))}-{data['environment']['date']}-quick"
    assert list(data) == ["environment", "checks", "rows", "targets"]
    assert set(data["environment"]) == {"device", "torch", "triton", "date", "git_commit"}
    assert data["environment"]["torch"] == torch.__version__
    for c in data["checks"]:
        assert set(c) == {"name", "passed", "detail"} and isinstance(c["passed"], bool)
        assert isinstance(c["detail"], str) and isinstance(c["name"], str)
    for r in data["rows"]:
        assert {"suite", "op", "impl", "median_ms"} <= set(r)
    for t in data["targets"]:
        assert set(t) == {"area", "name", "value", "target", "met"} and t["area"] in ("merge", "tokens")
    assert code == int(not all(c["passed"] for c in data["checks"]))

    checks = {c["name"]: c for c in data["checks"]}
    for area in gpu_suite.AREAS:  # each one ran and contributed rows, or is a failed check saying why
        assert checks[f"{area}: gpu_suite"]["detail"]
        if checks[f"{area}: gpu_suite"]["passed"]:
            assert any(r["suite"] == area for r in data["rows"]), area
    assert checks["fake: gpu_suite"]["passed"] and checks["fake: op vs reference"]["detail"] == f"{device} True"
    assert checks["broken: gpu_suite"] == {"name": "broken: gpu_suite", "passed": False,
                                           "detail": f"ValueError: no kernel for {device} (exit code 1)"}
    fake_row = next(r for r in data["rows"] if r["op"] == "fake_op")
    assert fake_row["suite"] == "fake" and fake_row["GB/s"] is None  # NaN written as null
    assert {"area": "tokens", "name": "fake speedup", "value": 2.0, "target": ">= 1.5", "met": True} in data["targets"]

    ceilings = {r["op"]: r for r in data["rows"] if r["suite"] == "device"}
    assert ceilings["copy"]["GB/s"] > 0 and ceilings["gemm"]["TFLOP/s"] > 0
    parts = [r["impl"] for r in data["rows"] if r["suite"] == "gpu_suite"]
    assert parts == ["device", *gpu_suite.AREAS, "distributed"]
    distributed = checks[gpu_suite.DISTRIBUTED_CHECK]
    assert distributed["passed"], distributed["detail"]
    assert f"--device {device}" in distributed["detail"] and "byte-identical" in distributed["detail"]
    merges = [r for r in data["rows"] if r["suite"] == "distributed"]
    assert len(merges) == 2 and merges[0]["out_MB"] == merges[1]["out_MB"] > 0 and merges[1]["ranks"] >= 1

    md = (out / f"{stem}.md").read_text()
    met = sum(t["met"] for t in data["targets"])
    assert f"## Targets: {met} of {len(data['targets'])} met" in md
    assert "| tokens | fake speedup | 2 | >= 1.5 | yes |" in md
    assert "| broken: gpu_suite | ValueError: no kernel for" in md and "## Rows: distributed" in md
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert "FAILED broken: gpu_suite: ValueError" in "\n".join(printed) and printed[-1].startswith("wrote ")


def test_malformed_area_results_keep_the_well_formed_entries():
    result = {"checks": [{"name": "a", "passed": True, "detail": "ok"}, {"name": "b", "passed": "yes", "detail": ""}],
              "rows": [{"op": "x", "impl": "vfuse"}, {"op": "x", "impl": "vfuse", "median_ms": 2.0}],
              "targets": [{"area": "engine", "name": "t", "value": 1.0, "target": ">= 1", "met": True}]}
    checks, rows, targets, problems = gpu_suite._validated(result)
    assert checks == result["checks"][:1] and rows == result["rows"][1:] and targets == []
    assert problems == ["checks[1] has a non-bool 'passed'", "rows[0] lacks median_ms",
                        "targets[0] has area 'engine', not one of ('merge', 'tokens')"]
    assert gpu_suite._validated([1])[3] == ["gpu_suite returned a list, not a dict"]
    assert gpu_suite._validated({"rows": []})[3] == ["'checks' is not a list", "'targets' is not a list"]


def test_pytest_outcomes_become_checks(tmp_path):
    tests = tmp_path / "test_sample.py"
    tests.write_text("import pytest\n\ndef test_passes():\n    assert 1 + 1 == 2\n\n"
                     "def test_fails():\n    assert 1 + 1 == 3, 'arithmetic is broken'\n\n"
                     "@pytest.mark.skip(reason='not here')\ndef test_skipped():\n    pass\n")
    with open(tmp_path / "suite.log", "w") as log:
        result = gpu_suite._tests_part(120, log, workers=0, paths=[str(tests)])
    summary, failure = result["checks"]
    assert not summary["passed"] and "1 passed, 1 failed, 0 errors, 1 skipped" in summary["detail"]
    assert failure["name"].endswith("test_sample.py::test_fails") and not failure["passed"]
    assert "arithmetic is broken" in failure["detail"]
    (row,) = result["rows"]
    assert (row["passed"], row["failed"], row["skipped"]) == (1, 1, 1) and row["median_ms"] > 0
    assert "test_fails" in (tmp_path / "suite.log").read_text()


def test_the_gpu_tests_run_first_and_the_others_in_the_time_left(tmp_path, monkeypatch):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_sample.py").write_text(
        "def test_on_cuda():\n    pass\n\ndef test_plain():\n    assert False, 'plain fails'\n")
    monkeypatch.setattr(gpu_suite, "SOURCE", str(tmp_path))
    with open(tmp_path / "suite.log", "w") as log:
        result = gpu_suite._tests_part(120, log, workers=0)
        gpu, other, failure = result["checks"]
        assert gpu["name"] == "pytest: GPU tests pass" and gpu["passed"] and "1 passed" in gpu["detail"]
        assert other["name"] == "pytest: other tests pass" and not other["passed"] and "1 failed" in other["detail"]
        assert failure["name"].endswith("test_sample.py::test_plain") and "plain fails" in failure["detail"]
        assert [row["passed"] for row in result["rows"]] == [1, 0]
        monkeypatch.setattr(gpu_suite, "MIN_TEST_RUN_S", 10**6)  # no time left after the first run
        gpu, other = gpu_suite._tests_part(120, log, workers=0)["checks"]
    assert gpu["passed"] and not other["passed"] and other["detail"].startswith("not run:")


@pytest.mark.parametrize("parent_sigint", [signal.default_int_handler, signal.SIG_IGN], ids=["default", "ignored"])
def test_a_child_past_its_limit_is_interrupted_before_it_is_killed(tmp_path, monkeypatch, parent_sigint):
    """SIGINT INTERRUPT_GRACE_S before the limit (pytest writes its report), SIGKILL at the limit:
    a child never outlives its limit. Also where the suite ignores SIGINT (a shell's background
    job), which its children would inherit."""
    monkeypatch.setattr(gpu_suite, "INTERRUPT_GRACE_S", 2)
    reports = ("import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
               "    print('wrote the report', flush=True)\n    raise SystemExit(2)\n")
    deaf = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)\n"
    previous = signal.signal(signal.SIGINT, parent_sigint)
    try:
        with open(tmp_path / "suite.log", "w") as log:
            code, seconds, output = gpu_suite._spawn("sleeper", [sys.executable, "-c", reports], 4, log,
                                                     dict(os.environ))
            assert code is None and 2 <= seconds < 4 and "wrote the report" in output
            code, seconds, _ = gpu_suite._spawn("deaf sleeper", [sys.executable, "-c", deaf], 4, log, dict(os.environ))
            assert code is None and 4 <= seconds < 5
        assert signal.getsignal(signal.SIGINT) == parent_sigint
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_failed_child_is_reported_by_its_error_line():
    traceback = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: no kernel\n"
    torchrun = ("W1127 warning\nvfuse merge: error: rank 0 of 1 failed merging: OSError: disk full\n"
                "Traceback (most recent call last):\n  File \"run.py\", line 9\n"
                "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
                "=====================\nRoot Cause (first observed failure):\n  exitcode  : 1\n=====================\n")
    assert gpu_suite._why(1, 60, traceback + "\n") == "ValueError: no kernel (exit code 1)"
    assert gpu_suite._why(1, 60, torchrun) == ("vfuse merge: error: rank 0 of 1 failed merging: OSError: disk full "
                                               "(exit code 1)")
    assert gpu_suite._why(-11, 60, "loading\nstill loading\n") == "still loading (exit code -11)"
    assert gpu_suite._why(None, 60, traceback) == "killed after 60 s (its share of the suite's time budget)"


NCU_RAW = (  # ncu --page raw --csv: metric names, their units, a row per launch (values as ncu prints them)
    '"ID","Process ID","Kernel Name","Block Size","gpu__time_duration.sum",'
    '"dram__throughput.avg.pct_of_peak_sustained_elapsed","launch__registers_per_thread",'
    '"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",'
    '"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",'
    '"smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"\n'
    '"","","","","usecond","%","register/thread","inst","inst","inst"\n'
    '"0","81","_bracket_kernel","(128, 1, 1)","844.32","45.80","72","12.5","3.25","0.5"\n'
    '"1","81","_merge_kernel","(128, 1, 1)","1,083.5","75.1","32","8","n/a","1.5"\n')


def test_ncu_rows_read_the_raw_page(monkeypatch):
    monkeypatch.setattr(gpu_suite, "NCU_STALLS_KEPT", 2)
    bracket, merge = gpu_suite.ncu_rows("==PROF== Disconnected\n" + NCU_RAW)
    assert bracket.pop("median_ms") == pytest.approx(0.84432) and merge.pop("median_ms") == pytest.approx(1.0835)
    assert bracket == {"suite": "ncu", "op": "ncu", "impl": "_bracket_kernel",
                       "dram_pct_of_peak": 45.8, "registers": 72.0, "stall 1": "long_scoreboard 12.50",
                       "stall 2": "barrier 3.25"}
    assert merge["stall 1"] == "long_scoreboard 8.00"
    assert merge["stall 2"] == "wait 1.50"  # "n/a" is no value
    assert gpu_suite.ncu_rows("no report\n") == []


def test_the_ncu_part_fails_its_check_without_ncu(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with open(tmp_path / "suite.log", "w") as log:
        result = gpu_suite._ncu_part(60, log, str(tmp_path / "suite"))
    assert result["checks"] == [{"name": "ncu: merge kernels profiled", "passed": False,
                                 "detail": "ncu is not on PATH"}] and not result["rows"]
