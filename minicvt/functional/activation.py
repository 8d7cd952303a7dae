"""Activations: GELU (exact erf form and tanh approximation) and QuickGELU.

All elementwise: x (any shape) -> out (same shape, same dtype). Constants are Python floats,
never NumPy float64 scalars, which would promote float32 arrays to float64.
Derivations: docs/activation.md.
"""
import math

import numpy as np

from .. import backend
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
    if approximate == "none":
        cdf = backend.erfc(x * -_SQRT_HALF)
        cdf *= 0.5
        return x * cdf, ("none", x, cdf)
    if approximate == "tanh":
        s = _sigmoid_of(x + _TANH_C * x * x * x, 2.0 * _SQRT_2_OVER_PI)
        return x * s, ("tanh", x, s)
    raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def gelu_backward(dout, cache):
    """dout -> dx. exact: d/dx x Phi(x) = Phi(x) + x phi(x), phi the normal density."""
    kind, x, a = cache
    xp = get_array_module(x)
    if kind == "none":
        d = x * x                                   # one new array, then in place:
        d *= -0.5
        xp.exp(d, out=d)
        d *= _INV_SQRT_2PI                          # phi(x)
        d *= x
        d += a                                      # Phi(x) + x phi(x)
        d *= dout
        return d
    # tanh form, s = sigmoid(2u): d/dx [x s] = s + x * 2 s (1 - s) * du/dx,
    # du/dx = sqrt(2/pi) (1 + 3c x^2); the same as (1 + t)/2 + x/2 (1 - t^2) du/dx, t = tanh u
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_C * x * x)
    return dout * (a + 2.0 * x * a * (1.0 - a) * du)


def _sigmoid_of(x, a):
    """sigmoid(a x) = 1 / (1 + exp(-a x)), a a Python float. For a x << 0 this keeps full
    relative precision (no 1 - (almost 1)); where exp(-a x) overflows to inf the result is
    exactly 0, the right limit, so the overflow warning is silenced. One new array and four
    passes over it in place: the MLP's hidden activations are the largest arrays in the
    model, and a new array of that size costs as much as a pass (docs/performance.md)."""
    xp = get_array_module(x)
    z = x * -a
    with np.errstate(over="ignore"):          # NumPy only; CuPy does not warn
        xp.exp(z, out=z)
    z += 1.0
    return xp.reciprocal(z, out=z)


def quick_gelu_forward(x):
    """QuickGELU(x) = x * sigmoid(1.702 x), the activation of the official CvT code.
    cache: x and s = sigmoid(1.702 x)."""
    s = _sigmoid_of(x, _QUICK)
    return x * s, (x, s)


def quick_gelu_backward(dout, cache):
    """dout -> dx = dout * (s + 1.702 x s (1 - s))."""
    x, s = cache
    d = 1.0 - s                                 # one new array, then in place:
    d *= s
    d *= x
    d *= _QUICK
    d += s                                      # s + 1.702 x s (1 - s)
    d *= dout
    return d
