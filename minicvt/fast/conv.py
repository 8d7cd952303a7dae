"""Fast convolutions: the functions of minicvt.functional.conv, with the same signatures and
results (to rounding), made fast on the CPU.

What they do differently, and why (measured in docs/performance.md):
- channels last natively: im2col of an (N, H, W, C) map moves C contiguous values per copy,
  about 3x faster than the transposing copies of NCHW, and the depthwise convolution
  multiply-adds along C; CvT's tokens (N, H*W, C) are that layout without a copy;
- the padding, im2col, col2im and the depthwise passes run a block of images per CPU thread
  (minicvt.fast.parallel), and the convolution's matmuls a block of rows per thread;
- the depthwise forward and dw are one einsum over a sliding-window view on NumPy (one pass,
  no product array), and on CuPy a loop over the kernel offsets (CuPy's einsum would copy the
  windows out: docs/backend.md); its stride-1 dx is the forward again, with flipped filters;
- depthwise_bn_inference folds an eval-mode BatchNorm into the depthwise filters.
Shapes as in minicvt.functional.conv; im2col's rows are in (i, j, c) order when channels last.
"""
from typing import NamedTuple

from .. import backend
from ..backend import get_array_module
from ..functional.checks import check_cache, check_shape
from ..functional.conv import check_conv2d, check_depthwise, conv_geometry
from . import parallel


def _pad(x, ph, pw, channels_last=False):
    """Zeros around H and W: axes 2, 3 of (N, C, H, W), or axes 1, 2 of (N, H, W, C). Written
    as one pass, a block of images per CPU thread: the border set to 0, the inside copied
    (NumPy's general `pad` took several times as long on these maps)."""
    if ph == 0 and pw == 0:
        return x
    xp = get_array_module(x)
    hw = _map_axes(channels_last)
    H, W = x.shape[hw[0]], x.shape[hw[1]]
    out = xp.empty(_padded_shape(x.shape, hw, ph, pw), x.dtype)
    at = _region(hw, x.ndim)
    inner, every = slice(ph, ph + H), slice(None)

    def block(x, out):
        out[at(slice(0, ph), every)] = 0                    # top and bottom rows
        out[at(slice(ph + H, None), every)] = 0
        out[at(inner, slice(0, pw))] = 0                    # left and right columns
        out[at(inner, slice(pw + W, None))] = 0
        out[at(inner, slice(pw, pw + W))] = x

    parallel.rows(block, (x, out))
    return out


def _map_axes(channels_last):
    """The axes of H and W: 1, 2 of (N, H, W, C), or 2, 3 of (N, C, H, W)."""
    return (1, 2) if channels_last else (2, 3)


def _padded_shape(shape, hw, ph, pw):
    """shape with its H and W axes (hw) grown by the zero padding on both sides."""
    padded = list(shape)
    padded[hw[0]] += 2 * ph
    padded[hw[1]] += 2 * pw
    return tuple(padded)


def _region(hw, ndim):
    """at(rows, cols) -> the index of that region of the map axes hw, every other axis whole."""
    def at(rows, cols):
        index = [slice(None)] * ndim
        index[hw[0]], index[hw[1]] = rows, cols
        return tuple(index)
    return at


def im2col(x, kernel_size, stride=1, padding=0, channels_last=False):
    """Equals functional.im2col: x (N, C, H, W) -> cols (N*OH*OW, C*kh*kw), rows (n, oh, ow),
    columns in (c, i, j) order. A block of images per CPU thread, padded in one pass.
    channels_last: x (N, H, W, C) -> cols (N*OH*OW, kh*kw*C), in (i, j, c) order; each copy
    then moves C contiguous values (about 3x faster than the transposing copies of NCHW).
    Written as a loop over the kh*kw kernel offsets with strided slices, which runs the same
    on NumPy and CuPy.
    """
    xp = get_array_module(x)
    nchw = _nchw(x.shape, channels_last)
    (kh, kw), (sh, sw), (ph, pw), (OH, OW) = conv_geometry("im2col", nchw, kernel_size, stride, padding)
    N, C = nchw[:2]
    xpad = _pad(x, ph, pw, channels_last)                   # H and W padded by ph, pw
    patch, column, cols_shape = _unfold(channels_last, (kh, kw), (sh, sw), (OH, OW))
    cols = xp.empty((N, OH, OW) + cols_shape(C), dtype=x.dtype)

    def block(xpad, cols):                                  # a block of images per CPU thread
        for i in range(kh):
            for j in range(kw):
                column(cols, i, j)[...] = patch(xpad, i, j)     # (n, OH, OW, C)

    parallel.rows(block, (xpad, cols))
    return cols.reshape(N * OH * OW, C * kh * kw)


def col2im(cols, x_shape, kernel_size, stride=1, padding=0, channels_last=False):
    """Equals functional.col2im, the adjoint of im2col: cols (N*OH*OW, C*kh*kw) -> (N, C, H, W),
    or (N, H, W, C) with channels_last (cols in im2col's order for that layout). A block of
    images per CPU thread."""
    xp = get_array_module(cols)
    nchw = _nchw(x_shape, channels_last)
    (kh, kw), (sh, sw), (ph, pw), (OH, OW) = conv_geometry("col2im", nchw, kernel_size, stride, padding)
    N, C, H, W = nchw
    check_shape("col2im", "cols", cols, (N * OH * OW, C * kh * kw))
    patch, column, cols_shape = _unfold(channels_last, (kh, kw), (sh, sw), (OH, OW))
    cols = cols.reshape((N, OH, OW) + cols_shape(C))
    hw = _map_axes(channels_last)
    xpad = xp.empty(_padded_shape(x_shape, hw, ph, pw), dtype=cols.dtype)

    def block(cols, xpad):                                  # a block of images per CPU thread
        xpad[...] = 0
        for i in range(kh):
            for j in range(kw):
                view = patch(xpad, i, j)                    # (n, OH, OW, C), a view into xpad
                view += column(cols, i, j)

    parallel.rows(block, (cols, xpad))
    return xpad[_region(hw, 4)(slice(ph, ph + H), slice(pw, pw + W))]


def _nchw(x_shape, channels_last):
    """x's shape as (N, C, H, W) whatever its layout (what `conv_geometry` reads)."""
    if channels_last:
        N, H, W, C = x_shape
        return (N, C, H, W)
    return tuple(x_shape)


def _unfold(channels_last, kernel, stride, out_hw):
    """The views im2col and col2im move data between, for kernel offset (i, j):
    patch(xpad, i, j): what that offset sees of the padded map, (n, OH, OW, C);
    column(cols, i, j): its columns of the unfolded rows, (n, OH, OW, C);
    and cols_shape(C), the trailing axes of cols: (kh, kw, C) channels last, (C, kh, kw) NCHW."""
    (kh, kw), (sh, sw), (OH, OW) = kernel, stride, out_hw
    at = _region(_map_axes(channels_last), 4)

    def patch(xpad, i, j):
        view = xpad[at(slice(i, i + sh * OH, sh), slice(j, j + sw * OW, sw))]
        return view if channels_last else view.transpose(0, 2, 3, 1)     # (n, C, OH, OW) -> (n, OH, OW, C)

    def column(cols, i, j):
        return cols[:, :, :, i, j] if channels_last else cols[:, :, :, :, i, j]

    def cols_shape(C):
        return (kh, kw, C) if channels_last else (C, kh, kw)

    return patch, column, cols_shape


def _weight_matrix(w, channels_last):
    """w (F, C, kh, kw) as the (F, C*kh*kw) matrix whose columns follow im2col's order."""
    F = w.shape[0]
    return w.transpose(0, 2, 3, 1).reshape(F, -1) if channels_last else w.reshape(F, -1)


class FastConvCache(NamedTuple):
    """functional.ConvCache's fields, with cols in this im2col's order (i, j, c) channels last."""
    x_shape: tuple
    cols: object
    w: object
    has_bias: bool
    stride: object
    padding: object
    channels_last: bool


def conv2d_forward(x, w, b=None, stride=1, padding=0, channels_last=False):
    """Equals functional.conv2d_forward. Channels last, im2col copies whole channel vectors and
    the result is already the (N, OH, OW, F) layout; the matmul runs a block of rows per thread
    and adds the bias while each block is in the cache. cache: a FastConvCache, whose cols are in
    im2col's order for the layout."""
    check_conv2d(x, w, b, channels_last)
    F, C, kh, kw = w.shape
    N = x.shape[0]
    _, _, _, (OH, OW) = conv_geometry("conv2d", _nchw(x.shape, channels_last), (kh, kw), stride, padding)
    cols = im2col(x, (kh, kw), stride, padding, channels_last)        # (N*OH*OW, C*kh*kw)
    out = parallel.matmul(cols, _weight_matrix(w, channels_last).T, bias=b)   # (N*OH*OW, F)
    out = out.reshape(N, OH, OW, F)
    if not channels_last:
        out = out.transpose(0, 3, 1, 2)                     # (N, F, OH, OW)
    return out, FastConvCache(x.shape, cols, w, b is not None, stride, padding, channels_last)


def conv2d_backward(dout, cache):
    """Equals functional.conv2d_backward; the sums over rows (dw, db) a block of rows per thread."""
    check_cache("conv2d", cache, FastConvCache)
    x_shape, cols, w, has_bias, stride, padding, channels_last = cache
    F, C, kh, kw = w.shape
    d2 = (dout if channels_last else dout.transpose(0, 2, 3, 1)).reshape(-1, F)   # (N*OH*OW, F)
    dw = parallel.matmul_t(d2, cols)                        # (F, C*kh*kw) in im2col's order
    dw = dw.reshape(F, kh, kw, C).transpose(0, 3, 1, 2).copy() if channels_last else dw.reshape(w.shape)
    db = parallel.sum_rows(d2) if has_bias else None
    dcols = parallel.matmul(d2, _weight_matrix(w, channels_last))    # (N*OH*OW, C*kh*kw)
    dx = col2im(dcols, x_shape, (kh, kw), stride, padding, channels_last)
    return dx, dw, db


def _depthwise_layout(x_shape, channels_last):
    """The depthwise convolution works in either layout: (N, C, H, W), or channels last
    (N, H, W, C), the layout of a token sequence (N, H*W, C) reshaped without a copy. Returns
    C, the shape in NCHW order (for `conv_geometry`), a function that turns the (row, col)
    slices of a kernel offset into an index of the layout, and the weight broadcast shape."""
    nchw = _nchw(x_shape, channels_last)
    C = nchw[1]
    return C, nchw, _region(_map_axes(channels_last), 4), (C,) if channels_last else (C, 1, 1)


def _windows(xpad, kernel, stride, out_hw, channels_last, window):
    """Every kernel-sized window of the padded map at the stride's steps, as a view (no copy:
    each window is another set of strides into the same memory):
    (N, OH, OW, C, kh, kw) channels last, (N, C, OH, OW, kh, kw) otherwise."""
    xp = get_array_module(xpad)
    (sh, sw), (OH, OW) = stride, out_hw
    hw = _map_axes(channels_last)
    # NumPy's sliding_window_view, written out: the window axes step as the map axes do. (CuPy's
    # sliding_window_view copies the window shape to the GPU and reads it back, two waits a call.)
    shape = list(xpad.shape) + list(kernel)
    for axis, k in zip(hw, kernel):
        shape[axis] -= k - 1
    strides = tuple(xpad.strides) + tuple(xpad.strides[axis] for axis in hw)
    windows = xp.lib.stride_tricks.as_strided(xpad, tuple(shape), strides)
    return windows[window(slice(0, sh * OH, sh), slice(0, sw * OW, sw))]


class FastDepthwiseCache(NamedTuple):
    x_shape: tuple          # x's shape, in its layout
    xpad: object            # the padded input, in x's layout: dw reads its windows again
    w: object               # (C, 1, kh, kw)
    has_bias: bool
    stride: tuple           # (sh, sw)
    padding: tuple          # (ph, pw)
    channels_last: bool


def depthwise_conv2d_forward(x, w, b=None, stride=1, padding=0, channels_last=False):
    """Equals functional.depthwise_conv2d_forward. Each output is a window of the padded input
    times its channel's filter, summed: one einsum over a sliding-window view (a single pass,
    where the reference's loop over the kh*kw offsets makes two passes over the output for
    each, 2 to 4x slower on the CPU), a block of images per thread. Channels last, each
    multiply-add runs along C contiguous values instead of a short row of OW."""
    check_depthwise(x, w, b, channels_last)
    C, nchw, window, wshape = _depthwise_layout(x.shape, channels_last)
    xp = get_array_module(x)
    N = x.shape[0]
    (kh, kw), (sh, sw), (ph, pw), (OH, OW) = conv_geometry("depthwise_conv2d", nchw, w.shape[2:], stride,
                                                           padding)
    xpad = _pad(x, ph, pw, channels_last)                   # H and W padded by ph, pw
    windows = _windows(xpad, (kh, kw), (sh, sw), (OH, OW), channels_last, window)
    out = xp.empty((N, OH, OW, C) if channels_last else (N, C, OH, OW), x.dtype)
    parallel.rows(_window_sums, (windows, out), _filters(w[:, 0], channels_last), channels_last,
                  None if b is None else b.reshape(wshape))
    return out, FastDepthwiseCache(x.shape, xpad, w, b is not None, (sh, sw), (ph, pw), channels_last)


def depthwise_bn_inference(x, w, gamma, beta, running_mean, running_var, eps=1e-5, stride=1, padding=0,
                           channels_last=False):
    """Equals batchnorm2d_forward(depthwise_conv2d_forward(x, w, None, ...), ..., training=False),
    the out alone, for inference (nothing cached). An eval-mode BatchNorm is a per-channel
    affine map: with g = gamma / sqrt(running_var + eps), bn(conv(x)) = conv_{w * g}(x) +
    (beta - running_mean * g), one depthwise convolution with scaled filters and a bias: one
    pass over the output instead of two."""
    g = gamma / get_array_module(x).sqrt(running_var + eps)          # (C,)
    out, _ = depthwise_conv2d_forward(x, w * g[:, None, None, None], beta - running_mean * g, stride,
                                      padding, channels_last)
    return out


def depthwise_conv2d_backward(dout, cache):
    """Equals functional.depthwise_conv2d_backward. dw is one einsum over the forward's windows;
    at stride 1, dx is dout zero-padded by k - 1 - p and correlated with the flipped filters,
    the forward's einsum again; a block of images per thread, whose shares of dw, db are added."""
    check_cache("depthwise_conv2d", cache, FastDepthwiseCache)
    x_shape, xpad, w, has_bias, (sh, sw), (ph, pw), channels_last = cache
    xp = get_array_module(dout)
    C, (N, _, H, W), window, wshape = _depthwise_layout(x_shape, channels_last)
    kh, kw = w.shape[2:]
    OH, OW = dout.shape[1:3] if channels_last else dout.shape[2:]
    windows = _windows(xpad, (kh, kw), (sh, sw), (OH, OW), channels_last, window)   # as in the forward
    # stride 1: dx is dout, zero-padded by k - 1 - p, correlated with the flipped filters: the
    # forward's one einsum again. Other strides: add dout * w into every offset's strided view.
    flipped = (sh, sw) == (1, 1) and ph < kh and pw < kw
    if flipped:
        filters = _filters(w[:, 0, ::-1, ::-1], channels_last)
        dx = xp.empty(x_shape, dout.dtype)
    else:
        dx = xp.empty_like(xpad)                            # the padded dx, cropped at the end

    def block(windows, dout, dx):           # a block of images: dx, and its share of dw and db
        # dw[c, i, j] = sum over n and the output grid of dout * window[..., i, j]
        dw = _window_dots(windows, dout, channels_last)
        if flipped:
            dwindows = _windows(_pad(dout, kh - 1 - ph, kw - 1 - pw, channels_last), (kh, kw), (1, 1),
                                (H, W), channels_last, window)
            _window_sums(dwindows, dx, filters, channels_last)
        else:           # the adjoint of "take the strided view of offset (i, j)" is "add into it"
            dx[...] = 0
            tmp = xp.empty_like(dout)
            for i in range(kh):
                for j in range(kw):
                    xp.multiply(dout, w[:, 0, i, j].reshape(wshape), out=tmp)
                    dx[window(slice(i, i + sh * OH, sh), slice(j, j + sw * OW, sw))] += tmp
        db = dout.sum(axis=(0, 1, 2) if channels_last else (0, 2, 3)) if has_bias else None
        return dw, db

    dw, db = parallel.total(parallel.rows(block, (windows, dout, dx)))
    if not flipped:
        dx = dx[window(slice(ph, ph + H), slice(pw, pw + W))]
    return dx, dw[:, None], db                              # dw (C, kh, kw) -> (C, 1, kh, kw)


def _filters(filters, channels_last):
    """The filters (C, kh, kw) in the layout of the windows: channels last, (kh, kw, C)."""
    xp = get_array_module(filters)
    return xp.ascontiguousarray(filters.transpose(1, 2, 0)) if channels_last else filters


# Each window times its channel's filter, summed over the kernel offsets: out[..., c] =
# sum_ij windows[..., c, i, j] * filters[c, i, j]. On NumPy that is one einsum, a single pass
# with no product array (2 to 4x faster on the CPU than a loop over the offsets, which makes
# two passes over the output for each). CuPy's einsum would rewrite it as a batched matrix
# product after copying the windows out, kh*kw times the output's size (measured under the
# emulated CuPy: docs/backend.md), so on the GPU it is the loop over the offsets, with one
# temporary of the output's size.

def _window_sums(windows, out, filters, channels_last, bias=None):
    """A block of images: out = sum_ij windows[..., i, j] * filters[i, j] (+ bias); windows
    (n, OH, OW, C, kh, kw) and filters (kh, kw, C) channels last, else (n, C, OH, OW, kh, kw)
    and (C, kh, kw)."""
    if backend.is_cupy_array(out):
        xp = get_array_module(out)
        kh, kw = windows.shape[-2:]
        tmp = None
        for i in range(kh):
            for j in range(kw):
                f = filters[i, j] if channels_last else filters[:, i, j].reshape(-1, 1, 1)
                if i == 0 and j == 0:
                    xp.multiply(windows[..., 0, 0], f, out=out)
                else:
                    tmp = xp.multiply(windows[..., i, j], f, out=tmp)
                    out += tmp
    else:
        backend.einsum("nhwcij,ijc->nhwc" if channels_last else "nchwij,cij->nchw", windows, filters, out=out)
    if bias is not None:
        out += bias


def _window_dots(windows, dout, channels_last):
    """dw (C, kh, kw): dw[c, i, j] = sum over images and the output grid of dout *
    windows[..., i, j]. NumPy: one einsum over the forward's windows (a view), without a
    product array of dout's size; CuPy: the product and a sum for each offset (as above)."""
    xp = get_array_module(dout)
    if backend.is_cupy_array(dout):
        kh, kw = windows.shape[-2:]
        axes = (0, 1, 2) if channels_last else (0, 2, 3)
        sums = [(windows[..., i, j] * dout).sum(axis=axes) for i in range(kh) for j in range(kw)]
        return xp.stack(sums, axis=1).reshape(-1, kh, kw)               # (C, kh*kw) -> (C, kh, kw)
    return xp.einsum("nhwcij,nhwc->cij" if channels_last else "nchwij,nchw->cij", windows, dout)
