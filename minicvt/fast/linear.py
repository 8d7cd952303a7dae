"""Fast linear layer: the functions of minicvt.functional.linear, with the same signatures and
results (to rounding), made fast on the CPU.

What they do differently, and why (docs/performance.md): every leading axis is folded into one
2-D matmul (a 3-D `x @ w.T` runs as a batch of small products, about 3x slower on CPU BLAS),
split a block of rows per CPU thread, each block adding the bias while it is in the cache; the
sums over rows of the backward (dw, db) are each thread's share, added up.
"""
from ..functional.linear import LinearCache, check_linear
from . import parallel


def linear_forward(x, w, b=None):
    """Equals functional.linear_forward."""
    check_linear(x, w, b)
    Cout, Cin = w.shape
    out = parallel.matmul(x.reshape(-1, Cin), w.T, bias=b)          # (M, Cout), M = leading axes
    return out.reshape(*x.shape[:-1], Cout), LinearCache(x, w, b is not None)


def linear_backward(dout, cache):
    """Equals functional.linear_backward."""
    x, w, has_bias = cache
    Cout, Cin = w.shape
    x2 = x.reshape(-1, Cin)                         # (M, Cin)
    d2 = dout.reshape(-1, Cout)                     # (M, Cout)
    dw = parallel.matmul_t(d2, x2)                  # (Cout, Cin)
    db = parallel.sum_rows(d2) if has_bias else None
    dx = parallel.matmul(d2, w).reshape(x.shape)    # (..., Cin)
    return dx, dw, db
