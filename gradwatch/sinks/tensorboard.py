"""TensorBoard: scalars for every stat, histograms, findings as text, a custom-scalars layout.

Tag scheme (``<layer>`` and ``<param>`` are qualified names as ``named_modules()`` /
``named_parameters()`` give them; the root module is ``(model)``):

=================================  ==================================================
``activation.mean/<layer>``        mean of the layer's output
``activation.std/<layer>``         standard deviation of the output
``activation.zero_fraction/<layer>``  share of exact zeros
``activation.saturated_fraction/<layer>``  share of saturated elements (activations)
``activation.dead_fraction/<layer>``  share of dead units over the dead-unit window
``activation.nonfinite/<layer>``   count of NaN/Inf in the output
``gradient.output_norm/<layer>``   L2 norm of the gradient w.r.t. the layer's output
``gradient.layer_norm/<layer>``    L2 norm over the layer's own parameter gradients
``gradient.norm/<param>``          L2 norm of a parameter's gradient
``gradient.max_abs/<param>``       largest absolute gradient entry
``gradient.ratio/<param>``         gradient norm / weight norm
``gradient.global_norm``           L2 norm over all watched parameter gradients (end of backward)
``gradient.global_applied_norm``   the same at ``optimizer.step()``, after clipping (``optimizer=``)
``update.ratio/<param>``           update-to-weight ratio ‖Δw‖/‖w‖ across ``optimizer.step()`` (``optimizer=``)
``attention.entropy/<layer>``      mean attention entropy of a query, in nats (``nn.MultiheadAttention``)
``attention.entropy_normalised/<layer>``  the same over log(number of keys): 1 uniform, 0 one key
``attention.saturated_fraction/<layer>``  share of queries whose largest attention weight exceeds 0.99
``attention.max_logit/<layer>``    largest scaled query-key logit
histogram ``attention.head_entropy/<layer>``  normalised entropy of each head
``findings/<kind>``                1 at a step where a new finding of that kind was raised
histogram ``activation/<layer>``   output values (strided sample)
histogram ``gradient/<param>``     gradient values (strided sample)
text ``gradwatch/findings``        each finding with its advice
=================================  ==================================================
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from .base import Sink

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
    "activation.nonfinite": "nonfinite",
    "gradient.output_norm": "output_grad_norm",
    "gradient.layer_norm": "grad_norm",
    "attention.entropy": "attention_entropy",
    "attention.entropy_normalised": "attention_entropy_normalised",
    "attention.saturated_fraction": "attention_saturated_fraction",
    "attention.max_logit": "attention_max_logit",
}
PARAM_SCALARS = {"gradient.norm": "grad_norm", "gradient.max_abs": "grad_max_abs", "gradient.ratio": "ratio",
                 "update.ratio": "update_ratio"}


def custom_scalars_layout() -> Dict[str, Dict[str, List[Any]]]:
    """Per-layer charts grouped by stat: one multi-line chart per tag family."""
    def chart(prefix: str) -> List[Any]:
        return ["Multiline", [rf"^{prefix.replace('.', chr(92) + '.')}/.*"]]
    return {
        "gradwatch: activations": {p.split(".", 1)[1]: chart(p) for p in LAYER_SCALARS if p.startswith("activation")},
        "gradwatch: gradients": {
            **{p.split(".", 1)[1]: chart(p) for p in LAYER_SCALARS if p.startswith("gradient")},
            **{"param " + p.split(".", 1)[1]: chart(p) for p in PARAM_SCALARS},
            "global_norm": ["Multiline", [r"^gradient\.global_norm$", r"^gradient\.global_applied_norm$"]],
        },
        "gradwatch: updates": {"param update ratio": chart("update.ratio")},
        "gradwatch: attention": {p.split(".", 1)[1]: chart(p) for p in LAYER_SCALARS if p.startswith("attention")},
    }


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
    """

    def __init__(self, log_dir: Optional[str] = None, writer: Any = None) -> None:
        self.log_dir = log_dir
        self.writer = writer
        self._owns_writer = writer is None
        self._layout_written = False
        self._guard: Optional[_GuardedRecords] = None
        self._stopped = False

    def open(self) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # heavy import, only when used

            self.writer = SummaryWriter(log_dir=self.log_dir)
            self._guard = _guard_writer(self.writer)

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
        w, st = self.writer, data.stats
        step = st.step
        if not self._layout_written:
            w.add_custom_scalars(custom_scalars_layout())
            self._layout_written = True
        event = _Event(w)
        for name, ls in st.layers.items():
            for tag, attr in LAYER_SCALARS.items():
                value = getattr(ls, attr)
                if value is not None and not (attr in ("mean", "std") and ls.count == 0):
                    event.scalar(f"{tag}/{name}", float(value))
        for pname, ps in st.params.items():
            for tag, attr in PARAM_SCALARS.items():
                if getattr(ps, attr) is not None:  # update_ratio: only with optimizer=
                    event.scalar(f"{tag}/{pname}", float(getattr(ps, attr)))
        if st.total_grad_norm is not None:
            event.scalar("gradient.global_norm", st.total_grad_norm)
        if st.total_applied_grad_norm is not None:
            event.scalar("gradient.global_applied_norm", st.total_applied_grad_norm)
        for name, h in data.act_histograms.items():
            event.histogram(f"activation/{name}", h)
        for name, h in data.grad_histograms.items():
            event.histogram(f"gradient/{name}", h)
        event.write(step)
        for name, ls in st.layers.items():
            heads = [h["entropy_normalised"] for h in ls.attention_heads or [] if h["entropy_normalised"] is not None]
            if heads:
                import numpy as np

                w.add_histogram(f"attention.head_entropy/{name}", np.asarray(heads, dtype=np.float64), step,
                                bins=np.linspace(0.0, 1.0, 21))
        for f in new_findings:
            w.add_scalar(f"findings/{f.kind.value}", 1.0, step)
            w.add_text("gradwatch/findings", f"**{f.kind.category.__name__}** `{f.layer}`: {f.message}\n\n"
                                             f"_{f.advice}_ (value {f.value:.3g}, threshold {f.threshold:.3g})",
                       step)

    def close(self, report: "Report") -> None:
        if self.writer is None or self._failed():
            return
        if self._owns_writer:
            self.writer.close()
            self._failed()  # the last writes happen in close: report a failure there too
        else:
            self.writer.flush()


class _Event:
    """One step's scalars and histograms, written as one TensorBoard event (one ``Summary``
    with many values) instead of one event each: on a model with a hundred tags, a hundred
    protocol buffers, queue hand-offs and record writes become one. A writer that is not
    PyTorch's ``SummaryWriter`` (tensorboardX, a logger's wrapper) gets one call per value."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self.values: List[Any] = []  # ("scalar", tag, value) or ("histogram", tag, fields)

    def scalar(self, tag: str, value: float) -> None:
        self.values.append(("scalar", tag, value))

    def histogram(self, tag: str, h: List[float]) -> None:
        mn, mx, num, total, sumsq = h[:5]
        counts = h[5:]
        if num <= 0 or not counts:
            return
        width = (mx - mn) / len(counts) if mx > mn else 1.0
        if not (math.isfinite(mn) and math.isfinite(width) and math.isfinite(mn + len(counts) * width)):
            return
        limits = [mn + (i + 1) * width for i in range(len(counts))]
        self.values.append(("histogram", tag, dict(min=mn, max=mx, num=int(num), sum=total, sum_squares=sumsq,
                                                   bucket_limits=limits, bucket_counts=counts)))

    def write(self, step: int) -> None:
        if not self.values:
            return
        from torch.utils.tensorboard import SummaryWriter

        if isinstance(self.writer, SummaryWriter):
            from tensorboard.compat.proto import summary_pb2 as pb

            values = [_value(pb, kind, tag, v) for kind, tag, v in self.values]
            self.writer._get_file_writer().add_summary(pb.Summary(value=values), step)
            return
        for kind, tag, value in self.values:
            if kind == "scalar":
                self.writer.add_scalar(tag, value, step)
            else:
                self.writer.add_histogram_raw(tag, global_step=step, **value)


def _value(pb: Any, kind: str, tag: str, v: Any) -> Any:
    """One ``Summary.Value`` (``pb``: TensorBoard's summary_pb2): a scalar, or a histogram from
    ``add_histogram_raw``'s fields."""
    if kind == "scalar":
        return pb.Summary.Value(tag=tag, simple_value=v)
    return pb.Summary.Value(tag=tag, histo=pb.HistogramProto(
        min=v["min"], max=v["max"], num=v["num"], sum=v["sum"], sum_squares=v["sum_squares"],
        bucket_limit=v["bucket_limits"], bucket=v["bucket_counts"]))
