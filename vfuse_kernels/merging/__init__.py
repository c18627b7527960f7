"""Checkpoint-level merging: mergekit-compatible configs, streaming safetensors I/O,
the CPU/GPU merge engine and in-place merges into a loaded model.

The names below are imported on first use: ``vfuse merge`` on the CPU loads no torch where
its method does not need it (``native.py``)."""
from __future__ import annotations

from .._lazy import lazy_exports

_SOURCES = {"Checkpoint": ".checkpoint", "CheckpointError": ".checkpoint", "ConfigError": ".config",
            "MergeConfig": ".config", "load_config": ".config", "parse_config": ".config", "MergeSummary": ".engine",
            "merge_checkpoints": ".engine", "merge_into_": ".inplace", "build_plan": ".plan"}
__all__ = sorted(_SOURCES)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _SOURCES)
