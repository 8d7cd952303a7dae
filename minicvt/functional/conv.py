"""Convolutions: im2col / col2im, 2-D convolution, depthwise convolution.

Shapes: N batch, C input channels, F output channels (filters), H, W input height/width,
kh, kw kernel size, sh, sw stride, ph, pw zero padding, OH, OW output height/width with
    OH = (H + 2*ph - kh) // sh + 1,   OW = (W + 2*pw - kw) // sw + 1.
Weights use PyTorch's layout: conv (F, C, kh, kw), depthwise (C, 1, kh, kw).
channels_last=True takes and returns maps laid out (N, H, W, C), the layout of CvT's tokens;
here it is a transpose on the way in and out (minicvt.fast works in that layout directly).
Derivations: docs/conv.md.
"""
from typing import NamedTuple

from ..backend import get_array_module
from .checks import check_cache, check_float, check_ndim, check_shape, pair


def conv_output_size(size, kernel, stride, padding):
    """How many kernel placements fit along one axis of the zero-padded input."""
    return (size + 2 * padding - kernel) // stride + 1


def conv_geometry(layer, x_shape, kernel_size, stride, padding):
    """Normalise the arguments (an int or a pair each) and compute the output grid of an
    (N, C, H, W) input; refuse an empty output. -> (kh, kw), (sh, sw), (ph, pw), (OH, OW)."""
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel_size, "kernel_size"), pair(stride, "stride"), pair(padding, "padding")
    if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"{layer}: need kernel >= 1, stride >= 1, padding >= 0, got "
                         f"kernel {(kh, kw)}, stride {(sh, sw)}, padding {(ph, pw)}")
    H, W = x_shape[2], x_shape[3]
    OH, OW = conv_output_size(H, kh, sh, ph), conv_output_size(W, kw, sw, pw)
    if OH < 1 or OW < 1:
        raise ValueError(f"{layer}: kernel {(kh, kw)} does not fit input {(H, W)} with padding {(ph, pw)}")
    return (kh, kw), (sh, sw), (ph, pw), (OH, OW)


def _pad(x, ph, pw):
    """(N, C, H, W) -> (N, C, H + 2ph, W + 2pw), zeros around the map."""
    return get_array_module(x).pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def im2col(x, kernel_size, stride=1, padding=0):
    """Unfold every receptive field into a row.

    x (N, C, H, W) -> cols (N*OH*OW, C*kh*kw); row r = (n, oh, ow) holds the patch that output
    pixel (oh, ow) of image n sees, in (c, i, j) order, so a convolution is one matmul with
    w.reshape(F, -1). Written as a loop over the kh*kw kernel offsets: offset (i, j) sees the
    strided slice of the padded input that starts at (i, j), for every output pixel at once.
    """
    xp = get_array_module(x)
    (kh, kw), (sh, sw), (ph, pw), (OH, OW) = conv_geometry("im2col", x.shape, kernel_size, stride, padding)
    N, C = x.shape[:2]
    xpad = _pad(x, ph, pw)                                          # (N, C, H + 2ph, W + 2pw)
    cols = xp.empty((N, C, kh, kw, OH, OW), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xpad[:, :, i:i + sh * OH:sh, j:j + sw * OW:sw]   # (N, C, OH, OW)
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(N * OH * OW, C * kh * kw)   # rows (n, oh, ow)


def col2im(cols, x_shape, kernel_size, stride=1, padding=0):
    """The adjoint of im2col: fold rows back onto the image, adding where patches overlap.

    cols (N*OH*OW, C*kh*kw) -> (N, C, H, W). Overlapping patches share input pixels, so each
    pixel receives the sum of its contributions (`+=`): exactly what the gradient of im2col
    needs, and <im2col(x), c> == <x, col2im(c)> holds for all x, c.
    """
    xp = get_array_module(cols)
    (kh, kw), (sh, sw), (ph, pw), (OH, OW) = conv_geometry("col2im", x_shape, kernel_size, stride, padding)
    N, C, H, W = x_shape
    check_shape("col2im", "cols", cols, (N * OH * OW, C * kh * kw))
    cols = cols.reshape(N, OH, OW, C, kh, kw).transpose(0, 3, 4, 5, 1, 2)     # (N, C, kh, kw, OH, OW)
    xpad = xp.zeros((N, C, H + 2 * ph, W + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            xpad[:, :, i:i + sh * OH:sh, j:j + sw * OW:sw] += cols[:, :, i, j]
    return xpad[:, :, ph:ph + H, pw:pw + W]


class ConvCache(NamedTuple):
    x_shape: tuple          # (N, C, H, W), for col2im
    cols: object            # (N*OH*OW, C*kh*kw), the unfolded input, for dw
    w: object               # (F, C, kh, kw), for dx
    has_bias: bool
    stride: object
    padding: object
    channels_last: bool


def conv2d_forward(x, w, b=None, stride=1, padding=0, channels_last=False):
    """2-D convolution (cross-correlation, as in PyTorch) by im2col and one matmul.

    x (N, C, H, W), w (F, C, kh, kw), b (F,) or None -> out (N, F, OH, OW); with channels_last,
    x (N, H, W, C) -> out (N, OH, OW, F).
    cache: the unfolded input cols (needed for dw; recomputing it would cost a second im2col)
    and w (needed for dx).
    """
    check_conv2d(x, w, b, channels_last)
    if channels_last:
        x = x.transpose(0, 3, 1, 2)                                 # (N, H, W, C) -> (N, C, H, W)
    N, F = x.shape[0], w.shape[0]
    _, _, _, (OH, OW) = conv_geometry("conv2d", x.shape, w.shape[2:], stride, padding)
    cols = im2col(x, w.shape[2:], stride, padding)                  # (N*OH*OW, C*kh*kw)
    out = cols @ w.reshape(F, -1).T                                 # (N*OH*OW, F)
    if b is not None:
        out = out + b
    out = out.reshape(N, OH, OW, F)
    if not channels_last:
        out = out.transpose(0, 3, 1, 2)                             # (N, F, OH, OW)
    return out, ConvCache(x.shape, cols, w, b is not None, stride, padding, channels_last)


def conv2d_backward(dout, cache):
    """dout (N, F, OH, OW) -> dx (N, C, H, W), dw (F, C, kh, kw), db (F,) or None; channels
    last, dout (N, OH, OW, F) -> dx (N, H, W, C)."""
    check_cache("conv2d", cache, ConvCache)
    x_shape, cols, w, has_bias, stride, padding, channels_last = cache
    F = w.shape[0]
    d2 = (dout if channels_last else dout.transpose(0, 2, 3, 1)).reshape(-1, F)   # (N*OH*OW, F)
    dw = (d2.T @ cols).reshape(w.shape)                 # forward was: out = cols @ w.T
    db = d2.sum(axis=0) if has_bias else None           # forward was: out + b, b broadcast over rows
    dcols = d2 @ w.reshape(F, -1)                       # (N*OH*OW, C*kh*kw)
    dx = col2im(dcols, x_shape, w.shape[2:], stride, padding)       # (N, C, H, W)
    return (dx.transpose(0, 2, 3, 1) if channels_last else dx), dw, db


def check_conv2d(x, w, b, channels_last):
    layer = "conv2d"
    check_ndim(layer, "x", x, 4, "(N, H, W, C)" if channels_last else "(N, C, H, W)")
    check_ndim(layer, "w", w, 4, "(F, C, kh, kw)")
    check_float(layer, ("x", x), ("w", w), ("b", b))
    C = x.shape[3] if channels_last else x.shape[1]
    if C != w.shape[1]:
        raise ValueError(f"conv2d: x of shape {tuple(x.shape)} has {C} channels but w of shape "
                         f"{tuple(w.shape)} expects {w.shape[1]}")
    if b is not None:
        check_shape(layer, "b", b, (w.shape[0],))


class DepthwiseCache(NamedTuple):
    x_shape: tuple          # (N, C, H, W)
    xpad: object            # (N, C, H + 2ph, W + 2pw), the padded input, for dw
    w: object               # (C, 1, kh, kw), for dx
    has_bias: bool
    stride: tuple           # (sh, sw)
    padding: tuple          # (ph, pw)
    channels_last: bool


def depthwise_conv2d_forward(x, w, b=None, stride=1, padding=0, channels_last=False):
    """Depthwise convolution: each channel is convolved with its own kh x kw filter (PyTorch's
    Conv2d with groups=C). With one filter per channel there is no matmul to gain, so no
    im2col: the output is the sum, over the kernel offsets (i, j), of the input's strided slice
    at that offset times the filters' (i, j) entries.

    x (N, C, H, W), w (C, 1, kh, kw), b (C,) or None -> out (N, C, OH, OW); with
    channels_last, x (N, H, W, C) -> out (N, OH, OW, C).
    cache: the padded input (dw reads its slices again) and w.
    """
    check_depthwise(x, w, b, channels_last)
    if channels_last:
        x = x.transpose(0, 3, 1, 2)                                 # (N, H, W, C) -> (N, C, H, W)
    xp = get_array_module(x)
    N, C = x.shape[:2]
    (kh, kw), (sh, sw), (ph, pw), (OH, OW) = conv_geometry("depthwise_conv2d", x.shape, w.shape[2:],
                                                           stride, padding)
    xpad = _pad(x, ph, pw)                                          # (N, C, H + 2ph, W + 2pw)
    out = xp.zeros((N, C, OH, OW), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            out += xpad[:, :, i:i + sh * OH:sh, j:j + sw * OW:sw] * w[:, 0, i, j].reshape(C, 1, 1)
    if b is not None:
        out += b.reshape(C, 1, 1)
    cache = DepthwiseCache(x.shape, xpad, w, b is not None, (sh, sw), (ph, pw), channels_last)
    return (out.transpose(0, 2, 3, 1) if channels_last else out), cache


def depthwise_conv2d_backward(dout, cache):
    """dout (N, C, OH, OW) -> dx (N, C, H, W), dw (C, 1, kh, kw), db (C,) or None; channels
    last, dout (N, OH, OW, C) -> dx (N, H, W, C)."""
    check_cache("depthwise_conv2d", cache, DepthwiseCache)
    x_shape, xpad, w, has_bias, (sh, sw), (ph, pw), channels_last = cache
    if channels_last:
        dout = dout.transpose(0, 3, 1, 2)                           # (N, C, OH, OW)
    xp = get_array_module(dout)
    N, C, H, W = x_shape
    kh, kw = w.shape[2:]
    OH, OW = dout.shape[2:]
    dxpad = xp.zeros(xpad.shape, dtype=dout.dtype)
    dw = xp.empty(w.shape, dtype=dout.dtype)
    for i in range(kh):
        for j in range(kw):
            window = (slice(None), slice(None), slice(i, i + sh * OH, sh), slice(j, j + sw * OW, sw))
            # forward was: out += xpad[window] * w[c, 0, i, j], for every channel c
            dw[:, 0, i, j] = (dout * xpad[window]).sum(axis=(0, 2, 3))
            dxpad[window] += dout * w[:, 0, i, j].reshape(C, 1, 1)
    db = dout.sum(axis=(0, 2, 3)) if has_bias else None
    dx = dxpad[:, :, ph:ph + H, pw:pw + W]                          # the padding's gradient is dropped
    return (dx.transpose(0, 2, 3, 1) if channels_last else dx), dw, db


def check_depthwise(x, w, b, channels_last):
    layer = "depthwise_conv2d"
    check_ndim(layer, "x", x, 4, "(N, H, W, C)" if channels_last else "(N, C, H, W)")
    check_ndim(layer, "w", w, 4, "(C, 1, kh, kw)")
    check_float(layer, ("x", x), ("w", w), ("b", b))
    C = x.shape[3] if channels_last else x.shape[1]
    if w.shape[0] != C or w.shape[1] != 1:
        raise ValueError(f"depthwise_conv2d: w must have shape ({C}, 1, kh, kw) for {C} channels, "
                         f"got {tuple(w.shape)}")
    if b is not None:
        check_shape(layer, "b", b, (C,))
