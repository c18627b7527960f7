"""Entry point: python benchmarks/bench_merge.py (= python -m vfuse_kernels.bench.merge)."""
from vfuse_kernels.bench.merge import main

if __name__ == "__main__":
    main()
