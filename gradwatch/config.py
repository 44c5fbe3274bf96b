"""Configuration: thresholds for findings and validation of GradWatch's arguments.

Everything is validated when ``GradWatch`` is constructed, so a bad value fails at
once with a message that quotes it, not hours later at the first logging step.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields
from typing import Union


class StepMode(str, enum.Enum):
    """What counts as a step."""

    FORWARD = "forward"  # each training-mode forward of the watched model
    OPTIMIZER = "optimizer"  # each optimizer.step() (needs GradWatch(..., optimizer=))
    MANUAL = "manual"  # each call of GradWatch.step()


def step_mode(value: Union[StepMode, str]) -> StepMode:
    try:
        return StepMode(value)
    except ValueError:
        raise ValueError(f"steps must be one of {[m.value for m in StepMode]}, got {value!r}") from None


@dataclass(frozen=True)
class Thresholds:
    """When a measurement becomes a finding. Defaults are calibrated on the seed experiments.

    Attributes:
        saturation_slope: an activation element is *saturated* when its local slope
            dy/dx is below this fraction of the activation's peak slope. For bounded
            activations recognised by type this is applied as "output within
            ``saturation_slope / 4`` of the output range from a bound", which is the
            same criterion for sigmoid and tanh (0.04 -> within 1% of the range).
        saturated_fraction: warn when more than this share of a layer's elements is saturated.
        dead_fraction: warn when more than this share of a layer's units is dead.
        vanishing_ratio: warn when the first layer's gradient norm is below this
            fraction of the last layer's (sigmoid MLP: ~1e-3; healthy nets: 0.5-2).
        exploding_ratio: warn when the first layer's gradient norm is above this
            multiple of the last layer's (a stack that amplifies layer after layer).
        exploding_norm: warn when the global gradient L2 norm exceeds this bound.
        jump_factor: warn when the global gradient norm grows by this factor over the
            median of the last few logged steps.
    """

    saturation_slope: float = 0.04
    saturated_fraction: float = 0.25
    dead_fraction: float = 0.5
    vanishing_ratio: float = 1e-2
    exploding_ratio: float = 1e2
    exploding_norm: float = 1e3
    jump_factor: float = 1e2

    def __post_init__(self) -> None:
        open_unit = ("saturation_slope", "saturated_fraction", "dead_fraction", "vanishing_ratio")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Thresholds.{f.name} must be a finite number, got {value!r}")
            if f.name in open_unit and not 0 < value < 1:
                raise ValueError(f"Thresholds.{f.name} must be between 0 and 1 (exclusive), got {value!r}")
            if f.name not in open_unit and not value > 1:
                raise ValueError(f"Thresholds.{f.name} must be greater than 1, got {value!r}")

    @property
    def saturation_margin(self) -> float:
        """Distance from a bound, as a fraction of the output range, that counts as saturated."""
        return self.saturation_slope / 4


def positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is a positive int, else raise a ValueError/TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int (1 or more), got {value!r}")
    return value
