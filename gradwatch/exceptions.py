"""gradwatch's errors and warnings, in one place.

Findings are emitted as warnings whose categories form a small hierarchy, so the
standard tools work: ``warnings.filterwarnings("ignore", category=DeadUnitsWarning)``,
``pytest.warns(VanishingGradientWarning)``, ``-W error::gradwatch.GradWatchWarning``.
"""

from __future__ import annotations


class GradWatchError(Exception):
    """Base class of every error gradwatch raises on purpose."""


class AlreadyWatchedError(GradWatchError, RuntimeError):
    """A module is already watched by another attached ``GradWatch``."""


class LogDirError(GradWatchError, OSError):
    """The TensorBoard ``log_dir`` cannot be created or written."""


class GradWatchWarning(UserWarning):
    """Base category of every gradwatch finding (and of gradwatch's own notices)."""


class VanishingGradientWarning(GradWatchWarning):
    """Gradient size decays across depth by orders of magnitude."""


class ExplodingGradientWarning(GradWatchWarning):
    """Gradient norm passes a bound, grows across depth, or jumps between steps."""


class DeadUnitsWarning(GradWatchWarning):
    """A large share of a layer's units passed no gradient over a window (no non-zero output, or a
    smooth rectifier's pre-activation below its flat side's cut-off)."""


class SaturationWarning(GradWatchWarning):
    """A large share of a layer's activations sit where the activation is flat."""


class NonFiniteWarning(GradWatchWarning):
    """NaN or Inf appeared in activations or gradients."""


class LearningRateWarning(GradWatchWarning):
    """Optimizer steps change weights by a large share of their size, step after step."""


class AttentionCollapseWarning(GradWatchWarning):
    """Softmax attention heads put almost all their weight on one key (entropy collapse)."""


class FP16OverflowWarning(GradWatchWarning):
    """Float16 activations or gradients come within reach of float16's largest finite value."""


__all__ = [
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
