"""Pure statistics over tensors: no hooks, no state, no I/O.

Every function reduces (possibly large) tensors on their own device into a few numbers,
without a host synchronisation, so hooks can call them on the hot path and gradwatch moves
everything to the host in one transfer per logging step. Per layer only what needs the whole
tensor runs (:func:`full_sum`, :func:`unit_sums`, :func:`unit_max`, :func:`l2_norm`); what a strided
sample gives is computed for the samples of all layers at once (:func:`sample_rows`, :func:`histogram_rows`),
in a number of kernels that does not grow with depth, and, for CPU tensors, in NumPy layer by
layer (:func:`sample_rows_host`, :func:`histogram_host`; norms too), on memory NumPy reads without
a PyTorch op (:func:`host_array`). Each is tested against a numpy or per-tensor reference in
``tests/test_stats.py`` and ``tests/test_buffers.py``.
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

ACTIVATION_FIELDS = ("sum", "sample_dev_norm", "sample_nonzero", "sample_saturated")
"""Order of the values :func:`activation_summary` returns (see :func:`activation_moments`)."""

ROW_FIELDS = ("sample_sum", "sample_spread", "sample_nonzero", "sample_saturated")
"""Order of the values :func:`sample_rows` returns per sample (see :func:`row_moments`)."""

PEAK_FIELD = "sample_peak"
"""The last value :func:`sample_rows` returns per sample when asked for it: the sample's largest |value|."""

dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
"""Whether Dynamo traces the calling code (Dynamo reads the call as True): one Python frame in
eager code, where ``torch.compiler.is_compiling`` opens two (it asks TorchScript first). Where
``torch.export`` can trace without Dynamo, callers add ``getattr(torch.compiler, EXPORTING, False)``:
together they say what ``is_compiling`` says."""
EXPORTING = "_is_compiling_flag"
"""The attribute of ``torch.compiler`` that ``torch.export`` sets while it traces without Dynamo."""
_HALF = (torch.float16, torch.bfloat16)

HOST_ARRAYS = True
"""On the CPU, a float32/float64 tensor's sample statistics and histogram are computed in NumPy,
right where its hook sees it (:func:`sample_rows_host`, :func:`histogram_host`); False: the batched
PyTorch path (:func:`sample_rows`, :func:`histogram_rows`) everywhere, as on other devices. On the
CPU the batched path costs more: its buffer of every layer's samples is reduced once it has left
the caches, and buffers of megabytes allocated anew at each step page-fault, where each layer's
sample, reduced at once, is still in cache (the seed MLP's every-step forward statistics: +1.3 ms
batched, +0.7 ms in NumPy per layer, one thread). On a GPU a kernel launch costs what a NumPy
call costs on the CPU, and the batched path launches a fixed number for all layers."""

HOST_SUM_ELEMENTS = 1 << 19
"""Up to this many elements a CPU tensor's full sum and per-unit sums are NumPy's (``einsum``, read
at once: :func:`host_sum`, :func:`host_unit_sums`); above it PyTorch's, vectorised over every core.
As inside a training step (code cold, the tensor just produced; ``python benchmarks/reductions.py
--in-step``, the project's 2-core machine), a (256, 512) output's sum costs 11.8 against 28.5 us,
its per-unit sums 17.7 against 26.5; at 401,408 elements 31.6 against 77.1 and 53.0 against 65.9;
from about a million PyTorch's threads are as fast or faster."""

_HOST_TYPES = {torch.float32: (np.dtype(np.float32).str, 4), torch.float64: (np.dtype(np.float64).str, 8)}
_PLAIN = (Tensor, torch.nn.Parameter)


class _Memory:
    """A CPU tensor's memory as NumPy reads it (``__array_interface__``, read-only); it holds the
    tensor, so the memory outlives every array made from it."""

    __slots__ = ("__array_interface__", "tensor")


def host_array(t: Tensor) -> Optional[np.ndarray]:
    """``t`` as a read-only NumPy array over its memory, where that works: a float32/float64 CPU
    tensor, outside torch.compile's tracing, with ``HOST_ARRAYS`` on; else None. A plain tensor or
    parameter is read through its pointer, shape and strides, without a PyTorch op (``detach`` and
    ``numpy()`` are four dispatches, which cost more than the NumPy call that follows them)."""
    if not HOST_ARRAYS:
        return None
    kind = _HOST_TYPES.get(t.dtype)
    if kind is None or not t.is_cpu or t.layout is not torch.strided:
        return None
    if type(t) in _PLAIN:
        if t.is_neg() or t.is_conj() or dynamo_compiling():  # (export's tensors are subclasses)
            return None
        try:
            ptr = t.data_ptr()
        except RuntimeError:  # no memory of its own (functorch's wrappers)
            return None
        if not ptr and t.numel():  # nor this (functionalization's wrappers)
            return None
        memory = _Memory()
        memory.tensor = t
        memory.__array_interface__ = {
            "shape": t.shape, "typestr": kind[0], "data": (ptr, True), "version": 3,
            "strides": None if t.is_contiguous() else tuple([s * kind[1] for s in t.stride()])}
        return np.asarray(memory)
    x = t.detach()
    if type(x) is not Tensor or dynamo_compiling():
        return None  # tensor subclasses (FakeTensor, DTensor, functorch wrappers)
    try:
        return x.numpy()
    except (RuntimeError, TypeError, ValueError):
        return None


def read_number(t: Tensor) -> float:
    """The value of a one-element CPU tensor that gradwatch just computed (a ``dot``, an extreme),
    read through its memory (:func:`host_array`: no PyTorch op, where ``item()`` records two);
    ``item()`` where NumPy cannot read it."""
    a = host_array(t)
    return float(a.reshape(-1)[0]) if a is not None else t.item()


_AXES = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"  # einsum's subscripts, one per dimension
_SUM_ALL = [_AXES[:k] + "->" for k in range(33)]  # by ndim (NumPy has at most 32 dimensions)


def host_sum(a: np.ndarray) -> float:
    """The sum of every element of ``a``, accumulated in its dtype (``einsum``: vectorised, about 3x
    faster than NumPy's pairwise sum, to within a few float32 roundings at the sizes gradwatch gives
    it, see :data:`HOST_SUM_ELEMENTS`); a NaN, an Inf or an overflow to Inf gives no RuntimeWarning
    (``-W error`` would raise it in the user's step)."""
    return float(_einsum(_SUM_ALL[a.ndim], a))


def host_unit_sums(a: np.ndarray, dim: int) -> np.ndarray:
    """Per index of dimension ``dim`` of ``a``, the sum of its elements, accumulated in ``a``'s
    dtype, as :func:`unit_sums` gives them (without kept dimensions); no RuntimeWarning."""
    return _einsum(_SUM_ALL[a.ndim] + _AXES[dim], a)  # type: ignore[no-any-return]


def host_flat(a: np.ndarray) -> np.ndarray:
    """Every element of ``a`` as a 1-dimensional array in the order of its memory (a view where
    its memory is dense, as for a permuted layout; a copy in logical order for one with gaps or
    repeats)."""
    return a.reshape(-1) if a.flags.c_contiguous else np.ravel(a, order="K")


def sum_squares(flat: np.ndarray) -> float:
    """The sum of squares of a 1-dimensional array, accumulated in its dtype, on the calling
    thread. Not ``np.dot``: BLAS splits a long dot product over its own threads, which then spin
    for a while after each call and take the cores from PyTorch's (training steps several times
    slower, measured with OpenBLAS on a 2-core CPU). ``einsum`` raises no floating-point warning
    (an overflow to Inf, a NaN), so no ``np.errstate`` is needed around it (one costs more than the
    sum of a small array). Called as NumPy's compiled ``c_einsum``, which ``np.einsum`` calls after
    six Python calls of its own (dispatch, keyword checks): the same result."""
    return float(_einsum("i,i->", flat, flat))


def _c_einsum() -> Callable[..., Any]:
    for module in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):  # NumPy 2, 1
        try:
            return importlib.import_module(module).c_einsum  # type: ignore[no-any-return]
        except (ImportError, AttributeError):
            continue
    return np.einsum  # pragma: no cover - every NumPy since 1.x has it


_einsum = _c_einsum()


def _numpy_core(name: str) -> Any:
    for module in ("numpy._core.", "numpy.core."):  # NumPy 2, 1
        try:
            return importlib.import_module(module + name)
        except ImportError:
            continue
    return None  # pragma: no cover - every NumPy since 1.x has them


# NumPy's reductions as the compiled calls that ``ndarray.sum``/``max``/``min`` and ``np.count_nonzero``
# make after a Python frame of their own (two for ``count_nonzero``): the same results, no frame.
_sum = np.add.reduce
_max = np.maximum.reduce
_min = np.minimum.reduce
_count_nonzero = getattr(_numpy_core("multiarray"), "count_nonzero", np.count_nonzero)
_bincount = getattr(_numpy_core("_multiarray_umath"), "bincount", np.bincount)

# Floating-point errors (an overflowing sum, a NaN) ignored rather than warned about (``-W error``
# would raise the warning in the user's step): ``np.errstate(all="ignore")`` is three Python calls a
# use; NumPy 2 keeps that state in a context variable, set here directly (``token = _fp_ignore()``,
# then ``_fp_restore(token)`` in a ``finally``). NumPy 1: ``np.seterr`` and back.
_ufunc_config = _numpy_core("_ufunc_config")
_umath = _numpy_core("umath")
if hasattr(_ufunc_config, "_extobj_contextvar") and hasattr(_umath, "_make_extobj"):
    _fp_ignore: Callable[[], Any] = functools.partial(_ufunc_config._extobj_contextvar.set,
                                                      _umath._make_extobj(all="ignore"))
    _fp_restore: Callable[[Any], Any] = _ufunc_config._extobj_contextvar.reset
else:  # pragma: no cover - NumPy 1
    _fp_ignore = functools.partial(np.seterr, all="ignore")
    _fp_restore = lambda old: np.seterr(**old)  # noqa: E731


DOT_ELEMENTS = 1 << 17
"""From this many elements, a dense CPU tensor's sum of squares is PyTorch's ``dot`` (BLAS, on
PyTorch's own threads: about half of NumPy's single-threaded ``einsum`` from 131,072 float32 up on
the project's 2-core machine, ``benchmarks/reductions.py``); below it, NumPy's call costs less than
PyTorch's dispatch. Extremes stay NumPy's up to :data:`AMINMAX_ELEMENTS`."""


AMINMAX_ELEMENTS = 1 << 20
"""From this many elements, a dense CPU gradient's largest |value| is PyTorch's ``aminmax`` (one pass
over its memory, on PyTorch's threads) instead of NumPy's ``max`` and ``min`` (two passes on the
calling thread): 223 against 275 µs on the seed CNN's fc1 gradient of 3.2 million elements, about
equal at 401,408 (warm, ``benchmarks/reductions.py``, the project's 2-core machine)."""


def _dense(t: Optional[Tensor], size: int) -> Optional[Tensor]:
    """``t``'s elements as a 1-dimensional PyTorch view when it is large (:data:`DOT_ELEMENTS`) and
    contiguous, else None (NumPy reduces it). Detached only where autograd would record the view."""
    if t is None or size < DOT_ELEMENTS or not t.is_contiguous():
        return None
    return _detached(t).view(-1)


def host_norm(a: np.ndarray, t: Optional[Tensor] = None) -> float:
    """L2 norm of every element of ``a`` (:func:`sum_squares`, accumulated in ``a``'s dtype as
    :func:`l2_norm` accumulates; NaN/Inf anywhere makes it non-finite). ``t``: the tensor whose
    memory ``a`` reads, if the caller has it: a large one goes to PyTorch's ``dot`` instead."""
    flat = _dense(t, a.size)
    if flat is not None:
        return math.sqrt(read_number(torch.dot(flat, flat)))
    return math.sqrt(sum_squares(host_flat(a)))


def as_float(t: Tensor) -> Tensor:
    """Detached, in float32 at least: half-precision sums of squares overflow (fp16 max is 65504)."""
    t = t.detach()
    return t.float() if t.dtype in _HALF else t


def _acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulate half precision in float32 without copying the tensor (reductions take ``dtype=``)."""
    return torch.float32 if t.dtype in _HALF else t.dtype


def all_dims(t: Tensor) -> Tuple[int, ...]:
    return tuple(range(t.dim()))


def _detached(t: Tensor) -> Tensor:
    """``t`` detached where autograd would record on it (a detach is an op of its own; under
    ``no_grad``, where gradwatch reduces, none is needed)."""
    return t.detach() if t.requires_grad and torch.is_grad_enabled() else t


def l2_norm(t: Tensor) -> Tensor:
    """L2 norm over every element, accumulated in float32 at least; NaN/Inf anywhere makes it
    non-finite. Its shape is ``(1,) * t.dim()`` (kept dimensions: one kernel, no re-striding view
    after it, and the norms of tensors with as many dimensions concatenate in one
    :func:`to_host`)."""
    x = _detached(t)
    if x.dim() == 0:
        return torch.linalg.vector_norm(x, dtype=_acc_dtype(x))
    return torch.linalg.vector_norm(x, dim=all_dims(x), keepdim=True, dtype=_acc_dtype(x))


def l2_norm_now(t: Tensor) -> Union[float, Tensor]:
    """:func:`l2_norm`, read at once where NumPy reads ``t`` (:func:`host_norm`: no PyTorch op, and a
    number, which :func:`to_host` takes as it is); elsewhere the tensor :func:`l2_norm` gives."""
    a = host_array(t)
    return l2_norm(t) if a is None else host_norm(a, t)


def full_sum(t: Tensor) -> Tensor:
    """Sum of every element, accumulated in float32 at least, shaped ``(1,) * t.dim()`` (as
    :func:`l2_norm`); NaN/Inf anywhere makes it non-finite."""
    x = _detached(t)
    if x.dim() == 0:
        return x.sum(dtype=_acc_dtype(x))
    return x.sum(all_dims(x), keepdim=True, dtype=_acc_dtype(x))


def saturation_limits(lower: Optional[float], upper: Optional[float], margin: float) -> Tuple[float, float]:
    """The values an output must lie between not to count as saturated: within ``margin`` of the
    output range from a bound (``lower``/``upper``; an open side is +-inf; the range of a one-sided
    activation is taken as 1).

    >>> saturation_limits(0.0, 1.0, 0.01), saturation_limits(None, 6.0, 0.01)
    ((0.01, 0.99), (-inf, 5.99))
    """
    if lower is not None and upper is not None:
        width = (upper - lower) * margin
        return lower + width, upper - width
    return (-math.inf if lower is None else lower + margin), (math.inf if upper is None else upper - margin)


def activation_summary(y: Tensor, lower: Optional[float] = None, upper: Optional[float] = None,
                       margin: float = 0.01, max_elements: int = 1 << 15, nonnegative: bool = False, *,
                       total: Optional[Tensor] = None) -> Tensor:
    """Summarise one activation tensor into raw ``ACTIVATION_FIELDS`` (one small tensor on ``y``'s
    device): the reference that the batched path (:func:`sample_rows`) is tested against, and what a
    compiled graph computes per layer.

    ``sum`` covers every element, so the mean is exact and any NaN/Inf shows (it makes
    the sum non-finite). The spread, the share of zeros and the share of saturated
    elements come from an evenly strided sample of at most about ``max_elements`` elements
    (:func:`sample_view`; every element when the tensor is smaller): ``sample_dev_norm`` (L2 norm
    of the sample minus the exact mean of the whole tensor: a two-pass variance, exact also when
    the mean is large, and unbiased for the whole tensor's variance), ``sample_nonzero`` (a NaN
    counts as zero) and, only when a bound is given, ``sample_saturated`` (elements outside
    :func:`saturation_limits`). ``nonnegative``: the output cannot be negative (a rectifier),
    which saves a pass. ``total``: the sum of every element, when the caller has it already.
    Divisions happen on the host in :func:`activation_moments`.

    >>> raw = activation_summary(torch.tensor([0.0, 0.5, 0.999, 1.0]), 0.0, 1.0, margin=0.01)
    >>> {k: round(float(v), 4) for k, v in activation_moments(raw.tolist(), 4, 4).items()}
    {'mean': 0.6248, 'var': 0.1717, 'zeros': 1.0, 'nonfinite': 0.0, 'saturated': 3.0}
    """
    x = y.detach()
    n = x.numel()
    acc = _acc_dtype(x)
    bounded = lower is not None or upper is not None
    if n == 0:
        return torch.zeros(len(ACTIVATION_FIELDS) - (not bounded), dtype=acc, device=x.device)
    total = x.sum(dtype=acc) if total is None else total.to(acc).reshape(())
    s = sample_view(x, max_elements)
    # A 0-dim tensor does not promote: s - mean keeps s's dtype (half stays half).
    dev = torch.linalg.vector_norm(s - total / n, dtype=acc)
    nonzero = torch.sign(s)
    parts = [total, dev, (nonzero if nonnegative else nonzero.abs_()).sum(dtype=acc)]
    if bounded:
        low, high = saturation_limits(lower, upper, margin)
        wide = s.to(acc)  # compared as the batched path compares (half precision is widened first)
        parts.append(((wide > high) | (wide < low)).sum().to(acc))
    return torch.stack(parts)


def activation_moments(values: Sequence[float], n: int, m: int) -> dict:
    """Host side of :func:`activation_summary`: the raw values of an ``n``-element tensor
    summarised from an ``m``-element sample, as mean (exact), population variance, zeros
    and saturated (scaled up from the sample to ``n``), and whether a NaN/Inf was present."""
    v = dict(zip(ACTIVATION_FIELDS, values))
    v.setdefault("sample_saturated", 0.0)
    if not n or not m:
        return {"mean": math.nan, "var": math.nan, "zeros": 0.0, "nonfinite": False, "saturated": 0.0}
    scale = n / m
    if not math.isfinite(v["sum"]):  # NaN/Inf present: no share of zeros or saturated values is known
        return {"mean": v["sum"] / n, "var": math.nan, "zeros": math.nan, "nonfinite": True, "saturated": math.nan}
    return {"mean": v["sum"] / n, "var": v["sample_dev_norm"] ** 2 / m,
            "zeros": (m - v["sample_nonzero"]) * scale, "nonfinite": False,
            "saturated": v["sample_saturated"] * scale}


def slope_saturation(y: Tensor, grad_in: Tensor, grad_out: Tensor, slope: float,
                     peak: Optional[Tensor] = None) -> Tensor:
    """Slope-based saturation of an elementwise map y = f(x), from its two gradients.

    For an elementwise map, ``grad_in = f'(x) * grad_out``, so ``|grad_in / grad_out|``
    is the local slope. An element is *saturated* when its slope is below
    ``slope * peak``, where ``peak`` is the larger of the given running peak and the
    largest slope seen here. Elements whose output is exactly zero are a rectifier's
    off side (dead-unit territory), not saturation, and are not counted; neither are
    elements whose upstream gradient is zero (no information).

    Returns (valid elements, saturated elements, largest slope seen), float64.

    >>> x = torch.tensor([-8.0, 0.0, 8.0]); y = torch.sigmoid(x)
    >>> g_out = torch.ones(3); g_in = y * (1 - y) * g_out
    >>> slope_saturation(y, g_in, g_out, slope=0.04).tolist()
    [3.0, 2.0, 0.25]
    """
    out = as_float(y)
    gi = as_float(grad_in).abs()
    go = as_float(grad_out).abs()
    valid = (go > 0) & (out != 0) & torch.isfinite(gi) & torch.isfinite(go)
    s = torch.where(valid, gi / torch.where(valid, go, torch.ones_like(go)), torch.zeros_like(gi))
    observed = s.amax() if s.numel() else s.new_zeros(())
    top = observed if peak is None else torch.maximum(peak.to(observed), observed)
    saturated = (valid & (s < slope * top)).sum()
    return torch.stack([valid.sum().double(), saturated.double(), observed.double()])


def unit_dim(ndim: int, channels_first: Optional[bool] = None) -> Optional[int]:
    """The dimension that indexes *units*, for an output with a batch dimension first.

    ``channels_first`` says how the tensor that the activation received was laid out:
    True for the outputs of convolutions and of BatchNorm/InstanceNorm/GroupNorm (channels
    are dim 1 of ``(N, C, ...)``), False for Linear, LayerNorm, embeddings and recurrent layers
    (features are the last dim, also of ``(N, L, F)`` sequences and channels-last images).
    Unknown (None): features of ``(N, F)``, the last dim of ``(N, L, F)`` sequences, channels
    of ``(N, C, H, W)`` and ``(N, C, D, H, W)``. None when there is no batch dimension.

    >>> unit_dim(3), unit_dim(3, channels_first=True), unit_dim(4), unit_dim(4, channels_first=False)
    (2, 1, 1, 3)
    """
    if ndim < 2:
        return None
    if channels_first is None:
        channels_first = ndim >= 4
    return 1 if channels_first else ndim - 1


def active_units(y: Tensor, channels_first: Optional[bool] = None, nonnegative: bool = False) -> Optional[Tensor]:
    """Per unit (see :func:`unit_dim`): did any element of this unit differ from zero?
    ``nonnegative``: the output cannot be negative (a rectifier), so one reduction suffices.

    >>> active_units(torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, -3.0]])).tolist()
    [False, True, True]
    """
    d = unit_dim(y.dim(), channels_first)
    if d is None or y.numel() == 0:
        return None
    x = y.detach()
    dims = tuple(i for i in range(x.dim()) if i != d)
    # amax/amin are fast and allocation-free; count_nonzero over dims is ~10x slower on CPU.
    if nonnegative:
        return x.amax(dim=dims) > 0
    return (x.amax(dim=dims) > 0) | (x.amin(dim=dims) < 0)


def unit_sums(y: Tensor, channels_first: Optional[bool] = None, keepdim: bool = False) -> Optional[Tensor]:
    """Per unit (see :func:`unit_dim`): the sum of its elements, accumulated in float32 at least.
    For an output that cannot be negative (a rectifier's) one pass gives two things: a unit is
    active exactly where its sum is positive (a NaN sum is not), as :func:`active_units` says, and
    the sum of the sums is the whole tensor's. ``keepdim``: the reduced dimensions are kept (one
    kernel, and no re-striding view after it).

    >>> unit_sums(torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 3.0]])).tolist()
    [0.0, 3.0, 3.0]
    """
    d = unit_dim(y.dim(), channels_first)
    if d is None or y.numel() == 0:
        return None
    x = _detached(y)
    return x.sum(dim=tuple(i for i in range(x.dim()) if i != d), keepdim=keepdim, dtype=_acc_dtype(x))


def unit_max(y: Tensor, channels_first: Optional[bool] = None, keepdim: bool = False) -> Optional[Tensor]:
    """Per unit (see :func:`unit_dim`): its largest element, in ``y``'s dtype (a maximum is exact in
    any precision; a NaN anywhere in a unit makes its maximum NaN). A smooth rectifier's unit passes
    (almost) no gradient on any sample exactly when the largest pre-activation it received lies below
    the flat side's cut-off (``layers.FlatSide``). ``keepdim`` as in :func:`unit_sums`.

    >>> unit_max(torch.tensor([[-20.0, 1.0, -3.0], [-21.0, -2.0, -4.0]])).tolist()
    [-20.0, 1.0, -3.0]
    """
    d = unit_dim(y.dim(), channels_first)
    if d is None or y.numel() == 0:
        return None
    x = _detached(y)
    return x.amax(dim=tuple(i for i in range(x.dim()) if i != d), keepdim=keepdim)


def sample_view(t: Tensor, max_elements: int, within: int = 0) -> Tensor:
    """A 1-dimensional view of about ``max_elements`` evenly spaced elements of ``t`` (every element
    when it has fewer), taken in the order of its memory: one ``as_strided`` view, no copy, also for
    channels-last and other permuted layouts. No RNG is used, so sampling never disturbs the user's
    random stream (dropout masks stay identical). The stride is coprime with the dimension laid
    out innermost in memory (the last one, or the channels of a channels-last image), so the sample
    visits every feature or channel instead of, say, only the even ones. A tensor with gaps or
    repeats in its memory (sliced, expanded) is sampled in its logical order from a flattened copy,
    and so is every tensor inside a graph torch.compile traces (the same elements for a contiguous one).

    >>> sample_view(torch.arange(12).reshape(3, 4), 4).tolist()
    [0, 3, 6, 9]
    >>> sample_view(torch.arange(100_000).reshape(1000, 100), 32768).numel()  # stride 3, not 4
    33334

    ``within``: a sample of the sample of at most ``within`` elements (every k-th of its elements, k
    coprime with the innermost dimension as well, :func:`nested_stride`): an activation's histogram
    is binned from its statistics' sample, which the CPU has copied already.

    >>> sample_view(torch.arange(100_000).reshape(1000, 100), 8192, within=32768)[:3].tolist()  # 3 * 3
    [0, 9, 18]
    """
    if dynamo_compiling() or getattr(torch.compiler, EXPORTING, False):  # traced: shape arithmetic only
        # (no guard on strides), in the logical order
        n = t.numel()
        last = t.shape[-1] if t.dim() else 1
        s, dense = _sample_stride(n, last, max_elements, within), False
    else:
        n, s, dense = _plan(t.shape, t.stride(), t.is_contiguous(), max_elements, within)
    if dense:
        return t.as_strided((-(-n // s),), (s,), t.storage_offset())
    flat = t.reshape(-1)
    return flat if s == 1 else flat[::s]


def strided_sample(t: Tensor, max_elements: int, within: int = 0) -> Tensor:
    """:func:`sample_view` of ``t`` (detached) as a contiguous tensor.

    >>> strided_sample(torch.arange(6).reshape(2, 3).t(), 6).tolist()  # memory order, not the transpose's
    [0, 1, 2, 3, 4, 5]
    """
    return sample_view(t.detach(), max_elements, within).contiguous()


def sample_size(t: Tensor, max_elements: int, within: int = 0) -> int:
    """Number of elements :func:`sample_view` takes from ``t`` (host arithmetic, no sync)."""
    if dynamo_compiling() or getattr(torch.compiler, EXPORTING, False):
        n = t.numel()
        last = t.shape[-1] if t.dim() else 1
        return -(-n // _sample_stride(n, last, max_elements, within))
    n, s, _ = _plan(t.shape, t.stride(), t.is_contiguous(), max_elements, within)
    return -(-n // s)


@functools.lru_cache(maxsize=4096)  # a model's shapes repeat every step
def _plan(shape: Tuple[int, ...], strides: Tuple[int, ...], contiguous: bool, max_elements: int,
          within: int = 0) -> Tuple[int, int, bool]:
    """(elements, stride, whether the memory is dense: no gaps, no overlaps) of a tensor's sample
    (nested in the one of at most ``within`` elements when given, see :func:`sample_view`)."""
    n = math.prod(shape)
    inner = shape[-1] if shape else 1
    dense = contiguous
    if not contiguous:  # a permutation of a contiguous layout? then its memory is sampled as it lies
        pairs = sorted((st, sz) for st, sz in zip(strides, shape) if sz != 1)
        expected = 1
        for st, sz in pairs:
            if st != expected:
                break
            expected *= sz
        else:
            dense, inner = True, (pairs[0][1] if pairs else 1)
    return n, _sample_stride(n, inner, max_elements, within), dense


def _sample_stride(n: int, last: int, max_elements: int, within: int = 0) -> int:
    """The stride of :func:`sample_view`'s sample: :func:`nested_stride` when ``within``, else its own."""
    return nested_stride(n, last, within, max_elements) if within else _stride(n, last, max_elements)


def nested_stride(n: int, last: int, within: int, max_elements: int) -> int:
    """The stride of a sample of at most about ``max_elements`` of ``n`` elements taken from their
    sample of at most ``within`` (stride ``s``): ``s * k``, k chosen as ``s`` is (coprime with
    ``last``, nearest to the inner sample's size over ``max_elements``), so every k-th element of
    the inner sample is taken and every feature is still visited.

    >>> nested_stride(100_000, 100, 32768, 8192)  # 3 for the inner sample, then every 3rd of it
    9
    >>> nested_stride(20_000, 100, 32768, 8192)  # the inner sample is everything
    3
    """
    s = _stride(n, last, within)
    return s * _stride(-(-n // s), last, max_elements)


@functools.lru_cache(maxsize=4096)
def _stride(n: int, last: int, max_elements: int) -> int:
    """The stride coprime with ``last`` nearest to ``n / max_elements`` (at least 2), so the
    sample holds about ``max_elements`` elements and still visits every feature."""
    if n <= max_elements:
        return 1
    target = n / max_elements
    base = max(2, round(target))
    for delta in range(0, base + last + 1):
        for stride in (base - delta, base + delta):
            if stride >= 2 and math.gcd(stride, last) == 1:
                return stride
    return base


def sample_rows(x: Tensor, counts: Tensor, low: Optional[Tensor] = None, high: Optional[Tensor] = None,
                peak: bool = False) -> Tensor:
    """The statistics of many strided samples at once, in a fixed number of kernels: ``x`` is a
    ``(k, R)`` buffer holding one sample per row, NaN after its end (``x`` is used as scratch space
    and left changed); ``counts`` ``(k, 1)``: each row's number of elements. Returns ``(k, 4)``
    rows of ``ROW_FIELDS``: the sample's sum, the L2 norm of its deviations from its own mean
    (a two-pass spread), the root of its number of non-zero elements and, where ``low``/``high``
    ``(k, 1)`` are given (:func:`saturation_limits`, +-inf for a row without bounds), the root of its
    number of elements outside them (roots: an L2 norm of signs counts in one fast kernel). A NaN
    counts as zero and never as saturated; a sample with a NaN/Inf gives meaningless spreads, which
    :func:`row_moments` replaces, its tensor's sum being non-finite. Host side: :func:`row_moments`.
    ``peak``: one more, last column: the largest |value| of the sample (:data:`PEAK_FIELD`; an Inf
    counts, a NaN does not), two kernels more for all rows (how near float16 outputs come to
    float16's largest finite value; the sample visits every feature, see :func:`sample_view`).

    >>> x = torch.tensor([[1.0, 0.0, 3.0, float("nan")], [0.5, 0.999, float("nan"), float("nan")]])
    >>> rows = sample_rows(x, torch.tensor([[3.0], [2.0]]), torch.tensor([[-math.inf], [0.01]]),
    ...                    torch.tensor([[math.inf], [0.99]]))
    >>> first, second = ([round(v ** 2 if j else v, 4) for j, v in enumerate(r)] for r in rows.tolist())
    >>> first  # (squared: the third and fourth fields are roots)
    [4.0, 4.6667, 2.0, 0.0]
    >>> second
    [1.499, 0.1245, 2.0, 1.0]
    """
    total = torch.nansum(x, 1, keepdim=True)
    dev = x - total / counts
    spread = torch.linalg.vector_norm(dev.nan_to_num_(0.0), dim=1, keepdim=True)
    del dev
    saturated = []
    if low is not None and high is not None:
        outside = torch.maximum(x, low)
        torch.minimum(outside, high, out=outside)
        saturated.append(torch.linalg.vector_norm(outside.sub_(x).sign_(), dim=1, keepdim=True))
        del outside
    top = []
    if peak:  # the padding's NaN (and a NaN of the sample) become 0, which sign_ counts as before
        top.append(torch.linalg.vector_norm(x.nan_to_num_(0.0, math.inf, -math.inf), ord=math.inf, dim=1,
                                            keepdim=True))
    nonzero = torch.linalg.vector_norm(x.sign_(), dim=1, keepdim=True)  # sign(NaN) is 0
    return torch.cat([total, spread, nonzero] + saturated + top, 1)


def _host_sample(t: Tensor, a: np.ndarray, max_elements: int, within: int = 0) -> np.ndarray:
    """The elements :func:`sample_view` takes of ``t`` (whose memory ``a`` shares), as an array."""
    _, stride, dense = _plan(t.shape, t.stride(), t.is_contiguous(), max_elements, within)
    flat = host_flat(a) if dense else a.reshape(-1)  # gaps or repeats: a copy in logical order, as sample_view
    return flat[::stride] if stride > 1 else flat


def activation_rows(tensors: Sequence[Tensor], max_elements: int,
                    limits: Optional[Sequence[Optional[Tuple[float, float]]]] = None) -> Tensor:
    """:func:`sample_rows` of many tensors held at once (a compiled graph's layer outputs): their
    samples (:func:`sample_view`) padded with NaN into one buffer, in float32 (float64 if any tensor
    is). ``limits``: per tensor, its :func:`saturation_limits` or None. With each tensor's sum
    (:func:`full_sum`), :func:`row_moments` gives its statistics.

    >>> rows = activation_rows([torch.tensor([0.0, 2.0]), torch.tensor([[1.0, 1.0, 1.0]])], 8)
    >>> [round(v, 4) for v in rows[:, 0].tolist()], [round(v * v) for v in rows[:, 2].tolist()]
    ([2.0, 3.0], [1, 3])
    """
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    samples = [sample_view(t.detach(), max_elements).to(dtype) for t in tensors]
    x = torch.nn.utils.rnn.pad_sequence(samples, batch_first=True, padding_value=math.nan)
    device = x.device
    counts = torch.tensor([[float(s.numel())] for s in samples], dtype=dtype, device=device)
    low = high = None
    if limits is not None and any(lim is not None for lim in limits):
        bounds = [lim if lim is not None else (-math.inf, math.inf) for lim in limits]
        low = torch.tensor([[b[0]] for b in bounds], dtype=dtype, device=device)
        high = torch.tensor([[b[1]] for b in bounds], dtype=dtype, device=device)
    return sample_rows(x, counts, low, high)


def sample_rows_host(t: Tensor, a: np.ndarray, max_elements: int, limits: Optional[Tuple[float, float]] = None,
                     scale: Optional[float] = None, bins: int = 0,
                     histogram_elements: int = 0) -> Tuple[List[float], Optional[List[float]]]:
    """:func:`sample_rows`' row of one CPU tensor ``t``, whose memory ``a`` shares, in NumPy: the
    same fields from the same elements, float64. ``scale``: the sample multiplied by it first. With
    ``bins``, also :func:`histogram_host`'s row of the sample of at most ``histogram_elements``
    nested in this one (``within=max_elements``): every k-th element of the copy made here, instead
    of a second gather over the tensor. Returns the row and the histogram's row (or None)."""
    s = _host_sample(t, a, max_elements)
    if s.size == 0:
        return [0.0, 0.0, 0.0, 0.0], _histogram_of(s, bins) if bins else None
    token = _fp_ignore()  # NaN/Inf and overflows give no RuntimeWarning (-W error would raise it)
    try:
        # One copy into contiguous memory of our own (every later pass is several times faster, and
        # the deviations are then computed in place).
        s = s * scale if scale is not None else s.copy()
        hist = None
        if bins:  # (before this row's pass turns s into deviations)
            plan = (t.shape, t.stride(), t.is_contiguous())
            k = _plan(*plan, histogram_elements, max_elements)[1] // _plan(*plan, max_elements)[1]
            hist = _histogram_of(s[::k] if k > 1 else s, bins)
        total = float(_sum(s))
        nonzero = _count_nonzero(s != 0)  # (on floats, count_nonzero alone is 5x slower)
        if not math.isfinite(total):  # maybe a NaN in the sample: it counts as zero, as torch.sign makes it
            nonzero -= _count_nonzero(s != s)
        saturated = _count_nonzero((s > limits[1]) | (s < limits[0])) if limits is not None else None
        s -= total / s.size
        row = [total, math.sqrt(sum_squares(s)), math.sqrt(nonzero)]
    finally:
        _fp_restore(token)
    if saturated is not None:  # a NaN is never saturated (comparisons are False)
        row.append(math.sqrt(saturated))
    return row, hist


def row_moments(total: float, n: int, row: Sequence[float], m: int) -> dict:
    """Host side of :func:`sample_rows`: a row of an ``m``-element sample of an ``n``-element tensor
    whose exact sum is ``total`` -> what :func:`activation_moments` gives for the same tensor."""
    if not n or not m:
        out = activation_moments([], n, m)
        if n and not math.isfinite(total):  # known by its sum alone, non-finite: nothing else is known
            out.update(nonfinite=True, zeros=math.nan, saturated=math.nan)
        return out
    s, spread, nonzero, saturated = (list(row) + [0.0])[:4]
    if math.isfinite(total):
        # The sample's spread around the whole tensor's exact mean: around its own mean, plus the shift.
        dev_sq = spread * spread + m * (s / m - total / n) ** 2
    else:
        dev_sq = math.nan
    return activation_moments([total, math.sqrt(dev_sq), round(nonzero * nonzero), round(saturated * saturated)], n, m)


HISTOGRAM_SAMPLES = 1 << 13
"""The largest strided sample a histogram is built from (8192 elements: with 64 bins, about
130 per bin on average). A histogram is a picture of the shape of a distribution; the
numbers gradwatch judges by (shares, spreads, norms) come from larger samples or every element."""


def histogram(t: Tensor, bins: int, max_elements: int = HISTOGRAM_SAMPLES, within: int = 0) -> Tensor:
    """Histogram of (a strided sample of) ``t``, float64 ``[min, max, num, sum, sum_squares,
    count_0, ..., count_{bins-1}]`` over equal-width bins spanning [min, max] (the fields
    TensorBoard's ``add_histogram_raw`` takes): one row of :func:`histogram_rows`, or of
    :func:`histogram_host` for a CPU tensor NumPy reads. ``within`` as for :func:`sample_view`.

    >>> histogram(torch.tensor([0.0, 1.0, 1.0, 4.0]), bins=4).tolist()
    [0.0, 4.0, 4.0, 6.0, 18.0, 1.0, 2.0, 0.0, 1.0]
    """
    a = host_array(t)
    if a is not None:
        row = histogram_host(t, a, bins, max_elements, within=within) if a.size else None
    else:
        x = strided_sample(t, max_elements, within).reshape(1, -1)
        row = histogram_rows(x, bins)[0].tolist() if x.numel() else None
    if row is None:
        return torch.zeros(5 + bins, dtype=torch.float64, device=t.device)
    return torch.tensor(histogram_fields(row), dtype=torch.float64, device=t.device)


def histogram_rows(x: Tensor, bins: int) -> Tensor:
    """Histograms of many strided samples at once, in a fixed number of kernels and without a host
    synchronisation: ``x`` is a ``(k, R)`` buffer holding one sample per row, NaN after its end (as
    for :func:`sample_rows`). Returns float64 ``(k, 5 + bins)`` rows ``[min, max, sum, sum_squares,
    count_0, ..., count_{bins-1}, left_out]`` over equal-width bins spanning each row's finite values
    (:func:`histogram_fields` makes TensorBoard's fields of one). NaN/Inf values are left out; a row
    of one value has every element in the first bin. Computed in float64, where ``(x - min) * scale``
    cannot overflow; bins are counted with ``index_add_`` (``bincount`` would read its largest index
    on the host)."""
    k, inf, nan = x.shape[0], math.inf, math.nan
    v = x.to(torch.float64, copy=True).nan_to_num_(nan, nan, nan)  # every value left out is a NaN now
    low = torch.nan_to_num(v, nan=inf).amin(1, keepdim=True)
    high = torch.nan_to_num(v, nan=-inf).amax(1, keepdim=True)
    finite = torch.nan_to_num(v, nan=0.0)
    total = finite.sum(1, keepdim=True)
    squares = finite.mul_(finite).sum(1, keepdim=True)
    del finite
    scale = torch.reciprocal(high - low).mul_(bins).nan_to_num_(0.0, 0.0, 0.0)  # one value: all in bin 0
    # Values -> bins 0..bins-1 (the largest lands on bins, taken into the last one), NaN -> bins: the
    # slot after each row's own bins, which collects what is left out; then each row's slots apart.
    v.sub_(low).mul_(scale).clamp_(max=bins - 1).floor_().nan_to_num_(bins)
    v.add_(torch.arange(0, k * (bins + 1), bins + 1, dtype=torch.float64, device=x.device).view(k, 1))
    idx = v.view(-1).to(torch.int64)
    counts = torch.zeros(k * (bins + 1), dtype=torch.float64, device=x.device)
    counts.index_add_(0, idx, torch.ones((), dtype=torch.float64, device=x.device).expand(idx.numel()))
    return torch.cat([low, high, total, squares, counts.view(k, bins + 1)], 1)


def histogram_host(t: Tensor, a: np.ndarray, bins: int, max_elements: int = HISTOGRAM_SAMPLES,
                   scale: Optional[float] = None, within: int = 0) -> List[float]:
    """:func:`histogram_rows`' row of one CPU tensor ``t``, whose memory ``a`` shares, in NumPy:
    the same fields from the same elements (float64 arithmetic, one call per pass); ``within`` as
    for :func:`sample_view`."""
    return _histogram_of(_host_sample(t, a, max_elements, within), bins, scale)


def _histogram_of(s: np.ndarray, bins: int, scale: Optional[float] = None) -> List[float]:
    """:func:`histogram_host`'s row of the sample ``s`` (left unchanged)."""
    token = _fp_ignore()  # overflows (to Inf, as PyTorch's) give no RuntimeWarning
    try:
        s = s.astype(np.float64)  # (a float32 sample times a scalar stays float32 under NumPy 1's casting)
        if scale is not None:
            s *= scale
        total = float(_sum(s))
        left_out = 0
        if not math.isfinite(total):  # a NaN/Inf in the sample, or a scaled sum past float64's range
            finite = np.isfinite(s)
            left_out = s.size - int(_count_nonzero(finite))
            if left_out:
                s = s[finite]
                total = float(_sum(s))
        if not s.size:
            return [math.inf, -math.inf, 0.0, 0.0] + [0.0] * bins + [float(left_out)]
        low, high = float(_min(s)), float(_max(s))
        x = np.subtract(s, low)
        scale_ = bins / (high - low) if high > low else 0.0
        x *= scale_ if math.isfinite(scale_) else 0.0  # (a subnormal range: all in bin 0, as histogram_rows)
        # The largest value lands on ``bins``: counted in one more slot, then taken into the last bin.
        counts = _bincount(x.astype(np.intp), minlength=bins + 1)
        counts[bins - 1] += _sum(counts[bins:])
        squares = float(_einsum("i,i->", s, s))  # (sum_squares, in line)
        return [low, high, total, squares] + counts[:bins].astype(np.float64).tolist() + [float(left_out)]
    finally:
        _fp_restore(token)


def histogram_fields(row: Sequence[float]) -> List[float]:
    """One row of :func:`histogram_rows` as ``[min, max, num, sum, sum_squares, count_0, ...,
    count_{bins-1}]``."""
    counts = list(row[4:-1])
    return [row[0], row[1], float(sum(counts)), row[2], row[3]] + counts


def grad_summaries(grads: Sequence[Tensor], weights: Sequence[Tensor]) -> Tensor:
    """Per parameter: gradient L2 norm, gradient max |g|, weight L2 norm -- fused multi-tensor
    reductions (``torch._foreach_norm``) per dtype, instead of three small ops per parameter.

    Returns float64 of shape (3, len(grads)) on the first gradient's device. A NaN/Inf anywhere
    in a gradient makes its norm non-finite, which is how non-finite gradients are detected at no
    extra cost. Any floating dtype works (half precision accumulates in float32); complex
    tensors count by their magnitude. A large but finite float32 gradient (1e19) is not reported
    as non-finite: where the float32 sum of squares overflows, the norm is computed again on the
    scaled tensor (on CPU only then; on other devices in float64 from the start, which is cheap
    there). A dtype that fails leaves its parameters NaN and costs the others nothing.

    >>> grad_summaries([torch.tensor([3.0, -4.0])], [torch.tensor([1.0, 0.0])]).tolist()
    [[5.0], [4.0], [1.0]]
    >>> f"{grad_summaries([torch.full((4,), 1e19)], [torch.ones(4)])[0, 0]:.3g}"  # float32 overflows at 1e19**2
    '2e+19'
    """
    if not grads:
        return torch.zeros(3, 0, dtype=torch.float64)
    device = grads[0].device
    groups: dict = {}
    for i, g in enumerate(grads):
        groups.setdefault((g.device, g.dtype), []).append(i)
    with torch.no_grad():
        if len(groups) == 1:  # the usual case: one run of kernels, its rows as they come
            try:
                rows = _grad_rows(list(grads), list(weights), device)
                return rows if rows.dtype == torch.float64 and rows.device == device else rows.to(device, torch.float64)
            except (RuntimeError, TypeError, NotImplementedError):
                return torch.full((3, len(grads)), math.nan, dtype=torch.float64, device=device)
        out = torch.full((3, len(grads)), math.nan, dtype=torch.float64, device=device)
        for (dev, dtype), idx in groups.items():
            try:
                rows = _grad_rows([grads[i] for i in idx], [weights[i] for i in idx], dev)
            except (RuntimeError, TypeError, NotImplementedError):
                continue  # this dtype is not supported by the fused kernels: its parameters stay NaN
            rows = rows.to(device, torch.float64)
            if idx == list(range(idx[0], idx[-1] + 1)):  # contiguous (callers sort by dtype): a slice, no copy
                out[:, idx[0]:idx[-1] + 1] = rows
            else:
                out[:, torch.tensor(idx).to(device, non_blocking=True)] = rows
    return out


def _grad_rows(grads: List[Tensor], weights: List[Tensor], device: torch.device) -> Tensor:
    """One (device, dtype) group's rows: fused multi-tensor kernels (a few launches for any number of
    parameters); on the CPU, unless ``HOST_ARRAYS`` is off, per-tensor kernels read at once."""
    if device.type == "cpu" and HOST_ARRAYS and not grads[0].is_complex():
        return _grad_rows_cpu(grads, weights)
    acc = torch.float32 if grads[0].dtype in _HALF else None
    if grads[0].dtype == torch.float32:
        acc = torch.float64  # no overflow of the sum of squares; fused and cheap on accelerators
    norms = torch.stack(torch._foreach_norm(grads, dtype=acc))
    wnorms = torch.stack(torch._foreach_norm(weights, dtype=torch.float32 if weights[0].dtype in _HALF else None))
    # The inf-norm reads each gradient once and allocates nothing (``_foreach_abs`` would copy them all);
    # it has no value for an empty tensor (and would fail the whole group): a zero stands in for one.
    maxabs = torch.stack(torch._foreach_norm([g if g.numel() else g.new_zeros(1) for g in grads], ord=math.inf))
    return torch.stack([norms.double(), maxabs.double(), wnorms.double()])


def _grad_rows_cpu(grads: List[Tensor], weights: List[Tensor]) -> Tensor:
    """The CPU's rows: float32/float64 tensors in NumPy through their memory (:func:`host_array`, no
    PyTorch op: :func:`_host_grad_row`), any other one in per-tensor kernels (:func:`_torch_grad_rows`)."""
    rows = np.empty((3, len(grads)))
    others: List[int] = []
    token = _fp_ignore()  # NaN/Inf and overflows give no RuntimeWarning (see sample_rows_host)
    try:
        for i, (g, w) in enumerate(zip(grads, weights)):
            a, b = host_array(g), host_array(w)
            if a is None or b is None:
                others.append(i)
            else:
                rows[:, i] = _host_grad_row(a, b, g, w)
    finally:
        _fp_restore(token)
    if others:
        rows[:, others] = _torch_grad_rows([grads[i] for i in others], [weights[i] for i in others])
    return torch.from_numpy(rows)


def _host_grad_row(a: np.ndarray, b: np.ndarray, g: Optional[Tensor] = None,
                   w: Optional[Tensor] = None) -> Tuple[float, float, float]:
    """Gradient L2 norm, gradient max |g| and weight L2 norm of a gradient and a weight NumPy reads
    (``g`` and ``w``: the tensors themselves, whose large ones' sums of squares PyTorch computes, see
    :data:`DOT_ELEMENTS`).
    The norms are :func:`sum_squares`; max |g| is one pass that allocates up to 16,384 elements,
    two that do not above (the faster of the two at each size), and PyTorch's ``aminmax`` from
    :data:`AMINMAX_ELEMENTS` (dense tensors). Where the float32 sum of squares
    overflows, the norm is computed again in float64 on the tensor scaled by its max |g|. Floating-point
    errors (a NaN, an overflow) are ignored around it by the caller (:func:`_grad_rows_cpu`)."""
    dense = _dense(g, a.size)
    flat = host_flat(a)
    norm = math.sqrt(read_number(torch.dot(dense, dense)) if dense is not None else sum_squares(flat))
    if not flat.size:
        top = 0.0
    elif flat.size <= 1 << 14:
        top = float(_max(np.abs(flat)))
    elif dense is not None and flat.size >= AMINMAX_ELEMENTS:
        low, high = torch.aminmax(dense)  # one pass, on PyTorch's threads
        top = max(read_number(high), -read_number(low))  # NaN when either is (both are)
    else:
        top = max(float(_max(flat)), -float(_min(flat)))  # NaN when either is (both are)
    if math.isinf(norm) and math.isfinite(top) and top > 0:
        scaled = flat.astype(np.float64) / top
        norm = top * math.sqrt(sum_squares(scaled))
    return norm, top, host_norm(b, w)


def _torch_grad_rows(grads: List[Tensor], weights: List[Tensor]) -> List[List[float]]:
    """The rows of CPU tensors NumPy does not read (half precision, tensor subclasses): per tensor one
    kernel per norm and extreme, with kept dimensions (the fused ``_foreach_`` kernels run tensor by
    tensor on the CPU too, and their results need re-striding and stacking; ``aminmax`` over all
    dimensions is no faster than ``amax`` and ``amin``, over one dimension 15x slower), read on the
    host at once: a number read on the CPU costs no synchronisation, and the float32 overflow check
    below needs them."""
    # Four numbers per parameter, shaped (1,) * g.dim(): concatenated per number of dimensions, read once.
    by_ndim: Dict[int, List[Tensor]] = {}
    for g, w in zip(grads, weights):
        if g.dim() and g.numel():
            dims = all_dims(g)
            by_ndim.setdefault(g.dim(), []).extend(
                [l2_norm(g), l2_norm(w), g.amin(dims, keepdim=True), g.amax(dims, keepdim=True)])
        else:  # a 0-dim or empty one: no kept dimensions to join along
            low, high = torch.aminmax(g) if g.numel() else (g.new_zeros(()), g.new_zeros(()))
            by_ndim.setdefault(0, []).extend(t.reshape(1) for t in (l2_norm(g), l2_norm(w), low, high))
    read = {d: (torch.cat(p) if len(p) > 1 else p[0]).reshape(-1).tolist() for d, p in by_ndim.items()}
    position = {d: 0 for d in read}
    found = []
    for g in grads:
        d = g.dim() if g.dim() and g.numel() else 0
        i = position[d]
        found.append(read[d][i:i + 4])
        position[d] = i + 4
    values = iter([[v] for four in found for v in four])
    norms, wnorms, maxabs = [], [], []
    for g in grads:
        norms.append(next(values)[0])
        wnorms.append(next(values)[0])
        low, high = next(values)[0], next(values)[0]
        maxabs.append(max(high, -low) if not (math.isnan(low) or math.isnan(high)) else math.nan)
    for i, g in enumerate(grads):  # the float32 sum of squares overflowed: the norm of the scaled tensor
        if math.isinf(norms[i]) and math.isfinite(maxabs[i]) and maxabs[i] > 0:
            norms[i] = maxabs[i] * torch.linalg.vector_norm(g.double() / maxabs[i]).item()
    return [norms, maxabs, wnorms]


def flat_view(t: Tensor) -> Tensor:
    """Every element of ``t`` as a 1-dimensional view in memory order (a copy only for a tensor
    with gaps or repeats in its memory)."""
    return sample_view(t, max(t.numel(), 1))


def merge_moments(parts: Sequence[Tuple[int, float, float]]) -> Tuple[int, float, float]:
    """Combine ``(count, mean, population variance)`` of several parts (Chan et al.),
    for a module called more than once in a step.

    >>> merge_moments([(2, 1.0, 1.0), (2, 3.0, 1.0)])
    (4, 2.0, 2.0)
    """
    n, mean, m2 = 0, 0.0, 0.0
    for nb, mb, vb in parts:
        if nb == 0:
            continue
        total = n + nb
        delta = mb - mean
        mean += delta * nb / total
        m2 += vb * nb + delta * delta * n * nb / total
        n = total
    return n, mean, (m2 / n if n else math.nan)


def to_host(tensors: Sequence[Union[Tensor, float]]) -> List[List[float]]:
    """Many small tensors read in one host transfer per device, in a number of kernels that does not
    grow with the number of tensors: tensors whose sizes are all 1 but along one dimension (the
    results of reductions with kept dimensions, vectors) are concatenated along it, group by
    group, and flattened; the groups are joined per dtype (converted to float64 off the CPU) and
    read at once. A CPU tensor NumPy reads (:func:`host_array`) is read where it is, without a
    PyTorch op; a number (a value read already, see :func:`l2_norm_now`) is taken as it is.
    Returns each tensor's values as a flat list, in the order given."""
    out: List[List[float]] = [[] for _ in tensors]
    groups: Dict[Any, List[int]] = {}
    flat: Dict[int, Tensor] = {}
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            out[i] = [t]
            continue
        a = host_array(t) if t.is_cpu else None
        if a is not None:
            out[i] = a.reshape(-1).tolist()
            continue
        ndim = t.dim()
        if t.numel() == 1 and ndim:  # a reduction with kept dimensions: the usual case
            key = (t.get_device(), t.dtype, ndim, 0)
        else:
            along = [d for d, size in enumerate(t.shape) if size != 1]
            if ndim == 0 or len(along) > 1:
                flat[i] = t = t.reshape(-1)
                ndim, along = 1, [0]
            key = (t.get_device(), t.dtype, ndim, along[0] if along else 0)
        groups.setdefault(key, []).append(i)
    by_device: Dict[int, Dict[torch.dtype, List[Tuple[List[int], Tensor]]]] = {}
    for (device, dtype, ndim, dim), idx in groups.items():
        parts = [flat.get(i, tensors[i]) for i in idx]
        v = parts[0] if len(parts) == 1 else torch.cat(parts, dim)
        if ndim != 1:
            v = v.view(-1) if v.is_contiguous() else v.reshape(-1)
        by_device.setdefault(device, {}).setdefault(dtype, []).append((idx, v))
    for device, by_dtype in by_device.items():
        order = [i for runs in by_dtype.values() for idx, _ in runs for i in idx]
        vectors = []
        for runs in by_dtype.values():
            v = runs[0][1] if len(runs) == 1 else torch.cat([v for _, v in runs])
            vectors.append(v if device < 0 or v.dtype == torch.float64 else v.to(torch.float64))
        if device < 0:  # the CPU: nothing to transfer, each dtype read where it is
            values = vectors[0].tolist() if len(vectors) == 1 else [x for v in vectors for x in v.tolist()]
        else:
            values = (vectors[0] if len(vectors) == 1 else torch.cat(vectors)).cpu().tolist()
        pos = 0
        for i in order:
            n = tensors[i].numel()
            out[i] = values[pos:pos + n]
            pos += n
    return out


def update_norms(before: Sequence[Any], after: Sequence[Any], scales: Sequence[float]) -> Tensor:
    """Per pair of parameter samples taken before and after an optimizer step: ``‖after - before‖``
    and ``‖before‖``, each multiplied by ``scales[i]``. Returns float64 of shape (2, k) on the first
    sample's device; the ratio of the two rows is the update-to-weight ratio. A pair of NumPy arrays
    (CPU samples, :func:`host_array`) is reduced in NumPy, without a PyTorch op; then the result is
    on the CPU.

    With ``scales[i] = sqrt(n / m)`` for an ``m``-element sample of an ``n``-element tensor each row
    estimates the whole tensor's norm, so the norms of several shards combine as the root of
    their summed squares (:func:`gradwatch.collect.ranks.reduce_shards`); the ratio itself does
    not depend on the scale.

    >>> update_norms([torch.tensor([3.0, 4.0])], [torch.tensor([3.0, 5.0])], [1.0]).tolist()
    [[1.0], [5.0]]
    """
    if not before:
        return torch.zeros(2, 0, dtype=torch.float64)
    arrays = [i for i, b in enumerate(before) if isinstance(b, np.ndarray)]
    if arrays:
        rows = np.empty((2, len(before)))
        token = _fp_ignore()  # NaN/Inf and overflows give no RuntimeWarning
        try:
            for i in arrays:
                rows[:, i] = host_norm(after[i] - before[i]) * scales[i], host_norm(before[i]) * scales[i]
        finally:
            _fp_restore(token)
        others = [i for i, b in enumerate(before) if not isinstance(b, np.ndarray)]
        if others:  # tensors NumPy does not read (half precision)
            rows[:, others] = update_norms([before[i] for i in others], [after[i] for i in others],
                                           [scales[i] for i in others]).cpu().numpy()
        return torch.from_numpy(rows)
    device = before[0].device
    with torch.no_grad():
        if device.type == "cpu" and HOST_ARRAYS:  # per tensor, read at once (see _grad_rows_cpu)
            parts = [l2_norm(torch.sub(a, b)) for b, a in zip(before, after)] + [l2_norm(b) for b in before]
            values = [v[0] for v in to_host(parts)]
            k = len(before)
            return torch.tensor([[values[i] * scales[i] for i in range(k)],
                                 [values[k + i] * scales[i] for i in range(k)]], dtype=torch.float64)
        out = torch.empty(2, len(before), dtype=torch.float64, device=device)
        groups: dict = {}
        for i, b in enumerate(before):
            groups.setdefault((b.device, b.dtype), []).append(i)
        for idx in groups.values():
            b = [before[i] for i in idx]
            d = torch._foreach_sub([after[i] for i in idx], b)
            rows = [torch._foreach_norm(d), torch._foreach_norm(b)]
            s = [float(scales[i]) for i in idx]
            for r, norms in enumerate(rows):
                col = torch.stack(torch._foreach_mul(norms, s)).to(device, torch.float64)
                if idx == list(range(idx[0], idx[-1] + 1)):  # callers sort by dtype: a slice, no index copy
                    out[r, idx[0]:idx[-1] + 1] = col
                else:
                    for j, i in enumerate(idx):
                        out[r, i] = col[j]
    return out


ATTENTION_FIELDS = ("queries", "entropy", "entropy_normalised", "normalisable", "saturated", "max_logit")
"""Rows of :func:`attention_summary`, per head (sums, except ``max_logit``, a maximum)."""


def attention_summary(logits: Tensor, saturation: float = 0.99) -> Tensor:
    """Softmax attention of one call, per head, from its logits ``(batch, heads, queries, keys)``
    (scaled query-key products, masks applied: a masked key is ``-inf``). Returns float32 of shape
    ``(len(ATTENTION_FIELDS), heads)``:

    - ``queries``: queries with at least one key they may attend to (fully masked ones are left out);
    - ``entropy``: sum over those queries of the attention entropy ``-sum_j p_j log p_j`` (nats);
    - ``entropy_normalised``: sum of the entropy divided by ``log`` of the query's number of keys
      (1: uniform attention, 0: one key), over the ``normalisable`` queries with two keys or more;
    - ``saturated``: of the ``normalisable`` queries, those whose largest weight exceeds ``saturation``
      (one-hot attention; a query with one key to attend to has no choice, and is not counted);
    - ``max_logit``: the largest logit of a key that may be attended to (``-inf`` when none).

    >>> s = attention_summary(torch.tensor([[[[0.0, 0.0], [30.0, 0.0]]]]))  # uniform, then one-hot
    >>> tuple(round(v, 4) for v in s[:, 0].tolist())
    (2.0, 0.6931, 1.0, 2.0, 1.0, 30.0)
    """
    x = logits.detach().float()
    allowed = x > -math.inf
    n_keys = allowed.sum(-1)
    rows = n_keys > 0
    safe = torch.where(rows.unsqueeze(-1), x, torch.zeros_like(x))  # a fully masked row would be NaN
    p = torch.softmax(safe, dim=-1)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    entropy = torch.where(rows, entropy, torch.zeros_like(entropy))
    normalisable = n_keys >= 2
    normalised = torch.where(normalisable, entropy / n_keys.clamp_min(2).float().log(), torch.zeros_like(entropy))
    saturated = normalisable & (p.amax(-1) > saturation)
    inf = x.new_full((), math.inf)
    max_logit = torch.where(allowed, x, -inf).amax(dim=(0, 2, 3)) if x.numel() else x.new_full(x.shape[1:2], -math.inf)
    return torch.stack([rows.float().sum((0, 2)), entropy.sum((0, 2)), normalised.sum((0, 2)),
                        normalisable.float().sum((0, 2)), saturated.float().sum((0, 2)), max_logit])
