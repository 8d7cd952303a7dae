"""Linear (fully connected / pointwise) layer on any leading shape.

x (..., Cin) with any leading axes: tokens (N, T, Cin), vectors (N, Cin), ...
w (Cout, Cin) in PyTorch's layout, b (Cout,) or None -> out (..., Cout).
Derivation: docs/linear.md.
"""
from typing import NamedTuple

from .checks import check_float, check_ndim, check_shape


class LinearCache(NamedTuple):
    x: object               # (..., Cin), for dw
    w: object               # (Cout, Cin), for dx
    has_bias: bool


def linear_forward(x, w, b=None):
    """out = x @ w.T + b."""
    check_linear(x, w, b)
    out = x @ w.T                                   # (..., Cout)
    if b is not None:
        out = out + b
    return out, LinearCache(x, w, b is not None)


def linear_backward(dout, cache):
    """dout (..., Cout) -> dx (..., Cin), dw (Cout, Cin), db (Cout,) or None."""
    x, w, has_bias = cache
    Cout, Cin = w.shape
    x2, d2 = x.reshape(-1, Cin), dout.reshape(-1, Cout)     # (M, Cin), (M, Cout): M = all leading axes
    dw = d2.T @ x2                                  # every row (token, image) adds its share
    db = d2.sum(axis=0) if has_bias else None
    dx = dout @ w                                   # (..., Cin)
    return dx, dw, db


def check_linear(x, w, b):
    check_ndim("linear", "w", w, 2, "(Cout, Cin)")
    check_float("linear", ("x", x), ("w", w), ("b", b))
    Cout, Cin = w.shape
    if x.ndim < 1 or x.shape[-1] != Cin:
        raise ValueError(f"linear: x must have shape (..., {Cin}) for w of shape {tuple(w.shape)}, "
                         f"got {tuple(x.shape)}")
    if b is not None:
        check_shape("linear", "b", b, (Cout,))
