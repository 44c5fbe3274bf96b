"""The finding kinds, in one table: each kind's module (its rule, words and advice), its warning
category, its style in the terminal and its row in the README's findings table.

``FindingKind.category`` and ``FindingKind.style`` read this table; ``tests/test_registry.py``
checks that every ``FindingKind`` and every warning category is in it, that the README's table
is the one :func:`markdown_table` writes, and that docs/concepts.md has a row for every kind.
Adding a kind: a module in this package, a ``FindingKind`` member, a warning class in
``exceptions.py``, and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Dict

from .. import exceptions as ex
from ..config import Thresholds
from ..report import FindingKind
from . import attention_collapse, dead_units, exploding, fp16_overflow, learning_rate, non_finite, saturation, vanishing


@dataclass(frozen=True)
class Kind:
    """One finding kind and everything that refers to it."""

    kind: FindingKind
    module: ModuleType  # the rule, its words and its advice
    warning: type  # its GradWatchWarning subclass
    style: str  # rich style of its panels and lines
    measured: str  # the README's "measured as"
    threshold: Callable[[Thresholds], str]  # the README's "default threshold", from the defaults
    share: str = ""  # what a per-call-site share is of, when one module's call sites are grouped


def _n(x: float) -> str:
    """``0.001`` -> ``1e-3``, ``1000`` -> ``1e3``, ``0.25`` -> ``0.25``."""
    if x >= 1e3 or x < 1e-2:
        mantissa, exponent = f"{x:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{x:g}"


_KINDS = (
    Kind(FindingKind.VANISHING, vanishing, ex.VanishingGradientWarning, "magenta",
         "gradient per weight (RMS) of the first layers / the last layer's, on `flow_window` measured steps "
         "in a row (with `optimizer=`, not while the first layers' update ratios keep up with the last's)", lambda t: f"< {_n(t.vanishing_ratio)}"),
    Kind(FindingKind.EXPLODING, exploding, ex.ExplodingGradientWarning, "red",
         "first/last gradient per weight and the global gradient norm, on `flow_window` measured steps in a "
         "row; a one-step jump of the global norm over its running median (reported at its step)",
         lambda t: f"> {_n(t.exploding_ratio)}; > {_n(t.exploding_norm)}; × {_n(t.jump_factor)}"),
    Kind(FindingKind.DEAD_UNITS, dead_units, ex.DeadUnitsWarning, "yellow",
         "share of units (features / channels) with no non-zero output (smooth rectifiers: no pre-activation "
         "above the flat side's cut-off) on any sample of the last `dead_window` measured batches", lambda t: f"> {100 * t.dead_fraction:.0f} %", share="of units dead"),
    Kind(FindingKind.SATURATION, saturation, ex.SaturationWarning, "yellow",
         "share of outputs where the activation is flat (see below)",
         lambda t: f"> {100 * t.saturated_fraction:.0f} %", share="saturated"),
    Kind(FindingKind.NON_FINITE, non_finite, ex.NonFiniteWarning, "bold red",
         "first layer in forward order with NaN/Inf in its output, else first in backward order with a "
         "NaN/Inf gradient", lambda t: "any"),
    Kind(FindingKind.LEARNING_RATE, learning_rate, ex.LearningRateWarning, "bold magenta",
         "a weighted layer's weight norm growing within `blowup_steps` steps; with `optimizer=`, the "
         "update-to-weight ratio ‖Δw‖/‖w‖ of a weight over `update_window` measured steps or in one step",
         lambda t: f"× {_n(t.blowup_growth)} in {t.blowup_steps} steps; ≥ {_n(t.update_ratio_high)}; "
                   f"≥ {_n(10 * t.update_ratio_high)}"),
    Kind(FindingKind.ATTENTION_COLLAPSE, attention_collapse, ex.AttentionCollapseWarning, "cyan",
         "share of an attention layer's queries putting > 0.99 of their weight on one key (`nn.MultiheadAttention`, "
         "or a module calling `F.scaled_dot_product_attention`; recomputed from a sample of queries)", lambda t: f"> {100 * t.attention_saturated_fraction:.0f} %",
         share="of sampled queries on one key"),
    Kind(FindingKind.FP16_OVERFLOW, fp16_overflow, ex.FP16OverflowWarning, "bold yellow",
         "largest \\|value\\| of a layer's float16 output (its strided sample) and, where no loss scaler "
         "multiplies them, of float16 gradients (parameters' largest; at outputs, their L2 norm as a bound), "
         "against float16's largest finite value 65504", lambda t: f"≥ 65504 / {t.fp16_headroom:g} ({65504 / t.fp16_headroom:.0f})"),
)

KINDS: Dict[FindingKind, Kind] = {k.kind: k for k in _KINDS}


def markdown_table(thresholds: Thresholds = Thresholds()) -> str:
    """The README's findings table."""
    rows = ["| finding (warning category) | measured as | default threshold |", "|---|---|---|"]
    rows += [f"| `{k.warning.__name__}` | {k.measured} | {k.threshold(thresholds)} |" for k in _KINDS]
    return "\n".join(rows)

