"""gradwatch: per-layer activation and gradient diagnostics for PyTorch, in one line.

    with GradWatch(model, log_dir="runs/exp"):
        ...  # your training loop, unchanged
"""

from .config import StepMode, Thresholds
from .exceptions import (
    AlreadyWatchedError,
    DeadUnitsWarning,
    ExplodingGradientWarning,
    GradWatchError,
    GradWatchWarning,
    LogDirError,
    NonFiniteWarning,
    SaturationWarning,
    VanishingGradientWarning,
    LearningRateWarning,
    AttentionCollapseWarning,
    FP16OverflowWarning,
)
from .report import Finding, FindingKind, LayerStats, ParamStats, Report
from .watch import GradWatch

__version__ = "0.1.0"

__all__ = [
    "GradWatch",
    "Thresholds",
    "StepMode",
    "Report",
    "LayerStats",
    "ParamStats",
    "Finding",
    "FindingKind",
    "GradWatchError",
    "AlreadyWatchedError",
    "LogDirError",
    "GradWatchWarning",
    "VanishingGradientWarning",
    "ExplodingGradientWarning",
    "DeadUnitsWarning",
    "SaturationWarning",
    "NonFiniteWarning",
    "LearningRateWarning",
    "AttentionCollapseWarning",
    "FP16OverflowWarning",
]
