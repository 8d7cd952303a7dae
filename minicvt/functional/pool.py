"""Average pooling (the official 'avg' projection) and the mean over tokens (the head's pooling
when there is no class token).

Shapes: N batch, C channels, H, W map size, OH, OW pooled size, T tokens.
"""
from typing import NamedTuple

from ..backend import get_array_module
from .checks import check_float, check_ndim, pair


def pool_output_size(size, kernel, stride, padding, ceil_mode):
    """PyTorch's rule: with ceil_mode the last window may overhang the padded input, but it
    must start inside the input or its left padding."""
    out = (size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _divisors(xp, size, out, kernel, stride, padding, count_include_pad, dtype):
    """How many entries each window averages over, along one axis (out,).
    Padding zeros count when count_include_pad, but the ceil_mode overhang never does."""
    start = xp.arange(out) * stride - padding
    end = xp.minimum(start + kernel, size + padding)
    if not count_include_pad:
        start, end = xp.maximum(start, 0), xp.minimum(end, size)
    return (end - start).astype(dtype)


class PoolCache(NamedTuple):
    x_shape: tuple          # (N, C, H, W)
    pad_shape: tuple        # the padded input's shape, ceil_mode's overhang included
    div: object             # (OH, OW), how many entries each window averages
    kernel: tuple           # (kh, kw)
    stride: tuple           # (sh, sw)
    padding: tuple          # (ph, pw)


def avg_pool2d_forward(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """x (N, C, H, W) -> out (N, C, OH, OW), the mean of each kh x kw window (PyTorch's
    nn.AvgPool2d, including ceil_mode and count_include_pad). cache: shapes and divisors."""
    layer = "avg_pool2d"
    check_ndim(layer, "x", x, 4, "(N, C, H, W)")
    check_float(layer, ("x", x))
    xp = get_array_module(x)
    (kh, kw) = pair(kernel_size, "kernel_size")
    (sh, sw) = pair(kernel_size if stride is None else stride, "stride")
    (ph, pw) = pair(padding, "padding")
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"avg_pool2d: padding {(ph, pw)} must be at most half the kernel {(kh, kw)}")
    N, C, H, W = x.shape
    OH = pool_output_size(H, kh, sh, ph, ceil_mode)
    OW = pool_output_size(W, kw, sw, pw, ceil_mode)
    if OH < 1 or OW < 1:
        raise ValueError(f"avg_pool2d: kernel {(kh, kw)} does not fit input {(H, W)}")
    # zero padding on the right/bottom also covers the ceil_mode overhang
    eh = max(0, (OH - 1) * sh + kh - (H + 2 * ph))
    ew = max(0, (OW - 1) * sw + kw - (W + 2 * pw))
    xpad = xp.pad(x, ((0, 0), (0, 0), (ph, ph + eh), (pw, pw + ew)))
    total = xp.zeros((N, C, OH, OW), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            total += xpad[:, :, i:i + sh * OH:sh, j:j + sw * OW:sw]
    div = (_divisors(xp, H, OH, kh, sh, ph, count_include_pad, x.dtype)[:, None]
           * _divisors(xp, W, OW, kw, sw, pw, count_include_pad, x.dtype)[None, :])   # (OH, OW)
    cache = PoolCache(x.shape, xpad.shape, div, (kh, kw), (sh, sw), (ph, pw))
    return total / div, cache


def avg_pool2d_backward(dout, cache):
    """dout (N, C, OH, OW) -> dx (N, C, H, W): each window spreads dout / divisor back."""
    x_shape, pad_shape, div, (kh, kw), (sh, sw), (ph, pw) = cache
    xp = get_array_module(dout)
    H, W = x_shape[2:]
    OH, OW = dout.shape[2:]
    g = dout / div
    dxpad = xp.zeros(pad_shape, dtype=dout.dtype)
    for i in range(kh):
        for j in range(kw):
            dxpad[:, :, i:i + sh * OH:sh, j:j + sw * OW:sw] += g
    return dxpad[:, :, ph:ph + H, pw:pw + W]


def token_mean_forward(x):
    """x (N, T, C) -> out (N, C), the mean over tokens. cache: x's shape."""
    check_ndim("token_mean", "x", x, 3, "(N, T, C)")
    check_float("token_mean", ("x", x))
    return x.mean(axis=1), x.shape


def token_mean_backward(dout, cache):
    """dout (N, C) -> dx (N, T, C): every token gets dout / T."""
    N, T, C = cache
    xp = get_array_module(dout)
    return xp.broadcast_to((dout / T)[:, None, :], (N, T, C)).copy()
