"""Entry point: python benchmarks/bench_tokens.py (= python -m vfuse_kernels.bench.tokens)."""
from vfuse_kernels.bench.tokens import main

if __name__ == "__main__":
    main()
