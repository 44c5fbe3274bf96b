"""Configuration: thresholds for findings, and the one validated options record of a watch.

Everything is validated when ``GradWatch`` is constructed, so a bad value fails at
once with a message that names the argument and quotes the value, not hours later at
the first measured step.
"""

from __future__ import annotations

import enum
import math
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .exceptions import LogDirError
from .layers import Selector, check_selectors
from .stats import HISTOGRAM_SAMPLES as MAX_BINS  # a histogram's sample: more bins than elements say nothing


class StepMode(str, enum.Enum):
    """What counts as a step."""

    FORWARD = "forward"  # the training forwards of the watched model before each backward
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
        vanishing_ratio: warn when the first layer's gradient scale (RMS per parameter
            element, so layers of different sizes compare) is below this fraction of
            the last layer's, on ``flow_window`` measured steps in a row (the Fashion-MNIST
            seed MLP at initialisation, one batch: ~4e-5 with sigmoid, 8e-3-0.08 with
            ReLU/tanh/ELU/Swish).
        exploding_ratio: warn when the first layer's gradient scale is above this
            multiple of the last layer's (a stack that amplifies layer after layer).
        exploding_norm: warn when the global gradient L2 norm exceeds this bound (the
            gradient the optimizer applied when it is known: unscaled and clipped).
        jump_factor: warn, at that step, when the global gradient norm is this factor over
            the median of the last few measured steps (a spike: a corrupt batch).
        blowup_growth: warn of a learning-rate blow-up when a weighted layer's weight norm
            grows by this factor within ``blowup_steps`` steps (healthy runs, even at a high
            learning rate: up to ~1.3; SGD at 10x too high a rate: 3-5).
        blowup_steps: the span of steps ``blowup_growth`` is measured over.
        flow_window: vanishing and exploding gradients (across depth, over the norm bound)
            must hold on this many measured steps with gradients in a row before they are
            reported (a run with fewer such steps is judged at its end, on all of them).
        update_ratio_high: warn (``learning_rate``) when a weight's update-to-weight ratio
            ``‖Δw‖/‖w‖`` per optimizer step stays at or above this over ``update_window``
            measured steps (needs ``optimizer=``; healthy training: around 1e-3).
        update_ratio_low: note when most weights' update ratios stay at or below this over
            ``update_window`` measured steps (the layers barely learn).
        update_window: measured steps with an update that a learning-rate verdict must cover
            (an integer, 2 or more).
        attention_saturated_fraction: warn (``attention_collapse``) when more than this share
            of an attention layer's sampled queries put more than 0.99 of their weight on one key.
        fp16_headroom: warn (``fp16_overflow``) when a float16 activation or gradient comes within
            this factor of float16's largest finite value, 65504 (8: from 8188 on).
    """

    saturation_slope: float = 0.04
    saturated_fraction: float = 0.25
    dead_fraction: float = 0.5
    vanishing_ratio: float = 1e-3
    exploding_ratio: float = 1e2
    exploding_norm: float = 1e3
    jump_factor: float = 1e2
    blowup_growth: float = 2.0
    blowup_steps: int = 5
    flow_window: int = 3
    update_ratio_high: float = 1e-1
    update_ratio_low: float = 1e-5
    update_window: int = 5
    attention_saturated_fraction: float = 0.5
    fp16_headroom: float = 8.0

    def __post_init__(self) -> None:
        open_unit = ("saturation_slope", "saturated_fraction", "dead_fraction", "vanishing_ratio",
                     "update_ratio_high", "update_ratio_low", "attention_saturated_fraction")
        counts = ("blowup_steps", "flow_window")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in counts:
                positive_int(f"Thresholds.{f.name}", value)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Thresholds.{f.name} must be a finite number, got {value!r}")
            if f.name in open_unit and not 0 < value < 1:
                raise ValueError(f"Thresholds.{f.name} must be between 0 and 1 (exclusive), got {value!r}")
            if f.name not in open_unit and not value > 1:
                raise ValueError(f"Thresholds.{f.name} must be greater than 1, got {value!r}")
        if not isinstance(self.update_window, int):
            raise ValueError(f"Thresholds.update_window must be an integer (measured steps), got {self.update_window!r}")
        if not self.update_ratio_low < self.update_ratio_high:
            raise ValueError(f"Thresholds.update_ratio_low ({self.update_ratio_low!r}) must be below "
                             f"update_ratio_high ({self.update_ratio_high!r})")

    @property
    def saturation_margin(self) -> float:
        """Distance from a bound, as a fraction of the output range, that counts as saturated."""
        return self.saturation_slope / 4


def unwrap_optimizer(obj: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` behind what a user holds, whose step hooks gradwatch registers.

    Training frameworks hand out wrappers that pass ``step()`` on: accelerate's
    ``AcceleratedOptimizer`` (also the Hugging Face Trainer's ``trainer.optimizer``; ``.optimizer``),
    which steps the wrapped optimizer only once gradients are synchronised after accumulation, and
    Lightning's ``LightningOptimizer`` (``._optimizer``). Both are ``Optimizer`` instances without the
    hook tables of one. The wrapped optimizer is taken, however deep; anything that is neither an
    optimizer nor such a wrapper is a ``TypeError`` quoting it (an LR scheduler, a model, a list).
    """
    seen = set()
    opt = obj
    while id(opt) not in seen:
        seen.add(id(opt))
        if isinstance(opt, torch.optim.Optimizer) and "_optimizer_step_pre_hooks" in vars(opt):
            return opt
        looks_like_one = isinstance(opt, torch.optim.Optimizer) or (
            callable(getattr(opt, "step", None)) and hasattr(opt, "param_groups"))
        inner = next((i for i in (getattr(opt, "_optimizer", None), getattr(opt, "optimizer", None))
                      if i is not None and i is not opt), None) if looks_like_one else None
        if inner is None:
            break
        opt = inner
    try:
        shown = repr(obj)
    except Exception:  # noqa: BLE001 -- a half-built optimizer's repr fails too
        shown = object.__repr__(obj)
    what = f"{type(obj).__name__} ({shown[:60]})".replace("\n", " ")
    if isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer: {what} is a torch.optim.Optimizer that never ran Optimizer.__init__ (it has "
                        f"no step hooks) and wraps no optimizer as .optimizer: pass the optimizer it steps")
    raise TypeError(f"optimizer must be a torch.optim.Optimizer or a wrapper of one (accelerate's "
                    f"AcceleratedOptimizer, Lightning's LightningOptimizer), got {what}")


@dataclass(frozen=True)
class Options:
    """Every option of a :class:`~gradwatch.GradWatch`, validated once (see its docstring)."""

    every: Optional[int]  # None: the automatic schedule
    histogram_every: Optional[int]
    dead_window: int
    bins: int
    samples: int
    thresholds: Thresholds
    include: Tuple[Selector, ...]
    exclude: Tuple[Selector, ...]
    include_eval: bool
    quiet: bool
    steps: StepMode
    optimizer: Optional[torch.optim.Optimizer]
    budget: Optional[float]
    functional: bool
    strict: bool
    log_dir: Optional[Path]
    writer: Any
    scaler: Any = None  # a torch.amp.GradScaler: gradients are read unscaled

    @classmethod
    def build(cls, *, every: Optional[int], histogram_every: Optional[int], dead_window: int, bins: int,
              samples: int, thresholds: Optional[Union[Thresholds, Mapping[str, float]]],
              include: Optional[Union[Selector, Sequence[Selector]]],
              exclude: Optional[Union[Selector, Sequence[Selector]]], include_eval: bool, quiet: bool,
              steps: Union[StepMode, str], optimizer: Any, budget: Optional[float], functional: bool,
              strict: bool, log_dir: Optional[Union[str, os.PathLike]], writer: Any, rank: int,
              scaler: Any = None) -> "Options":
        mode = step_mode(steps)
        if optimizer is not None:
            optimizer = unwrap_optimizer(optimizer)
        if mode is StepMode.OPTIMIZER and optimizer is None:
            raise ValueError('steps="optimizer" needs the optimizer: GradWatch(model, optimizer=opt, '
                             'steps="optimizer")')
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not 0 < budget < 1):
            raise ValueError(f"budget must be a fraction of step time between 0 and 1 (e.g. 0.01), got {budget!r}")
        if log_dir is not None and writer is not None:
            raise ValueError("pass either log_dir= or writer=, not both (writer= writes where the writer writes)")
        if log_dir is not None and (not isinstance(log_dir, (str, os.PathLike)) or not os.fspath(log_dir)
                                    or isinstance(os.fspath(log_dir), bytes)):
            raise TypeError(f"log_dir must be a folder's path (a str or pathlib.Path, not empty), got {log_dir!r}")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"writer must be a TensorBoard SummaryWriter (torch.utils.tensorboard or tensorboardX), "
                            f"got {type(writer).__name__} ({writer!r:.60}); or pass log_dir= instead")
        if isinstance(bins, int) and not isinstance(bins, bool) and bins > MAX_BINS:
            raise ValueError(f"bins must be at most {MAX_BINS} (a histogram is drawn from a sample of at most "
                             f"{MAX_BINS} elements), got {bins!r}")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be the torch.amp.GradScaler that scales your loss, got "
                            f"{type(scaler).__name__} ({scaler!r:.60})")
        return cls(every=None if every is None else positive_int("every", every),
                   histogram_every=None if histogram_every is None else positive_int("histogram_every",
                                                                                      histogram_every),
                   dead_window=positive_int("dead_window", dead_window), bins=positive_int("bins", bins),
                   samples=positive_int("samples", samples), thresholds=as_thresholds(thresholds),
                   include=check_selectors("include", include), exclude=check_selectors("exclude", exclude),
                   include_eval=flag("include_eval", include_eval), quiet=flag("quiet", quiet), steps=mode,
                   optimizer=optimizer, budget=budget, functional=flag("functional", functional),
                   strict=flag("strict", strict),
                   log_dir=check_log_dir(log_dir) if log_dir is not None and rank == 0 else
                   (None if log_dir is None else Path(log_dir)),
                   writer=writer, scaler=scaler)


def flag(name: str, value: object) -> bool:
    """Return ``value`` as a bool if it is one (or 0 or 1), else raise a TypeError naming ``name``: a
    string such as ``"no"`` would otherwise count as True."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is a positive int, else raise a ValueError/TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int (1 or more), got {value!r}")
    return value


def as_thresholds(value: Optional[Union[Thresholds, Mapping[str, float]]]) -> Thresholds:
    """``thresholds=``: a :class:`Thresholds`, a mapping of some of its fields, or None (defaults)."""
    if value is None:
        return Thresholds()
    if isinstance(value, Thresholds):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(Thresholds.__dataclass_fields__))
        if unknown:
            raise ValueError(f"thresholds: unknown field(s) {unknown}; known: "
                             f"{sorted(Thresholds.__dataclass_fields__)}")
        return Thresholds(**value)
    raise TypeError(f"thresholds must be a gradwatch.Thresholds or a mapping, got {value!r}")


def check_log_dir(path: Union[str, os.PathLike]) -> Path:
    """Create ``log_dir`` and prove it writable now, rather than failing at the first write."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".gradwatch-write-test-"):
            pass
    except OSError as exc:
        raise LogDirError(f"log_dir {os.fspath(path)!r} cannot be created or written "
                          f"({exc.strerror or exc}); pass a writable folder, or log_dir=None for terminal "
                          f"output only") from None
    return p


def check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"GradWatch(model): model must be a torch.nn.Module, got {type(model).__name__} "
                        f"({model!r:.80})")
    return model
