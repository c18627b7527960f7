"""Checkpoint-level merging: mergekit-compatible configs, streaming safetensors I/O,
the CPU/GPU merge engine and in-place merges into a loaded model.

The names below are imported on first use: ``vfuse merge`` on the CPU loads no torch where
its method does not need it (``native.py``)."""
from __future__ import annotations

import importlib

_SOURCES = {"Checkpoint": ".checkpoint", "CheckpointError": ".checkpoint", "ConfigError": ".config",
            "MergeConfig": ".config", "load_config": ".config", "parse_config": ".config", "MergeSummary": ".engine",
            "merge_checkpoints": ".engine", "merge_into_": ".inplace", "build_plan": ".plan"}
__all__ = sorted(_SOURCES)


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
