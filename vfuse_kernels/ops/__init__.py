"""Public functional ops: argument checks, backend dispatch, torch.library registration."""
from .delta_merge import METHODS, delta_merge
from .magnitude_threshold import MagnitudeThresholds, magnitude_threshold, ties_thresholds

__all__ = ["METHODS", "MagnitudeThresholds", "delta_merge", "magnitude_threshold", "ties_thresholds"]
