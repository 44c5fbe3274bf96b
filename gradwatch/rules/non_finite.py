"""Non-finite values: the first place a NaN or Inf appeared at a step.

Activations in forward order first, then activation gradients in the order backward produced
them, then parameter gradients, nearest the output first (the order backward reaches them). The finding's condition says which: ``forward``, ``weights``
(the layer's own weights are already non-finite: a bad update was applied at an earlier step)
or ``backward`` (gradients only).
"""

from __future__ import annotations

import math
from typing import List

from ..layers import ROOT_NAME
from ..report import Finding, FindingKind, StepStats

ADVICE = ("Look at what feeds this layer: log/sqrt/division of non-positive values, a learning rate "
          "that is too high, or fp16 overflow; torch.autograd.detect_anomaly() can then name the op.")


def non_finite(stats: StepStats) -> List[Finding]:
    """The first non-finite place at this step, or nothing."""
    step = stats.step
    bad_weights = {ps.layer for ps in stats.params.values() if not math.isfinite(ps.weight_norm)}
    for ls in stats.layers.values():
        if ls.nonfinite:
            if ls.name in bad_weights:
                if step == 0:  # no update yet: a checkpoint, an initialisation or a hand-set weight
                    why, advice = ("they were non-finite before training began (a loaded checkpoint, the "
                                   "initialisation, or weights set by hand).",
                                   "Check where the weights come from: torch.isfinite(p).all() for each parameter "
                                   "after loading or initialising them.")
                else:
                    why, advice = ("a non-finite update was applied at an earlier step (one not measured, or "
                                   "an optimizer step that turned finite gradients into non-finite updates).",
                                   ADVICE + " Measure every step (every=1) to see where it starts.")
                return [Finding(FindingKind.NON_FINITE, ls.name, step, math.nan, 0.0,
                                "Non-finite values (NaN/Inf) first appear in this layer's output, in forward "
                                f"order: its weights are already non-finite, so {why}", advice, "weights")]
            return [Finding(FindingKind.NON_FINITE, ls.name, step, math.nan, 0.0,
                            "Non-finite activation values (NaN/Inf) first appear in this layer's output, "
                            "in forward order.", ADVICE, "forward")]
    if stats.output_nonfinite:  # found in the model's output, with no layer output kept to say where
        return [Finding(FindingKind.NON_FINITE, ROOT_NAME, step, math.nan, 0.0,
                        "Non-finite values (NaN/Inf) appeared in the model's output at this step, which was not "
                        "measured; the layers' outputs were not kept at it (a compiled graph, activation "
                        "checkpointing or saved-tensor hooks), so the layer where they arose is not known.",
                        ADVICE + " Measure every step (every=1) to name the layer at the step it happens.",
                        "forward")]
    for name in stats.backward_order:
        ls = stats.layers.get(name)
        if ls is not None and ls.output_grad_nonfinite:
            return [Finding(FindingKind.NON_FINITE, name, step, math.nan, 0.0,
                            "Non-finite gradient (NaN/Inf) first appears at this layer's output during backward.",
                            ADVICE, "backward")]
    # Parameter gradients last, nearest the output first: backward reaches the layers in reverse, and a
    # NaN that arose in one layer's backward spreads to every layer before it, not to those after.
    for ps in reversed(list(stats.params.values())):
        if ps.nonfinite:
            return [Finding(FindingKind.NON_FINITE, ps.layer, step, ps.grad_norm, 0.0,
                            f"Gradient of {ps.name} is non-finite (norm {ps.grad_norm}).", ADVICE, "backward")]
    return []
