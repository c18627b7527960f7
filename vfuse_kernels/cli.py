"""The ``vfuse`` command line.

    vfuse merge CONFIG.yml OUT_DIR [--device cpu|cuda] [--threads N] [--out-shard-size SIZE] [--resume]
"""
from __future__ import annotations

import argparse
import sys


def _merge(args) -> int:
    import torch

    from .merging import CheckpointError, ConfigError, merge_checkpoints

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("vfuse merge: --threads must be at least 1")
        torch.set_num_threads(args.threads)
        from ._backend import cpu_extension

        ext = cpu_extension()
        if ext is not None:
            ext.set_num_threads(args.threads)
    try:
        summary = merge_checkpoints(args.config, args.out_dir, device=args.device, out_shard_size=args.out_shard_size,
                                    resume=args.resume, progress=not args.quiet)
    except (ConfigError, CheckpointError, FileExistsError, ValueError) as exc:
        print(f"vfuse merge: error: {exc}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vfuse", description="Fused kernels for training-free MLLM fusion")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="merge checkpoints from a mergekit-style YAML config",
                                description="Merge safetensors checkpoints as a mergekit YAML config says "
                                            "(linear, task_arithmetic, ties, dare_linear, dare_ties), streaming "
                                            "tensor by tensor.")
    merge.add_argument("config", help="YAML merge config (mergekit syntax + the vfuse: extension)")
    merge.add_argument("out_dir", help="output folder (sharded safetensors + index + config.json)")
    merge.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the arithmetic runs")
    merge.add_argument("--threads", type=int, help="CPU threads for the kernels (default: all cores)")
    merge.add_argument("--out-shard-size", default="5GB", help="maximum bytes per output shard (e.g. 5GB, 500MiB)")
    merge.add_argument("--resume", action="store_true", help="keep the shards a killed run already finished")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.set_defaults(run=_merge)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
