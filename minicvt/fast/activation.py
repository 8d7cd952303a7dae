"""Fast activations: the functions of minicvt.functional.activation, with the same signatures
and results (to rounding), made fast on the CPU.

What they do differently, and why (measured in docs/performance.md): the MLP's hidden
activations are the largest arrays of the model, and on them a new array costs as much as a
pass. So each function makes only the arrays it returns and builds them with in-place passes
(`out=`) instead of a new array per operation, a block of rows per CPU thread, each block
walked in cache-sized pieces so that it is read from memory once, not once a pass.
`*_inference(x) -> out` is the forward alone, for `nn.no_grad()`: nothing is cached, and the
result is built in its one output array with a pass fewer.
"""
import numpy as np

from .. import backend
from ..backend import get_array_module
from ..functional.activation import (INV_SQRT_2PI, QUICK, SQRT_2_OVER_PI, SQRT_HALF, TANH_C, GeluCache,
                                     QuickGeluCache, check_approximate)
from . import parallel


def gelu_forward(x, approximate="none"):
    """Equals functional.gelu_forward."""
    check_approximate(approximate)
    xp = get_array_module(x)
    cdf, out = xp.empty_like(x), xp.empty_like(x)
    parallel.rows(_gelu_rows, (x, cdf, out), approximate, pieces=True)
    return out, GeluCache(approximate, x, cdf)


def _gelu_rows(x, cdf, out, approximate):
    """A block of rows of the forward, written into cdf and out without a new array; cdf may be
    out itself (gelu_inference), since the last pass multiplies it by x in place."""
    xp = get_array_module(x)
    if approximate == "none":
        xp.multiply(x, -SQRT_HALF, out=cdf)
        backend.erfc(cdf, out=cdf)
        cdf *= 0.5
    else:
        xp.multiply(x, x, out=cdf)                  # u / sqrt(2/pi) = x + c x^3 = (1 + c x^2) x
        cdf *= TANH_C
        cdf += 1.0
        cdf *= x
        _sigmoid_into(cdf, 2.0 * SQRT_2_OVER_PI, cdf)
    xp.multiply(x, cdf, out=out)


def gelu_inference(x, approximate="none"):
    """Equals functional.gelu_forward's out alone (nothing cached): Phi(x) built in out, then
    out *= x."""
    check_approximate(approximate)
    out = get_array_module(x).empty_like(x)
    parallel.rows(_gelu_rows, (x, out, out), approximate, pieces=True)   # cdf and out share one array
    return out


def gelu_backward(dout, cache):
    """Equals functional.gelu_backward."""
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
        d *= INV_SQRT_2PI                          # phi(x)
        d *= x
        d += a                                      # Phi(x) + x phi(x)
    else:
        # tanh form, s = sigmoid(2u): d/dx [x s] = s + x * 2 s (1 - s) * du/dx,
        # du/dx = sqrt(2/pi) (1 + 3c x^2); the same as (1 + t)/2 + x/2 (1 - t^2) du/dx, t = tanh u
        d *= 3.0 * TANH_C
        d += 1.0
        d *= 2.0 * SQRT_2_OVER_PI                  # 2 du/dx
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
    """Equals functional.quick_gelu_forward."""
    xp = get_array_module(x)
    s, out = xp.empty_like(x), xp.empty_like(x)
    parallel.rows(_quick_gelu_rows, (x, s, out), pieces=True)
    return out, QuickGeluCache(x, s)


def _quick_gelu_rows(x, s, out):
    _sigmoid_into(x, QUICK, s)
    get_array_module(x).multiply(x, s, out=out)


def quick_gelu_inference(x):
    """Equals functional.quick_gelu_forward's out alone (nothing cached), as x / (1 + exp(-1.702 x)):
    four passes in one output array instead of five in two (s and out); in the model 10 -> 6 ms
    for the stage-0 MLP at batch 128 (docs/performance.md). Where exp overflows, x / inf is -0, the limit."""
    out = get_array_module(x).empty_like(x)
    parallel.rows(_quick_gelu_inference_rows, (x, out), pieces=True)
    return out


def _quick_gelu_inference_rows(x, out):
    xp = get_array_module(x)
    xp.multiply(x, -QUICK, out=out)
    with np.errstate(over="ignore"):          # NumPy only; CuPy does not warn
        xp.exp(out, out=out)
    out += 1.0
    xp.divide(x, out, out=out)


def quick_gelu_backward(dout, cache):
    """Equals functional.quick_gelu_backward: dx = dout * (s + 1.702 x s (1 - s)), in place."""
    x, s = cache
    dx = get_array_module(x).empty_like(dout)
    parallel.rows(_quick_gelu_grad_rows, (dout, x, s, dx), pieces=True)
    return dx


def _quick_gelu_grad_rows(dout, x, s, d):
    xp = get_array_module(x)
    xp.subtract(1.0, s, out=d)                  # in place, no new array:
    d *= s
    d *= x
    d *= QUICK
    d += s                                      # s + 1.702 x s (1 - s)
    d *= dout
