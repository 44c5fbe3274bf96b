"""Rules: plain numbers + thresholds -> findings. Pure; no tensors, hooks or output.

One module per finding kind holds its rule, its words and its advice (``vanishing``,
``exploding``, ``dead_units``, ``saturation``, ``non_finite``, ``learning_rate``,
``attention_collapse``, ``fp16_overflow``); ``registry`` ties each kind to its warning category, its terminal style
and its row in the docs. Two stages: :func:`evaluate` (``step``) says which conditions hold at
one measured step, from that step's numbers alone; :class:`Judge` (``judge``) turns them into
findings over a run: persistence, root causes, one finding per module, once per condition.

Each finding names the layer, the measured value (the named layer's) and the threshold, says in
one line what it means, and suggests what to try next -- advice that fits the model's own layers.
"""

from .judge import SCALER_BACKOFF_STEPS, Judge, finding_key, group_sites
from .registry import KINDS, Kind
from .step import evaluate
from .words import count, names

__all__ = ["Judge", "evaluate", "finding_key", "group_sites", "KINDS", "Kind", "SCALER_BACKOFF_STEPS",
           "count", "names"]
