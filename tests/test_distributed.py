"""The distributed merge on localhost gloo ranks: byte-identical output to the single-process
merge (launched by torchrun, through both entry points), balanced deterministic shard
assignment, and jobs where one rank raises, dies, hangs or writes elsewhere failing on every
rank without publishing an index (then resuming from the shards that were finished)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
from checkpoints import family, llama, write_yaml

import vfuse_kernels
from vfuse_kernels.cli import main as cli_main
from vfuse_kernels.merging import merge_checkpoints
from vfuse_kernels.merging.distributed import assign_shards

INDEX = "model.safetensors.index.json"
SHARD = "6KB"  # 10-14 shards of the tiny llama: several per rank

CONFIGS = {
    "ties": """
        merge_method: ties
        base_model: BASE
        models:
          - {model: FT0, parameters: {weight: [0.2, 0.8], density: 0.5}}
          - {model: FT1, parameters: {weight: 0.6, density: [0.3, 0.9]}}
        parameters: {normalize: true}
        dtype: float32
    """,
    "task_arithmetic": """
        merge_method: task_arithmetic
        base_model: BASE
        models:
          - {model: FT0, parameters: {weight: [{filter: self_attn, value: [0.2, 1.0]}, {value: 0.5}]}}
          - {model: FT1, parameters: {weight: -0.2}}
        parameters: {lambda: 0.9}
        vfuse: {keep: [{filter: embed_tokens}]}
    """,
    "dare_ties": """
        merge_method: dare_ties
        base_model: BASE
        models:
          - {model: FT0, parameters: {weight: 0.6, density: 0.5}}
          - {model: FT1, parameters: {weight: 0.4, density: 0.7}}
        out_dtype: bfloat16
        vfuse: {seed: 3}
    """,
}

# Read only by this wrapper: VFUSE_TEST_FAIL="<rank>:raise|kill|hang" breaks that rank's merge.
WRAPPER = """
import os, signal, sys, time
from vfuse_kernels.merging import distributed, engine
rank, how = os.environ.get("VFUSE_TEST_FAIL", ":").split(":")
if rank == os.environ["RANK"]:
    original, calls = engine._Runner.compute, []
    def broken(self, task, loaded, offset):
        calls.append(task.name)
        if len(calls) == 3:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "hang":
                time.sleep(600)
            raise RuntimeError("disk on fire")
        return original(self, task, loaded, offset)
    engine._Runner.compute = broken
sys.exit(distributed.main())
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    base, tuned = family(str(root), llama, n=2)
    configs = {}
    for name, text in CONFIGS.items():
        text = text.replace("BASE", base).replace("FT0", tuned[0]).replace("FT1", tuned[1])
        configs[name] = write_yaml(str(root / f"{name}.yml"), textwrap.dedent(text))
    wrapper = root / "wrapper.py"
    wrapper.write_text(WRAPPER)
    return configs, str(wrapper)


def _env(extra: dict | None = None) -> dict:
    """The environment for a rank: this process's, with the folder this ``vfuse_kernels`` was
    imported from first on PYTHONPATH — a rank started from a script (the wrapper) has only the
    script's folder on sys.path, so without it an uninstalled source checkout is not found."""
    source = os.path.dirname(os.path.dirname(vfuse_kernels.__file__))
    path = os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **(extra or {}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, *command: str, env: dict | None = None) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    return subprocess.Popen([*launcher, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(env))


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


def _ranks(args_of_rank: list[list[str]], env: dict | None = None) -> list[subprocess.Popen]:
    """One process per rank, started by hand: no torchrun agent tears the job down, so the
    ranks themselves must notice a lost peer."""
    common = _env(dict(WORLD_SIZE=str(len(args_of_rank)), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                       **(env or {})))
    return [subprocess.Popen([sys.executable, *args], env=dict(common, RANK=str(r), LOCAL_RANK=str(r)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for r, args in enumerate(args_of_rank)]


def _rank_0(procs: list[subprocess.Popen]) -> tuple[int, str]:
    """Rank 0's exit code and stderr; the other ranks are then killed if still running."""
    _, err = procs[0].communicate(timeout=120)
    for p in procs[1:]:
        if p.poll() is None:
            p.kill()
        p.communicate()
    return procs[0].returncode, err


def _same_files(expected: str, got: str) -> None:
    assert sorted(os.listdir(got)) == sorted(os.listdir(expected))
    for name in os.listdir(expected):
        with open(os.path.join(expected, name), "rb") as a, open(os.path.join(got, name), "rb") as b:
            assert a.read() == b.read(), name


def test_assign_shards_balances_bytes_deterministically():
    sizes = {"a": 50, "b": 40, "c": 30, "d": 30, "e": 20, "f": 10}
    assert assign_shards(sizes, 2) == [["a", "d", "f"], ["b", "c", "e"]]  # 90 / 90
    assert assign_shards(sizes, 3) == [["a", "f"], ["b", "e"], ["c", "d"]]
    assert assign_shards({"x": 7, "y": 7}, 3) == [["x"], ["y"], []]  # ties: the lower rank, then the name
    assert assign_shards(dict(reversed(sizes.items())), 2) == assign_shards(sizes, 2)


def test_output_is_byte_identical_to_single_process(models, tmp_path):
    configs, _ = models
    runs = {"ties": (2, ["-m", "vfuse_kernels.merging.distributed"]),
            "task_arithmetic": (2, ["-m", "vfuse_kernels.cli", "merge", "--distributed"]),
            "dare_ties": (3, ["-m", "vfuse_kernels.merging.distributed"])}
    jobs = {method: _torchrun(nproc, *entry, configs[method], str(tmp_path / method), "--out-shard-size", SHARD,
                              "--quiet")
            for method, (nproc, entry) in runs.items()}  # concurrently: start-up dominates
    for method, (nproc, _) in runs.items():
        single = str(tmp_path / f"{method}-single")
        summary = merge_checkpoints(configs[method], single, out_shard_size=SHARD, progress=False)
        assert summary.shards >= 3 * nproc
        code, out, err = _finish(jobs[method])
        assert code == 0, (method, err[-3000:])
        assert f"into {summary.shards} shards" in out and f"[{nproc} ranks" in out, out
        _same_files(single, str(tmp_path / method))


def test_failed_rank_fails_the_job_unpublished_then_resumes(models, tmp_path):
    configs, wrapper = models
    out, single = str(tmp_path / "out"), str(tmp_path / "single")
    options = [configs["ties"], out, "--out-shard-size", SHARD, "--quiet"]
    code, _, err = _finish(_torchrun(2, wrapper, *options, env={"VFUSE_TEST_FAIL": "1:raise"}))
    assert code != 0
    assert "rank 1 of 2 failed merging: RuntimeError: disk on fire" in err, err[-3000:]
    assert INDEX not in os.listdir(out)
    assert any(f.endswith(".safetensors") for f in os.listdir(out))  # rank 0 finished its shards
    resumed = _torchrun(3, "-m", "vfuse_kernels.merging.distributed", *options, "--resume")  # any world size
    merge_checkpoints(configs["ties"], single, out_shard_size=SHARD, progress=False)
    code, stdout, err = _finish(resumed)
    assert code == 0, err[-3000:]
    assert "kept from the previous run" in stdout
    _same_files(single, out)


def test_dead_hung_or_unshared_rank_stops_rank_0_from_publishing(models, tmp_path):
    """Rank 1 SIGKILLed mid-merge, hung past --timeout, or writing into another folder."""
    configs, wrapper = models

    def args(out):
        return [wrapper, configs["dare_ties"], str(tmp_path / out), "--out-shard-size", SHARD, "--quiet",
                "--timeout", "8"]  # also bounds the start-up rendezvous: not too short on a busy machine
    os.makedirs(tmp_path / "elsewhere")
    jobs = {"kill": _ranks([args("kill"), args("kill")], {"VFUSE_TEST_FAIL": "1:kill"}),
            "hang": _ranks([args("hang"), args("hang")], {"VFUSE_TEST_FAIL": "1:hang"}),
            "unshared": _ranks([args("unshared"), args("elsewhere")])}
    expected = {"kill": "lost contact with the other ranks after merging",
                "hang": "Timed out waiting 8000ms",  # gloo's words for the --timeout
                "unshared": "OUT must be on a filesystem every node shares"}
    for case, procs in jobs.items():
        code, err = _rank_0(procs)
        assert code == 1 and expected[case] in err, (case, err[-3000:])
        assert INDEX not in os.listdir(tmp_path / case)
    assert not any(f.endswith(".safetensors") for f in os.listdir(tmp_path / "elsewhere"))


def test_distributed_flag_outside_torchrun_is_an_error(models, tmp_path, monkeypatch, capsys):
    configs, _ = models
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert cli_main(["merge", configs["ties"], str(tmp_path / "out"), "--distributed", "--quiet"]) == 2
    assert "not launched by torchrun" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(SystemExit, match="--timeout needs --distributed"):
        cli_main(["merge", configs["ties"], str(tmp_path / "out"), "--timeout", "5"])
