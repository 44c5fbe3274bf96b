"""TensorBoard: scalars for every stat, histograms, findings as text, the gradient-flow
figure as an image, and a custom-scalars layout of the charts a run writes.

The tags are listed in :data:`TAGS` (``<layer>`` and ``<param>`` are qualified names as
``named_modules()`` / ``named_parameters()`` give them; the root module is ``(model)``);
docs/tags.md says what each holds, and a test keeps it and the README in step with this list.
Everything a measured step writes is one event: one record in the file, whatever the number
of tags.
"""

from __future__ import annotations

import functools
import math
import struct
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import numpy as np

from .base import Sink
from .flow_image import IMAGE_TAG, FlowImage, png_shape

try:  # TensorBoard without TensorFlow checksums every record in pure Python (about 150 ns a byte)
    import google_crc32c

    _FAST_CRC = google_crc32c.implementation == "c"
except ImportError:  # pragma: no cover - a declared dependency; TensorBoard's own framing is the fallback
    _FAST_CRC = False

if TYPE_CHECKING:
    from ..report import Finding, Report, StepData

LAYER_SCALARS = {
    "activation.mean": "mean",
    "activation.std": "std",
    "activation.zero_fraction": "zero_fraction",
    "activation.saturated_fraction": "saturated_fraction",
    "activation.dead_fraction": "dead_fraction",
    "activation.nonfinite": "nonfinite",  # written only at steps where the output held NaN/Inf
    "gradient.output_norm": "output_grad_norm",
    "gradient.layer_norm": "grad_norm",
    "attention.entropy": "attention_entropy",
    "attention.entropy_normalised": "attention_entropy_normalised",
    "attention.saturated_fraction": "attention_saturated_fraction",
    "attention.max_logit": "attention_max_logit",
}
_SAMPLED = ("mean", "std", "zero_fraction", "saturated_fraction")
"""Layer scalars read from the output's sample: none where no floating-point element was measured
(an attention module whose outputs are not floating point, or not measured)."""
PARAM_SCALARS = {"gradient.norm": "grad_norm", "gradient.max_abs": "grad_max_abs", "gradient.ratio": "ratio",
                 "update.ratio": "update_ratio"}
GLOBAL_SCALARS = ("gradient.global_norm", "gradient.global_applied_norm")
STEP_SCALARS = ("gradient.noise_scale",)  # of the whole step, each its own chart
FINDINGS_TEXT = "gradwatch/findings"
"""The name the findings' text is written under; TensorBoard's text summary appends
``/text_summary``, so the tag is ``gradwatch/findings/text_summary``."""

TAGS: Tuple[Tuple[str, str], ...] = (
    *(("scalar", f"{p}/<layer>") for p in LAYER_SCALARS),
    *(("scalar", f"{p}/<param>") for p in PARAM_SCALARS),
    *(("scalar", t) for t in GLOBAL_SCALARS),
    *(("scalar", t) for t in STEP_SCALARS),
    ("scalar", "findings/<kind>"),
    ("histogram", "activation/<layer>"),
    ("histogram", "gradient/<param>"),
    ("histogram", "attention.head_entropy/<layer>"),
    ("text", f"{FINDINGS_TEXT}/text_summary"),
    ("image", IMAGE_TAG),
)
"""Every tag gradwatch writes, with the TensorBoard tab it shows in: (kind, tag pattern)."""

_CATEGORIES = (("gradwatch: activations", "activation."), ("gradwatch: gradients", "gradient."),
               ("gradwatch: updates", "update."), ("gradwatch: attention", "attention."),
               ("gradwatch: findings", "findings"))


def scalar_family(tag: str) -> str:
    """The chart a scalar tag belongs to: its prefix (``activation.mean``), or the tag itself
    when it has no ``/<name>`` (``gradient.global_norm``)."""
    return tag.split("/", 1)[0]


def custom_scalars_layout(families: Iterable[str]) -> Dict[str, Dict[str, List[Any]]]:
    """One multi-line chart per family of scalar tags in ``families`` (those a run has
    written), titled by the family, so that every title is unique and every chart has
    curves; the two global norms share one chart, the noise scale has its own. Categories without
    charts are left out."""
    families = set(families)
    order = [*LAYER_SCALARS, *PARAM_SCALARS, *GLOBAL_SCALARS, *STEP_SCALARS, "findings"]
    charts: Dict[str, List[str]] = {}
    for family in sorted(families, key=lambda f: (order.index(f) if f in order else len(order), f)):
        title = "gradient.global_norm" if family in GLOBAL_SCALARS else family
        escaped = family.replace(".", "\\.")
        whole = family in GLOBAL_SCALARS or family in STEP_SCALARS  # a tag without /<name>
        charts.setdefault(title, []).append(f"^{escaped}$" if whole else f"^{escaped}/")
    layout: Dict[str, Dict[str, List[Any]]] = {}
    for category, prefix in _CATEGORIES:
        mine = {t: ["Multiline", regexes] for t, regexes in charts.items() if t.startswith(prefix)}
        if mine:
            layout[category] = mine
    return layout


SINGLE_VALUE_HALF_WIDTH = 0.5
"""A histogram of one value v (a dead layer's zeros) spans v ± this, as TensorBoard's own
histogram summary draws single-valued data."""


def single_value_buckets(value: float, count: float, bins: int) -> Tuple[float, float, List[float], List[float]]:
    """Buckets for a histogram whose elements all equal ``value``: an odd number of equal
    buckets (``bins``, or one more) spanning ``value`` ± :data:`SINGLE_VALUE_HALF_WIDTH`, all
    of ``count`` in the middle one. Returns (left edge, right edge, bucket right limits,
    counts). The edges are written as the histogram's ``min``/``max``: TensorBoard takes
    those as the outer bucket edges, and ``min == max`` would leave the value's bucket no
    width (its Python reader) or make the last bucket run backwards (its data server)."""
    n = max(1, bins | 1)
    lo, hi = value - SINGLE_VALUE_HALF_WIDTH, value + SINGLE_VALUE_HALF_WIDTH
    width = (hi - lo) / n
    limits = [lo + (i + 1) * width for i in range(n)]
    limits[-1] = hi
    counts = [0.0] * n
    counts[n // 2] = float(count)
    return lo, hi, limits, counts


def _masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C TensorBoard's record format puts after a record's length and data."""
    crc = int(google_crc32c.value(data))
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One record of an event file, byte for byte as TensorBoard's ``RecordWriter`` frames it
    (length, its masked CRC-32C, the data, the data's masked CRC-32C), with the checksums
    computed in C. TensorBoard's own pure-Python CRC costs about 4 ms for one step's 24 kB of
    scalars and histograms on a small MLP, on a writer thread that holds the GIL meanwhile."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc32c(header)) + data + struct.pack("<I", _masked_crc32c(data))


class _GuardedRecords:
    """Stands in for the record writer of a ``SummaryWriter`` gradwatch owns.

    TensorBoard writes from a background thread; a failure there (disk full, log folder
    removed mid-run) would print a thread traceback and then fail every later call. Here
    the first failure is kept instead, later writes are dropped, and the sink reports it
    once as a warning on the training thread. Records are framed by :func:`frame_record`
    and written to the record writer's file, when both are found.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.error: Optional[BaseException] = None
        file = getattr(inner, "_writer", None)
        self.file = file if _FAST_CRC and type(inner).__name__ == "RecordWriter" and hasattr(file, "write") else None

    def _guard(self, method: str, *args: Any) -> None:
        if self.error is not None:
            return
        try:
            getattr(self.inner, method)(*args)
        except Exception as exc:  # noqa: BLE001 - any I/O failure ends file output, nothing else
            self.error = exc

    def write(self, data: bytes) -> None:
        if self.file is None:
            self._guard("write", data)
        elif self.error is None:
            try:
                self.file.write(frame_record(data))
            except Exception as exc:  # noqa: BLE001 - as in _guard
                self.error = exc

    def flush(self) -> None:
        self._guard("flush")

    def close(self) -> None:
        try:
            self.inner.close()
        except Exception as exc:  # noqa: BLE001
            self.error = self.error or exc

    @property
    def closed(self) -> bool:
        return bool(getattr(self.inner, "closed", False))


def _guard_writer(writer: Any) -> Optional[_GuardedRecords]:
    """Put a :class:`_GuardedRecords` between ``writer``'s background thread and its file.
    Reaches into TensorBoard's private ``_AsyncWriter``; where that is not found (another
    version), nothing is changed and failures surface as before."""
    file_writer = getattr(writer, "file_writer", None)
    async_writer = getattr(getattr(file_writer, "event_writer", None), "_async_writer", None)
    worker = getattr(async_writer, "_worker", None)
    if async_writer is None or worker is None or not hasattr(async_writer, "_writer") \
            or getattr(worker, "_record_writer", None) is not async_writer._writer:
        return None
    guard = _GuardedRecords(async_writer._writer)
    with async_writer._lock:
        async_writer._writer = guard
        worker._record_writer = guard
    return guard


class TensorBoardSink(Sink):
    """Writes to ``log_dir`` with its own ``SummaryWriter``, or to a writer the user passes
    (which gradwatch flushes but never closes).

    If writing its own event file fails (disk full, folder removed), one
    :class:`~gradwatch.exceptions.GradWatchWarning` says so and TensorBoard output stops;
    training and the other outputs go on. No traceback comes from the writer's thread.
    ``note`` receives what a person should know once (the image left out without matplotlib).
    """

    def __init__(self, log_dir: Optional[str] = None, writer: Any = None,
                 note: Optional[Callable[[str], None]] = None) -> None:
        self.log_dir = log_dir
        self.writer = writer
        self._owns_writer = writer is None
        self._families: Set[str] = set()  # scalar tag families written so far: the layout's charts
        self._guard: Optional[_GuardedRecords] = None
        self._stopped = False
        self._note = note
        self._flow: Optional[FlowImage] = None

    def open(self) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # heavy import, only when used

            self.writer = SummaryWriter(log_dir=self.log_dir)
            self._guard = _guard_writer(self.writer)
        if self._flow is None:
            folder = self.log_dir or getattr(self.writer, "log_dir", None) or "run"
            self._flow = FlowImage(Path(folder).name or "run", self._note)

    def _failed(self) -> bool:
        """True once file output has failed; the first time, warn and stop writing."""
        if self._stopped:
            return True
        if self._guard is None or self._guard.error is None:
            return False
        self._stopped = True
        import warnings

        from ..exceptions import GradWatchWarning
        from .warn import _user_stacklevel

        err = self._guard.error
        warnings.warn(f"gradwatch: writing TensorBoard events to {self.log_dir} failed "
                      f"({type(err).__name__}: {err}); TensorBoard output stops here, training and the other "
                      f"outputs continue.", GradWatchWarning, stacklevel=_user_stacklevel())
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - already reported
            pass
        return True

    def on_step(self, data: "StepData", new_findings: "List[Finding]") -> None:
        if self._failed():
            return
        st = data.stats
        step = st.step
        event = _Event(self.writer)
        scalars: List[Tuple[str, float, str]] = []  # (tag, value, family): one call for all of them
        for name, ls in st.layers.items():
            for tag, attr in LAYER_SCALARS.items():
                value = getattr(ls, attr)
                if attr == "nonfinite":
                    if value:  # a chart per layer only where NaN/Inf appeared, not nine lines at 0
                        scalars.append((f"{tag}/{name}", 1.0, tag))
                elif value is not None and not (attr in _SAMPLED and ls.count == 0):
                    scalars.append((f"{tag}/{name}", float(value), tag))
        for pname, ps in st.params.items():
            for tag, attr in PARAM_SCALARS.items():
                # update_ratio: only with optimizer=; the ratio of a weight at zero (a bias at
                # initialisation) has no value, and a NaN line would read as a non-finite gradient.
                value = getattr(ps, attr) if attr != "ratio" or ps.weight_norm != 0 else None
                if value is not None:
                    scalars.append((f"{tag}/{pname}", float(value), tag))
        event.scalars(scalars)
        total = st.total_grad_norm
        if total is not None:
            event.scalar("gradient.global_norm", total)
        applied = st.total_applied_grad_norm
        if applied is not None:
            event.scalar("gradient.global_applied_norm", applied)
        if st.noise_scale is not None:
            event.scalar("gradient.noise_scale", st.noise_scale)
        for kind, n in Counter([f.kind.value for f in new_findings]).items():
            event.scalar(f"findings/{kind}", float(n))
        for name, h in data.act_histograms.items():
            event.histogram(f"activation/{name}", h)
        for name, h in data.grad_histograms.items():
            event.histogram(f"gradient/{name}", h)
        for name, ls in st.layers.items():
            if not ls.attention_heads:
                continue
            heads = [h["entropy_normalised"] for h in ls.attention_heads if h["entropy_normalised"] is not None]
            if heads:
                event.histogram(f"attention.head_entropy/{name}", histogram_of(heads, bins=20))
        if new_findings:  # one text per step holding all of its findings: TensorBoard shows one per step
            event.text(FINDINGS_TEXT, findings_markdown(new_findings))
        if self._flow is not None:
            self._flow.add(st)
            if (data.act_histograms or data.grad_histograms) and self._flow.due():
                self._image(event)
        families = event.families
        if not families <= self._families:  # TensorBoard reads the latest layout
            self._families |= families
            event.layout(custom_scalars_layout(self._families))
        event.write(step)

    def _image(self, event: "_Event") -> None:
        """Add the gradient-flow figure to the step's event. A failure to draw is said once
        and ends the images, not the sink."""
        assert self._flow is not None
        try:
            png = self._flow.png()
        except Exception as exc:  # noqa: BLE001 - an image is never worth the scalars
            self._flow.available = False
            if self._note is not None:
                self._note(f"gradwatch: drawing the gradient-flow image failed ({type(exc).__name__}: {exc}); "
                           f"TensorBoard gets no more images, the rest goes on.")
            return
        if png is not None:
            event.image(IMAGE_TAG, png)

    def close(self, report: "Report") -> None:
        if self.writer is None or self._failed():
            return
        if self._owns_writer:
            self.writer.close()
            self._failed()  # the last writes happen in close: report a failure there too
        else:
            self.writer.flush()


def histogram_of(values: List[float], bins: int) -> List[float]:
    """A few host values in ``stats.histogram``'s layout (min, max, num, sum, sum of squares,
    counts of ``bins`` equal buckets from min to max)."""
    a = np.asarray(values, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    counts = np.histogram(a, bins=bins, range=(lo, hi))[0] if hi > lo else np.eye(bins)[0] * a.size
    return [lo, hi, float(a.size), float(a.sum()), float(a @ a), *map(float, counts)]


def findings_markdown(findings: "List[Finding]") -> str:
    """One step's findings as one Markdown text: each with its warning category, layer,
    message, advice, value and threshold, separated by rules."""
    return "\n\n---\n\n".join(
        f"**{f.kind.category.__name__}** `{f.layer}`: {f.message}\n\n"
        f"_{f.advice}_ (value {f.value:.3g}, threshold {f.threshold:.3g})" for f in findings)


class _Event:
    """One step's scalars, histograms, findings text, image and layout, written as one
    TensorBoard event (one ``Summary`` with many values) instead of one event each: on a
    model with a hundred tags, a hundred protocol buffers, queue hand-offs and record writes
    become one. For PyTorch's ``SummaryWriter`` the values go straight into that ``Summary``
    as they come (``Summary.value.add``, fields set in place: no intermediate records, about
    half the Python work of building each value and then the message). A writer that is not
    PyTorch's (tensorboardX, a logger's wrapper) gets one call per value."""

    def __init__(self, writer: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = writer
        self.summary: Any = None  # PyTorch's writer: the event's Summary, filled as values come
        if isinstance(writer, SummaryWriter):
            from tensorboard.compat.proto import summary_pb2

            self.summary = summary_pb2.Summary()
            self._add = self.summary.value.add
        self.values: List[Tuple[str, str, Any]] = []  # another writer: (kind, tag, value), one call each
        self.families: Set[str] = set()  # of the scalars (the custom-scalars layout's charts)

    def scalar(self, tag: str, value: float, family: Optional[str] = None) -> None:
        """``family``: the tag's :func:`scalar_family`, where the caller knows it."""
        if self.summary is not None:
            self._add(tag=tag, simple_value=value)
        else:
            self.values.append(("scalar", tag, value))
        self.families.add(family or scalar_family(tag))

    def scalars(self, items: List[Tuple[str, float, str]]) -> None:
        """Many scalars at once: (tag, value, family) each."""
        families = self.families
        if self.summary is not None:
            add = self._add
            for tag, value, family in items:
                add(tag=tag, simple_value=value)
                families.add(family)
            return
        for tag, value, family in items:
            self.values.append(("scalar", tag, value))
            families.add(family)

    def histogram(self, tag: str, h: List[float]) -> None:
        mn, mx, num, total, sumsq = h[:5]
        counts = h[5:]
        if num <= 0 or not counts:
            return
        if not (math.isfinite(mn) and math.isfinite(mx)):
            return
        if mx > mn:
            width = (mx - mn) / len(counts)
            if not math.isfinite(width):
                return
            limits = (_bucket_steps(len(counts)) * width + mn).tolist()  # mn + (i + 1) * width
        else:  # every element the same value
            mn, mx, limits, counts = single_value_buckets(mn, num, len(counts))
        if self.summary is None:
            self.values.append(("histogram", tag, dict(min=mn, max=mx, num=int(num), sum=total, sum_squares=sumsq,
                                                       bucket_limits=limits, bucket_counts=counts)))
            return
        histo = self._add(tag=tag).histo  # (as SummaryWriter.add_histogram_raw builds it)
        histo.min, histo.max, histo.num, histo.sum, histo.sum_squares = mn, mx, int(num), total, sumsq
        histo.bucket_limit.extend(limits)
        histo.bucket.extend(counts)

    def text(self, tag: str, markdown: str) -> None:
        if self.summary is None:
            self.values.append(("text", tag, markdown))
            return
        from torch.utils.tensorboard import summary

        self.summary.value.append(summary.text(tag, markdown).value[0])

    def image(self, tag: str, png: bytes) -> None:
        if self.summary is None:
            self.values.append(("image", tag, png))
            return
        height, width = png_shape(png)
        image = self._add(tag=tag).image
        image.height, image.width, image.colorspace, image.encoded_image_string = height, width, 4, png

    def layout(self, layout: Dict[str, Dict[str, List[Any]]]) -> None:
        if self.summary is None:
            self.values.append(("layout", "", layout))
            return
        from torch.utils.tensorboard import summary

        self.summary.value.append(summary.custom_scalars(layout).value[0])

    def write(self, step: int) -> None:
        if self.summary is not None:
            if len(self.summary.value):
                self.writer._get_file_writer().add_summary(self.summary, step)
            return
        for kind, tag, value in self.values:
            if kind == "scalar":
                self.writer.add_scalar(tag, value, step)
            elif kind == "histogram":
                self.writer.add_histogram_raw(tag, global_step=step, **value)
            elif kind == "text":
                self.writer.add_text(tag, value, step)
            elif kind == "image" and hasattr(self.writer, "add_image"):
                self.writer.add_image(tag, _decode_png(value), step, dataformats="HWC")
            elif kind == "layout" and hasattr(self.writer, "add_custom_scalars"):
                self.writer.add_custom_scalars(value)


@functools.lru_cache(maxsize=8)
def _bucket_steps(bins: int) -> np.ndarray:
    """1, 2, ..., ``bins`` (float64): a histogram's bucket limits are ``min + steps * width``."""
    steps = np.arange(1, bins + 1, dtype=np.float64)
    steps.flags.writeable = False
    return steps


def _decode_png(png: bytes) -> Any:
    """A PNG as an 8-bit height x width x channels array, for a writer's ``add_image``."""
    import io

    from matplotlib.image import imread

    pixels = imread(io.BytesIO(png), format="png")
    return np.round(pixels * 255).astype(np.uint8) if pixels.dtype != np.uint8 else pixels
