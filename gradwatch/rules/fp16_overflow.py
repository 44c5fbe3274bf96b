"""fp16 overflow ahead of the NaN: a float16 activation or gradient within ``fp16_headroom`` of
float16's largest finite value (65504). Past it a value becomes Inf and the next operation makes
NaN; this names the layer and the step while the values are still finite.

Judged:

* activations: the largest |value| of the strided sample of each float16 output
  (``LayerStats.fp16_peak``; the sample visits every feature, so an outlier feature is seen);
* gradients, where no loss scaler multiplied them (:func:`gradients_unscaled`): the largest |g| of
  float16 parameters (``ParamStats.grad_max_abs``, exact), and the L2 norm of the gradient at a
  float16 output (``LayerStats.output_grad_norm``, an upper bound of its largest element).

With a GradScaler the scaled gradient is what the scaler protects (an overflow skips the step and
lowers the scale), so only activations are judged. bfloat16 and float32 values have float32's
range and are never judged.
"""

from __future__ import annotations

import math
from typing import List, Set

from ..config import Thresholds
from ..report import Finding, FindingKind, StepStats
from .traits import module_of

FP16_MAX = 65504.0
"""float16's largest finite value (``torch.finfo(torch.float16).max``)."""

ADVICE = ("Keep this layer's values in range: normalise what feeds it (LayerNorm or RMSNorm; QK-norm for "
          "attention logits), use weight decay or a lower learning rate if its weights keep growing, or run it "
          "in float32 (torch.autocast(..., enabled=False) around it); bfloat16, where the hardware has it, has "
          "float32's range.")
GRADIENT_ADVICE = ("Keep float32 weights and let torch.autocast run the layers in float16, with a "
                   "torch.amp.GradScaler (it skips a step whose gradients overflow and lowers the scale), or "
                   "train in bfloat16; a loss summed over many elements can be averaged instead.")


def gradients_unscaled(stats: StepStats, scaler: bool) -> bool:
    """Whether this step's float16 gradients are the model's own, not multiplied by a loss scaler:
    no ``scaler=`` given, and either the model has float16 parameters (``.half()``: a GradScaler
    refuses to unscale float16 gradients, so none is in use) or the gradient the optimizer applied
    (``optimizer=``) is the one at the end of backward (nothing unscaled or clipped it)."""
    if scaler:
        return False
    if any(ps.dtype == "float16" for ps in stats.params.values()):
        return True
    applied, total = stats.total_applied_grad_norm, stats.total_grad_norm
    return (applied is not None and total is not None and math.isfinite(total) and total > 0
            and math.isclose(applied, total, rel_tol=1e-6))


def fp16_overflow(stats: StepStats, thresholds: Thresholds, scaler: bool = False) -> List[Finding]:
    """Each module with a float16 activation (or, where unscaled, gradient) of at least
    ``FP16_MAX / fp16_headroom``; one finding a module, its output's before its gradients'.
    ``scaler``: a loss scaler was given (``GradWatch(..., scaler=)``)."""
    headroom = thresholds.fp16_headroom
    bound = FP16_MAX / headroom
    reach = f"within {headroom:g}x of float16's largest finite value ({FP16_MAX:.0f})"
    grads = gradients_unscaled(stats, scaler)
    out: List[Finding] = []
    named: Set[str] = set()

    def add(layer: str, value: float, message: str, advice: str, condition: str) -> None:
        named.add(module_of(layer))
        out.append(Finding(FindingKind.FP16_OVERFLOW, layer, stats.step, value, bound, message, advice, condition))

    for ls in stats.layers.values():
        peak = ls.fp16_peak
        if peak is None or module_of(ls.name) in named:
            continue
        if math.isfinite(peak) and peak >= bound:
            add(ls.name, peak, f"The largest |value| sampled from this layer's float16 output is {peak:.3g}, "
                               f"{reach}: beyond it values become Inf, then NaN.", ADVICE, "forward")
        elif grads and ls.output_grad_norm is not None and math.isfinite(ls.output_grad_norm) \
                and ls.output_grad_norm >= bound:
            norm = ls.output_grad_norm
            add(ls.name, norm, f"The gradient at this layer's float16 output has an L2 norm of {norm:.3g} "
                               f"(which bounds its largest element), {reach}; no loss scaler multiplies it.",
                GRADIENT_ADVICE, "backward")
    if grads:
        for ps in stats.params.values():
            g = ps.grad_max_abs
            if ps.dtype == "float16" and ps.layer not in named and math.isfinite(g) and g >= bound:
                add(ps.layer, g, f"The gradient of {ps.name} (float16) reaches {g:.3g}, {reach}.",
                    GRADIENT_ADVICE, "backward")
    return out
