"""Activations: GELU (exact erf form and tanh approximation) and QuickGELU.

All elementwise: x (any shape) -> out (same shape, same dtype). Constants are Python floats,
never NumPy float64 scalars, which would promote float32 arrays to float64.
Derivations: docs/activation.md.
"""
import math
from typing import NamedTuple

import numpy as np

from .. import backend
from ..backend import get_array_module

SQRT_HALF = math.sqrt(0.5)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TANH_C = 0.044715
QUICK = 1.702


class GeluCache(NamedTuple):
    approximate: str        # 'none' or 'tanh'
    x: object
    cdf: object             # Phi(x), or its tanh form: the derivative reuses it


def check_approximate(approximate):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def sigmoid(z):
    """1 / (1 + exp(-z)). For z << 0 this keeps full relative precision (no 1 - (almost 1));
    where exp(-z) overflows to inf the result is exactly 0, the right limit, so NumPy's
    overflow warning is silenced (CuPy does not warn)."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + get_array_module(z).exp(-z))


def gelu_forward(x, approximate="none"):
    """GELU(x) = x * Phi(x), Phi the standard normal CDF (PyTorch's nn.GELU).

    approximate='none':  Phi(x) = (1 + erf(x / sqrt 2)) / 2                 (exact)
    approximate='tanh':  Phi(x) ~ (1 + tanh(u)) / 2,  u = sqrt(2/pi) (x + 0.044715 x^3)
    Both are evaluated without the sum 1 + (something near -1), which for x < -5 cancels
    most float64 digits: (1 + erf(z)) / 2 as erfc(-z) / 2, and (1 + tanh u) / 2 as sigmoid(2u).
    """
    check_approximate(approximate)
    if approximate == "none":
        cdf = 0.5 * backend.erfc(-SQRT_HALF * x)
    else:
        cdf = sigmoid(2.0 * SQRT_2_OVER_PI * (x + TANH_C * x * x * x))
    return x * cdf, GeluCache(approximate, x, cdf)


def gelu_backward(dout, cache):
    """dout -> dx = dout * d/dx [x Phi(x)] = dout * (Phi(x) + x Phi'(x))."""
    approximate, x, cdf = cache
    if approximate == "none":
        pdf = INV_SQRT_2PI * get_array_module(x).exp(-0.5 * x * x)     # phi(x), the normal density
        return dout * (cdf + x * pdf)
    # tanh form, s = sigmoid(2u): ds/dx = 2 s (1 - s) du/dx, du/dx = sqrt(2/pi) (1 + 3c x^2)
    du = SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_C * x * x)
    return dout * (cdf + x * 2.0 * cdf * (1.0 - cdf) * du)


class QuickGeluCache(NamedTuple):
    x: object
    s: object               # sigmoid(1.702 x)


def quick_gelu_forward(x):
    """QuickGELU(x) = x * sigmoid(1.702 x), the activation of the official CvT code."""
    s = sigmoid(QUICK * x)
    return x * s, QuickGeluCache(x, s)


def quick_gelu_backward(dout, cache):
    """dout -> dx = dout * (s + 1.702 x s (1 - s))."""
    x, s = cache
    return dout * (s + QUICK * x * s * (1.0 - s))
