"""``vfuse merge`` under faults, as a user meets them, in real subprocesses: a second writer
into the same OUT, a full disk, a signal mid-merge. Each asserts the one-line message and
the exit code, that nothing looks complete, and that ``--resume`` then writes the bytes of
an undisturbed run."""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest
from checkpoints import family, folder_bytes, llama, write_yaml

from vfuse_kernels.merging import merge_checkpoints

INDEX = "model.safetensors.index.json"
SHARD = "20KB"
# A `vfuse merge` that, once RELEASE is set, stops before merging its 20th tensor (of 30, in 6
# shards) until the file RELEASE exists, so a test can act mid-merge.
HELD_CLI = """
import os, sys, time
from vfuse_kernels import cli
from vfuse_kernels.merging import engine
original, calls = engine._Runner.compute, []
def held(self, task, loaded, offset):
    calls.append(task.name)
    while len(calls) == 20 and not os.path.exists(os.environ["RELEASE"]):
        time.sleep(0.01)
    return original(self, task, loaded, offset)
engine._Runner.compute = held
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    base, tuned = family(str(root), llama, n=2)
    config = write_yaml(str(root / "c.yml"), f"merge_method: ties\nbase_model: {base}\nmodels:\n"
                                             f"  - {{model: {tuned[0]}, parameters: {{weight: 0.6, density: 0.5}}}}\n"
                                             f"  - {{model: {tuned[1]}, parameters: {{weight: 0.4, density: 0.7}}}}\n")
    reference = str(root / "reference")
    merge_checkpoints(config, reference, out_shard_size=SHARD, progress=False)
    return config, reference


def vfuse(*args, release: str | None = None) -> subprocess.Popen:
    """A real `vfuse merge` process; with ``release``, held mid-merge until that file exists."""
    code = ["-c", HELD_CLI] if release is not None else ["-m", "vfuse_kernels.cli"]
    return subprocess.Popen([sys.executable, *code, "merge", *args, "--out-shard-size", SHARD, "--quiet"],
                            env=dict(os.environ, RELEASE=str(release)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_shards(out: str, proc: subprocess.Popen) -> None:
    """Returns once ``proc`` recorded a finished shard in OUT's state file."""
    state = os.path.join(out, ".vfuse-merge-state.json")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with open(state) as f:
                if json.load(f)["shards"]:
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"no finished shard in {out}: exit {proc.poll()}")


def assert_incomplete_then_resumes(out: str, reference: str, config: str) -> None:
    """Nothing in OUT looks complete (no index, no temporary); --resume keeps some shards
    and then OUT holds exactly the undisturbed run's bytes."""
    assert not os.path.exists(os.path.join(out, INDEX))
    assert not any(n.endswith(".tmp") for n in os.listdir(out))
    kept = [n for n in os.listdir(out) if n.endswith(".safetensors")]
    assert kept
    proc = vfuse(config, out, "--resume")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "kept from the previous run" in stdout
    assert folder_bytes(out) == folder_bytes(reference)


def test_second_writer_fails_at_once_naming_the_first(setup, tmp_path):
    config, reference = setup
    out = str(tmp_path / "out")
    release = tmp_path / "release"
    first = vfuse(config, out, release=release)
    wait_for_shards(out, first)
    second = vfuse(config, out)
    _, stderr = second.communicate(timeout=120)
    release.touch()
    assert second.returncode == 2
    assert stderr.splitlines() == [f"vfuse merge: error: {out} is being merged into by pid {first.pid} on "
                                   f"{socket.gethostname()} (lock {out}/.vfuse-merge.lock)"]
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert folder_bytes(out) == folder_bytes(reference)  # the first is unaffected; no lock file left


def test_lock_of_a_dead_process_is_taken_over(setup, tmp_path):
    config, reference = setup
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".vfuse-merge.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout)}))
    proc = vfuse(config, str(out))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0
    assert f"note: took over the lock of pid {int(gone.stdout)} on {socket.gethostname()}" in stderr
    assert folder_bytes(str(out)) == folder_bytes(reference)


@pytest.fixture
def small_disk(tmp_path):
    """mount_at(KiB): a real tmpfs of that size (a disk that fills); needs root and mount."""
    mounted = []

    def mount_at(kib: int) -> str:
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
        mounted.append(path)
        return str(path)

    yield mount_at
    for path in mounted:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def test_too_small_disk_is_refused_before_writing(setup, small_disk):
    config, reference = setup
    out = os.path.join(small_disk(64), "out")
    proc = vfuse(config, out)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert re.fullmatch(rf"vfuse merge: error: {out}: the merge needs 0.11 MB there, 0.0[5-7] MB free\n", stderr)
    assert os.listdir(out) == []


def test_disk_filling_up_mid_merge(setup, small_disk, tmp_path):
    config, reference = setup
    disk = small_disk(256)
    out, release = os.path.join(disk, "out"), tmp_path / "release"
    proc = vfuse(config, out, release=release)
    wait_for_shards(out, proc)
    with open(os.path.join(disk, "filler"), "wb", buffering=0) as f:  # another program takes the rest of the disk
        with pytest.raises(OSError, match="No space left"):
            while True:
                f.write(b"\0" * 4096)
    release.touch()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert re.fullmatch(rf"vfuse merge: error: {out}/\S+: No space left on device: [1-5] of 6 shards finished; "
                        r"rerun with --resume\n", stderr), stderr
    os.remove(os.path.join(disk, "filler"))
    assert_incomplete_then_resumes(out, reference, config)


def test_file_size_limit_mid_merge(setup, tmp_path):
    """EFBIG from RLIMIT_FSIZE: the write-fault path without root, at a known shard."""
    config, reference = setup
    out = str(tmp_path / "out")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (19000, 19000))  # noqa: E731 - shard 2 is 20480 bytes
    proc = subprocess.run([sys.executable, "-m", "vfuse_kernels.cli", "merge", config, out, "--out-shard-size", SHARD,
                           "--quiet"], capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"vfuse merge: error: {out}/model-00002-of-00006.safetensors: File too large: "
                                        "1 of 6 shards finished; rerun with --resume"]
    assert_incomplete_then_resumes(out, reference, config)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_merge(setup, tmp_path, signum, code):
    config, reference = setup
    out = str(tmp_path / "out")
    proc = vfuse(config, out, release=tmp_path / "never")
    wait_for_shards(out, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code
    assert re.fullmatch(r"vfuse merge: interrupted: [1-5] of 6 shards finished; rerun with --resume\n", stderr), stderr
    assert_incomplete_then_resumes(out, reference, config)
