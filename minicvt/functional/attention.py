"""Softmax and multi-head scaled dot-product attention with Tq != Tk.

Shapes: N batch, Tq query tokens, Tk key/value tokens (fewer when keys and values are
squeezed by a strided projection), C = h * d channels, h heads, d head dimension.
Derivations: docs/attention.md.
"""
from typing import NamedTuple

from ..backend import get_array_module
from .checks import check_float, check_ndim


class SoftmaxCache(NamedTuple):
    p: object               # the probabilities: their own derivative needs only them
    axis: int
    scale: float


def softmax_forward(x, axis=-1, scale=1.0):
    """Softmax of scale * x along `axis`. x (any) -> p (same shape).
    Subtracting the max leaves the result unchanged and keeps exp() from overflowing. The scale
    (a Python float > 0; attention's 1/sqrt(d)) is part of the layer, so that its backward is
    one function."""
    if not scale > 0:
        raise ValueError(f"softmax: scale must be positive, got {scale}")
    xp = get_array_module(x)
    z = float(scale) * x
    e = xp.exp(z - z.max(axis=axis, keepdims=True))
    p = e / e.sum(axis=axis, keepdims=True)
    return p, SoftmaxCache(p, axis, float(scale))


def softmax_backward(dout, cache):
    """dout -> dx = scale * p * (dout - sum(dout * p)) along the softmax axis (the Jacobian
    diag(p) - p p^T, times the scale)."""
    p, axis, scale = cache
    return scale * p * (dout - (dout * p).sum(axis=axis, keepdims=True))


def split_heads(x, num_heads):
    """(N, T, C) -> (N, h, T, d), as the official code's rearrange 'b t (h d) -> b h t d'."""
    N, T, C = x.shape
    return x.reshape(N, T, num_heads, C // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(N, h, T, d) -> (N, T, h*d)."""
    N, h, T, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(N, T, h * d)


class AttentionCache(NamedTuple):
    q: object               # (N, h, Tq, d), per head
    k: object               # (N, h, Tk, d)
    v: object               # (N, h, Tk, d)
    p: object               # (N, h, Tq, Tk), the attention probabilities (what maps are drawn from)
    scale: float
    drop_mask: object       # (N, h, Tq, Tk) or None


def attention_forward(q, k, v, num_heads, scale=None, drop_mask=None):
    """Multi-head attention: softmax(q k^T * scale) v, per head.

    q (N, Tq, C), k (N, Tk, C), v (N, Tk, C) -> out (N, Tq, C).
    scale defaults to d ** -0.5; the official CvT code uses C ** -0.5 (see docs/attention.md).
    drop_mask (N, h, Tq, Tk) or None: a dropout mask on the probabilities (the official
    attn_drop), applied as p * mask before the product with v.
    """
    scale = check_attention(q, k, v, num_heads, scale, drop_mask)
    qh, kh, vh = split_heads(q, num_heads), split_heads(k, num_heads), split_heads(v, num_heads)
    scores = qh @ kh.transpose(0, 1, 3, 2)                  # (N, h, Tq, Tk), unscaled
    p, _ = softmax_forward(scores, -1, scale)               # softmax over the keys
    pd = p if drop_mask is None else p * drop_mask          # dropped-out probabilities
    out = merge_heads(pd @ vh)                              # (N, h, Tq, d) -> (N, Tq, C)
    return out, AttentionCache(qh, kh, vh, p, scale, drop_mask)


def attention_backward(dout, cache):
    """dout (N, Tq, C) -> dq (N, Tq, C), dk (N, Tk, C), dv (N, Tk, C)."""
    qh, kh, vh, p, scale, drop_mask = cache
    pd = p if drop_mask is None else p * drop_mask
    douth = split_heads(dout, qh.shape[1])                  # (N, h, Tq, d)
    dv = pd.transpose(0, 1, 3, 2) @ douth                   # (N, h, Tk, d); forward was: out = pd @ v
    dpd = douth @ vh.transpose(0, 1, 3, 2)                  # (N, h, Tq, Tk)
    dp = dpd if drop_mask is None else dpd * drop_mask      # forward was: pd = p * mask
    dscores = softmax_backward(dp, SoftmaxCache(p, -1, scale))      # w.r.t. the unscaled scores
    dq = dscores @ kh                                       # (N, h, Tq, d); forward was: scores = q k^T
    dk = dscores.transpose(0, 1, 3, 2) @ qh                 # (N, h, Tk, d)
    return merge_heads(dq), merge_heads(dk), merge_heads(dv)


def check_attention(q, k, v, num_heads, scale, drop_mask):
    """Refuse mismatched inputs in one line; returns the scale as a Python float (a NumPy
    float64 scale would promote float32 scores to float64)."""
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
    if drop_mask is not None:
        want = (N, num_heads, Tq, k.shape[1])
        if tuple(drop_mask.shape) != want or drop_mask.dtype != q.dtype:
            raise ValueError(f"attention: drop_mask must be {q.dtype} of shape {want}, "
                             f"got {drop_mask.dtype} {tuple(drop_mask.shape)}")
    return float((C // num_heads) ** -0.5 if scale is None else scale)
