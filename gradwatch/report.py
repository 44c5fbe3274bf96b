"""Plain records of what was measured and found; they render themselves.

These are host-side Python numbers, produced once per logging step. ``Report``
renders as a rich table in a terminal and converts to JSON-ready dicts.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Type

from .config import Thresholds
from .exceptions import GradWatchWarning


class FindingKind(str, enum.Enum):
    """What a finding is about; each kind has its own warning category."""

    VANISHING = "vanishing"
    EXPLODING = "exploding"
    DEAD_UNITS = "dead_units"
    SATURATION = "saturation"
    NON_FINITE = "non_finite"
    LEARNING_RATE = "learning_rate"
    ATTENTION_COLLAPSE = "attention_collapse"
    FP16_OVERFLOW = "fp16_overflow"

    @property
    def category(self) -> Type[GradWatchWarning]:
        """Its warning category (``gradwatch.rules.registry``)."""
        from .rules.registry import KINDS

        return KINDS[self].warning

    @property
    def style(self) -> str:
        """The rich style its warnings are drawn in (``gradwatch.rules.registry``)."""
        from .rules.registry import KINDS

        return KINDS[self].style


@dataclass(frozen=True)
class Finding:
    """One diagnosis: where, when, how bad, against which threshold, and what to do."""

    kind: FindingKind
    layer: str
    step: int
    value: float
    threshold: float
    message: str
    advice: str
    condition: str = field(default="", compare=False)  # which rule: "depth", "size", "updates", ...

    def __str__(self) -> str:
        return f"[step {self.step}] {self.layer}: {self.message} {self.advice}"

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind.value, "layer": self.layer, "step": self.step,
                "value": _json_float(self.value), "threshold": self.threshold,
                "message": self.message, "advice": self.advice}


@dataclass
class ParamStats:
    """Gradient statistics of one parameter at one logging step."""

    name: str
    layer: str
    numel: int
    grad_norm: float  # at the end of backward (before any clipping)
    grad_max_abs: float
    weight_norm: float
    applied_grad_norm: Optional[float] = None  # at optimizer.step(), after clipping (optimizer= given)
    update_ratio: Optional[float] = None  # ‖Δw‖ / ‖w‖ across optimizer.step() (optimizer= given)
    update_ratio_min: Optional[float] = None  # smallest / largest ratio over the last update_window
    update_ratio_max: Optional[float] = None  # measured steps with an update
    update_window: int = 0
    learning_rate: Optional[float] = None  # of the optimizer's param group holding it
    ndim: int = 0  # dimensions (the learning-rate rule judges weight matrices and kernels, ndim >= 2)
    dtype: str = ""  # "float32", "float16", ... (fp16_overflow judges float16 gradients)

    @property
    def ratio(self) -> float:
        """Gradient norm over weight norm: the relative size of one update before the learning rate."""
        return self.grad_norm / self.weight_norm if self.weight_norm > 0 else math.nan

    @property
    def nonfinite(self) -> bool:
        return not math.isfinite(self.grad_norm)


@dataclass
class LayerStats:
    """What one watched module did at one logging step (several calls are merged)."""

    name: str
    type: str
    calls: int = 0
    count: int = 0
    mean: float = math.nan
    std: float = math.nan
    zero_fraction: float = math.nan
    nonfinite: bool = False  # NaN/Inf present in the output
    saturated_fraction: Optional[float] = None
    saturation_method: Optional[str] = None  # "bounds" or "slope"
    dead_fraction: Optional[float] = None
    dead_window: int = 0  # batches the dead-unit verdict covers
    dead_cutoff: Optional[float] = None  # smooth rectifiers: a unit is dead below this pre-activation
    output_grad_norm: Optional[float] = None
    output_grad_nonfinite: bool = False
    grad_norm: Optional[float] = None  # L2 norm over this layer's own parameter gradients
    note: Optional[str] = None  # e.g. outputs skipped because they are not floating point
    # Softmax attention (nn.MultiheadAttention, F.scaled_dot_product_attention), recomputed from a sample of
    # queries on measured steps:
    attention_entropy: Optional[float] = None  # mean entropy of a query's attention weights (nats)
    attention_entropy_normalised: Optional[float] = None  # the same over log(keys): 1 uniform, 0 one key
    attention_saturated_fraction: Optional[float] = None  # queries (with 2+ keys) whose largest weight > 0.99
    attention_max_logit: Optional[float] = None  # the largest scaled query-key logit
    attention_heads: Optional[List[Dict[str, Any]]] = None  # the same per head (rank 0's sample)
    # ‖Δw‖/‖w‖ as the learning-rate rule judges it here (optimizer= given): the largest over the
    # layer's own weight matrices and kernels (ndim >= 2), not its biases or norm scales
    update_ratio: Optional[float] = None
    # The largest |value| in the strided sample of the layer's float16 outputs (None: no float16 output, as
    # in float32 and bfloat16 training): how near it comes to float16's largest finite value, 65504
    fp16_peak: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return {k: _json_float(v) if k != "attention_heads" or v is None else
                [{hk: _json_float(hv) for hk, hv in h.items()} for h in v] for k, v in asdict(self).items()}


@dataclass
class StepStats:
    """Everything measured at one logging step, in plain numbers."""

    step: int
    layers: Dict[str, LayerStats] = field(default_factory=dict)  # forward order
    params: Dict[str, ParamStats] = field(default_factory=dict)
    backward_order: List[str] = field(default_factory=list)  # layers in the order their output gradient arrived
    # The gradient noise scale B_simple (gradwatch.noise_scale), from steps with two batch sizes
    # (gradient accumulation, DDP): in samples, from the moving averages so far; how many steps
    # they average; and the step's batch, every micro-batch and process together.
    noise_scale: Optional[float] = None
    noise_scale_steps: int = 0
    batch_size: Optional[int] = None
    # The model's output held NaN/Inf and no layer's output here does: the finiteness check found it
    # at a step not measured, where the layers' outputs were not kept (a compiled graph, checkpointing).
    output_nonfinite: bool = False

    @property
    def total_grad_norm(self) -> Optional[float]:
        if not self.params:
            return None
        return math.sqrt(sum([p.grad_norm ** 2 for p in self.params.values()]))

    @property
    def total_applied_grad_norm(self) -> Optional[float]:
        """Global norm of the gradient the optimizer applied (after clipping), if known."""
        applied = [p.applied_grad_norm for p in self.params.values() if p.applied_grad_norm is not None]
        return math.sqrt(sum(v ** 2 for v in applied)) if applied else None


@dataclass
class StepData:
    """What a measured step produced, on the host: the stats and the histograms
    (``stats.histogram`` layout: min, max, num, sum, sum of squares, bin counts)."""

    stats: StepStats
    act_histograms: Dict[str, List[float]] = field(default_factory=dict)
    grad_histograms: Dict[str, List[float]] = field(default_factory=dict)


@dataclass
class Report:
    """The latest per-layer stats and every finding so far, with the thresholds they were
    judged by. Renders as a rich table."""

    step: int
    stats: Optional[StepStats]
    findings: List[Finding]
    steps_seen: int = 0
    every: int = 0  # the logging interval in force (it moves when a budget is set)
    thresholds: Thresholds = field(default_factory=Thresholds)
    notes: List[str] = field(default_factory=list)  # what could not be measured, said once
    # Where each finding's full text was printed already (render.Shown): the table and the summary
    # printed to the same place name it instead of repeating it.
    shown: Dict[Tuple[Finding, Tuple[Any, ...]], str] = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> Dict[str, LayerStats]:
        return self.stats.layers if self.stats else {}

    @property
    def params(self) -> Dict[str, ParamStats]:
        return self.stats.params if self.stats else {}

    def to_dict(self) -> Dict[str, Any]:
        """Strict JSON (NaN as None, Inf as "inf"): ``{"step", "steps_seen", "every", "notes",
        "noise_scale", "noise_scale_steps", "batch_size", "layers": {name: {...}}, "params": {...},
        "findings": [...]}``."""
        params = {n: {"layer": p.layer, "numel": p.numel, "grad_norm": _json_float(p.grad_norm),
                      "grad_max_abs": _json_float(p.grad_max_abs), "weight_norm": _json_float(p.weight_norm),
                      "ratio": _json_float(p.ratio), "nonfinite": p.nonfinite,
                      "applied_grad_norm": _json_float(p.applied_grad_norm),
                      "update_ratio": _json_float(p.update_ratio), "learning_rate": _json_float(p.learning_rate)}
                  for n, p in self.params.items()}
        st = self.stats
        return {"step": self.step, "steps_seen": self.steps_seen, "every": self.every, "notes": list(self.notes),
                "noise_scale": _json_float(st.noise_scale) if st else None,
                "noise_scale_steps": st.noise_scale_steps if st else 0, "batch_size": st.batch_size if st else None,
                "layers": {n: s.to_dict() for n, s in self.layers.items()},
                "params": params, "findings": [f.to_dict() for f in self.findings]}

    def __rich__(self) -> Any:
        from .render import report_table

        return report_table(self)

    def __str__(self) -> str:
        """The table as plain text at the terminal's width (what ``print(report)`` shows)."""
        return str(self.table())

    def _repr_html_(self) -> str:
        """The same table as HTML, for Jupyter."""
        from .render import to_html

        return to_html(self)

    def table(self, *, full: bool = False) -> Any:
        """The per-layer table and the findings: ``print`` it (plain text at the terminal's width)
        or ``console.print`` it (rich, at the console's width).

        ``full=False`` is what ``print(report)`` shows: every layer for models with up to 30
        measured layers, above that the layers with findings and the most extreme per
        statistic. ``full=True`` shows every layer.
        """
        from .render import report_table

        return report_table(self, full=full)

    def summary(self, *, top: int = 3) -> Any:
        """The few lines printed when a watch detaches: findings, then the ``top`` most
        extreme layers per statistic (``print`` or ``console.print`` it)."""
        from .config import positive_int
        from .render import report_summary

        return report_summary(self, top=positive_int("top", top))


def _json_float(v: Any) -> Any:
    """JSON has no NaN/Inf: map them to None/strings the way JSON readers expect."""
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
    return v
