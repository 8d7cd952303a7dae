"""Linear (fully connected / pointwise) layer on any leading shape.

x (..., Cin) with any leading axes: tokens (N, T, Cin), vectors (N, Cin), ...
w (Cout, Cin) in PyTorch's layout, b (Cout,) or None -> out (..., Cout).
Derivation: docs/linear.md.
"""
from .. import parallel
from ._checks import check_float, check_ndim, check_shape


def linear_forward(x, w, b=None):
    """out = x @ w.T + b. cache: x (for dw) and w (for dx)."""
    check_ndim("linear", "w", w, 2, "(Cout, Cin)")
    check_float("linear", ("x", x), ("w", w), ("b", b))
    Cout, Cin = w.shape
    if x.ndim < 1 or x.shape[-1] != Cin:
        raise ValueError(f"linear: x must have shape (..., {Cin}) for w of shape {tuple(w.shape)}, "
                         f"got {tuple(x.shape)}")
    if b is not None:
        check_shape("linear", "b", b, (Cout,))
    # one 2-D matmul over all leading axes (a 3-D `x @ w.T` runs as a batch of small products,
    # about 3x slower on CPU BLAS); each CPU thread takes a block of rows and adds the bias
    out = parallel.matmul(x.reshape(-1, Cin), w.T, bias=b)          # (M, Cout)
    return out.reshape(*x.shape[:-1], Cout), (x, w, b is not None)


def linear_backward(dout, cache):
    """dout (..., Cout) -> dx (..., Cin), dw (Cout, Cin), db (Cout,) or None."""
    x, w, has_bias = cache
    Cout, Cin = w.shape
    x2 = x.reshape(-1, Cin)                         # (M, Cin), M = product of leading axes
    d2 = dout.reshape(-1, Cout)                     # (M, Cout)
    # sums over the M rows, a block of rows per CPU thread (parallel.py)
    dw = parallel.matmul_t(d2, x2)                  # (Cout, Cin)
    db = parallel.sum_rows(d2) if has_bias else None
    dx = parallel.matmul(d2, w).reshape(x.shape)    # (..., Cin)
    return dx, dw, db
