"""Finite-difference gradient checks of the normalisation layers, BatchNorm2d and LayerNorm
(pure functions and modules), and of a small Sequential stack that composes them.

Float64, every input and parameter, a random upstream gradient (minicvt.gradcheck); asserted
below TOL. BatchNorm is checked in training mode (the batch statistics depend on x, which adds
the two mean terms to dx) and in eval mode (running statistics: a per-channel affine map).
Shapes: N batch, C channels, H, W map size, T tokens.
"""
import numpy as np
import pytest

from minicvt import backend
from minicvt.kernels import ops as F      # the reference and the fast kernels, in turn
from minicvt import nn
from minicvt.gradcheck import check_function, check_module

pytestmark = pytest.mark.usefixtures("both_kernels")

TOL = 1e-7          # these layers give 1e-8 or less; no kinks here, so no case is looser


def _buffers(module):
    """Host copies of the module's buffers, to see whether a check changed them."""
    return {name: backend.to_numpy(b).copy() for name, b in module.named_buffers()}


def _assert_same_buffers(before, after):
    assert before.keys() == after.keys()
    for name in before:
        assert np.array_equal(before[name], after[name]), f"{name} changed"


# -- batchnorm2d, functional --------------------------------------------------------------------

@pytest.mark.parametrize("N, C, H, W, training", [
    pytest.param(1, 3, 4, 5, True, id="train-n1-4x5"),      # batch 1: statistics over H*W only
    pytest.param(3, 2, 3, 5, True, id="train-n3-3x5"),
    pytest.param(2, 2, 5, 2, True, id="train-n2-5x2"),
    pytest.param(1, 3, 4, 5, False, id="eval-n1-4x5"),
    pytest.param(3, 2, 3, 5, False, id="eval-n3-3x5"),
])
def test_batchnorm2d_gradients(xp, rand, N, C, H, W, training):
    x = rand(N, C, H, W, scale=2.0) + 1.0                   # away from mean 0 / variance 1
    gamma, beta = rand(C), rand(C)
    running_mean, running_var = rand(C), rand(C) ** 2 + 0.5   # variances must be positive
    kept = backend.to_numpy(running_mean).copy(), backend.to_numpy(running_var).copy()

    def forward(x, gamma, beta):
        out, cache, _ = F.batchnorm2d_forward(x, gamma, beta, running_mean, running_var, training)
        return out, cache

    report = check_function(forward, F.batchnorm2d_backward, {"x": x, "gamma": gamma, "beta": beta})
    assert [r.name for r in report.results] == ["x", "gamma", "beta"]
    report.assert_ok(TOL)
    # the function is pure: it returns new running statistics and leaves its inputs alone
    assert np.array_equal(backend.to_numpy(running_mean), kept[0])
    assert np.array_equal(backend.to_numpy(running_var), kept[1])


# -- BatchNorm2d, module ------------------------------------------------------------------------

def _trained_batchnorm(rand, C):
    """A float64 BatchNorm2d with random weight/bias and running statistics moved away from
    their (0, 1) start by three training forwards."""
    m = nn.BatchNorm2d(C, dtype=np.float64)
    m.weight.data[...] = rand(C)
    m.bias.data[...] = rand(C)
    for _ in range(3):
        m(rand(4, C, 3, 3, scale=3.0) + 2.0)
    stats = _buffers(m)
    assert np.abs(stats["running_mean"]).min() > 0.1 and np.abs(stats["running_var"] - 1).min() > 0.1
    assert stats["num_batches_tracked"] == 3
    return m


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("N, H, W", [(1, 3, 4), (2, 4, 3)], ids=["n1-3x4", "n2-4x3"])
def test_batchnorm2d_module_gradients(xp, rand, N, H, W, training):
    C = 3
    m = _trained_batchnorm(rand, C).train(training)
    x = rand(N, C, H, W, scale=2.0) - 1.0
    before = _buffers(m)
    report = check_module(m, x)
    assert [r.name for r in report.results] == ["input", "weight", "bias"]
    report.assert_ok(TOL)
    # each training forward of the check moved the running statistics; check_module must
    # have put them back (and in eval mode they must not have moved at all)
    _assert_same_buffers(before, _buffers(m))


def test_batchnorm2d_module_forward_moves_running_stats(xp, rand):
    """The counterpart of the restore check above: one training forward does change the
    buffers, so an unchanged state after check_module is the restore, not a no-op."""
    m = _trained_batchnorm(rand, 3)
    before = _buffers(m)
    m(rand(2, 3, 4, 3))
    after = _buffers(m)
    assert after["num_batches_tracked"] == before["num_batches_tracked"] + 1
    assert not np.array_equal(after["running_mean"], before["running_mean"])
    assert not np.array_equal(after["running_var"], before["running_var"])


# -- layernorm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [
    pytest.param((5, 3), id="NC-C3"),
    pytest.param((3, 8), id="NC-C8"),
    pytest.param((1, 5, 6), id="NTC-n1-T5-C6"),
    pytest.param((2, 4, 16), id="NTC-n2-T4-C16"),
])
def test_layernorm_gradients(xp, rand, shape):
    C = shape[-1]
    x = rand(*shape, scale=2.0) + 1.0
    report = check_function(F.layernorm_forward, F.layernorm_backward,
                            {"x": x, "gamma": rand(C), "beta": rand(C)})
    assert [r.name for r in report.results] == ["x", "gamma", "beta"]
    report.assert_ok(TOL)


@pytest.mark.parametrize("shape", [(4, 8), (2, 3, 8)], ids=["NC", "NTC"])
def test_layernorm_module_gradients(xp, rand, shape):
    m = nn.LayerNorm(8, dtype=np.float64)
    m.weight.data[...] = rand(8)            # not the (1, 0) start, so both paths are exercised
    m.bias.data[...] = rand(8)
    report = check_module(m, rand(*shape))
    assert [r.name for r in report.results] == ["input", "weight", "bias"]
    report.assert_ok(TOL)


# -- composition --------------------------------------------------------------------------------

def _conv_bn_gelu(rand, C, F_OUT, conv_bias):
    """Sequential Conv2d -> BatchNorm2d -> GELU in float64, BatchNorm with random weight, bias
    and running statistics."""
    bn = nn.BatchNorm2d(F_OUT, dtype=np.float64)
    bn.weight.data[...] = rand(F_OUT)
    bn.bias.data[...] = rand(F_OUT)
    bn.running_mean, bn.running_var = rand(F_OUT) * 0.1, rand(F_OUT) ** 2 * 0.1 + 0.2
    conv = nn.Conv2d(C, F_OUT, 3, padding=1, bias=conv_bias, dtype=np.float64, rng=backend.host_rng(0))
    return nn.Sequential([conv, bn, nn.GELU()])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_sequential_conv_batchnorm_gelu_gradients(xp, rand, training):
    """Sequential.backward chains the three backwards in reverse, and every parameter of the
    stack is checked under its state_dict name. In training mode the conv has no bias: see the
    next test for why its gradient would be exactly zero."""
    stack = _conv_bn_gelu(rand, 2, 3, conv_bias=not training).train(training)
    before = _buffers(stack)
    report = check_module(stack, rand(2, 2, 4, 5))
    names = ["input", "0.weight"] + ([] if training else ["0.bias"]) + ["1.weight", "1.bias"]
    assert [r.name for r in report.results] == names
    report.assert_ok(TOL)
    _assert_same_buffers(before, _buffers(stack))


def test_bias_before_training_batchnorm_gets_zero_gradient(xp, rand):
    """A per-channel constant added before a training-mode BatchNorm is removed with the batch
    mean, so its gradient is zero up to rounding (why conv layers followed by BN, like CvT's
    depthwise projections, have bias=False). A relative-error check of such an array compares
    rounding noise with 0, so it is tested against an absolute bound instead."""
    stack = _conv_bn_gelu(rand, 2, 3, conv_bias=True).train()
    out = stack(rand(2, 2, 4, 5))
    stack.backward(rand(*out.shape))
    assert float(abs(stack[0].weight.grad).max()) > 1e-2                 # the stack is not flat
    assert float(abs(stack[0].bias.grad).max()) < 1e-12
