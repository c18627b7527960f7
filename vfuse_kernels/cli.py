"""The ``vfuse`` command line.

    vfuse merge CONFIG.yml OUT_DIR [--device cpu|cuda] [--threads N] [--out-shard-size SIZE] [--resume]
                [--distributed [--timeout SECONDS]]   # under torchrun: the ranks split the shards
    vfuse sweep SWEEP.yml --out DIR [--device cpu|cuda] [--resume] [--save-best CKPT_DIR]
    vfuse demo [--device cpu|cuda] [--keep RATIO]
    vfuse bench [merge|tokens|scores|all] [--quick] [--device cpu|cuda] [--json PATH]
    vfuse bench gpu [--quick] [--device cpu|cuda] [--out DIR] [--no-tests] [--skip PART ...] [--budget SECONDS]
                    [--workers N]   # the one-call GPU suite: checks, timings, targets, tests -> DIR/gpu-suite-*
    vfuse profile-sequence [--device cpu|cuda] [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import os
import signal
import sys


def _interrupt(signum, frame) -> None:
    """SIGINT/SIGTERM: stop the merge where it is (once; the cleanup is not interrupted)."""
    from .merging.engine import Interrupted

    for other in (signal.SIGINT, signal.SIGTERM):
        signal.signal(other, signal.SIG_IGN)
    raise Interrupted(signum)


def _set_threads(threads: int) -> None:
    """The C++ kernels' thread count, and torch's (now if it is loaded, else when it loads: the
    CPU merge imports torch only for methods that need it)."""
    from ._extension import cpu_extension

    ext = cpu_extension()
    if ext is not None:
        ext.set_num_threads(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)


def _merge(args) -> int:
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run_merge(args)
    except KeyboardInterrupt as exc:  # before the merge started writing
        print("vfuse merge: interrupted", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_merge(args) -> int:
    from .merging import CheckpointError, ConfigError, merge_checkpoints
    from .merging.engine import MergeStopped, describe_error

    if args.timeout is not None and (not args.distributed or args.timeout <= 0):
        raise SystemExit("vfuse merge: --timeout needs --distributed and a positive number of seconds")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("vfuse merge: --threads must be at least 1")
        _set_threads(args.threads)
    options = dict(device=args.device, out_shard_size=args.out_shard_size, resume=args.resume, progress=not args.quiet)
    try:
        if args.distributed:
            from .merging.distributed import DEFAULT_TIMEOUT, DistributedMergeError, merge_distributed

            try:
                summary = merge_distributed(args.config, args.out_dir, timeout=args.timeout or DEFAULT_TIMEOUT,
                                            **options)
            except DistributedMergeError as exc:
                rank = int(os.environ.get("RANK", "0"))
                if rank == 0 or rank in exc.failed or not exc.failed:  # one report per failure, not per rank
                    print(f"vfuse merge: error: {exc}", file=sys.stderr)
                return 1
        else:
            summary = merge_checkpoints(args.config, args.out_dir, **options)
    except MergeStopped as exc:  # part-way: the finished shards are kept for --resume
        print(f"vfuse merge: {'' if exc.signum else 'error: '}{exc}", file=sys.stderr)
        return 128 + exc.signum if exc.signum else 1
    except (ConfigError, CheckpointError, ValueError, OSError) as exc:  # before any shard was written
        print(f"vfuse merge: error: {describe_error(exc)}", file=sys.stderr)
        return 2
    if summary is not None:  # a distributed merge reports on rank 0
        print(summary.line())
    return 0


def _sweep(args) -> int:
    from .merging import CheckpointError, ConfigError
    from .merging.sweep import run_sweep

    try:
        rows = run_sweep(args.sweep, args.out, device=args.device, resume=args.resume, save_best=args.save_best,
                         progress=not args.quiet)
    except (ConfigError, CheckpointError, FileExistsError, ValueError) as exc:
        print(f"vfuse sweep: error: {exc}", file=sys.stderr)
        return 2
    failed = sum(1 for row in rows if row.get("error"))
    print(f"{len(rows)} configurations evaluated ({failed} with a metric error) -> {args.out}/results.csv"
          + (", best.yml" if os.path.exists(os.path.join(args.out, "best.yml")) else ""))
    return 0


def _demo(args) -> int:
    from .pipeline.demo import run_demo

    keep = None if args.keep <= 0 or args.keep >= 1 else args.keep
    result = run_demo(device=args.device, cache_dir=args.cache_dir, keep=keep, max_new_tokens=args.max_new_tokens)
    return 0 if result["parity"] else 1


def _bench(args) -> int:
    gpu_only = [flag for flag, value in (("--out", args.out), ("--no-tests", args.no_tests), ("--skip", args.skip),
                                         ("--budget", args.budget), ("--workers", args.workers))
                if value is not None and value is not False]
    if args.suite == "gpu":
        if args.json:
            raise SystemExit("vfuse bench gpu: the suite writes its JSON into --out DIR, not --json")
        from .bench.gpu_suite import run as run_gpu_suite

        return run_gpu_suite(args, "vfuse bench gpu")
    if gpu_only:
        raise SystemExit(f"vfuse bench {args.suite}: {', '.join(gpu_only)}: options of `vfuse bench gpu` only")
    from .bench import run

    suites = ["merge", "tokens", "scores"] if args.suite == "all" else [args.suite]
    run(suites, device=args.device or "cpu", quick=args.quick, json_path=args.json)
    return 0


def _profile_sequence(args) -> int:
    from .profile import profile_sequence

    try:
        profile_sequence(args.out, device=args.device, quick=args.quick, cache_dir=args.cache_dir)
    except ImportError as exc:
        print(f"vfuse profile-sequence: error: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vfuse", description="Fused kernels for training-free MLLM fusion")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="merge checkpoints from a mergekit-style YAML config",
                                description="Merge safetensors checkpoints as a mergekit YAML config says "
                                            "(every mergekit 0.1.5 method, models: or slices:), streaming "
                                            "tensor by tensor.")
    merge.add_argument("config", help="YAML merge config (mergekit syntax + the vfuse: extension)")
    merge.add_argument("out_dir", help="output folder (sharded safetensors + index + config.json)")
    merge.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the arithmetic runs")
    merge.add_argument("--threads", type=int, help="CPU threads for the kernels (default: all cores)")
    merge.add_argument("--out-shard-size", default="5GB", help="maximum bytes per output shard (e.g. 5GB, 500MiB)")
    merge.add_argument("--resume", action="store_true", help="keep the shards a killed run already finished")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.add_argument("--distributed", action="store_true",
                       help="launched by torchrun: the ranks split the output shards (OUT on a shared filesystem)")
    merge.add_argument("--timeout", type=float, metavar="SECONDS",
                       help="--distributed: how long a rank waits for the others at each step (default 1800)")
    merge.set_defaults(run=_merge)
    sweep = commands.add_parser("sweep", help="evaluate many merge configurations in memory",
                                description="Loads the base model once, applies each configuration of the sweep "
                                            "(a vfuse merge config plus sweep: axes and eval: metrics) in place, "
                                            "evaluates it, and writes results.csv, results.png and best.yml.")
    sweep.add_argument("sweep", help="sweep YAML (a merge config + sweep: + eval:)")
    sweep.add_argument("--out", required=True, help="output folder for results.csv, results.png, best.yml")
    sweep.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model and merges run")
    sweep.add_argument("--resume", action="store_true", help="keep the rows already in results.csv")
    sweep.add_argument("--save-best", metavar="CKPT_DIR", help="also write the best configuration's merge here")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.set_defaults(run=_sweep)
    demo = commands.add_parser("demo", help="build a small LLaVA family offline and run VisionFuse on it",
                               description="Builds (once, cached) a base LLM and five members (three LLaVA-1.5, "
                                           "a LLaVA-NeXT and a LLaVA-OneVision) as real checkpoints with their image "
                                           "processors, merges their language models, fuses their visual tokens and "
                                           "generates text; checks M=1 parity with transformers for every member.")
    demo.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    demo.add_argument("--cache-dir", help="where the demo checkpoints live (default ~/.cache/vfuse/demo)")
    demo.add_argument("--keep", type=float, default=0.5, help="ratio of visual tokens kept (1: no pruning)")
    demo.add_argument("--max-new-tokens", type=int, default=12)
    demo.set_defaults(run=_demo)
    bench = commands.add_parser("bench", help="run the kernel benchmarks, or the one-call GPU suite",
                                description="merge, tokens, scores, all: times the kernels against their baselines "
                                            "(vfuse_kernels.bench.merge, bench.tokens), prints a table per op and "
                                            "optionally writes JSON rows. gpu: the GPU suite (vfuse_kernels.bench."
                                            "gpu_suite): every area's checks, timings and targets, the device's "
                                            "copy and GEMM ceilings, the distributed merge over NCCL and the test "
                                            "suite, written to DIR/gpu-suite-<device>-<date>.{json,md,log}; exit "
                                            "code 1 when a check failed.")
    bench.add_argument("suite", nargs="?", default="all", choices=["merge", "tokens", "scores", "all", "gpu"])
    bench.add_argument("--quick", action="store_true", help="small sizes, few repetitions, no torch.compile baseline "
                                                            "(gpu: tiny sizes, on a CPU under Triton's interpreter)")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cpu (gpu: cuda when available)")
    bench.add_argument("--json", metavar="PATH", help="write the rows and the environment here (not with gpu)")
    gpu = bench.add_argument_group("vfuse bench gpu")
    gpu.add_argument("--out", metavar="DIR", help="where the JSON, markdown and log go (default: benchmarks/results of "
                                                  "the source checkout, else the current folder)")
    gpu.add_argument("--no-tests", action="store_true", help="skip the pytest run (= --skip tests)")
    gpu.add_argument("--skip", nargs="+", metavar="PART",
                     help="parts not to run: merge tokens engine ncu distributed tests")
    gpu.add_argument("--budget", type=float, metavar="SECONDS",
                     help="time for the whole suite, each part within its own limit too (default 480)")
    gpu.add_argument("--workers", type=int, metavar="N",
                     help="pytest-xdist workers for the tests (default min(8, cores); 0: one process)")
    bench.set_defaults(run=_bench)
    profile = commands.add_parser("profile-sequence", help="time and memory per visual-path stage vs visual tokens",
                                  description="Sweeps encoders x tokens per encoder x keep ratio x batch through "
                                              "the demo family's visual path and the merged LLM's prefill; writes "
                                              "profile.csv and profile.png (needs matplotlib).")
    profile.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    profile.add_argument("--out", default="profile-sequence", help="output folder")
    profile.add_argument("--quick", action="store_true", help="a small sweep, one timed run per point")
    profile.add_argument("--cache-dir", help="where the demo checkpoints live (default ~/.cache/vfuse/demo)")
    profile.set_defaults(run=_profile_sequence)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


def run() -> None:
    """The ``vfuse`` console script: ``main()``. A merge that finished (not a distributed one) then
    ends the process at once, its output streams flushed: by then every file is written, synced and
    closed, the lock released and no other thread is left, and the interpreter's teardown with torch
    loaded took 0.3–0.5 s of a ~3 s merge (benchmarks/NOTES.md, v0.7). Every other exit is the normal one."""
    args = build_parser().parse_args()
    if args.run is _merge and not args.distributed:  # the process ends after it: torch is never freed
        from .merging import engine

        engine.FREEZE_TORCH = True
    code = args.run(args)
    if code == 0 and args.run is _merge and not args.distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(code)


if __name__ == "__main__":
    run()
