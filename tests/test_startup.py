"""Start-up: `vfuse --help` loads no torch, and a merge loads neither transformers nor triton
(checked on the modules a real process imported, not on timings)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from checkpoints import family, llama, load_tensors, write_yaml



def imported_after(args: list[str], *modules: str) -> dict[str, bool]:
    """Which of ``modules`` a fresh `vfuse ARGS` process had imported when it finished."""
    code = (f"import json, sys\nfrom vfuse_kernels.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n"
            f"    pass\nprint(json.dumps({{m: m in sys.modules for m in {modules!r}}}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_imports_no_torch():
    assert imported_after(["--help"], "torch") == {"torch": False}
    assert imported_after(["merge", "--help"], "torch") == {"torch": False}


def test_merge_imports_what_its_method_needs(tmp_path):
    """Task arithmetic, TIES (its selection included) and Model Stock on the CPU run the C++
    passes on the files' pages: no torch; DELLA ranks through torch ops: torch, but neither
    transformers nor triton — and each writes the bytes of a run in this process (torch loaded)."""
    from vfuse_kernels.merging import merge_checkpoints

    base, tuned = family(str(tmp_path), llama, n=2)
    models = {"task_arithmetic": "weight: 0.5", "ties": "weight: 0.5, density: 0.5", "model_stock": None,
              "della": "weight: 0.5, density: 0.5"}
    for method, params in models.items():
        listed = "".join(f"  - {{model: {t}" + (f", parameters: {{{params}}}" if params else "") + "}\n" for t in tuned)
        config = write_yaml(str(tmp_path / f"{method}.yml"), f"merge_method: {method}\nbase_model: {base}\n"
                                                             f"models:\n{listed}")
        out = str(tmp_path / f"out-{method}")
        found = imported_after(["merge", config, out, "--quiet"], "torch", "transformers", "triton")
        assert found == {"torch": method == "della", "transformers": False, "triton": False}
        merge_checkpoints(config, out + "-here", progress=False)
        assert load_tensors(out).keys() == load_tensors(out + "-here").keys()
        assert all(torch.equal(v, load_tensors(out + "-here")[k]) for k, v in load_tensors(out).items())


def test_load_torch_freezes_what_it_loaded():
    """Torch, imported for a merge that needs it (as the console script sets it up), is frozen
    for the collector (not walked by it)."""
    code = ("import gc\nfrom vfuse_kernels.merging import engine\nengine.FREEZE_TORCH = True\nengine.load_torch()\n"
            "print(gc.isenabled(), gc.get_freeze_count() > 10_000)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "True True", proc.stderr


def _console(args: list[str]) -> subprocess.CompletedProcess:
    """`vfuse ARGS` through the console entry point, with an atexit handler that reports the
    interpreter's normal teardown."""
    code = (f"import atexit, gc, sys\natexit.register(lambda: print('teardown', gc.isenabled(), "
            f"gc.get_freeze_count() > 10_000, flush=True))\n"
            f"sys.argv = ['vfuse', *{args!r}]\nfrom vfuse_kernels.cli import run\nrun()")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_a_finished_merge_exits_without_the_teardown_and_other_exits_keep_it(tmp_path):
    """The console entry point: a finished merge flushes its line and skips the interpreter's
    teardown; a refused one exits normally."""
    base, tuned = family(str(tmp_path), llama, n=1)
    config = write_yaml(str(tmp_path / "c.yml"), f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                                                 f"  - {{model: {tuned[0]}, parameters: {{weight: 0.5}}}}\n")
    done = _console(["merge", config, str(tmp_path / "out")])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("merged ") and "teardown" not in done.stdout  # flushed, then os._exit
    assert "config.json" in os.listdir(tmp_path / "out")
    again = _console(["merge", config, str(tmp_path / "out")])  # refused: OUT holds a finished merge
    assert again.returncode == 2 and again.stdout.strip().startswith("teardown True")
