"""Certified OOD scores: a sound upper bound of the in-distribution score over a whole L∞ ball.

For an image x and a radius ε, let B = {x' : ||x' - x||∞ <= ε} ∩ [0, 1]^d (every image an attacker
within ε could upload). `score_upper_bounds` returns, per image, U >= max_{x' in B} score(model(x')) for
the scores in `CERTIFIABLE_SCORES` (msp, energy, and a composed model's `detector`). An OOD image whose U is below the acceptance threshold
is rejected whatever the attack, not only against the attacks tried; "guaranteed AUROC" (`evaluate_certified`)
compares clean in-distribution scores with these worst cases.

Method: interval bound propagation (IBP; Gowal et al., 2018). The model is traced with `torch.fx` and
every node is evaluated on boxes [lo, hi] instead of tensors:

- affine maps (conv, linear): centre / radius form, W mid + b ± |W| rad, the exact image of a box;
- BatchNorm in eval mode is the per-channel affine map a x + c with a = γ / sqrt(var + eps): positive and
  negative a are split (a < 0 swaps the ends); in training mode its output depends on the batch: refused;
- positive linear maps (average pooling, mean, the models' own (x - mean) / std) and monotone maps (ReLU,
  max-pooling, amax, concatenation, reshapes) are applied to both ends;
- GELU is not monotone: decreasing to its minimum ≈ -0.170 at x* ≈ -0.752, increasing after. Upper bound
  max(g(lo), g(hi)); lower bound min(g(lo), g(hi)), or g(x*) when lo <= x* <= hi;
- sums of two boxes add ends; products / quotients with constants split by sign.
Any other layer or operation raises `UnsupportedLayerError` naming it (never a silently wrong bound).

The last linear layer is bounded for the logit differences directly: lower(z_j - z_k) from W_j - W_k on the
penultimate box, tighter than lower(z_j) - upper(z_k). Scores are monotone in these, so
  energy = T logsumexp(z / T)   <= T logsumexp(upper(z) / T),
  msp    = max_k 1 / Σ_j exp((z_j - z_k) / T) <= max_k 1 / Σ_j exp(lower(z_j - z_k) / T),
  detector = d_in - d_out                     <= -lower(d_out - d_in)   (the detector's own two logits d).

Floating point: the boxes are computed in float64 and widened outward after every operation that rounds
(by 2(n + 8)·2^-53 times a bound on the magnitude of the terms summed, n the fan-in; Higham's γ_n for a
sum), so rounding cannot shrink a box: the bound holds for the model's exact real-arithmetic function with
its (float32) weights. A float32 forward pass of the same model differs from that function by its own
rounding; `FLOAT32_SLACK` (logits, relative to their magnitude bound) and `SCORE_SLACK` (scores) cover it
with a wide margin on every model tested (tests/training/test_certify.py checks the bound against float32
scores of random and PGD points). These margins are far below the width of any bound at ε >= 1/255.

Why a module of our own: auto_LiRPA, the maintained bound-propagation library, is on PyPI only as
0.3 (2022), which requires torch < 1.13 (oodguard pins torch 2.14.1); installed without its dependencies
next to ours it fails at import (`numpy.lib.arraysetops`, gone in NumPy 2; checked 2026-11-30). Its newer
releases are GitHub-only. IBP needs only the rules above.

    certifier = IntervalBounds(model)                  # traces once; UnsupportedLayerError if it cannot
    ub = score_upper_bounds(certifier, x, 1 / 255, ["energy"])["energy"]   # (N,) float64
"""

from __future__ import annotations

import logging
import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

log = logging.getLogger(__name__)

CLASSIFIER_CERTIFIABLE = ("msp", "energy")  # bounded through the classifier
CERTIFIABLE_SCORES = (*CLASSIFIER_CERTIFIABLE, "detector")  # detector: through a composed model's detector
NOT_CERTIFIABLE = {
    "odin": "its input pre-processing is a gradient step: not a layer IBP can bound",
    "mahalanobis": "a quadratic form of the features: not bounded here (IBP through it is near-vacuous)",
}
FLOAT32_SLACK = 1e-5  # logits widened by this times their magnitude bound (float32 forward passes)
SCORE_SLACK = 1e-6  # scores widened by this times (1 + |score|) (float32 softmax / logsumexp)
_U = 2.0**-53  # unit roundoff of float64


class UnsupportedLayerError(ValueError):
    """The model contains a layer or operation that interval bound propagation here cannot bound."""


@dataclass(frozen=True)
class Box:
    """Elementwise lower and upper bounds (float64) of one activation tensor."""

    lo: torch.Tensor
    hi: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.lo.shape

    def contains(self, value: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
        v = value.to(torch.float64)
        return (v >= self.lo - atol) & (v <= self.hi + atol)


@dataclass(frozen=True)
class LogitBounds:
    """lower / upper (N, C) bound each logit; diff_lower[n, j, k] <= z_j - z_k (0 on the diagonal)."""

    lower: torch.Tensor
    upper: torch.Tensor
    diff_lower: torch.Tensor


def input_box(x: torch.Tensor, eps: float) -> Box:
    """The L∞ ball of radius eps around x, intersected with the [0, 1] pixel box."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    x = x.detach().to(torch.float64)
    return Box((x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0))


# -- rounding ------------------------------------------------------------------------------------------


def _gamma(n: int) -> float:
    """Outward widening factor for a float64 sum of n terms (Higham's γ_n, doubled, plus slack for the
    centre / radius split and the final subtraction)."""
    return 2.0 * (n + 8) * _U


def _absmax(b: Box, ndim: int | None = None) -> torch.Tensor:
    """max |value| over the box, per sample, shaped (N, 1, ...) with `ndim` dimensions (default: b's)."""
    m = torch.maximum(b.lo.abs(), b.hi.abs())
    return m.flatten(1).amax(1).view(-1, *([1] * ((m.ndim if ndim is None else ndim) - 1)))


def _widen(lo: torch.Tensor, hi: torch.Tensor, tol: float, mag: torch.Tensor | float) -> Box:
    d = tol * mag
    return Box(lo - d, hi + d)


def _per_sample_size(b: Box) -> int:
    return int(b.lo[0].numel()) if b.lo.ndim > 0 and b.lo.shape[0] > 0 else 1


# -- rules: affine ---------------------------------------------------------------------------------------


def _affine(b: Box, apply: Callable[[torch.Tensor, bool], torch.Tensor], row_l1: torch.Tensor,
            bias_abs: torch.Tensor | float, fan_in: int) -> Box:
    """apply(v, abs_weights) is the layer with its weights (and bias) or |weights| (no bias) on v."""
    mid, rad = (b.lo + b.hi) / 2, (b.hi - b.lo) / 2
    out_mid, out_rad = apply(mid, False), apply(rad, True)
    mag = row_l1 * _absmax(b, out_mid.ndim) + bias_abs  # >= Σ |w x| + |b|: what rounding is relative to
    return _widen(out_mid - out_rad, out_mid + out_rad, _gamma(fan_in), mag)


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float64)


def _conv2d(b: Box, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups) -> Box:
    w, bi = _f64(weight), _f64(bias)
    if isinstance(padding, str):
        raise UnsupportedLayerError("string padding modes ('same', 'valid') are not supported; use numbers")

    def apply(v: torch.Tensor, absolute: bool) -> torch.Tensor:
        return F.conv2d(v, w.abs() if absolute else w, None if absolute else bi, stride, padding, dilation, groups)

    shape = (1, -1, 1, 1)
    row_l1 = w.abs().flatten(1).sum(1).view(shape)
    bias_abs = 0.0 if bi is None else bi.abs().view(shape)
    return _affine(b, apply, row_l1, bias_abs, int(w[0].numel()))


def _linear(b: Box, weight: torch.Tensor, bias: torch.Tensor | None) -> Box:
    w, bi = _f64(weight), _f64(bias)

    def apply(v: torch.Tensor, absolute: bool) -> torch.Tensor:
        return F.linear(v, w.abs() if absolute else w, None if absolute else bi)

    row_l1 = w.abs().sum(1)
    return _affine(b, apply, row_l1, 0.0 if bi is None else bi.abs(), int(w.shape[1]))


def _batch_norm(b: Box, m: nn.modules.batchnorm._BatchNorm, name: str) -> Box:
    if m.training or m.running_mean is None or m.running_var is None:
        raise UnsupportedLayerError(
            f"layer {name!r} ({type(m).__name__}) normalises with batch statistics (training mode or no "
            "running statistics): not a fixed function of one image. Call model.eval().")
    a = 1.0 / torch.sqrt(_f64(m.running_var) + m.eps)
    if m.weight is not None:
        a = a * _f64(m.weight)
    c = -_f64(m.running_mean) * a
    if m.bias is not None:
        c = c + _f64(m.bias)
    shape = (1, -1) + (1,) * (b.lo.ndim - 2)
    a, c = a.view(shape), c.view(shape)
    pos = a >= 0  # a < 0 maps the upper end to the lower one
    lo = torch.where(pos, a * b.lo, a * b.hi) + c
    hi = torch.where(pos, a * b.hi, a * b.lo) + c
    return _widen(lo, hi, _gamma(8), a.abs() * torch.maximum(b.lo.abs(), b.hi.abs()) + c.abs())


def _scale(b: Box, k: Any) -> Box:
    """b * k for a constant k (scalar or tensor broadcast against b)."""
    k = _f64(k) if isinstance(k, torch.Tensor) else float(k)
    p, q = b.lo * k, b.hi * k
    lo, hi = torch.minimum(p, q), torch.maximum(p, q)
    return _widen(lo, hi, _gamma(1), torch.maximum(lo.abs(), hi.abs()))


def _shift(b: Box, k: Any) -> Box:
    k = _f64(k) if isinstance(k, torch.Tensor) else float(k)
    lo, hi = b.lo + k, b.hi + k
    return _widen(lo, hi, _gamma(1), torch.maximum(lo.abs(), hi.abs()))


def _add(a: Any, b: Any) -> Box:
    if isinstance(a, Box) and isinstance(b, Box):
        lo, hi = a.lo + b.lo, a.hi + b.hi
        return _widen(lo, hi, _gamma(1), torch.maximum(lo.abs(), hi.abs()))
    return _shift(a, b) if isinstance(a, Box) else _shift(b, a)


def _neg(b: Box) -> Box:
    return Box(-b.hi, -b.lo)


def _sub(a: Any, b: Any) -> Box:
    return _add(a, _neg(b) if isinstance(b, Box) else -b)


def _mul(a: Any, b: Any) -> Box:
    if isinstance(a, Box) and isinstance(b, Box):
        raise UnsupportedLayerError("the product of two bounded tensors is not supported")
    return _scale(a, b) if isinstance(a, Box) else _scale(b, a)


def _truediv(a: Any, b: Any) -> Box:
    if isinstance(b, Box):
        raise UnsupportedLayerError("division by a bounded tensor is not supported")
    if isinstance(b, torch.Tensor) and bool((b == 0).any()) or (not isinstance(b, torch.Tensor) and b == 0):
        raise UnsupportedLayerError("division by zero")
    return _scale(a, 1.0 / (_f64(b) if isinstance(b, torch.Tensor) else float(b)))


def _positive_linear(b: Box, fn: Callable[[torch.Tensor], torch.Tensor]) -> Box:
    """A linear map with non-negative weights summing to <= 1 per output (averages): monotone, so applied
    to both ends; rounding widening relative to the sample's largest magnitude."""
    lo, hi = fn(b.lo), fn(b.hi)
    return _widen(lo, hi, _gamma(_per_sample_size(b)), _absmax(b, lo.ndim))


def _monotone(b: Box, fn: Callable[[torch.Tensor], torch.Tensor]) -> Box:
    """Non-decreasing and computed exactly in floating point (ReLU, max, selections, reshapes)."""
    return Box(fn(b.lo), fn(b.hi))


# -- rules: GELU -----------------------------------------------------------------------------------------


_GELU_MIN: dict[str, tuple[float, float]] = {}


def _gelu_minimum(approximate: str) -> tuple[float, float]:
    """(x*, a lower bound of min_x gelu(x)) for F.gelu(·, approximate): golden-section search on
    [-2, 0] in float64, the minimum value then lowered by 1e-12 (far above float64 error and the
    search's O(dx²) error in value), so the returned value is <= the true minimum."""
    if approximate not in _GELU_MIN:
        g = lambda v: float(F.gelu(torch.tensor(v, dtype=torch.float64), approximate=approximate))  # noqa: E731
        a, c = -2.0, 0.0
        r = (math.sqrt(5.0) - 1.0) / 2.0
        for _ in range(200):
            x1, x2 = c - r * (c - a), a + r * (c - a)
            if g(x1) < g(x2):
                c = x2
            else:
                a = x1
        x_star = (a + c) / 2.0
        _GELU_MIN[approximate] = (x_star, min(g(x_star), g(a), g(c)) - 1e-12)
    return _GELU_MIN[approximate]


def _gelu(b: Box, approximate: str = "none") -> Box:
    if approximate not in ("none", "tanh"):
        raise UnsupportedLayerError(f"GELU approximate={approximate!r} is not supported")
    x_star, g_min = _gelu_minimum(approximate)
    gl, gh = F.gelu(b.lo, approximate=approximate), F.gelu(b.hi, approximate=approximate)
    mag = torch.maximum(b.lo.abs(), b.hi.abs()) + 1.0  # erf / tanh and the products: absolute error ~ u |x|
    d = _gamma(32) * mag
    lo = torch.minimum(gl, gh) - d
    hi = torch.maximum(gl, gh) + d  # quasi-convex: the maximum over [lo, hi] is at an end
    lo = torch.where((b.lo <= x_star) & (b.hi >= x_star), torch.minimum(lo, torch.full_like(lo, g_min)), lo)
    return Box(lo, hi)


# -- the rule tables --------------------------------------------------------------------------------------


def _module_rule(m: nn.Module, name: str, b: Box) -> Box:
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            raise UnsupportedLayerError(f"layer {name!r} (Conv2d) uses padding_mode={m.padding_mode!r}; only 'zeros'")
        return _conv2d(b, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
    if isinstance(m, nn.Linear):
        return _linear(b, m.weight, m.bias)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return _batch_norm(b, m, name)
    if isinstance(m, nn.ReLU):
        return _monotone(b, F.relu)
    if isinstance(m, nn.GELU):
        return _gelu(b, m.approximate)
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise UnsupportedLayerError(f"layer {name!r} (MaxPool2d) returns indices")
        return _monotone(b, m)
    if isinstance(m, (nn.AdaptiveMaxPool2d,)):
        if m.return_indices:
            raise UnsupportedLayerError(f"layer {name!r} (AdaptiveMaxPool2d) returns indices")
        return _monotone(b, m)
    if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return _positive_linear(b, m)
    if isinstance(m, (nn.Flatten, nn.Identity)):
        return _monotone(b, m)
    if isinstance(m, nn.Dropout):
        if m.training:
            raise UnsupportedLayerError(f"layer {name!r} (Dropout) is in training mode. Call model.eval().")
        return b
    raise UnsupportedLayerError(_unsupported(name, type(m).__name__))


_SUPPORTED_MODULES = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.GELU, nn.MaxPool2d,
                      nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)


def _box_args(args: tuple, kwargs: dict) -> bool:
    return any(isinstance(a, Box) for a in (*args, *kwargs.values())) or any(
        isinstance(a, (list, tuple)) and any(isinstance(v, Box) for v in a) for a in args)


def _reduce_dims(args: tuple, kwargs: dict) -> dict:
    kw = dict(kwargs)
    if len(args) > 1:
        kw["dim"] = args[1]
    if len(args) > 2:
        kw["keepdim"] = args[2]
    return kw


def _cat(tensors, dim: int = 0) -> Box:
    if not all(isinstance(t, Box) for t in tensors):
        raise UnsupportedLayerError("concatenation of bounded and constant tensors is not supported")
    return Box(torch.cat([t.lo for t in tensors], dim), torch.cat([t.hi for t in tensors], dim))


_FUNCTIONS: dict[Any, Callable[..., Box]] = {
    F.relu: lambda b, *a, **k: _monotone(b, F.relu),
    torch.relu: lambda b, *a, **k: _monotone(b, F.relu),
    F.gelu: lambda b, approximate="none": _gelu(b, approximate),
    F.max_pool2d: lambda b, *a, **k: _monotone(b, lambda v: F.max_pool2d(v, *a, **{**k, "return_indices": False})),
    F.adaptive_max_pool2d: lambda b, *a, **k: _monotone(b, lambda v: F.adaptive_max_pool2d(v, *a, **k)),
    F.avg_pool2d: lambda b, *a, **k: _positive_linear(b, lambda v: F.avg_pool2d(v, *a, **k)),
    F.adaptive_avg_pool2d: lambda b, *a, **k: _positive_linear(b, lambda v: F.adaptive_avg_pool2d(v, *a, **k)),
    torch.mean: lambda b, *a, **k: _positive_linear(b, lambda v: torch.mean(v, **_reduce_dims((v, *a), k))),
    torch.amax: lambda b, *a, **k: _monotone(b, lambda v: torch.amax(v, **_reduce_dims((v, *a), k))),
    torch.flatten: lambda b, *a, **k: _monotone(b, lambda v: torch.flatten(v, *a, **k)),
    torch.flip: lambda b, *a, **k: _monotone(b, lambda v: torch.flip(v, *a, **k)),  # a permutation: exact
    torch.reshape: lambda b, *a, **k: _monotone(b, lambda v: torch.reshape(v, *a, **k)),
    torch.cat: lambda tensors, dim=0: _cat(tensors, dim),
    operator.add: _add,
    torch.add: _add,
    operator.sub: _sub,
    torch.sub: _sub,
    operator.mul: _mul,
    torch.mul: _mul,
    operator.truediv: _truediv,
    torch.div: _truediv,
    operator.neg: _neg,
}
_CONSTANT_FUNCTIONS = (getattr, operator.getitem)  # shapes and the like; getattr also on boxes (.shape)
_METHODS: dict[str, Callable[..., Any]] = {
    "mean": lambda b, *a, **k: _positive_linear(b, lambda v: v.mean(*a, **k)),
    "amax": lambda b, *a, **k: _monotone(b, lambda v: v.amax(*a, **k)),
    "flatten": lambda b, *a, **k: _monotone(b, lambda v: v.flatten(*a, **k)),
    "flip": lambda b, *a, **k: _monotone(b, lambda v: v.flip(*a, **k)),
    "view": lambda b, *a, **k: _monotone(b, lambda v: v.reshape(*a, **k)),
    "reshape": lambda b, *a, **k: _monotone(b, lambda v: v.reshape(*a, **k)),
    "contiguous": lambda b, *a, **k: b,
    "size": lambda b, *a, **k: b.lo.size(*a, **k),
    "dim": lambda b: b.lo.dim(),
    "relu": lambda b: _monotone(b, F.relu),
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "div": _truediv,
}


def _unsupported(name: str, what: str) -> str:
    return (f"cannot bound layer {name!r} ({what}): interval bound propagation supports Conv2d, Linear, "
            "BatchNorm (eval), ReLU, GELU, max / average pooling, mean / amax, flatten / reshape / cat, "
            "sums and constant scalings only")


def _function_name(target: Any) -> str:
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def _where(node: fx.Node) -> str:
    """The module a function call sits in (torch.fx records the stack), for error messages."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack), None) if stack else None
    return f"{node.name!r} in module {path!r}" if path else repr(node.name)


# -- the interpreter --------------------------------------------------------------------------------------


class IntervalBounds:
    """A model traced once with torch.fx, evaluated on boxes. Refuses (UnsupportedLayerError naming the
    layer) at construction when a layer or operation is outside the rules, and when a rule's condition
    fails at run time (e.g. BatchNorm back in training mode)."""

    def __init__(self, model: nn.Module):
        self.model = model
        try:
            self.graph_module = fx.symbolic_trace(model)
        except Exception as exc:  # data-dependent control flow and the like
            raise UnsupportedLayerError(f"cannot trace {type(model).__name__} with torch.fx: {exc}") from exc
        self.graph = self.graph_module.graph
        self._check_supported()
        self._last_linear = self._find_last_linear()

    def _check_supported(self) -> None:
        inputs = [n.name for n in self.graph.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise UnsupportedLayerError(f"the model must take exactly one input tensor, it takes {inputs}")
        for node in self.graph.nodes:
            if node.op == "call_module":
                m = self.model.get_submodule(node.target)
                if not isinstance(m, _SUPPORTED_MODULES):
                    raise UnsupportedLayerError(_unsupported(str(node.target), type(m).__name__))
            elif node.op == "call_function" and node.target not in _FUNCTIONS and node.target not in _CONSTANT_FUNCTIONS:
                raise UnsupportedLayerError(_unsupported(_where(node), f"function {_function_name(node.target)}"))
            elif node.op == "call_method" and node.target not in _METHODS:
                raise UnsupportedLayerError(_unsupported(_where(node), f"method Tensor.{node.target}"))

    def _find_last_linear(self) -> fx.Node | None:
        """The nn.Linear node whose output is the model's output (bounded per logit difference)."""
        out = next(n for n in self.graph.nodes if n.op == "output")
        arg = out.args[0]
        if isinstance(arg, fx.Node) and arg.op == "call_module" and len(arg.users) == 1:
            if isinstance(self.model.get_submodule(arg.target), nn.Linear):
                return arg
        return None

    def propagate(self, box: Box, record: bool = False, stop_at_last_linear: bool = False) -> tuple[Any, dict[str, Box]]:
        """Evaluate the graph on `box`. Returns (the output's Box, or with `stop_at_last_linear` the Box of
        the last linear layer's input; {node name: Box} of every node when `record`, else {}). Boxes are
        freed after their last use unless recorded (the evaluation of fast_cnn peaked at 1.5 GB resident)."""
        last_use: dict[fx.Node, fx.Node] = {}
        for node in self.graph.nodes:
            for inp in node.all_input_nodes:
                last_use[inp] = node
        env: dict[fx.Node, Any] = {}
        recorded: dict[str, Box] = {}
        for node in self.graph.nodes:
            if node.op == "output":
                return env[node.args[0]], recorded
            if stop_at_last_linear and node is self._last_linear:
                return env[node.args[0]], recorded
            if node.op == "placeholder":
                value: Any = box
            elif node.op == "get_attr":  # read from the model itself: buffers replaced by .to() stay current
                value = self.model
                for part in str(node.target).split("."):
                    value = getattr(value, part)
                value = _f64(value) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            else:
                args = fx.node.map_arg(node.args, lambda n: env[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
                value = self._run(node, args, kwargs)
            env[node] = value
            if record and isinstance(value, Box):
                recorded[node.name] = value
            for inp in node.all_input_nodes:
                if last_use.get(inp) is node and not record:
                    env.pop(inp, None)
        raise AssertionError("the traced graph has no output node")

    def _run(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "call_module":
            (b,) = args
            if not isinstance(b, Box):
                raise UnsupportedLayerError(f"layer {node.target!r} called on a constant")
            return _module_rule(self.model.get_submodule(node.target), str(node.target), b)
        if not _box_args(args, kwargs):  # constants only (shapes, buffers): evaluate as the model would
            fn = node.target if node.op == "call_function" else getattr(args[0], node.target)
            return fn(*args, **kwargs) if node.op == "call_function" else fn(*args[1:], **kwargs)
        if node.op == "call_function":
            if node.target is getattr and args[1] in ("shape", "ndim", "dtype", "device"):
                return getattr(args[0].lo, args[1])
            if node.target not in _FUNCTIONS:
                raise UnsupportedLayerError(_unsupported(_where(node), f"function {_function_name(node.target)} "
                                                         "on a bounded tensor"))
            return _FUNCTIONS[node.target](*args, **kwargs)
        return _METHODS[node.target](*args, **kwargs)

    def node_bounds(self, box: Box) -> dict[str, Box]:
        """A box for every intermediate tensor (tests check that real activations lie inside)."""
        return self.propagate(box, record=True)[1]

    def logit_bounds(self, box: Box) -> LogitBounds:
        """Bounds of the logits and of their pairwise differences over `box`, in float64, widened by
        FLOAT32_SLACK for float32 forward passes."""
        if self._last_linear is None:  # the output is not a linear layer: differences from the logit boxes
            out, _ = self.propagate(box)
            lower, upper = out.lo, out.hi
            diff_lower = lower[:, :, None] - upper[:, None, :]
            mag = torch.maximum(lower.abs(), upper.abs())
            slack = FLOAT32_SLACK * (1.0 + mag)
            diff_slack = slack[:, :, None] + slack[:, None, :]
        else:
            feats, _ = self.propagate(box, stop_at_last_linear=True)
            head = self.model.get_submodule(self._last_linear.target)
            w = _f64(head.weight)
            bias = _f64(head.bias) if head.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                              device=w.device)
            logits = _linear(feats, w, bias)
            lower, upper = logits.lo, logits.hi
            # z_j - z_k = (W_j - W_k) f + (b_j - b_k), bounded as one linear layer (C, C, D)
            wd = w[:, None, :] - w[None, :, :]
            bd = bias[:, None] - bias[None, :]
            mid, rad = (feats.hi + feats.lo) / 2, (feats.hi - feats.lo) / 2
            diff_mid = torch.einsum("jkd,nd->njk", wd, mid) + bd
            diff_rad = torch.einsum("jkd,nd->njk", wd.abs(), rad)
            f_abs = _absmax(feats).view(-1, 1, 1)
            diff_mag = wd.abs().sum(2)[None] * f_abs + bd.abs()[None]
            diff_lower = diff_mid - diff_rad - _gamma(w.shape[1]) * diff_mag
            mag = w.abs().sum(1)[None] * _absmax(feats) + bias.abs()[None]  # (N, C) magnitude bound of each logit
            slack = FLOAT32_SLACK * (1.0 + mag)
            diff_slack = slack[:, :, None] + slack[:, None, :]
        eye = torch.eye(lower.shape[1], dtype=torch.bool, device=lower.device)
        diff_lower = torch.where(eye, torch.zeros_like(diff_lower), diff_lower - diff_slack)
        return LogitBounds(lower - slack, upper + slack, diff_lower)


# -- scores ----------------------------------------------------------------------------------------------


def score_bound_from_logits(bounds: LogitBounds, name: str, temperature: float = 1.0) -> torch.Tensor:
    """Upper bound (N,) float64 of score `name` over every logit vector the bounds allow."""
    if name == "energy":
        s = temperature * torch.logsumexp(bounds.upper / temperature, dim=1)
    elif name == "detector":  # bounds of the detector's logits (column 0 in-distribution, 1 outlier)
        s = -bounds.diff_lower[:, 1, 0]
    elif name == "msp":
        # msp = max_k 1 / Σ_j exp((z_j - z_k) / T), decreasing in every difference
        s = torch.exp(-torch.logsumexp(bounds.diff_lower / temperature, dim=1)).amax(dim=1)
    else:
        raise ValueError(f"score {name!r} cannot be certified: "
                         + NOT_CERTIFIABLE.get(name, f"certifiable scores: {', '.join(CERTIFIABLE_SCORES)}"))
    return s + SCORE_SLACK * (1.0 + s.abs())


def score_upper_bounds(certifier: IntervalBounds | None, x: torch.Tensor, eps: float, names: list[str],
                       temperature: float = 1.0, detector: IntervalBounds | None = None) -> dict[str, torch.Tensor]:
    """{score: (N,) float64 upper bound of the score over the eps-ball of each image of x}. `certifier` bounds
    the classifier (msp, energy), `detector` a composed model's detector (`IntervalBounds(model.detector)`)."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        box = input_box(x, eps)
        classifier_scores = [n for n in names if n != "detector"]
        if classifier_scores:
            if certifier is None:
                raise ValueError(f"bounding {', '.join(classifier_scores)} needs the classifier's IntervalBounds")
            bounds = certifier.logit_bounds(box)
            out.update({n: score_bound_from_logits(bounds, n, temperature) for n in classifier_scores})
        if "detector" in names:
            if detector is None:
                raise ValueError("bounding the detector score needs the detector's IntervalBounds")
            out["detector"] = score_bound_from_logits(detector.logit_bounds(box), "detector")
    return {n: out[n] for n in names}


# -- evaluation -------------------------------------------------------------------------------------------


def certify_key(eps: float) -> str:
    """Result-row name of a radius: 1/255 -> 'certified_1_255'."""
    return f"certified_{eps * 255:.4g}_255"


def _strictly_above(bound: np.ndarray) -> np.ndarray:
    """float32 values strictly above the float64 bounds: ties with an in-distribution score then count
    against the detector (a guarantee should not win a tie by rounding)."""
    b32 = bound.astype(np.float32)
    b32 = np.where(b32.astype(np.float64) < bound, np.nextafter(b32, np.float32(np.inf)), b32)
    return np.nextafter(b32, np.float32(np.inf))


def evaluate_certified(model: nn.Module, test_images: np.ndarray, clean_in: dict[str, np.ndarray],
                       ood_images: dict[str, np.ndarray], eps_list: list[float], *, samples: int | None = None,
                       seed: int = 0, temperature: float = 1.0, batch_size: int = 128,
                       ) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, np.ndarray], dict[str, Any]]:
    """`oodguard evaluate --certify`: per score, OOD set and radius, the metrics of clean in-distribution
    scores vs the certified upper bounds of the OOD images' scores (guaranteed AUROC, FPR95, ...).

    `clean_in` holds the clean scores of all of `test_images` (per score: the certifiable ones are
    certified); `samples` takes the same seeded subsets as the attacked rows (seed for the inliers,
    seed + 1 for each OOD set). Returns ({score: {set: {row: metrics}}}, {raw key: bounds}, the eval.json
    section describing the rows)."""
    from tqdm.auto import tqdm

    from . import data
    from .ood_metrics import ood_metrics
    from .ood_sets import subset_indices

    names = [n for n in clean_in if n in CERTIFIABLE_SCORES]
    if not names:
        raise ValueError(f"--certify bounds {', '.join(CERTIFIABLE_SCORES)} only; add one to --scores")
    # the classifier and the detector are bounded separately (only what the scores need is traced)
    certifier = IntervalBounds(model) if any(n != "detector" for n in names) else None
    detector = IntervalBounds(model.detector) if "detector" in names else None
    in_idx = subset_indices(len(test_images), samples, seed)
    device = next(model.parameters()).device
    results: dict[str, dict[str, dict[str, Any]]] = {n: {} for n in names}
    raw: dict[str, np.ndarray] = {}
    seconds: dict[str, dict[str, float]] = {}
    for key, images in ood_images.items():
        images = images[subset_indices(len(images), samples, seed + 1)]
        seconds[key] = {}
        for eps in eps_list:
            row, t0 = certify_key(eps), time.perf_counter()
            chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
            for _, x in tqdm(data.iterate_batches(images, batch_size), total=-(-len(images) // batch_size),
                             desc=f"{key} [{row}]", leave=False, unit="batch"):
                for n, ub in score_upper_bounds(certifier, x.to(device), eps, names, temperature, detector).items():
                    chunks[n].append(ub.cpu().numpy())
            for n in names:
                ub = np.concatenate(chunks[n])
                raw[f"{n}__{key}__{row}"] = ub
                results[n].setdefault(key, {})[row] = ood_metrics(clean_in[n][in_idx], _strictly_above(ub))
            seconds[key][row] = round(time.perf_counter() - t0, 2)
            log.info("certified %s at eps %.4g/255: %d images in %.1f s", key, eps * 255, len(images), seconds[key][row])
    info = {
        "method": "interval bound propagation (training/certify.py): float64 with outward rounding; the last "
                  "linear layer bounded per logit difference",
        "rows": {certify_key(e): float(e) for e in eps_list},
        "region": "L-inf ball of radius eps around each OOD image, intersected with [0, 1] (continuous, not only "
                  "the 8-bit grid)",
        "compared": "clean in-distribution scores vs the certified upper bound of each OOD image's score; "
                    "ties count against the detector",
        "scores": names,
        "not_certified": {n: NOT_CERTIFIABLE.get(n, "no bound rule") for n in clean_in if n not in names},
        "float32_slack": {"logits": FLOAT32_SLACK, "scores": SCORE_SLACK},
        "n_in": int(in_idx.size),
        "seconds": seconds,
    }
    return results, raw, info
