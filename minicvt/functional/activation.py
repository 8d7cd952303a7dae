"""Activations: GELU (exact erf form and tanh approximation) and QuickGELU.

All elementwise: x (any shape) -> out (same shape, same dtype). Constants are Python floats,
never NumPy float64 scalars, which would promote float32 arrays to float64.
Derivations: docs/activation.md.
"""
import math

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
    approximate='tanh':  Phi(x) ~ (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2
    cache: x and what the derivative reuses (Phi(x), or the tanh value).
    """
    if approximate == "none":
        cdf = 0.5 * (1.0 + backend.erf(x * _SQRT_HALF))
        return x * cdf, ("none", x, cdf)
    if approximate == "tanh":
        t = get_array_module(x).tanh(_SQRT_2_OVER_PI * (x + _TANH_C * x * x * x))
        return 0.5 * x * (1.0 + t), ("tanh", x, t)
    raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def gelu_backward(dout, cache):
    """dout -> dx. exact: d/dx x Phi(x) = Phi(x) + x phi(x), phi the normal density."""
    kind, x, a = cache
    xp = get_array_module(x)
    if kind == "none":
        pdf = _INV_SQRT_2PI * xp.exp(-0.5 * x * x)
        return dout * (a + x * pdf)
    # tanh form: d/dx [x (1 + t) / 2] = (1 + t)/2 + x/2 (1 - t^2) sqrt(2/pi) (1 + 3c x^2)
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_C * x * x)
    return dout * (0.5 * (1.0 + a) + 0.5 * x * (1.0 - a * a) * du)


def _sigmoid(z):
    # written with tanh so no exp can overflow for large |z|
    return 0.5 * (1.0 + get_array_module(z).tanh(0.5 * z))


def quick_gelu_forward(x):
    """QuickGELU(x) = x * sigmoid(1.702 x), the activation of the official CvT code.
    cache: x and s = sigmoid(1.702 x)."""
    s = _sigmoid(_QUICK * x)
    return x * s, (x, s)


def quick_gelu_backward(dout, cache):
    """dout -> dx = dout * (s + 1.702 x s (1 - s))."""
    x, s = cache
    return dout * (s + _QUICK * x * s * (1.0 - s))
