"""Convolutional projection and multi-head attention (paper Section 3.2, official `Attention`).

Shapes: N batch, C = dim_in channels, D = dim_out, H, W the stage's token grid, T = H*W
(1 + T with a class token), Tq and Tk the query and key/value token counts after the
projections (keys/values squeezed by stride 2 have about 4x fewer), h heads, d = D / h.

    x (N, [1+]T, C)
      split off the class token; tokens -> grid (N, H, W, C) (a view: channels last)
      conv_proj_q/k/v: 'dw_bn' depthwise conv -> BatchNorm -> tokens
                       'avg'   avg pool for k and v (q: none) -> tokens
                       'linear' none: q = k = v = x (plain ViT attention)
      join the class token again in front of q, k and v
      proj_q/k/v (Linear C -> D) -> heads -> softmax(q k^T * scale) -> attn_drop -> @ v
      -> merge heads -> proj (Linear D -> D) -> proj_drop       -> (N, [1+]T, D)
"""
import numpy as np

from .. import nn
from ..kernels import ops
from .tokens import cat_cls, grid_to_tokens, map_to_tokens, split_cls, tokens_to_grid, tokens_to_map


class ConvProjection(nn.Module):
    """'dw_bn': grid (N, H, W, C) -> tokens (N, H'W', C). `conv` is depthwise (weight (C, 1, k, k),
    no bias), `bn` a BatchNorm2d(C); H' = (H + 2 padding - k) // stride + 1. Both work channels
    last, the tokens' own layout, so no transpose is needed on the way in or out."""

    def __init__(self, dim, kernel_size, padding, stride, dtype=np.float32, rng=None):
        super().__init__()
        self.conv = nn.DepthwiseConv2d(dim, kernel_size, stride=stride, padding=padding, bias=False,
                                       dtype=dtype, rng=rng, channels_last=True)
        self.bn = nn.BatchNorm2d(dim, dtype=dtype, channels_last=True)

    def forward(self, x):
        if self.training or nn.grad_enabled():
            y = self.bn(self.conv(x))                       # (N, H', W', C)
        else:       # inference: the same, and the fast kernels fold the BatchNorm into the filters
            conv, bn = self.conv, self.bn
            y = ops.depthwise_bn_inference(x, conv.weight.data, bn.weight.data, bn.bias.data, bn.running_mean,
                                           bn.running_var, bn.eps, conv.stride, conv.padding, channels_last=True)
        self._save(y.shape[1:3])
        return grid_to_tokens(y)                            # (N, H'W', C)

    def backward(self, dout):
        """dout (N, H'W', C) -> dx (N, H, W, C)."""
        OH, OW = self._take()                               # the projected grid H', W'
        return self.conv.backward(self.bn.backward(tokens_to_grid(dout, OH, OW)))


class AvgProjection(nn.Module):
    """'avg' (keys and values only): grid (N, H, W, C) -> tokens (N, H'W', C) by `avg`, an
    AvgPool2d with ceil_mode=True (so an even grid keeps a partly padded last window:
    H' = ceil((H + 2 padding - k) / stride) + 1) and count_include_pad=True, as official."""

    def __init__(self, kernel_size, padding, stride):
        super().__init__()
        self.avg = nn.AvgPool2d(kernel_size, stride, padding, ceil_mode=True)

    def forward(self, x):
        y = self.avg(x.transpose(0, 3, 1, 2))               # (N, H, W, C) -> (N, C, H, W) -> (N, C, H', W')
        self._save(y.shape[2:])
        return map_to_tokens(y)                             # (N, H'W', C)

    def backward(self, dout):
        """dout (N, H'W', C) -> dx (N, H, W, C)."""
        OH, OW = self._take()
        return self.avg.backward(tokens_to_map(dout, OH, OW)).transpose(0, 2, 3, 1)


def _sum(arrays):
    """The sum of a list of equally shaped gradients."""
    total = arrays[0]
    for a in arrays[1:]:
        total = total + a
    return total


def _build_projection(dim, kernel_size, padding, stride, method, dtype, rng):
    if method == "dw_bn":
        return ConvProjection(dim, kernel_size, padding, stride, dtype, rng)
    if method == "avg":
        return AvgProjection(kernel_size, padding, stride)
    if method == "linear":
        return None
    raise ValueError(f"unknown projection method {method!r}: expected 'dw_bn', 'avg' or 'linear'")


class Attention(nn.Module):
    """x (N, [1+]H*W, dim_in), H, W -> (N, [1+]H*W, dim_out).

    scale: 'official' multiplies the scores by dim_out ** -0.5 (the official code's choice),
    'head' by d ** -0.5. The attention itself is `sdpa`, an nn.ScaledDotProductAttention: with
    its keep_attention on, the probabilities (N, h, Tq, Tk) of the last forward stay in
    `sdpa.attention` (for attention maps; CvT.keep_attention switches every block's).
    Dropout modules draw their masks from `drop_rng` (a backend.BackendRNG shared by the model).
    """

    def __init__(self, dim_in, dim_out, num_heads, qkv_bias=False, attn_drop=0.0, proj_drop=0.0,
                 method="dw_bn", kernel_size=3, stride_kv=1, stride_q=1, padding_kv=1, padding_q=1,
                 with_cls_token=True, scale="official", dtype=np.float32, rng=None, drop_rng=None):
        super().__init__()
        if dim_out % num_heads:
            raise ValueError(f"Attention: dim_out {dim_out} does not split into {num_heads} heads")
        if scale not in ("official", "head"):
            raise ValueError(f"Attention: scale must be 'official' or 'head', got {scale!r}")
        self.num_heads, self.with_cls_token = num_heads, with_cls_token
        # a Python float, so float32 scores stay float32
        self.scale = float((dim_out if scale == "official" else dim_out // num_heads) ** -0.5)
        # queries never get average pooling: the official code builds them 'linear' for 'avg'
        self.conv_proj_q = _build_projection(dim_in, kernel_size, padding_q, stride_q,
                                             "linear" if method == "avg" else method, dtype, rng)
        self.conv_proj_k = _build_projection(dim_in, kernel_size, padding_kv, stride_kv, method, dtype, rng)
        self.conv_proj_v = _build_projection(dim_in, kernel_size, padding_kv, stride_kv, method, dtype, rng)
        self.proj_q = nn.Linear(dim_in, dim_out, bias=qkv_bias, dtype=dtype, rng=rng)
        self.proj_k = nn.Linear(dim_in, dim_out, bias=qkv_bias, dtype=dtype, rng=rng)
        self.proj_v = nn.Linear(dim_in, dim_out, bias=qkv_bias, dtype=dtype, rng=rng)
        self.sdpa = nn.ScaledDotProductAttention(num_heads, self.scale)
        self.attn_drop = nn.Dropout(attn_drop, rng=drop_rng)
        self.proj = nn.Linear(dim_out, dim_out, bias=True, dtype=dtype, rng=rng)
        self.proj_drop = nn.Dropout(proj_drop, rng=drop_rng)

    def _projections(self):
        return (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v)

    # -- convolutional projection, with the class token split around it -------------------------
    def forward_conv(self, x, H, W):
        """x (N, [1+]T, C) -> q (N, [1+]Tq, C), k, v (N, [1+]Tk, C). A None projection passes the
        tokens through, so method 'linear' gives q = k = v = x."""
        cls = None
        if self.with_cls_token:
            cls, x = split_cls(x)                           # (N, 1, C), (N, T, C)
        grid = tokens_to_grid(x, H, W)                      # (N, H, W, C), a view
        qkv = [x if p is None else p(grid) for p in self._projections()]
        if cls is not None:
            qkv = [cat_cls(cls, t) for t in qkv]            # (N, 1 + T*, C)
        return qkv

    def backward_conv(self, dq, dk, dv):
        """The adjoint of forward_conv: the class token and the tokens each feed q, k and v, so
        their gradients are the sums of the three paths. -> dx (N, [1+]T, C)."""
        grads, dcls = [dq, dk, dv], None
        if self.with_cls_token:
            pairs = [split_cls(g) for g in grads]           # [(N, 1, C), (N, T*, C)] x 3
            dcls = pairs[0][0] + pairs[1][0] + pairs[2][0]
            grads = [t for _, t in pairs]
        dtokens, dgrid = [], []
        for p, g in zip(self._projections(), grads):
            if p is None:
                dtokens.append(g)                           # passed through: (N, T, C)
            else:
                dgrid.append(p.backward(g))                 # (N, H, W, C)
        if dgrid:                                           # (N, H, W, C) -> (N, T, C)
            dtokens.append(grid_to_tokens(_sum(dgrid)))
        dx = _sum(dtokens)
        return dx if dcls is None else cat_cls(dcls, dx)

    # -- the whole layer ------------------------------------------------------------------------------
    def forward(self, x, H, W):
        q, k, v = self.forward_conv(x, H, W)                            # dim_in channels
        q, k, v = self.proj_q(q), self.proj_k(k), self.proj_v(v)        # (N, T*, D)
        N, Tq, Tk = q.shape[0], q.shape[1], k.shape[1]
        mask = self.attn_drop.mask((N, self.num_heads, Tq, Tk), q.dtype)  # None unless training
        out = self.sdpa(q, k, v, mask)                                  # (N, [1+]Tq, D)
        return self.proj_drop(self.proj(out))

    def backward(self, dout):
        """dout (N, [1+]T, D) -> dx (N, [1+]T, dim_in)."""
        d = self.proj.backward(self.proj_drop.backward(dout))
        dq, dk, dv = self.sdpa.backward(d)
        dq, dk, dv = self.proj_q.backward(dq), self.proj_k.backward(dk), self.proj_v.backward(dv)
        return self.backward_conv(dq, dk, dv)
