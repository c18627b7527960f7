"""Checkpoint-level merging: mergekit-compatible configs, streaming safetensors I/O,
the CPU/GPU merge engine and in-place merges into a loaded model."""
from .checkpoint import Checkpoint, CheckpointError
from .config import ConfigError, MergeConfig, load_config, parse_config
from .engine import MergeSummary, merge_checkpoints
from .inplace import merge_into_
from .plan import build_plan

__all__ = ["Checkpoint", "CheckpointError", "ConfigError", "MergeConfig", "MergeSummary", "build_plan",
           "load_config", "merge_checkpoints", "merge_into_", "parse_config"]
