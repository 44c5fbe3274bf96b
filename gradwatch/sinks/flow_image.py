"""The gradient-flow figure of ``gradwatch compare --png``, drawn during training for
TensorBoard's Images tab.

A layer's gradient scale spans orders of magnitude across depth; on a scalar chart's linear
axis a vanishing layer is a flat line at zero. The figure draws each layer's parameter
gradient as RMS per element on a log axis, the median over the measured steps since the
previous image (the latest :data:`FLOW_STEPS` of them), one point per layer from input to output.

Drawing costs matplotlib 0.3-0.6 s on a 2-core CPU (``benchmarks/tensorboard_image.py``), so
it happens only on histogram steps, and only as often as keeps it within
:data:`IMAGE_BUDGET` of the training time between two images (the first two histogram steps
always get one: the first drawing also loads matplotlib). Measured steps only add each
layer's gradient norm to a list; unmeasured steps never reach this module.
"""

from __future__ import annotations

import io
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Deque, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    from ..report import StepStats

IMAGE_TAG = "gradient.flow"
IMAGE_DPI = 100
FLOW_STEPS = 512
"""The most measured steps per layer an image's medians are taken over: the latest ones since the
previous image (memory stays bounded where images are rare, or never drawn: histograms off)."""
IMAGE_BUDGET: Optional[float] = 0.005
"""Largest share of the training time spent drawing images (``None``: an image on every
histogram step). With a drawing time ``d``, the next image waits until ``d / IMAGE_BUDGET``
seconds have passed since the previous one."""
MISSING = ("gradwatch: the gradient-flow image for TensorBoard's Images tab needs matplotlib (gradwatch's "
           "examples extra), which is not installed: the image is left out. To get it: pip install matplotlib")
# (no square brackets: the terminal prints notes as rich markup, where [examples] would vanish)


class FlowImage:
    """Collects each measured step's per-layer gradient norms and draws them as a PNG on the
    histogram steps the budget allows. ``note`` says once that matplotlib is missing."""

    def __init__(self, name: str, note: Optional[Callable[[str], None]] = None) -> None:
        self.name = name
        self.note = note
        self.available: Optional[bool] = None  # None: matplotlib not looked for yet
        # layer -> (step, gradient norm) since the last image, the latest FLOW_STEPS of them
        self.norms: Dict[str, Deque[Tuple[int, float]]] = {}
        self.numel: Dict[str, int] = {}  # parameter -> number of elements
        self.owner: Dict[str, str] = {}  # parameter -> layer
        self.layers: List[str] = []  # forward order
        self.draw_seconds = 0.0  # how long the last image took
        self.drawn_at: Optional[float] = None  # when the last image was finished

    def add(self, stats: "StepStats") -> None:
        """Keep a measured step's per-layer gradient norms (a few floats per layer)."""
        if self.available is False:  # nothing will be drawn (no matplotlib, or drawing failed)
            return
        for name, ls in stats.layers.items():
            if ls.grad_norm is not None:
                series = self.norms.get(name)
                if series is None:
                    series = self.norms[name] = deque(maxlen=FLOW_STEPS)
                series.append((stats.step, ls.grad_norm))
        if len(self.layers) != len(stats.layers):
            self.layers = list(stats.layers)
        for pname, ps in stats.params.items():
            self.numel[pname] = ps.numel
            self.owner[pname] = ps.layer

    def due(self) -> bool:
        """Whether drawing now keeps images within the budget."""
        if self.drawn_at is None or IMAGE_BUDGET is None:
            return True
        return self.draw_seconds <= IMAGE_BUDGET * (time.perf_counter() - self.drawn_at)

    def png(self) -> Optional[bytes]:
        """The figure for the steps collected since the last image, as PNG bytes (``None``:
        nothing to draw, or matplotlib is missing)."""
        if not self.norms or not self._matplotlib():
            return None
        from ..figures import gradient_flow
        from ..runs import Run

        start = time.perf_counter()
        steps = sorted({s for series in self.norms.values() for s, _ in series})
        span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
        run = Run(path=Path(self.name), layers=[n for n in self.layers if n in self.norms] or list(self.norms),
                  layer_types={}, param_layer=dict(self.owner), param_numel=dict(self.numel),
                  label=f"{self.name}, {span}")
        run.layer_scalars["gradient.layer_norm"] = {n: list(series) for n, series in self.norms.items()}
        buf = io.BytesIO()
        gradient_flow([run], buf, dpi=IMAGE_DPI)
        self.norms = {}
        first = self.drawn_at is None
        self.drawn_at = time.perf_counter()
        # The first drawing also loads matplotlib's modules and fonts: the next histogram step
        # draws again, and its time sets the pace.
        self.draw_seconds = 0.0 if first else self.drawn_at - start
        return buf.getvalue()

    def _matplotlib(self) -> bool:
        if self.available is None:
            try:
                import matplotlib  # noqa: F401
                self.available = True
            except ImportError:
                self.available = False
                if self.note is not None:
                    self.note(MISSING)
        return self.available


def png_shape(png: bytes) -> Tuple[int, int]:
    """(height, width) in pixels from a PNG's header."""
    return int.from_bytes(png[20:24], "big"), int.from_bytes(png[16:20], "big")
