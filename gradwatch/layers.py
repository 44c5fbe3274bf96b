"""Which modules gradwatch watches, and what kind of activation each one is.

Recognising activations by type gives exact saturation bounds; anything else that
*could* be an elementwise activation (a parameter-free leaf module written outside
``torch.nn``, like a user's ``class Swish(nn.Module)``) is measured generically,
from its local slope dy/dx, which needs no knowledge of the function -- once a probe has
shown that it *is* elementwise: a normalisation, an aggregation or a module of two inputs
written by hand is not an activation, and its slope says nothing about saturation.
"""

from __future__ import annotations

import enum
import fnmatch
import functools
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

Selector = Union[str, Type[nn.Module]]
"""A layer selector: a glob over qualified names (``"features.*"``) or a module type."""

ROOT_NAME = "(model)"
"""Display name of the root module (``named_modules()`` calls it ``""``)."""


class ActivationKind(enum.Enum):
    """How a watched module's output is interpreted."""

    BOUNDED = "bounded"  # saturation = share of outputs near a known bound (Sigmoid, Tanh, ...)
    RECTIFIER = "rectifier"  # exact zeros are the off side: dead units, not saturation (ReLU, ReLU6)
    SMOOTH = "smooth"  # known activation without saturation bounds (LeakyReLU, ELU, GELU, ...; see FlatSide)
    GENERIC = "generic"  # unknown parameter-free leaf: slope-based saturation and dead units
    NONE = "none"  # not an activation (Linear, Conv, norms, pooling, ...)


# (lower bound, upper bound); None means unbounded on that side.
_BOUNDED: Sequence[Tuple[Type[nn.Module], Tuple[Optional[float], Optional[float]]]] = (
    (nn.Sigmoid, (0.0, 1.0)),
    (nn.Tanh, (-1.0, 1.0)),
    (nn.Hardsigmoid, (0.0, 1.0)),
    (nn.Softsign, (-1.0, 1.0)),
    (nn.LogSigmoid, (None, 0.0)),
)
_SMOOTH = (
    nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Softplus, nn.Hardswish, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
)
# Smooth rectifiers (see FlatSide): (type, torch.nn.functional name, parameters read from the module).
_FLAT: Sequence[Tuple[Type[nn.Module], str, Tuple[str, ...]]] = (
    (nn.GELU, "gelu", ("approximate",)), (nn.SiLU, "silu", ()), (nn.Mish, "mish", ()),
    (nn.ELU, "elu", ("alpha",)), (nn.CELU, "celu", ("alpha",)), (nn.SELU, "selu", ()),
    (nn.Softplus, "softplus", ("beta", "threshold")), (nn.Hardswish, "hardswish", ()),
)
# Leaf modules not worth a hook by default: they copy or drop values without transforming them.
_SKIP_BY_DEFAULT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout, nn.Identity, nn.Flatten, nn.Unflatten)


@dataclass(frozen=True)
class FlatSide:
    """The flat negative side of a smooth rectifier (GELU, SiLU, Mish, ELU, CELU, SELU, Softplus,
    Hardswish): ``f'(x) -> 0`` as ``x -> -inf``, so a unit pushed far negative passes (almost) no
    gradient, although its output is not exactly zero (SiLU(-20) = -4e-8).

    ``function`` names the ``torch.nn.functional`` function and ``kwargs`` its parameters (ELU's
    ``alpha``, Softplus's ``beta`` and ``threshold``, GELU's ``approximate``). Its :meth:`cutoff`
    is the pre-activation below which the slope stays under a share of its peak.

    LeakyReLU, PReLU and RReLU have no flat side: their negative slope is a constant the user chose so
    that every unit keeps learning, as large at -20 as at -0.1, and a unit is never cut off by it.
    """

    function: str
    kwargs: Tuple[Tuple[str, Any], ...] = ()
    # Whether f increases strictly (ELU, CELU, SELU, Softplus): then a unit's largest output is above
    # f(cutoff) exactly when its largest pre-activation is above the cut-off, so the output says as
    # much as the input (also of an in-place module, which overwrites its input). GELU, SiLU, Mish and
    # Hardswish dip below zero and come back: their output does not say where the input was. Known at
    # construction, so that code torch.compile traces reads a plain attribute.
    increasing: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "increasing", _increasing(self.function, self.kwargs))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(F, self.function)(x, **dict(self.kwargs))

    def cutoff(self, slope: float) -> float:
        """The largest pre-activation ``c`` such that ``|f'(x)| < slope * max |f'|`` for every
        ``x < c``: below it a unit passes less than ``slope`` (a share) of the peak slope.

        >>> round(FlatSide("elu", (("alpha", 1.0),)).cutoff(0.04), 4)  # alpha * e^c = 0.04
        -3.2189
        """
        return _cutoff(self, slope)

    def output_cutoff(self, slope: float) -> float:
        """``f(cutoff)``: what a unit's largest output is compared with where ``f`` increases strictly."""
        return _output_cutoff(self, slope)


_GRID = (-60.0, 20.0, 80_001)  # where slopes are looked at: steps of 1e-3, 0 among them (the peak of ELU's)


def _slopes(function: str, kwargs: Tuple[Tuple[str, Any], ...], x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``f'`` on :data:`_GRID` (or at ``x``), float64, by autograd."""
    x = torch.linspace(*_GRID, dtype=torch.float64) if x is None else x
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (d,) = torch.autograd.grad(getattr(F, function)(x, **dict(kwargs)).sum(), x)
    return d


@functools.lru_cache(maxsize=64)
def _increasing(function: str, kwargs: Tuple[Tuple[str, Any], ...]) -> bool:
    return bool((_slopes(function, kwargs) > 0).all())


def _slope(side: FlatSide, x: float) -> float:
    return abs(float(_slopes(side.function, side.kwargs, torch.tensor([x], dtype=torch.float64))))


@functools.lru_cache(maxsize=64)
def _output_cutoff(side: FlatSide, slope: float) -> float:
    return float(side(torch.tensor([side.cutoff(slope)], dtype=torch.float64)))


@functools.lru_cache(maxsize=64)
def _cutoff(side: FlatSide, slope: float) -> float:
    """:meth:`FlatSide.cutoff`, once per function, parameters and share: the peak of ``|f'|`` on the
    grid, the first grid point from the left where ``|f'|`` reaches ``slope`` times it, then the edge
    by bisection between it and the point before."""
    d = _slopes(side.function, side.kwargs).abs()
    limit = slope * float(d.max())
    steep = torch.nonzero(d >= limit)
    first = int(steep[0]) if len(steep) else 0
    if first == 0:
        raise ValueError(f"{side} has no flat negative side at a slope share of {slope!r}")
    start, stop, n = _GRID
    step = (stop - start) / (n - 1)
    lo, hi = start + (first - 1) * step, start + first * step
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _slope(side, mid) < limit else (lo, mid)
    return lo


@dataclass(frozen=True)
class ActivationSpec:
    kind: ActivationKind
    lower: Optional[float] = None
    upper: Optional[float] = None
    flat: Optional[FlatSide] = None  # a smooth rectifier's flat side: dead units judged by slope

    @property
    def tracks_dead_units(self) -> bool:
        return self.kind in (ActivationKind.RECTIFIER, ActivationKind.GENERIC) or self.flat is not None

    @property
    def reads_input(self) -> bool:
        """A smooth rectifier whose dead units are judged from its input (its output does not say)."""
        return self.flat is not None and not self.flat.increasing


def flat_side(module: nn.Module) -> Optional[FlatSide]:
    """The flat side of a smooth rectifier module, with its parameters; None for other modules."""
    for cls, function, params in _FLAT:
        if isinstance(module, cls):
            return FlatSide(function, tuple((p, _param(getattr(module, p))) for p in params))
    return None


def call_flat_side(function: str, args: Sequence[Any], kwargs: dict) -> Optional[FlatSide]:
    """The flat side of a call ``F.<function>(input, *args[1:], **kwargs)`` of a smooth rectifier
    (``functional=True``), its parameters as passed or the module's defaults; None for others."""
    for cls, name, params in _FLAT:
        if name == function:
            values = dict(flat_side(cls()).kwargs)  # type: ignore[union-attr]
            values.update(zip(params, args[1:]))
            values.update((p, kwargs[p]) for p in params if p in kwargs)
            return FlatSide(name, tuple((p, _param(values[p])) for p in params))
    return None


def _param(v: Any) -> Any:
    return v if isinstance(v, str) else float(v)


def activation_spec(module: nn.Module) -> ActivationSpec:
    """Classify ``module``: a known bounded activation, a rectifier, a generic candidate, or none."""
    # ReLU6 subclasses Hardtanh, so it must be tested first: its zero side is a rectifier's.
    if isinstance(module, nn.ReLU6):
        return ActivationSpec(ActivationKind.RECTIFIER, None, 6.0)
    if isinstance(module, nn.ReLU):
        return ActivationSpec(ActivationKind.RECTIFIER)
    if isinstance(module, nn.Hardtanh):
        return ActivationSpec(ActivationKind.BOUNDED, float(module.min_val), float(module.max_val))
    for cls, (lo, hi) in _BOUNDED:
        if isinstance(module, cls):
            return ActivationSpec(ActivationKind.BOUNDED, lo, hi)
    if isinstance(module, _SMOOTH):
        return ActivationSpec(ActivationKind.SMOOTH, flat=flat_side(module))
    if _is_generic_candidate(module):
        return ActivationSpec(ActivationKind.GENERIC)
    return ActivationSpec(ActivationKind.NONE)


def _is_generic_candidate(module: nn.Module) -> bool:
    # Modules from torch itself are known; only user-written, stateless leaves may be
    # elementwise activations, and only those the probe shows to be elementwise are.
    if type(module).__module__.startswith("torch."):
        return False
    has_children = next(module.children(), None) is not None
    has_state = next(module.parameters(recurse=False), None) is not None or next(
        module.buffers(recurse=False), None) is not None
    return not has_children and not has_state and is_elementwise(module)


_ELEMENTWISE: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def is_elementwise(module: nn.Module) -> bool:
    """Whether ``module`` maps one tensor to one of the same shape, each output element a
    deterministic function of its own input element only: the Jacobian is diagonal.

    Probed once per module on a small CPU tensor (2x3x4x5) without autograd: its output must
    have the input's shape and repeat itself; then two random halves of the input are moved,
    and no output element outside the moved half may change. A normalisation (each output
    depends on the mean), an aggregation, a softmax, a roll or a module that needs a second
    input fails. The probe calls ``forward`` directly (no hooks run), uses a private
    ``torch.Generator`` and restores the CPU random state, so the user's random stream is
    untouched; a module that raises on the probe is not elementwise.

    >>> is_elementwise(nn.Sigmoid()), is_elementwise(nn.Softmax(dim=-1))
    (True, False)
    """
    known = _ELEMENTWISE.get(module)
    if known is None:
        known = _ELEMENTWISE[module] = _probe(module)
    return known


def _probe(module: nn.Module) -> bool:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=gen)

    def same(a: object, b: torch.Tensor, where: Optional[torch.Tensor] = None) -> bool:
        if not isinstance(a, torch.Tensor) or a.shape != b.shape or not a.is_floating_point():
            return False
        a, b = (a, b) if where is None else (a[where], b[where])
        return bool(((a == b) | (a.isnan() & b.isnan())).all())

    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = module.forward(x.clone())
            if not (isinstance(y, torch.Tensor) and y.shape == x.shape and y.is_floating_point()):
                return False
            if not same(module.forward(x.clone()), y):
                return False  # not deterministic (noise, dropout): not an activation function
            for _ in range(2):
                moved = torch.rand(x.shape, generator=gen) < 0.5
                shifted = torch.where(moved, x + torch.randn(x.shape, generator=gen), x)
                if not same(module.forward(shifted), y, ~moved):
                    return False
            return True
    except Exception:  # noqa: BLE001 -- whatever the module cannot take, it is not an activation
        return False


@dataclass(frozen=True)
class Layer:
    """One watched module."""

    name: str
    module: nn.Module
    spec: ActivationSpec
    function: Optional[str] = None  # set for activations called as functions inside `module`

    @property
    def type_name(self) -> str:
        return f"{self.function}()" if self.function else type(self.module).__name__


def display_name(qualified: str, wrapped: bool = False) -> str:
    """``named_modules()`` name for people: the root is ``(model)``; the ``_orig_mod.`` that
    ``torch.compile`` inserts, and the ``module.`` of a DDP/DataParallel wrapper (``wrapped``),
    are dropped, so a wrapped model reads like the original."""
    qualified = qualified.replace("_orig_mod.", "")
    if qualified == "_orig_mod":
        qualified = ""
    if wrapped:
        qualified = "" if qualified == "module" else qualified.removeprefix("module.")
    return qualified if qualified else ROOT_NAME


def is_wrapper(model: nn.Module) -> bool:
    """DistributedDataParallel / DataParallel: the real model is ``model.module``."""
    return isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))


def _matches(name: str, module: nn.Module, selectors: Sequence[Selector]) -> bool:
    for sel in selectors:
        if isinstance(sel, str):
            if fnmatch.fnmatchcase(name, sel):
                return True
        elif isinstance(module, sel):
            return True
    return False


def check_selectors(argument: str, selectors: object) -> Tuple[Selector, ...]:
    """Validate ``include=``/``exclude=``: a str, a module type, or a sequence of them."""
    if selectors is None:
        return ()
    items = (selectors,) if isinstance(selectors, (str, type)) else selectors
    try:
        items = tuple(items)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{argument} must be a name pattern, an nn.Module subclass, or a list of them; "
                        f"got {selectors!r}") from None
    for item in items:
        ok = isinstance(item, str) or (isinstance(item, type) and issubclass(item, nn.Module))
        if not ok:
            raise TypeError(f"{argument} entries must be name patterns (str) or nn.Module subclasses; "
                            f"got {item!r}")
    return items  # type: ignore[return-value]


def select_layers(model: nn.Module, include: Sequence[Selector] = (),
                  exclude: Sequence[Selector] = ()) -> list[Layer]:
    """The modules to hook, in registration order.

    Default: every leaf module except dropout/identity/flatten, and every module with
    parameters of its own (``nn.MultiheadAttention`` computes with ``in_proj_weight``
    directly and never calls its ``out_proj`` child) or packed quantised weights. With ``include``, exactly the
    modules it matches (containers too). ``exclude`` always wins.
    """
    layers = []
    weights = _parametrizations(model)
    for name, module in model.named_modules():
        if include:
            wanted = _matches(name, module, include)
        else:
            is_leaf = next(module.children(), None) is None
            own_params = next(module.parameters(recurse=False), None) is not None or _quantized(module)
            wanted = (is_leaf or own_params) and not isinstance(module, _SKIP_BY_DEFAULT) and \
                not type(module).__name__.endswith("PackedParams")  # a quantised layer's weights, never called
        if wanted and not _matches(name, module, exclude):
            spec = ActivationSpec(ActivationKind.NONE) if id(module) in weights else activation_spec(module)
            layers.append(Layer(display_name(name, is_wrapper(model)), module, spec))
    return layers


def _quantized(module: nn.Module) -> bool:
    """A quantised layer (``torch.ao.nn.quantized``: ``quantize_dynamic``'s Linear): its weights
    are packed, not parameters, in a child that is never called; the layer itself computes."""
    return type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized")) and \
        hasattr(module, "_packed_params")


def _parametrizations(model: nn.Module) -> set:
    """ids of the modules that compute weights (``torch.nn.utils.parametrize``): their
    outputs are parameters, not activations."""
    return {id(m) for p in model.modules() if isinstance(p, parametrize.ParametrizationList)
            for m in p.modules()}


def select_parameters(model: nn.Module, include: Sequence[Selector] = (),
                      exclude: Sequence[Selector] = ()) -> list[Tuple[str, str, nn.Parameter]]:
    """``(parameter name, owning layer name, parameter)`` for parameters that train.

    A parameter is selected by its owning module; with ``include``, an owner inside an
    included container counts as included (``include="encoder"`` covers ``encoder.0.weight``).
    Lazy parameters (``nn.LazyLinear`` before its first forward) are left out until they exist.
    """
    owners = dict(model.named_modules())
    out = []
    for pname, param in model.named_parameters():
        if not param.requires_grad or is_lazy(param):
            continue
        owner_name = pname.rpartition(".")[0]
        chain = _ancestors(owner_name)
        if include and not any(_matches(n, owners[n], include) for n in chain):
            continue
        if any(_matches(n, owners[n], exclude) for n in chain):
            continue
        wrapped = is_wrapper(model)
        pname_shown = pname.replace("_orig_mod.", "")
        if wrapped:
            pname_shown = pname_shown.removeprefix("module.")
        out.append((pname_shown, display_name(owner_name, wrapped), param))
    return out


def _ancestors(name: str) -> Iterable[str]:
    """``"a.b.c"`` -> ``"a.b.c", "a.b", "a"``; the root is not included."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)] or [""]
