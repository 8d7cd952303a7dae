"""Softmax and multi-head scaled dot-product attention with Tq != Tk.

Shapes: N batch, Tq query tokens, Tk key/value tokens (fewer when keys and values are
squeezed by a strided projection), C = h * d channels, h heads, d head dimension.
Derivations: docs/attention.md.
"""
from .. import parallel
from ..backend import get_array_module
from ._checks import check_float, check_ndim


def softmax_forward(x, axis=-1, scale=1.0):
    """Numerically stable softmax of scale * x: subtracting the max leaves the result unchanged
    and keeps exp() from overflowing. x (any) -> p (same shape). The scale (a Python float
    > 0; attention's 1/sqrt(d)) is applied inside the pass instead of as one more pass over
    the scores. cache: p (its own derivative needs only p), the axis and the scale."""
    if not scale > 0:
        raise ValueError(f"softmax: scale must be positive, got {scale}")
    p = get_array_module(x).empty(x.shape, x.dtype)                 # the one new array
    _by_rows(_softmax_rows, (x, p), axis, float(scale))
    return p, (p, axis, float(scale))


def _softmax_rows(x, p, axis, scale):
    xp = get_array_module(x)
    xp.subtract(x, x.max(axis=axis, keepdims=True), out=p)          # then in place
    if scale != 1.0:
        p *= scale                      # max(scale * x) = scale * max(x), as scale > 0
    xp.exp(p, out=p)
    p /= p.sum(axis=axis, keepdims=True)


def softmax_backward(dout, cache):
    """dout -> dx = scale * p * (dout - sum(dout * p)) along the softmax axis (the Jacobian
    diag(p) - p p^T, times the scale)."""
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


def split_heads(x, num_heads):
    """(N, T, C) -> (N, h, T, d), as the official code's rearrange 'b t (h d) -> b h t d'."""
    N, T, C = x.shape
    return x.reshape(N, T, num_heads, C // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(N, h, T, d) -> (N, T, h*d)."""
    N, h, T, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(N, T, h * d)


def attention_forward(q, k, v, num_heads, scale=None, drop_mask=None):
    """Multi-head attention: softmax(q k^T * scale) v, per head.

    q (N, Tq, C), k (N, Tk, C), v (N, Tk, C) -> out (N, Tq, C).
    scale defaults to d ** -0.5; the official CvT code uses C ** -0.5 (see docs/attention.md).
    drop_mask (N, h, Tq, Tk) or None: a dropout mask on the probabilities (the official
    attn_drop), applied as p * mask before the product with v.
    cache: the per-head q, k, v (N, h, T*, d), the attention probabilities p (N, h, Tq, Tk),
    which the backward needs and attention maps are drawn from (cache[3]), and the mask.
    """
    layer = "attention"
    for name, a in (("q", q), ("k", k), ("v", v)):
        check_ndim(layer, name, a, 3, "(N, T, C)")
    check_float(layer, ("q", q), ("k", k), ("v", v))
    N, Tq, C = q.shape
    if k.shape != v.shape or k.shape[0] != N or k.shape[2] != C:
        raise ValueError(f"attention: expected k and v of shape ({N}, Tk, {C}) for q of shape "
                         f"{tuple(q.shape)}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if C % num_heads:
        raise ValueError(f"attention: {C} channels do not split into {num_heads} heads")
    # a Python float: a NumPy float64 scale would promote float32 scores to float64
    scale = float((C // num_heads) ** -0.5 if scale is None else scale)
    if drop_mask is not None:
        want = (N, num_heads, Tq, k.shape[1])
        if tuple(drop_mask.shape) != want or drop_mask.dtype != q.dtype:
            raise ValueError(f"attention: drop_mask must be {q.dtype} of shape {want}, "
                             f"got {drop_mask.dtype} {tuple(drop_mask.shape)}")
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
    return out, (qh, kh, vh, p, scale, drop_mask)


def attention_backward(dout, cache):
    """dout (N, Tq, C) -> dq (N, Tq, C), dk (N, Tk, C), dv (N, Tk, C)."""
    qh, kh, vh, p, scale, drop_mask = cache
    h = qh.shape[1]
    pd = p if drop_mask is None else p * drop_mask
    douth = split_heads(dout, h)                              # (N, h, Tq, d)
    dv = parallel.matmul(pd.transpose(0, 1, 3, 2), douth)     # (N, h, Tk, d)
    # key-major like the forward's scores, (N, h, Tk, Tq): w.r.t. pd, then the unscaled scores
    dp_t = parallel.matmul(vh, douth.transpose(0, 1, 3, 2))
    if drop_mask is not None:
        dp_t = dp_t * drop_mask.transpose(0, 1, 3, 2)         # back through p * mask
    dscores_t = softmax_backward(dp_t, (p.transpose(0, 1, 3, 2), -2, scale))
    dq = parallel.matmul(dscores_t.transpose(0, 1, 3, 2), kh)  # (N, h, Tq, d)
    dk = parallel.matmul(dscores_t, qh)                       # (N, h, Tk, d)
    return merge_heads(dq), merge_heads(dk), merge_heads(dv)
