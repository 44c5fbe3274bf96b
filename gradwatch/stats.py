"""Pure statistics over tensors: no hooks, no state, no I/O.

Every function reduces a (possibly large) tensor on its own device into a few
numbers, without a host synchronisation, so hooks can call them on the hot path and
gradwatch moves everything to the host in one transfer per logging step. Each is
tested against a numpy reference in ``tests/test_stats.py``.
"""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

ACTIVATION_FIELDS = ("sum", "sample_dev_norm", "sample_nonzero", "sample_saturated")
"""Order of the values :func:`activation_summary` returns (see :func:`activation_moments`)."""


def as_float(t: Tensor) -> Tensor:
    """Detached, in float32 at least: half-precision sums of squares overflow (fp16 max is 65504)."""
    t = t.detach()
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulate half precision in float32 without copying the tensor (reductions take ``dtype=``)."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


HOST_ARRAYS = True
"""Reduce float32/float64 CPU tensors with NumPy (see :func:`host_array`); False: PyTorch everywhere."""

HOST_SUM_ELEMENTS = 1 << 15
"""Above this many elements a CPU tensor's full sum is PyTorch's, vectorised over every core
(NumPy's pairwise sum uses one, about 3x slower on 131,072 floats)."""

_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
_HOST_DTYPES = (torch.float32, torch.float64)


def host_array(t: Tensor) -> Optional[np.ndarray]:
    """``t`` as a NumPy array sharing its memory, where that works: a plain float32/float64 CPU
    tensor, outside torch.compile's tracing; else None. Reducing a small CPU tensor costs mostly
    the calls, and a NumPy call costs about 1 us where a PyTorch op costs 3-5 us (its
    dispatcher), so the CPU reduces in NumPy: the same arithmetic, in the same dtype."""
    if not HOST_ARRAYS or not t.is_cpu or t.dtype not in _HOST_DTYPES or t.layout is not torch.strided:
        return None
    x = t.detach() if t.requires_grad or type(t) is not Tensor else t  # (detach: 0.6 us, a third of the rest)
    if type(x) is not Tensor or _compiling():
        return None  # tensor subclasses (FakeTensor, DTensor, functorch wrappers)
    try:
        return x.numpy()
    except (RuntimeError, TypeError, ValueError):
        return None


def l2_norm(t: Tensor) -> Tensor:
    """L2 norm accumulated in float32 at least; NaN/Inf anywhere makes it non-finite."""
    return torch.linalg.vector_norm(t.detach(), dtype=_acc_dtype(t))


def activation_summary(y: Tensor, lower: Optional[float] = None, upper: Optional[float] = None,
                       margin: float = 0.01, max_elements: int = 1 << 15, nonnegative: bool = False, *,
                       total: Optional[Tensor] = None) -> Tensor:
    """Summarise an activation tensor into raw ``ACTIVATION_FIELDS`` (one small tensor on ``y``'s device).

    ``sum`` covers every element, so the mean is exact and any NaN/Inf shows (it makes
    the sum non-finite). The spread, the share of zeros and the share of saturated
    elements come from an evenly strided sample of at most ``max_elements`` elements
    (every element when the tensor is smaller; the stride is coprime with the last
    dimension, so every unit is visited): ``sample_dev_norm`` (L2 norm of the sample minus
    the exact mean of the whole tensor: a two-pass variance, exact also when the mean is
    large, and unbiased for the whole tensor's variance), ``sample_nonzero`` and, only when a
    bound is given, ``sample_saturated`` (elements within ``margin`` of the output range from a
    bound ``lower``/``upper``; an open side is ignored; the range of a one-sided activation is
    taken as 1). ``nonnegative``: the output cannot be negative (a rectifier), which saves a
    pass. The sample's size is :func:`sample_size` (known on the host). Divisions happen on the
    host in :func:`activation_moments`. Each pass over the sample is one device kernel, and
    on the hot path the number of kernels is the cost: on CPU, ``var_mean`` and boolean
    ``.sum()`` are 10-30x slower than a sum, a norm or ``sign``. float32/float64 CPU tensors
    are reduced in NumPy (:func:`host_array`), with the same results. ``total``: the sum of every
    element, when the caller has it already (a 0-dim tensor, e.g. the sum of :func:`unit_sums`),
    which saves the pass over the whole tensor.

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
    a = host_array(x)
    if a is not None:
        return _activation_summary_host(x, a, lower, upper, margin, max_elements, total)
    total = x.sum(dtype=acc) if total is None else total.to(acc)
    s = strided_sample(x, max_elements)
    # A 0-dim tensor does not promote: s - mean keeps s's dtype (half stays half).
    dev = torch.linalg.vector_norm(s - total / n, dtype=acc)
    nonzero = torch.sign(s)
    parts = [total, dev, (nonzero if nonnegative else nonzero.abs_()).sum(dtype=acc)]
    if bounded:
        parts.append(_near_bounds(s, lower, upper, margin))
    return torch.stack(parts)


def _host_sample(a: np.ndarray, t: Tensor, max_elements: int) -> Tuple[np.ndarray, np.ndarray]:
    """``a`` (the memory of ``t``) flattened, and the sample :func:`strided_sample` takes of
    ``t``, as a contiguous array."""
    flat = a.reshape(-1)
    stride = _stride(flat.size, t.shape[-1] if t.dim() else 1, max_elements)
    return flat, (flat[::stride].copy() if stride > 1 else flat)


def _activation_summary_host(x: Tensor, a: np.ndarray, lower: Optional[float], upper: Optional[float],
                             margin: float, max_elements: int, known_total: Optional[Tensor] = None) -> Tensor:
    """:func:`activation_summary` of a CPU tensor ``x``, whose memory ``a`` shares, in NumPy:
    the same passes in the same dtype; float64 results."""
    n = a.size
    flat, s = _host_sample(a, x, max_elements)
    # NaN/Inf and overflowing sums give no RuntimeWarning (``-W error`` would raise it in the user's step)
    with np.errstate(all="ignore"):
        if known_total is not None:
            total = known_total.item()
        else:
            total = float(flat.sum()) if n <= HOST_SUM_ELEMENTS else x.sum().item()
        d = s - total / n
        dev = math.sqrt(float(np.dot(d, d)))
        nonzero = s != 0
        if math.isnan(dev):  # maybe a NaN in the sample: it counts as zero, as torch.sign makes it
            nonzero &= ~np.isnan(s)
        values = [total, dev, float(np.count_nonzero(nonzero)), 0.0]  # (on floats count_nonzero is 3x slower)
        if lower is not None and upper is not None:  # a NaN is never saturated (comparisons are False)
            center, half = (upper + lower) / 2, (upper - lower) / 2
            values[3] = float(np.count_nonzero(np.abs(s - center) > half * (1 - 2 * margin)))
        elif upper is not None:
            values[3] = float(np.count_nonzero(s > upper - margin))
        elif lower is not None:
            values[3] = float(np.count_nonzero(s < lower + margin))
    # (from_numpy: a third of torch.tensor's cost for a short list)
    return torch.from_numpy(np.array(values if lower is not None or upper is not None else values[:3]))


def activation_moments(values: Sequence[float], n: int, m: int) -> dict:
    """Host side of :func:`activation_summary`: the raw values of an ``n``-element tensor
    summarised from an ``m``-element sample, as mean (exact), population variance, zeros
    and saturated (scaled up from the sample to ``n``), and whether a NaN/Inf was present."""
    v = dict(zip(ACTIVATION_FIELDS, values))
    v.setdefault("sample_saturated", 0.0)
    if not n or not m:
        return {"mean": math.nan, "var": math.nan, "zeros": 0.0, "nonfinite": False, "saturated": 0.0}
    scale = n / m
    return {"mean": v["sum"] / n, "var": v["sample_dev_norm"] ** 2 / m,
            "zeros": (m - v["sample_nonzero"]) * scale, "nonfinite": not math.isfinite(v["sum"]),
            "saturated": v["sample_saturated"] * scale}


def _count_above(x: Tensor, threshold: float) -> Tensor:
    """Number of elements strictly above ``threshold`` (x is consumed as a scratch tensor)."""
    if threshold:
        x = x.sub_(threshold)
    return x.clamp_(min=0).sign_().sum(dtype=_acc_dtype(x))


def _near_bounds(x: Tensor, lower: Optional[float], upper: Optional[float], margin: float) -> Tensor:
    if lower is None and upper is None:
        return x.new_zeros((), dtype=_acc_dtype(x))
    if lower is not None and upper is not None:
        center, half = (upper + lower) / 2, (upper - lower) / 2
        return _count_above((x - center).abs_(), half * (1 - 2 * margin))
    if upper is not None:
        return _count_above(x - (upper - margin), 0.0)
    return _count_above((lower + margin) - x, 0.0)


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


def unit_sums(y: Tensor, channels_first: Optional[bool] = None) -> Optional[Tensor]:
    """Per unit (see :func:`unit_dim`): the sum of its elements, accumulated in float32 at least.
    For an output that cannot be negative (a rectifier's) one pass gives two things: a unit is
    active exactly where its sum is positive (a NaN sum is not), as :func:`active_units` says, and
    the sum of the sums is the whole tensor's (``activation_summary(..., total=)``).

    >>> unit_sums(torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 3.0]])).tolist()
    [0.0, 3.0, 3.0]
    """
    d = unit_dim(y.dim(), channels_first)
    if d is None or y.numel() == 0:
        return None
    x = y.detach()
    return x.sum(dim=tuple(i for i in range(x.dim()) if i != d), dtype=_acc_dtype(x))


def strided_sample(t: Tensor, max_elements: int) -> Tensor:
    """About ``max_elements`` evenly spaced elements of ``t``, flattened. No RNG is used,
    so sampling never disturbs the user's random stream (dropout masks stay identical).
    The stride is coprime with the last dimension, so the sample visits every feature
    instead of, say, only the even ones.

    >>> strided_sample(torch.arange(12).reshape(3, 4), 4).tolist()
    [0, 3, 6, 9]
    >>> strided_sample(torch.arange(100_000).reshape(1000, 100), 32768).numel()  # stride 3, not 4
    33334
    """
    flat = t.detach().reshape(-1)
    stride = _stride(flat.numel(), t.shape[-1] if t.dim() else 1, max_elements)
    # One copy into contiguous memory: every later pass over the sample is then several
    # times faster than over a strided view (measured on CPU: a sum of 32k strided elements
    # cost more than a sum of 131k contiguous ones).
    return flat if stride == 1 else flat[::stride].contiguous()


@functools.lru_cache(maxsize=4096)  # a model's shapes repeat every step
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


def sample_size(t: Tensor, max_elements: int) -> int:
    """Number of elements :func:`strided_sample` takes from ``t`` (host arithmetic, no sync)."""
    n = t.numel()
    return len(range(0, n, _stride(n, t.shape[-1] if t.dim() else 1, max_elements)))


HISTOGRAM_SAMPLES = 1 << 13
"""The largest strided sample a histogram is built from (8192 elements: with 64 bins, about
130 per bin on average). A histogram is a picture of the shape of a distribution; the
numbers gradwatch judges by (shares, spreads, norms) come from larger samples or every element."""


def histogram(t: Tensor, bins: int, max_elements: int = HISTOGRAM_SAMPLES) -> Tensor:
    """Histogram of (a strided sample of) ``t``, computed on its device in a fixed number of
    kernels, whatever the size, and no host synchronisation.

    Returns float64 ``[min, max, num, sum, sum_squares, count_0, ..., count_{bins-1}]``
    over equal-width bins spanning [min, max] -- the fields TensorBoard's
    ``add_histogram_raw`` takes. NaN/Inf values are left out.

    On the CPU, where reading a number costs no synchronisation, a finite sample takes eight
    kernels (``aminmax``, a sum, a dot product, four to bin and a ``bincount``); elsewhere, and
    when the sample holds a NaN/Inf, about fifteen masked ones.

    >>> histogram(torch.tensor([0.0, 1.0, 1.0, 4.0]), bins=4).tolist()
    [0.0, 4.0, 4.0, 6.0, 18.0, 1.0, 2.0, 0.0, 1.0]
    """
    a = host_array(t)
    if a is not None and a.size:
        _, s = _host_sample(a, t, max_elements)
        low, high = float(s.min()), float(s.max())
        if math.isfinite(low) and math.isfinite(high):  # else: PyTorch's masked kernels below
            scale = bins / (high - low) if high > low else 0.0  # as on the CPU below, in NumPy
            with np.errstate(all="ignore"):  # overflows (to Inf, as PyTorch's) give no RuntimeWarning
                idx = ((s - low) * scale).astype(np.intp)
                np.clip(idx, 0, bins - 1, out=idx)
                out = np.empty(5 + bins)
                out[:5] = (low, high, s.size, s.sum(), np.dot(s, s))
            out[5:] = np.bincount(idx, minlength=bins)
            return torch.from_numpy(out)
    x = as_float(strided_sample(t, max_elements)).reshape(-1)
    if x.numel() == 0:
        return torch.zeros(5 + bins, dtype=torch.float64, device=x.device)
    if x.device.type == "cpu":
        lo, hi = torch.aminmax(x)
        low, high = lo.item(), hi.item()
        if math.isfinite(low) and math.isfinite(high):  # NaN propagates into both, Inf into one
            # histc and histogram are 5-10x slower on CPU than scaling, truncating and bincount.
            scale = bins / (high - low) if high > low else 0.0  # one value: every element in the first bin
            counts = torch.bincount(x.sub(low).mul_(scale).to(torch.int32).clamp_(0, bins - 1), minlength=bins)
            head = torch.stack([lo, hi, lo.new_tensor(float(x.numel())), x.sum(), torch.dot(x, x)])
            return torch.cat([head, counts]).double()
    bad = ~torch.isfinite(x)
    weight = (~bad).to(x.dtype)
    xz = x.masked_fill(bad, 0.0)
    mn, mx = x.masked_fill(bad, math.inf).amin(), x.masked_fill(bad, -math.inf).amax()
    scale = bins / (mx - mn).clamp_min(torch.finfo(x.dtype).tiny)
    # Scatter into a fixed-size buffer: bincount on CUDA must read the largest index (a sync).
    idx = ((xz - mn) * scale).long().clamp_(0, bins - 1)
    counts = torch.zeros(bins, dtype=x.dtype, device=x.device).index_add_(0, idx, weight)
    head = torch.stack([mn, mx, weight.sum(), xz.sum(), torch.dot(xz, xz)])
    return torch.cat([head, counts]).double()


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
    out = torch.full((3, len(grads)), math.nan, dtype=torch.float64, device=device)
    groups: dict = {}
    for i, g in enumerate(grads):
        groups.setdefault((g.device, g.dtype), []).append(i)
    with torch.no_grad():
        for (dev, dtype), idx in groups.items():
            try:
                rows = _grad_rows([grads[i].detach() for i in idx], [weights[i].detach() for i in idx], dev)
            except (RuntimeError, TypeError, NotImplementedError):
                continue  # this dtype is not supported by the fused kernels: its parameters stay NaN
            rows = rows.to(device, torch.float64)
            if idx == list(range(idx[0], idx[-1] + 1)):  # contiguous (callers sort by dtype): a slice, no copy
                out[:, idx[0]:idx[-1] + 1] = rows
            else:
                out[:, torch.tensor(idx).to(device, non_blocking=True)] = rows
    return out


def _grad_rows(grads: List[Tensor], weights: List[Tensor], device: torch.device) -> Tensor:
    if device.type == "cpu" and not grads[0].is_complex():
        return _grad_rows_cpu(grads, weights)
    acc = torch.float32 if grads[0].dtype in (torch.float16, torch.bfloat16) else None
    if grads[0].dtype == torch.float32 and device.type != "cpu":
        acc = torch.float64  # no overflow of the sum of squares; fused and cheap on accelerators
    norms = torch.stack(torch._foreach_norm(grads, dtype=acc))
    wacc = torch.float32 if weights[0].dtype in (torch.float16, torch.bfloat16) else None
    wnorms = torch.stack(torch._foreach_norm(weights, dtype=wacc))
    if hasattr(torch, "_foreach_max"):  # on CPU the inf-norm kernel is ~15x slower than abs + max
        maxabs = torch.stack(torch._foreach_max(torch._foreach_abs(grads)))
    else:
        maxabs = torch.stack(torch._foreach_norm(grads, ord=math.inf))
    return torch.stack([norms.double(), maxabs.double(), wnorms.double()])


def _grad_rows_cpu(grads: List[Tensor], weights: List[Tensor]) -> Tensor:
    """The CPU's rows: a number read on the CPU costs no synchronisation, so the small results
    are read once and combined on the host (a few kernels instead of about fifteen)."""
    half = (torch.float16, torch.bfloat16)
    acc = torch.float32 if grads[0].dtype in half else None
    wacc = torch.float32 if weights[0].dtype in half else None
    if acc == wacc and all(w.dtype == grads[0].dtype for w in weights):  # one fused call for both
        both = torch._foreach_norm(list(grads) + list(weights), dtype=acc)
    else:
        both = list(torch._foreach_norm(grads, dtype=acc)) + list(torch._foreach_norm(weights, dtype=wacc))
    extremes = [v for g in grads for v in torch.aminmax(g)]  # one pass per tensor, no copy
    k = len(grads)
    values, ends = torch.stack(both).tolist(), torch.stack(extremes).tolist()
    norms, wnorms = values[:k], values[k:]
    maxabs = [max(ends[2 * i + 1], -ends[2 * i]) if not math.isnan(ends[2 * i]) else math.nan for i in range(k)]
    for i in range(k):  # the float32 sum of squares overflowed: the norm of the scaled tensor
        if math.isinf(norms[i]) and math.isfinite(maxabs[i]) and maxabs[i] > 0:
            norms[i] = maxabs[i] * torch.linalg.vector_norm(grads[i].double() / maxabs[i]).item()
    return torch.tensor([norms, maxabs, wnorms], dtype=torch.float64)


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


def to_host(tensors: Sequence[Tensor]) -> List[List[float]]:
    """One host transfer per device for many small tensors: concatenate, copy, split.

    Tensors of one dtype are concatenated first and converted once, which keeps the
    number of device kernels independent of the number of tensors. CPU tensors need no
    transfer and are read one by one. Returns each tensor's values as a flat list of
    floats, in the order given.
    """
    groups: dict = {}
    out: List[List[float]] = [[] for _ in tensors]
    for i, t in enumerate(tensors):
        if t.device.type == "cpu":  # nothing to transfer: read each where it is (fewer kernels)
            t = t if t.is_floating_point() else t.double()
            out[i] = t.tolist() if t.dim() == 1 else t.reshape(-1).tolist()
        else:
            groups.setdefault(t.device, {}).setdefault(t.dtype, []).append(i)
    for by_dtype in groups.values():
        order = [i for idxs in by_dtype.values() for i in idxs]
        parts = [torch.cat([tensors[i].detach().reshape(-1) for i in idxs]).to(torch.float64)
                 for idxs in by_dtype.values()]
        flat = (torch.cat(parts) if len(parts) > 1 else parts[0]).cpu().tolist()
        pos = 0
        for i in order:
            n = tensors[i].numel()
            out[i] = flat[pos:pos + n]
            pos += n
    return out


def update_norms(before: Sequence[Tensor], after: Sequence[Tensor], scales: Sequence[float]) -> Tensor:
    """Per pair of parameter samples taken before and after an optimizer step: ``‖after - before‖``
    and ``‖before‖``, each multiplied by ``scales[i]``. Returns float64 of shape (2, k) on the first
    sample's device; the ratio of the two rows is the update-to-weight ratio.

    With ``scales[i] = sqrt(n / m)`` for an ``m``-element sample of an ``n``-element tensor each row
    estimates the whole tensor's norm, so the norms of several shards combine as the root of
    their summed squares (:func:`gradwatch.collect.ranks.reduce_shards`); the ratio itself does
    not depend on the scale.

    >>> update_norms([torch.tensor([3.0, 4.0])], [torch.tensor([3.0, 5.0])], [1.0]).tolist()
    [[1.0], [5.0]]
    """
    if not before:
        return torch.zeros(2, 0, dtype=torch.float64)
    device = before[0].device
    out = torch.empty(2, len(before), dtype=torch.float64, device=device)
    groups: dict = {}
    for i, b in enumerate(before):
        groups.setdefault((b.device, b.dtype), []).append(i)
    with torch.no_grad():
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
