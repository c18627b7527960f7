"""Reference VisionFuse pipeline on HF transformers LLaVA-family models, and ``vfuse demo``."""
from .visionfuse import Encoder, Generation, MergeStats, VisionFuse, check_family

__all__ = ["Encoder", "Generation", "MergeStats", "VisionFuse", "check_family"]
