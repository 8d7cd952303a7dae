"""The channels-last layout (N, H, W, C) of depthwise convolution and BatchNorm2d, which the
convolutional projection uses on the token grid, and of convolution by im2col, which the token
embedding uses: float64 gradient checks of every input and parameter, the adjoint identity of
im2col and col2im, and agreement with the (N, C, H, W) layout through transposes, forward and
backward.
"""
import numpy as np
import pytest

from minicvt import backend, fast, nn
from minicvt.gradcheck import check_function, check_module
from minicvt.kernels import ops as F      # the reference and the fast kernels, in turn

pytestmark = pytest.mark.usefixtures("both_kernels")

TOL = 1e-7          # as the NCHW checks (tests/test_gradients_conv.py, test_gradients_norm.py)
CONFIGS = [         # N, C, H, W, kernel, stride, padding, bias
    pytest.param(2, 3, 5, 7, 3, 1, 1, True, id="k3-s1-p1-5x7-bias"),
    pytest.param(1, 2, 6, 5, 3, 2, 1, False, id="k3-s2-p1-6x5"),      # CvT's k and v projection
    pytest.param(2, 2, 7, 8, (3, 1), (2, 1), (0, 2), True, id="k3x1-s2x1-p0x2-bias"),
    pytest.param(2, 3, 4, 4, 1, 1, 0, False, id="k1-s1-p0"),
]


def _nhwc(a):
    return a.transpose(0, 2, 3, 1)                          # (N, C, H, W) -> (N, H, W, C)


def _kernel(k):
    return k if isinstance(k, tuple) else (k, k)


@pytest.mark.parametrize("N, C, H, W, kernel, stride, padding, bias", CONFIGS)
def test_depthwise_channels_last_gradients(xp, rand, N, C, H, W, kernel, stride, padding, bias):
    inputs = {"x": rand(N, H, W, C), "w": rand(C, 1, *_kernel(kernel))}
    if bias:
        inputs["b"] = rand(C)

    def forward(x, w, b=None):
        return F.depthwise_conv2d_forward(x, w, b, stride, padding, channels_last=True)

    def backward(dout, cache):
        dx, dw, db = F.depthwise_conv2d_backward(dout, cache)
        return (dx, dw, db) if bias else (dx, dw)
    check_function(forward, backward, inputs).assert_ok(TOL)


@pytest.mark.parametrize("N, C, H, W, kernel, stride, padding, bias", CONFIGS)
def test_depthwise_channels_last_equals_nchw(xp, rand, N, C, H, W, kernel, stride, padding, bias):
    x, w = rand(N, C, H, W), rand(C, 1, *_kernel(kernel))
    b = rand(C) if bias else None
    out, cache = F.depthwise_conv2d_forward(x, w, b, stride, padding)
    out_l, cache_l = F.depthwise_conv2d_forward(_nhwc(x), w, b, stride, padding, channels_last=True)
    assert out_l.shape == _nhwc(out).shape
    dout = rand(*out.shape)
    grads = F.depthwise_conv2d_backward(dout, cache)
    grads_l = F.depthwise_conv2d_backward(_nhwc(dout), cache_l)
    pairs = [(_nhwc(out), out_l), (_nhwc(grads[0]), grads_l[0]), (grads[1], grads_l[1])]
    if bias:
        pairs.append((grads[2], grads_l[2]))
    for a, b_ in pairs:                                    # the same sums in another order
        np.testing.assert_allclose(backend.to_numpy(b_), backend.to_numpy(a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm_channels_last_gradients_and_equality(xp, rand, training):
    N, C, H, W = 3, 4, 3, 5
    x = rand(N, C, H, W, scale=2.0) + 1.0
    gamma, beta = rand(C), rand(C)
    running_mean, running_var = rand(C), rand(C) ** 2 + 0.5

    def forward(x, gamma, beta):
        out, cache, _ = F.batchnorm2d_forward(x, gamma, beta, running_mean, running_var, training,
                                              channels_last=True)
        return out, cache
    check_function(forward, F.batchnorm2d_backward,
                   {"x": _nhwc(x).copy(), "gamma": gamma, "beta": beta}).assert_ok(TOL)

    out, cache, stats = F.batchnorm2d_forward(x, gamma, beta, running_mean, running_var, training)
    out_l, cache_l, stats_l = F.batchnorm2d_forward(_nhwc(x), gamma, beta, running_mean, running_var,
                                                    training, channels_last=True)
    dout = rand(N, C, H, W)
    grads = F.batchnorm2d_backward(dout, cache)
    grads_l = F.batchnorm2d_backward(_nhwc(dout), cache_l)
    pairs = [(_nhwc(out), out_l), (_nhwc(grads[0]), grads_l[0]), (grads[1], grads_l[1]),
             (grads[2], grads_l[2]), (stats[0], stats_l[0]), (stats[1], stats_l[1])]
    for a, b in pairs:
        np.testing.assert_allclose(backend.to_numpy(b), backend.to_numpy(a), rtol=1e-12, atol=1e-12)


def test_channels_last_modules(xp, rand):
    conv = nn.DepthwiseConv2d(3, 3, stride=2, padding=1, dtype=np.float64, rng=backend.host_rng(0),
                              channels_last=True)
    bn = nn.BatchNorm2d(3, dtype=np.float64, channels_last=True)
    x = rand(2, 5, 6, 3)                                    # (N, H, W, C)
    assert conv(x).shape == (2, 3, 3, 3)                    # (N, OH, OW, C)
    for module in (conv, bn, bn.eval()):
        report = check_module(module, x)
        assert [r.name for r in report.results][:2] == ["input", "weight"]
        report.assert_ok(TOL)


# -- convolution by im2col, channels last (the token embedding) ----------------------------------

CONV_CONFIGS = [    # N, C, F, H, W, kernel, stride, padding
    pytest.param(2, 3, 4, 5, 7, 3, 2, 1, id="k3-s2-p1-5x7"),      # CvT-CIFAR's embeddings
    pytest.param(1, 2, 3, 9, 8, 7, 4, 2, id="k7-s4-p2-9x8"),      # CvT-13's first embedding
    pytest.param(2, 2, 3, 6, 5, (3, 1), (1, 2), (0, 1), id="k3x1-s1x2-p0x1"),
    pytest.param(2, 3, 2, 4, 4, 1, 1, 0, id="k1-s1-p0"),
]


@pytest.mark.parametrize("N, C, F_, H, W, kernel, stride, padding", CONV_CONFIGS)
def test_conv2d_channels_last_gradients_and_equality(xp, rand, N, C, F_, H, W, kernel, stride, padding):
    x, w, b = rand(N, C, H, W), rand(F_, C, *_kernel(kernel)), rand(F_)
    check_function(lambda x, w, b: F.conv2d_forward(x, w, b, stride, padding, channels_last=True),
                   F.conv2d_backward, {"x": _nhwc(x).copy(), "w": w, "b": b}).assert_ok(TOL)
    out, cache = F.conv2d_forward(x, w, b, stride, padding)
    out_l, cache_l = F.conv2d_forward(_nhwc(x), w, b, stride, padding, channels_last=True)
    dout = rand(*out.shape)
    grads = F.conv2d_backward(dout, cache)
    grads_l = F.conv2d_backward(_nhwc(dout), cache_l)
    pairs = [(_nhwc(out), out_l), (_nhwc(grads[0]), grads_l[0]), (grads[1], grads_l[1]),
             (grads[2], grads_l[2])]
    for a, b_ in pairs:                                    # the same sums in another order
        np.testing.assert_allclose(backend.to_numpy(b_), backend.to_numpy(a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("N, C, F_, H, W, kernel, stride, padding", CONV_CONFIGS)
def test_im2col_channels_last_is_the_adjoint_of_col2im(xp, rand, N, C, F_, H, W, kernel, stride, padding):
    """<im2col(x), c> == <x, col2im(c)>, and the rows hold each patch in (i, j, c) order."""
    x = rand(N, H, W, C)
    cols = fast.im2col(x, kernel, stride, padding, channels_last=True)     # fast only: (i, j, c) rows
    c = rand(*cols.shape)
    lhs = float((cols * c).sum())
    rhs = float((x * fast.col2im(c, x.shape, kernel, stride, padding, channels_last=True)).sum())
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))
    kh, kw = _kernel(kernel)
    nchw = F.im2col(x.transpose(0, 3, 1, 2), kernel, stride, padding)        # rows in (c, i, j) order
    reordered = nchw.reshape(len(nchw), C, kh, kw).transpose(0, 2, 3, 1).reshape(len(nchw), -1)
    np.testing.assert_array_equal(backend.to_numpy(cols), backend.to_numpy(reordered))


def test_conv2d_channels_last_module(xp, rand):
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, dtype=np.float64, rng=backend.host_rng(0),
                     channels_last=True)
    x = rand(2, 5, 6, 3)                                    # (N, H, W, C)
    assert conv(x).shape == (2, 3, 3, 4)                    # (N, OH, OW, F)
    report = check_module(conv, x)
    assert [r.name for r in report.results] == ["input", "weight", "bias"]
    report.assert_ok(TOL)
