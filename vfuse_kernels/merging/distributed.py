"""Distributed checkpoint merge: ``torchrun`` ranks split the output shards between them;
the output is byte-identical to a single-process ``vfuse merge``.

    torchrun --nproc-per-node N -m vfuse_kernels.merging.distributed CONFIG OUT [vfuse merge options]

Every rank builds the same plan and shard layout (``plan_shards`` with the same
``--out-shard-size``) and takes whole shards, balanced by bytes (``assign_shards``), then
runs the engine's pipeline on its shards only, writing them into OUT, which must be one
folder that every rank sees (a shared filesystem; checked before any work). Each step ends
with every rank's outcome exchanged over gloo: a failure anywhere fails every rank with a
message naming the rank and its error. Rank 0 copies the config files and writes the index
only once every rank has written its shards, so a failed job never looks complete; a rank
that dies breaks the exchange (or leaves it unanswered past ``timeout``), which fails the
others before the index too. ``--resume`` keeps the shards a failed run (distributed or
not) finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .checkpoint import parse_size, plan_shards
from .config import MergeConfig, load_config
from .engine import MergeSummary, _finish_out_dir, _prepare_out_dir, _run, _write_state, rank_state_name
from .lock import OutLock
from .plan import build_plan

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT = 1800.0  # seconds a rank waits for the others at each exchange
VISIBILITY_WAIT = 60.0  # at most (and at most half the timeout): NFS may show another node's new files late


class DistributedMergeError(RuntimeError):
    """A distributed merge failed; the message names the failed rank(s) and their errors.
    ``failed`` lists those ranks (empty when a rank was lost: died or did not answer)."""

    def __init__(self, message: str, failed: list[int]):
        super().__init__(message)
        self.failed = failed


@dataclass
class DistributedSummary(MergeSummary):
    ranks: int = 1

    def line(self) -> str:
        return super().line() + f" [{self.ranks} ranks; peak RSS of the largest rank]"


def assign_shards(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """Whole shards (file name → bytes) to ranks, balanced by bytes: largest first, each to
    the least-loaded rank (ties: the lower rank, then the file name). Deterministic, so
    every rank computes the same assignment; each rank's shards come back in name order."""
    loads = [0] * world_size
    owned: list[list[str]] = [[] for _ in range(world_size)]
    for name, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owned[rank].append(name)
        loads[rank] += size
    return [sorted(names) for names in owned]


class _Step:
    """One step of the job on this rank: ``with _Step("merging") as step:`` runs the body,
    then every rank's outcome (``step.value`` or the error) is exchanged; ``step.values``
    holds all ranks' values, and any failure raises DistributedMergeError on every rank."""

    def __init__(self, what: str, timeout: float | None):
        self.what = what
        self.timeout = timeout
        self.value = None
        self.values: list = []

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is not None and not isinstance(error, Exception):
            return False  # KeyboardInterrupt, SystemExit: this rank ends; the others lose it
        rank, world = dist.get_rank(), dist.get_world_size()
        if error is not None and not isinstance(error, (ValueError, OSError)):  # unexpected: show where
            print(f"rank {rank}: {self.what} failed:", file=sys.stderr)
            traceback.print_exception(error)
        outcome = (False, f"{type(error).__name__}: {error}") if error is not None else (True, self.value)
        outcomes: list = [None] * world
        try:
            dist.all_gather_object(outcomes, outcome)
        except Exception as exc:  # a peer's connection closed, or the exchange timed out
            waited = f"within {self.timeout:g} s" if self.timeout else "in time"
            raise DistributedMergeError(
                f"rank {rank}: lost contact with the other ranks after {self.what} (a rank died or did not "
                f"answer {waited}): {type(exc).__name__}: {exc}", []) from (error or exc)
        failed = [r for r, (ok, _) in enumerate(outcomes) if not ok]
        if failed:
            raise DistributedMergeError("; ".join(f"rank {r} of {world} failed {self.what}: {outcomes[r][1]}"
                                                  for r in failed), failed) from error
        self.values = [value for _, value in outcomes]
        return False


def _await_files(out_dir: str, expected: dict[str, int | None], seconds: float) -> list[str]:
    """The files (name → size; None: any) still not in ``out_dir`` after waiting up to
    ``seconds`` for them (a shared filesystem may show another node's new files late)."""
    def present(name: str, size: int | None) -> bool:
        path = os.path.join(out_dir, name)
        return os.path.exists(path) and (size is None or os.path.getsize(path) == size)

    deadline = time.monotonic() + seconds
    while True:
        missing = [name for name, size in expected.items() if not present(name, size)]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.2)


def _plan_digest(plan, layouts) -> str:
    """What every rank must agree on: the output layout and every task's parameters."""
    tasks = [(t.name, t.copy_from, t.base, t.inputs, t.weights, t.densities, t.seed) for t in plan.tasks]
    blob = json.dumps([plan.method, plan.normalize, plan.scale, plan.rescale, tasks], default=str).encode()
    return hashlib.sha256(blob + b"".join(layout.header for layout in layouts)).hexdigest()


def _device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda":
        return device
    rank, local = os.environ.get("RANK", "?"), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.cuda.is_available():
        raise ValueError(f"rank {rank}: device='cuda' but CUDA is not available")
    if local >= torch.cuda.device_count():
        raise ValueError(f"rank {rank}: LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPUs")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def merge_distributed(
    config: MergeConfig | str,
    out_dir: str,
    *,
    device: str | torch.device = "cpu",
    out_shard_size: str | int = "5GB",
    resume: bool = False,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> DistributedSummary | None:
    """``merge_checkpoints`` split across the ranks of a torchrun job (or of a process group
    the caller initialized); ``device='cuda'`` uses cuda:LOCAL_RANK. ``timeout``: seconds a
    rank waits for the others at each exchange (when this call starts the process group),
    so it must exceed the spread of the ranks' finishing times. Returns the job's summary on
    rank 0, None on the others."""
    start = time.perf_counter()
    device = _device(device)
    own_group = not dist.is_initialized()
    if own_group:
        missing = [v for v in TORCHRUN_VARS if v not in os.environ]
        if missing:
            raise ValueError(f"not launched by torchrun ({', '.join(missing)} unset): run "
                             "`torchrun --nproc-per-node N -m vfuse_kernels.merging.distributed CONFIG OUT`")
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"  # status exchanges go over gloo
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    try:
        return _merge(config, out_dir, device, out_shard_size, resume, progress, timeout if own_group else None,
                      start)
    finally:
        if own_group:
            dist.destroy_process_group()


def _merge(config, out_dir, device, out_shard_size, resume, progress, timeout, start) -> DistributedSummary | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    wait = min(VISIBILITY_WAIT, (timeout or DEFAULT_TIMEOUT) / 2)
    plan = None
    held = ExitStack()  # rank 0: the lock on out_dir, until the job ends
    try:
        with _Step("planning", timeout) as step:
            plan = build_plan(load_config(config) if isinstance(config, str) else config)
            layouts = plan_shards([(t.name, t.out_dtype, t.shape) for t in plan.tasks], parse_size(out_shard_size))
            step.value = _plan_digest(plan, layouts)
        differ = [r for r, digest in enumerate(step.values) if digest != step.values[0]]
        if differ:
            raise DistributedMergeError(f"ranks {differ} planned a different merge than rank 0: the config and the "
                                        "input checkpoints must be the same on every node", differ)
        with _Step(f"preparing {out_dir}", timeout) as step:
            if rank == 0:  # rank 0's fingerprint (its inputs' mtimes) keys the state files of every rank
                held.enter_context(OutLock(out_dir))
                fingerprint = plan.fingerprint()
                step.value = fingerprint, _prepare_out_dir(out_dir, plan, layouts, fingerprint, resume)
        fingerprint, done = step.values[0]
        with _Step(f"writing its state file into {out_dir}", timeout):
            if not os.path.isdir(out_dir):
                raise FileNotFoundError(f"{out_dir} does not exist on this node: OUT must be on a filesystem every "
                                        "node shares")
            _write_state(out_dir, fingerprint, done, rank_state_name(rank))
        with _Step(f"checking that every rank writes into the same {out_dir}", timeout):
            if rank == 0:
                unseen = _await_files(out_dir, {rank_state_name(r): None for r in range(world)}, wait)
                if unseen:
                    raise FileNotFoundError(f"{out_dir} lacks the files {unseen} that other ranks wrote into it: "
                                            "OUT must be on a filesystem every node shares")
        sizes = {layout.filename: layout.size for layout in layouts if layout.filename not in done}
        mine = assign_shards(sizes, world)[rank]
        with _Step("merging", timeout) as step:
            step.value = _run(plan, layouts, fingerprint, done, out_dir, device, progress and rank == 0, start,
                              shards=set(mine), state_name=rank_state_name(rank))
        summaries = step.values
        with _Step(f"publishing {out_dir}", timeout):
            if rank == 0:
                _await_files(out_dir, {layout.filename: layout.size for layout in layouts}, wait)
                _finish_out_dir(plan, out_dir, layouts)  # fails, naming the shard, if one is still missing
    finally:
        held.close()
        if plan is not None:
            plan.close()
    if rank != 0:
        return None
    skipped = sum(len(layout.names) for layout in layouts if layout.filename in done)
    return DistributedSummary(out_dir, sum(s.merged for s in summaries), sum(s.copied for s in summaries), skipped,
                              len(layouts), sum(s.bytes_written for s in summaries), time.perf_counter() - start,
                              max(s.peak_rss_bytes for s in summaries), world)


def main(argv=None) -> int:
    """``vfuse merge --distributed`` with these arguments."""
    from ..cli import main as cli_main

    return cli_main(["merge", "--distributed", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
