"""Activations: GELU (exact erf form and tanh approximation) and QuickGELU.

All elementwise: x (any shape) -> out (same shape, same dtype). Constants are Python floats,
never NumPy float64 scalars, which would promote float32 arrays to float64.
`*_inference(x) -> out` is the forward alone, for `nn.no_grad()`: with no backward to come,
nothing is cached, the result is built in its output array with a pass fewer, and the
largest arrays of the model (the MLP's hidden activations) are made once instead of twice.
Derivations: docs/activation.md.
"""
import math

import numpy as np

from .. import backend, parallel
from ..backend import get_array_module

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_C = 0.044715
_QUICK = 1.702


def gelu_forward(x, approximate="none"):
    """GELU(x) = x * Phi(x), Phi the standard normal CDF (PyTorch's nn.GELU).

    approximate='none':  Phi(x) = (1 + erf(x / sqrt 2)) / 2                 (exact)
    approximate='tanh':  Phi(x) ~ (1 + tanh(u)) / 2,  u = sqrt(2/pi) (x + 0.044715 x^3)
    Both are evaluated without the sum 1 + (something near -1), which for x < -5 cancels
    most float64 digits: (1 + erf(z)) / 2 as erfc(-z) / 2, and (1 + tanh u) / 2 as sigmoid(2u).
    cache: x and the Phi(x) value, which the derivative reuses.
    """
    _check_approximate(approximate)
    xp = get_array_module(x)
    cdf, out = xp.empty_like(x), xp.empty_like(x)
    parallel.rows(_gelu_rows, (x, cdf, out), approximate, pieces=True)
    return out, (approximate, x, cdf)


def _check_approximate(approximate):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def _gelu_rows(x, cdf, out, approximate):
    """A block of rows of the forward, written into cdf and out without a new array; cdf may be
    out itself (gelu_inference), since the last pass multiplies it by x in place."""
    xp = get_array_module(x)
    if approximate == "none":
        xp.multiply(x, -_SQRT_HALF, out=cdf)
        backend.erfc(cdf, out=cdf)
        cdf *= 0.5
    else:
        xp.multiply(x, x, out=cdf)                  # u / sqrt(2/pi) = x + c x^3 = (1 + c x^2) x
        cdf *= _TANH_C
        cdf += 1.0
        cdf *= x
        _sigmoid_into(cdf, 2.0 * _SQRT_2_OVER_PI, cdf)
    xp.multiply(x, cdf, out=out)


def gelu_inference(x, approximate="none"):
    """gelu_forward's out alone (nothing cached): Phi(x) built in out, then out *= x."""
    _check_approximate(approximate)
    out = get_array_module(x).empty_like(x)
    parallel.rows(_gelu_rows, (x, out, out), approximate, pieces=True)   # cdf and out share one array
    return out


def gelu_backward(dout, cache):
    """dout -> dx. exact: d/dx x Phi(x) = Phi(x) + x phi(x), phi the normal density."""
    kind, x, a = cache
    dx = get_array_module(x).empty_like(dout)
    parallel.rows(_gelu_grad_rows, (dout, x, a, dx), kind, pieces=True)
    return dx


def _gelu_grad_rows(dout, x, a, d, kind):
    """A block of rows of the backward, built in d in place."""
    xp = get_array_module(x)
    xp.multiply(x, x, out=d)
    if kind == "none":
        d *= -0.5
        xp.exp(d, out=d)
        d *= _INV_SQRT_2PI                          # phi(x)
        d *= x
        d += a                                      # Phi(x) + x phi(x)
    else:
        # tanh form, s = sigmoid(2u): d/dx [x s] = s + x * 2 s (1 - s) * du/dx,
        # du/dx = sqrt(2/pi) (1 + 3c x^2); the same as (1 + t)/2 + x/2 (1 - t^2) du/dx, t = tanh u
        d *= 3.0 * _TANH_C
        d += 1.0
        d *= 2.0 * _SQRT_2_OVER_PI                  # 2 du/dx
        d *= x
        d *= a
        d *= 1.0 - a                                # a new array of the block's size, not of x's
        d += a
    d *= dout


def _sigmoid_into(x, a, out):
    """out = sigmoid(a x) = 1 / (1 + exp(-a x)), a a Python float; out may be x itself.
    For a x << 0 this keeps full relative precision (no 1 - (almost 1)); where exp(-a x)
    overflows to inf the result is exactly 0, the right limit, so the overflow warning is
    silenced. Four passes in place, no new array: the MLP's hidden activations are the
    largest arrays in the model, and a new array of that size costs as much as a pass
    (docs/performance.md)."""
    xp = get_array_module(x)
    xp.multiply(x, -a, out=out)
    with np.errstate(over="ignore"):          # NumPy only; CuPy does not warn
        xp.exp(out, out=out)
    out += 1.0
    xp.reciprocal(out, out=out)


def quick_gelu_forward(x):
    """QuickGELU(x) = x * sigmoid(1.702 x), the activation of the official CvT code.
    cache: x and s = sigmoid(1.702 x)."""
    xp = get_array_module(x)
    s, out = xp.empty_like(x), xp.empty_like(x)
    parallel.rows(_quick_gelu_rows, (x, s, out), pieces=True)
    return out, (x, s)


def _quick_gelu_rows(x, s, out):
    _sigmoid_into(x, _QUICK, s)
    get_array_module(x).multiply(x, s, out=out)


def quick_gelu_inference(x):
    """quick_gelu_forward's out alone (nothing cached), as x / (1 + exp(-1.702 x)): four passes
    in one output array instead of five in two (s and out); in the model 10 -> 6 ms for the
    stage-0 MLP at batch 128 (docs/performance.md). Where exp overflows, x / inf is -0, the limit."""
    out = get_array_module(x).empty_like(x)
    parallel.rows(_quick_gelu_inference_rows, (x, out), pieces=True)
    return out


def _quick_gelu_inference_rows(x, out):
    xp = get_array_module(x)
    xp.multiply(x, -_QUICK, out=out)
    with np.errstate(over="ignore"):          # NumPy only; CuPy does not warn
        xp.exp(out, out=out)
    out += 1.0
    xp.divide(x, out, out=out)


def quick_gelu_backward(dout, cache):
    """dout -> dx = dout * (s + 1.702 x s (1 - s))."""
    x, s = cache
    dx = get_array_module(x).empty_like(dout)
    parallel.rows(_quick_gelu_grad_rows, (dout, x, s, dx), pieces=True)
    return dx


def _quick_gelu_grad_rows(dout, x, s, d):
    xp = get_array_module(x)
    xp.subtract(1.0, s, out=d)                  # in place, no new array:
    d *= s
    d *= x
    d *= _QUICK
    d += s                                      # s + 1.702 x s (1 - s)
    d *= dout
