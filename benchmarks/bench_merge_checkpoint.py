"""Entry point: python benchmarks/bench_merge_checkpoint.py (= python -m vfuse_kernels.bench.checkpoint)."""
from vfuse_kernels.bench.checkpoint import main

if __name__ == "__main__":
    main()
