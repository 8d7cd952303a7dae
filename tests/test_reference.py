"""Forward passes against slow, obviously correct loop versions written here.

Each reference is a plain Python loop over output entries on the host, written from the
definition of the layer and never calling minicvt: direct convolution, per-head attention,
per-channel / per-token normalisation, PyTorch's documented average pooling, and the row-by-row
softmax. The fast code runs on the backend under test (`xp`) and is compared in float64.

Tolerance: RTOL = ATOL = 1e-12. Both sides sum at most a few hundred float64 terms of size
about 1, so they differ only by rounding (about 1e-15); a wrong index or a missing term is O(1).
"""
import itertools
import math

import numpy as np
import pytest

from minicvt import backend
from minicvt.kernels import ops as F      # the reference and the fast kernels, in turn

pytestmark = pytest.mark.usefixtures("both_kernels")

RTOL = ATOL = 1e-12


def _rng(seed=0):
    return np.random.default_rng(seed)


def _close(ours, ref):
    np.testing.assert_allclose(backend.to_numpy(ours), ref, rtol=RTOL, atol=ATOL)


def _out_size(size, kernel, stride, padding):
    """Number of kernel placements that fit in the zero-padded input (textbook formula)."""
    return (size + 2 * padding - kernel) // stride + 1


# ---------------------------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------------------------

def _pixel(x, n, c, r, s):
    """x[n, c, r, s], or 0 outside the image: zero padding without building a padded copy."""
    H, W = x.shape[2:]
    return x[n, c, r, s] if 0 <= r < H and 0 <= s < W else 0.0


def loop_conv2d(x, w, b, stride, padding):
    """Direct cross-correlation: out[n, f, oh, ow] = b[f] + sum_{c,i,j} w[f,c,i,j] *
    x[n, c, oh*sh - ph + i, ow*sw - pw + j].  x (N, C, H, W), w (F, C, kh, kw) -> (N, F, OH, OW)."""
    (sh, sw), (ph, pw) = stride, padding
    N, C, H, W = x.shape
    Fo, _, kh, kw = w.shape
    OH, OW = _out_size(H, kh, sh, ph), _out_size(W, kw, sw, pw)
    out = np.zeros((N, Fo, OH, OW))
    for n, f, oh, ow in itertools.product(range(N), range(Fo), range(OH), range(OW)):
        acc = 0.0 if b is None else b[f]
        for c, i, j in itertools.product(range(C), range(kh), range(kw)):
            acc += w[f, c, i, j] * _pixel(x, n, c, oh * sh - ph + i, ow * sw - pw + j)
        out[n, f, oh, ow] = acc
    return out


def loop_depthwise(x, w, b, stride, padding):
    """Each channel c is cross-correlated with its own filter w[c, 0].
    x (N, C, H, W), w (C, 1, kh, kw) -> (N, C, OH, OW)."""
    (sh, sw), (ph, pw) = stride, padding
    N, C, H, W = x.shape
    kh, kw = w.shape[2:]
    OH, OW = _out_size(H, kh, sh, ph), _out_size(W, kw, sw, pw)
    out = np.zeros((N, C, OH, OW))
    for n, c, oh, ow in itertools.product(range(N), range(C), range(OH), range(OW)):
        acc = 0.0 if b is None else b[c]
        for i, j in itertools.product(range(kh), range(kw)):
            acc += w[c, 0, i, j] * _pixel(x, n, c, oh * sh - ph + i, ow * sw - pw + j)
        out[n, c, oh, ow] = acc
    return out


@pytest.mark.parametrize("kernel", [1, 3, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, 2])
def test_conv2d_matches_loop(xp, kernel, stride, padding):
    rng = _rng(1)
    x, w, b = rng.standard_normal((2, 2, 9, 8)), rng.standard_normal((3, 2, kernel, kernel)), rng.standard_normal(3)
    out, _ = F.conv2d_forward(backend.to_device(x), backend.to_device(w), backend.to_device(b), stride, padding)
    _close(out, loop_conv2d(x, w, b, (stride, stride), (padding, padding)))


@pytest.mark.parametrize("kernel, stride, padding, bias", [
    ((3, 2), (2, 1), (1, 0), True),
    ((1, 3), (1, 2), (0, 1), False),
    ((2, 2), (3, 2), (1, 1), True),
])
def test_conv2d_tuple_arguments_match_loop(xp, kernel, stride, padding, bias):
    rng = _rng(2)
    x, w = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3) + kernel)
    b = rng.standard_normal(4) if bias else None
    out, _ = F.conv2d_forward(backend.to_device(x), backend.to_device(w),
                              None if b is None else backend.to_device(b), stride, padding)
    _close(out, loop_conv2d(x, w, b, stride, padding))


@pytest.mark.parametrize("kernel, stride, padding, bias", [
    ((3, 3), (1, 1), (1, 1), False),
    ((3, 3), (2, 2), (1, 1), True),
    ((3, 5), (2, 1), (0, 2), True),
    ((1, 1), (1, 1), (0, 0), False),
])
def test_depthwise_matches_loop(xp, kernel, stride, padding, bias):
    rng = _rng(3)
    x, w = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((3, 1) + kernel)
    b = rng.standard_normal(3) if bias else None
    out, _ = F.depthwise_conv2d_forward(backend.to_device(x), backend.to_device(w),
                                        None if b is None else backend.to_device(b), stride, padding)
    _close(out, loop_depthwise(x, w, b, stride, padding))


# ---------------------------------------------------------------------------------------------
# im2col / col2im
# ---------------------------------------------------------------------------------------------

_IM2COL_CONFIGS = [(k, s, p) for k, s, p in itertools.product([1, 2, 3, 7], [1, 2, 3], [0, 1, 2])]
_IM2COL_CONFIGS += [((3, 2), (2, 1), (1, 0)), ((2, 5), (1, 3), (0, 2))]


@pytest.mark.parametrize("kernel, stride, padding", _IM2COL_CONFIGS)
def test_col2im_is_adjoint_of_im2col(xp, kernel, stride, padding):
    rng = _rng(4)
    x_shape = (2, 3, 9, 8)
    x = rng.standard_normal(x_shape)
    cols = F.im2col(backend.to_device(x), kernel, stride, padding)
    c = rng.standard_normal(cols.shape)
    back = F.col2im(backend.to_device(c), x_shape, kernel, stride, padding)
    lhs_terms = backend.to_numpy(cols) * c                    # (N*OH*OW, C*kh*kw)
    rhs_terms = x * backend.to_numpy(back)                    # (N, C, H, W)
    lhs, rhs = lhs_terms.sum(), rhs_terms.sum()
    # rounding in a sum of products scales with sum |terms|, not with the (possibly small) sum
    scale = np.abs(lhs_terms).sum()
    assert abs(lhs - rhs) <= 1e-12 * scale, (lhs, rhs, scale)


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 0), ((2, 3), (2, 1), (1, 1)), (7, 3, 2)])
def test_im2col_rows_are_loop_patches(xp, kernel, stride, padding):
    rng = _rng(5)
    x = rng.standard_normal((2, 3, 7, 8))
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    N, C, H, W = x.shape
    OH, OW = _out_size(H, kh, sh, ph), _out_size(W, kw, sw, pw)
    cols = backend.to_numpy(F.im2col(backend.to_device(x), kernel, stride, padding))
    assert cols.shape == (N * OH * OW, C * kh * kw)
    for n, oh, ow in itertools.product(range(N), range(OH), range(OW)):
        patch = np.zeros((C, kh, kw))
        for c, i, j in itertools.product(range(C), range(kh), range(kw)):
            patch[c, i, j] = _pixel(x, n, c, oh * sh - ph + i, ow * sw - pw + j)
        r = (n * OH + oh) * OW + ow                           # rows are ordered (n, oh, ow)
        np.testing.assert_array_equal(cols[r], patch.ravel())  # a pure copy: exact


# ---------------------------------------------------------------------------------------------
# attention and softmax
# ---------------------------------------------------------------------------------------------

def _loop_softmax(row):
    """Softmax of one 1-D row, shifted by its max so exp() never overflows."""
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return np.array([v / s for v in e])


def loop_attention(q, k, v, heads, scale):
    """Per batch entry and head h: channels h*d:(h+1)*d of q, k, v are that head's vectors;
    each query row t gets p = softmax(scale * <q_t, k_s>) over s and out_t = sum_s p_s v_s.
    q (N, Tq, C), k, v (N, Tk, C) -> out (N, Tq, C), p (N, heads, Tq, Tk)."""
    N, Tq, C = q.shape
    Tk, d = k.shape[1], C // heads
    out, probs = np.zeros((N, Tq, C)), np.zeros((N, heads, Tq, Tk))
    for n, h in itertools.product(range(N), range(heads)):
        cs = slice(h * d, (h + 1) * d)
        for t in range(Tq):
            scores = [scale * float(np.dot(q[n, t, cs], k[n, s, cs])) for s in range(Tk)]
            p = _loop_softmax(scores)
            probs[n, h, t] = p
            out[n, t, cs] = sum(p[s] * v[n, s, cs] for s in range(Tk))
    return out, probs


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("scale", [None, 8 ** -0.5, 0.3])   # default d^-1/2, CvT's C^-1/2, any
def test_attention_matches_per_head_loop(xp, heads, scale):
    rng = _rng(6)
    N, Tq, Tk, C = 2, 5, 3, 8                                 # Tk < Tq: squeezed keys/values
    q, k, v = (rng.standard_normal(s) for s in [(N, Tq, C), (N, Tk, C), (N, Tk, C)])
    out, cache = F.attention_forward(*(backend.to_device(a) for a in (q, k, v)), heads, scale)
    ref_out, ref_p = loop_attention(q, k, v, heads, (C // heads) ** -0.5 if scale is None else scale)
    _close(out, ref_out)
    p = backend.to_numpy(cache[3])
    assert p.shape == (N, heads, Tq, Tk)
    np.testing.assert_allclose(p, ref_p, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=0, atol=ATOL)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_softmax_is_stable_for_large_inputs(xp, offset):
    """Scores of size 1e4 overflow exp() in float64 (which tops out near exp(709)); the
    shifted softmax must still give finite probabilities equal to the loop's."""
    x = offset + _rng(7).standard_normal((4, 6)) * (1e4 if offset == 0.0 else 1.0)
    with np.errstate(over="ignore", invalid="ignore"):
        naive = np.exp(x) / np.exp(x).sum(axis=-1, keepdims=True)
    assert not np.isfinite(naive).all()                       # the unshifted formula breaks here
    p, _ = F.softmax_forward(backend.to_device(x))
    p = backend.to_numpy(p)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p, np.stack([_loop_softmax(list(row)) for row in x]), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=0, atol=ATOL)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
def test_cross_entropy_is_minus_log_softmax(xp, label_smoothing):
    """loss = mean_n [(1 - eps) * -log p_n[y_n] + eps * mean_k -log p_n[k]], the smoothed
    target written as its two parts rather than as one distribution q."""
    rng = _rng(8)
    N, K = 5, 7
    logits = rng.standard_normal((N, K)) * 3.0
    labels = rng.integers(0, K, size=N)
    loss, _ = F.cross_entropy_forward(backend.to_device(logits), backend.to_device(labels), label_smoothing)
    total = 0.0
    for n in range(N):
        nll = [-math.log(pk) for pk in _loop_softmax(list(logits[n]))]
        total += (1.0 - label_smoothing) * nll[labels[n]] + label_smoothing * sum(nll) / K
    _close(loss, total / N)


# ---------------------------------------------------------------------------------------------
# average pooling: PyTorch's documented semantics, written out independently
# ---------------------------------------------------------------------------------------------

def _pool_windows(size, k, s, p, ceil_mode):
    """[(start, end, count_with_pad)] along one axis. Output length is floor (or ceil) of
    (size + 2p - k) / s, plus 1; with ceil_mode a window that would start in the right
    padding is dropped. The window clipped to the padded input counts padding zeros
    (count_include_pad); the ceil_mode overhang beyond the padding never counts."""
    n_out = (math.ceil if ceil_mode else math.floor)((size + 2 * p - k) / s) + 1
    if ceil_mode and (n_out - 1) * s >= size + p:
        n_out -= 1
    windows = []
    for o in range(n_out):
        start = o * s - p
        end = min(start + k, size + p)
        windows.append((max(start, 0), min(end, size), end - start))
    return windows


def loop_avg_pool(x, kernel, stride, padding, ceil_mode, count_include_pad):
    """x (N, C, H, W) -> (N, C, OH, OW) by summing each window's in-image entries."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    N, C, H, W = x.shape
    rows, cols = _pool_windows(H, kh, sh, ph, ceil_mode), _pool_windows(W, kw, sw, pw, ceil_mode)
    out = np.zeros((N, C, len(rows), len(cols)))
    for n, c in itertools.product(range(N), range(C)):
        for a, (r0, r1, rpad) in enumerate(rows):
            for b, (c0, c1, cpad) in enumerate(cols):
                total = sum(x[n, c, r, s] for r in range(r0, r1) for s in range(c0, c1))
                count = rpad * cpad if count_include_pad else (r1 - r0) * (c1 - c0)
                out[n, c, a, b] = total / count
    return out


@pytest.mark.parametrize("kernel, stride, padding", [
    ((3, 3), (2, 2), (1, 1)), ((2, 2), (2, 2), (1, 1)), ((3, 2), (2, 1), (1, 0)),
    ((2, 2), (3, 3), (0, 0)), ((1, 1), (2, 2), (0, 0)),
])
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avg_pool_matches_loop(xp, kernel, stride, padding, ceil_mode, count_include_pad):
    x = _rng(9).standard_normal((2, 2, 5, 7))
    out, _ = F.avg_pool2d_forward(backend.to_device(x), kernel, stride, padding, ceil_mode, count_include_pad)
    _close(out, loop_avg_pool(x, kernel, stride, padding, ceil_mode, count_include_pad))


# ---------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------

def loop_batchnorm(x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    """Per channel c: the M = N*H*W values x[:, c] are normalised by their own mean and biased
    variance (training) or by the running statistics (eval). In training the running
    statistics become (1 - momentum) * old + momentum * batch, with the unbiased variance."""
    N, C, H, W = x.shape
    out, new_mean, new_var = np.zeros_like(x), running_mean.copy(), running_var.copy()
    for c in range(C):
        vals = [x[n, c, i, j] for n in range(N) for i in range(H) for j in range(W)]
        M = len(vals)
        if training:
            mean = sum(vals) / M
            sq = sum((v - mean) ** 2 for v in vals)
            var = sq / M
            new_mean[c] = (1 - momentum) * running_mean[c] + momentum * mean
            new_var[c] = (1 - momentum) * running_var[c] + momentum * sq / (M - 1)
        else:
            mean, var = running_mean[c], running_var[c]
        for n, i, j in itertools.product(range(N), range(H), range(W)):
            out[n, c, i, j] = gamma[c] * (x[n, c, i, j] - mean) / math.sqrt(var + eps) + beta[c]
    return out, new_mean, new_var


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_matches_loop(xp, training):
    rng = _rng(10)
    C = 3
    x = rng.standard_normal((2, C, 3, 4)) * 2.0 + 0.5
    gamma, beta, rmean = rng.standard_normal(C), rng.standard_normal(C), rng.standard_normal(C)
    rvar = rng.uniform(0.5, 2.0, C)                           # a variance must be positive
    args = [backend.to_device(a) for a in (x, gamma, beta, rmean, rvar)]
    out, _, (new_mean, new_var) = F.batchnorm2d_forward(*args, training, momentum=0.1, eps=1e-5)
    ref_out, ref_mean, ref_var = loop_batchnorm(x, gamma, beta, rmean, rvar, training)
    _close(out, ref_out)
    _close(new_mean, ref_mean)
    _close(new_var, ref_var)


def test_layernorm_matches_loop(xp):
    rng = _rng(11)
    N, T, C = 2, 5, 6
    x = rng.standard_normal((N, T, C)) * 3.0 - 1.0
    gamma, beta = rng.standard_normal(C), rng.standard_normal(C)
    out, _ = F.layernorm_forward(*(backend.to_device(a) for a in (x, gamma, beta)), eps=1e-5)
    ref = np.zeros_like(x)
    for n, t in itertools.product(range(N), range(T)):
        token = list(x[n, t])                                 # the C channels of one token
        mean = sum(token) / C
        var = sum((v - mean) ** 2 for v in token) / C         # biased, as PyTorch
        for c in range(C):
            ref[n, t, c] = gamma[c] * (token[c] - mean) / math.sqrt(var + 1e-5) + beta[c]
    _close(out, ref)
