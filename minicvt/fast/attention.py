"""Fast softmax and attention: the functions of minicvt.functional.attention, with the same
signatures and results (to rounding), made fast on the CPU.

What they do differently, and why (measured in docs/performance.md):
- the scores are made key-major, k q^T (N, h, Tk, Tq), so that the softmax over the keys
  reduces across rows of Tq values, which NumPy does as fast elementwise passes, instead of
  along each row of only Tk = 64, 16 or 5 values (2-3x faster); p is handed out as a
  transposed view, (N, h, Tq, Tk) as in the reference, and BLAS reads it as it lies;
- the softmax is built in its one output array with in-place passes, the scale applied inside;
- the stacks of per-head products run a block of images per CPU thread.
"""
from ..backend import get_array_module
from ..functional.attention import (AttentionCache, SoftmaxCache, check_attention, merge_heads,
                                    split_heads)
from . import parallel


def softmax_forward(x, axis=-1, scale=1.0):
    """Equals functional.softmax_forward: one new array, then in place, a block of rows per thread."""
    if not scale > 0:
        raise ValueError(f"softmax: scale must be positive, got {scale}")
    p = get_array_module(x).empty(x.shape, x.dtype)                 # the one new array
    _by_rows(_softmax_rows, (x, p), axis, float(scale))
    return p, SoftmaxCache(p, axis, float(scale))


def _softmax_rows(x, p, axis, scale):
    xp = get_array_module(x)
    xp.subtract(x, x.max(axis=axis, keepdims=True), out=p)          # then in place
    if scale != 1.0:
        p *= scale                      # max(scale * x) = scale * max(x), as scale > 0
    xp.exp(p, out=p)
    p /= p.sum(axis=axis, keepdims=True)


def softmax_backward(dout, cache):
    """Equals functional.softmax_backward."""
    p, axis, scale = cache
    dx = get_array_module(dout).empty(dout.shape, dout.dtype)
    _by_rows(_softmax_grad_rows, (dout, p, dx), axis, scale)
    return dx


def _softmax_grad_rows(dout, p, dx, axis, scale):
    xp = get_array_module(dout)
    xp.multiply(dout, p, out=dx)
    xp.subtract(dout, dx.sum(axis=axis, keepdims=True), out=dx)
    dx *= p
    if scale != 1.0:
        dx *= scale


def _by_rows(fn, arrays, axis, scale):
    """A block of rows per CPU thread (parallel.rows), unless the softmax runs along the
    leading axis itself, which the blocks would cut."""
    if axis % arrays[0].ndim == 0:
        fn(*arrays, axis, scale)
    else:
        parallel.rows(fn, arrays, axis, scale, pieces=True)


def attention_forward(q, k, v, num_heads, scale=None, drop_mask=None):
    """Equals functional.attention_forward; cache.p is a transposed view of the key-major
    probabilities, (N, h, Tq, Tk) as the reference's."""
    scale = check_attention(q, k, v, num_heads, scale, drop_mask)
    qh, kh, vh = split_heads(q, num_heads), split_heads(k, num_heads), split_heads(v, num_heads)
    # each product is a stack of N*h small matrices: a block of images per CPU thread.
    # The scores are made key-major, k q^T (N, h, Tk, Tq): the softmax over the keys then
    # reduces across rows of Tq values, which NumPy does as fast elementwise passes, instead
    # of along each row of only Tk = 64, 16 or 5 values (2-3x faster). p is a transposed
    # view, (N, h, Tq, Tk) as usual; BLAS reads transposed matrices as they are.
    scores_t = parallel.matmul(kh, qh.transpose(0, 1, 3, 2))  # (N, h, Tk, Tq), unscaled
    p = softmax_forward(scores_t, -2, scale)[0].transpose(0, 1, 3, 2)   # softmax(scores * scale)
    pd = p if drop_mask is None else p * drop_mask            # dropped-out probabilities
    out = merge_heads(parallel.matmul(pd, vh))                # (N, h, Tq, d) -> (N, Tq, C)
    return out, AttentionCache(qh, kh, vh, p, scale, drop_mask)


def attention_backward(dout, cache):
    """Equals functional.attention_backward."""
    qh, kh, vh, p, scale, drop_mask = cache
    h = qh.shape[1]
    pd = p if drop_mask is None else p * drop_mask
    douth = split_heads(dout, h)                              # (N, h, Tq, d)
    dv = parallel.matmul(pd.transpose(0, 1, 3, 2), douth)     # (N, h, Tk, d)
    # key-major like the forward's scores, (N, h, Tk, Tq): w.r.t. pd, then the unscaled scores
    dp_t = parallel.matmul(vh, douth.transpose(0, 1, 3, 2))
    if drop_mask is not None:
        dp_t = dp_t * drop_mask.transpose(0, 1, 3, 2)         # back through p * mask
    dscores_t = softmax_backward(dp_t, SoftmaxCache(p.transpose(0, 1, 3, 2), -2, scale))
    dq = parallel.matmul(dscores_t.transpose(0, 1, 3, 2), kh)  # (N, h, Tq, d)
    dk = parallel.matmul(dscores_t, qh)                       # (N, h, Tk, d)
    return merge_heads(dq), merge_heads(dk), merge_heads(dv)
