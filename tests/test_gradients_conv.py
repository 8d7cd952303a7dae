"""Finite-difference gradient checks of the convolution family: conv2d, depthwise_conv2d and
avg_pool2d (pure functions and their modules), on every backend.

Every input and every parameter is checked entry by entry in float64 (minicvt.gradcheck: a
random upstream gradient, the five-point stencil). These layers are linear in each argument,
so the only error left is rounding in the forward, divided by h: about 1e-12 absolute,
1e-10 relative on most entries, more on the few whose gradient is small (the worst here,
4e-8, is an input pixel of the 7x7 case whose 18 gradient terms nearly cancel, to -3.7e-5).
Shapes: N batch, C channels, F filters, H, W map size; kernel/stride/padding an int or (h, w).
"""
import numpy as np
import pytest

from minicvt import backend
from minicvt.kernels import ops as F      # the reference and the fast kernels, in turn
from minicvt import nn
from minicvt.gradcheck import check_function, check_module

pytestmark = pytest.mark.usefixtures("both_kernels")

TOL = 1e-7          # these layers give 4e-8 or less; no kinks here, so no case is looser
F_OUT = 3           # conv2d output channels


def _fmt(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _case(N, C, H, W, kernel, stride, padding, bias):
    """One (N, C, H, W, kernel, stride, padding, bias) configuration with a readable id,
    e.g. 'k3-s2-p1-5x7-n2-bias'."""
    name = f"k{_fmt(kernel)}-s{_fmt(stride)}-p{_fmt(padding)}-{H}x{W}-n{N}"
    return pytest.param(N, C, H, W, kernel, stride, padding, bias, id=name + ("-bias" if bias else "-nobias"))


# Kernel 1/3/7, stride 1/2, padding 0/1/2, non-square maps, batch 1 and 2, bias on and off,
# then non-square kernel/stride/padding tuples. Kernel 7 needs a map of at least 7 (8x9).
GRID = [
    _case(1, 2, 5, 7, 1, 1, 0, True),
    _case(2, 2, 5, 7, 1, 2, 1, False),
    _case(2, 2, 5, 7, 3, 1, 1, True),
    _case(1, 3, 9, 6, 3, 2, 0, False),
    _case(2, 2, 9, 6, 3, 2, 2, True),
    _case(1, 2, 8, 9, 7, 1, 0, False),
    _case(1, 2, 8, 9, 7, 1, 1, True),
    _case(2, 1, 8, 9, 7, 2, 2, True),
    _case(2, 2, 5, 7, (3, 1), (2, 1), (1, 0), True),
    _case(1, 2, 6, 5, (1, 3), (1, 2), (0, 1), False),
    _case(2, 1, 7, 6, (2, 3), (3, 2), (2, 1), True),
]


def _check_weight_bias(forward, backward, x, w, b):
    """Check forward(x, w, b) -> (out, cache) / backward -> (dx, dw, db) for x, w and, when
    there is one, b. Without a bias the backward's db must be None and is not compared."""
    if b is None:
        def backward_no_bias(dout, cache):
            dx, dw, db = backward(dout, cache)
            assert db is None, "a layer without bias returned a bias gradient"
            return dx, dw
        report = check_function(lambda x, w: forward(x, w, None), backward_no_bias, {"x": x, "w": w})
        assert [r.name for r in report.results] == ["x", "w"]
    else:
        report = check_function(forward, backward, {"x": x, "w": w, "b": b})
        assert [r.name for r in report.results] == ["x", "w", "b"]
    # every entry was compared, none sampled
    assert [r.checked for r in report.results] == [a.size for a in (x, w, b) if a is not None]
    return report


def _kernel(kernel):
    return kernel if isinstance(kernel, tuple) else (kernel, kernel)


# -- conv2d -------------------------------------------------------------------------------------

@pytest.mark.parametrize("N, C, H, W, kernel, stride, padding, bias", GRID)
def test_conv2d_gradients(xp, rand, N, C, H, W, kernel, stride, padding, bias):
    x = rand(N, C, H, W)
    fan_in = C * np.prod(_kernel(kernel))
    w = rand(F_OUT, C, *_kernel(kernel), scale=fan_in ** -0.5)     # PyTorch's scale: O(1) outputs
    b = rand(F_OUT) if bias else None
    report = _check_weight_bias(lambda x, w, b: F.conv2d_forward(x, w, b, stride, padding),
                                F.conv2d_backward, x, w, b)
    report.assert_ok(TOL)


@pytest.mark.parametrize("kernel, stride, padding, bias", [
    pytest.param(3, 2, 1, True, id="k3-s2-p1-bias"),
    pytest.param((1, 3), (1, 2), (0, 1), False, id="k1x3-s1x2-p0x1-nobias"),
])
def test_conv2d_module_gradients(xp, rand, kernel, stride, padding, bias):
    m = nn.Conv2d(2, F_OUT, kernel, stride, padding, bias=bias, dtype=np.float64,
                  rng=backend.host_rng(0))
    report = check_module(m, rand(2, 2, 5, 7))
    assert [r.name for r in report.results] == ["input", "weight"] + (["bias"] if bias else [])
    report.assert_ok(TOL)


# -- depthwise_conv2d ---------------------------------------------------------------------------

@pytest.mark.parametrize("N, C, H, W, kernel, stride, padding, bias", GRID)
def test_depthwise_conv2d_gradients(xp, rand, N, C, H, W, kernel, stride, padding, bias):
    x = rand(N, C, H, W)
    w = rand(C, 1, *_kernel(kernel), scale=np.prod(_kernel(kernel)) ** -0.5)
    b = rand(C) if bias else None
    report = _check_weight_bias(lambda x, w, b: F.depthwise_conv2d_forward(x, w, b, stride, padding),
                                F.depthwise_conv2d_backward, x, w, b)
    report.assert_ok(TOL)


@pytest.mark.parametrize("kernel, stride, padding, bias", [
    pytest.param(3, 2, 1, False, id="k3-s2-p1-nobias"),     # CvT's conv projection of k and v
    pytest.param(3, 1, 1, True, id="k3-s1-p1-bias"),
    pytest.param((3, 1), (1, 2), (1, 0), True, id="k3x1-s1x2-p1x0-bias"),
])
def test_depthwise_conv2d_module_gradients(xp, rand, kernel, stride, padding, bias):
    m = nn.DepthwiseConv2d(3, kernel, stride, padding, bias=bias, dtype=np.float64,
                           rng=backend.host_rng(0))
    report = check_module(m, rand(2, 3, 5, 6))
    assert [r.name for r in report.results] == ["input", "weight"] + (["bias"] if bias else [])
    report.assert_ok(TOL)


# -- avg_pool2d ---------------------------------------------------------------------------------
# The full grid: kernel 2/3 x stride 1/2 x padding 0/1 x ceil_mode x count_include_pad, on odd,
# non-square maps, where ceil_mode adds an output row or column for stride 2.

@pytest.mark.parametrize("H, W", [(5, 7), (6, 5)], ids=["5x7", "6x5"])
@pytest.mark.parametrize("count_include_pad", [True, False], ids=["incl-pad", "excl-pad"])
@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("padding", [0, 1], ids=["p0", "p1"])
@pytest.mark.parametrize("stride", [1, 2], ids=["s1", "s2"])
@pytest.mark.parametrize("kernel", [2, 3], ids=["k2", "k3"])
def test_avg_pool2d_gradients(xp, rand, kernel, stride, padding, ceil_mode, count_include_pad, H, W):
    report = check_function(
        lambda x: F.avg_pool2d_forward(x, kernel, stride, padding, ceil_mode, count_include_pad),
        F.avg_pool2d_backward, {"x": rand(2, 2, H, W)})
    report.assert_ok(TOL)


def test_avg_pool2d_grid_exercises_the_ceil_overhang():
    """The grid above must contain windows that hang over the padded input, or the divisor
    logic for the overhang is never checked. By hand (floor vs ceil of (size + 2p - k) / s + 1):
    size 5, k2, s2, p0: floor 2, ceil 3; size 6, k3, s2, p1: floor 3, ceil 4; and size 5, k2,
    s2, p1: ceil would give 4, but that window would start in the right padding, so 3."""
    assert (F.pool_output_size(5, 2, 2, 0, False), F.pool_output_size(5, 2, 2, 0, True)) == (2, 3)
    assert (F.pool_output_size(6, 3, 2, 1, False), F.pool_output_size(6, 3, 2, 1, True)) == (3, 4)
    assert (F.pool_output_size(5, 2, 2, 1, False), F.pool_output_size(5, 2, 2, 1, True)) == (3, 3)


@pytest.mark.parametrize("args", [
    pytest.param((2,), id="k2-default-stride"),
    pytest.param((3, 2, 1, True, False), id="k3-s2-p1-ceil-excl-pad"),
    pytest.param(((3, 2), (2, 1), (1, 0), True, True), id="k3x2-s2x1-p1x0-ceil-incl-pad"),
])
def test_avg_pool2d_module_gradients(xp, rand, args):
    check_module(nn.AvgPool2d(*args), rand(2, 2, 5, 7)).assert_ok(TOL)
