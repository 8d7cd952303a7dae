"""Tests of the gradient checker itself (minicvt.gradcheck): a check that cannot fail proves
nothing, so here backwards with deliberate bugs must make assert_ok raise, naming the array
and the worst entry; float32 is refused; max_entries samples what it is asked to.
"""
import re

import numpy as np
import pytest

from minicvt import backend
from minicvt import functional as F
from minicvt import nn
from minicvt.gradcheck import check_function, check_module

TOL = 1e-7


def _linear_inputs(rand):
    return {"x": rand(2, 3, 4), "w": rand(4, 4), "b": rand(4)}


def test_correct_backward_passes(xp, rand):
    """The baseline the bugs below are measured against."""
    report = check_function(F.linear_forward, F.linear_backward, _linear_inputs(rand))
    assert report.assert_ok(TOL) is report
    assert report.max_error < 1e-9


def test_scaled_gradient_fails_with_the_expected_error(xp, rand):
    """dw scaled by 1.001: every entry of w has |a - n| / (|a| + |n|) = 0.001 / 2.001."""
    def backward(dout, cache):
        dx, dw, db = F.linear_backward(dout, cache)
        return dx, dw * 1.001, db

    report = check_function(F.linear_forward, backward, _linear_inputs(rand))
    assert report["w"].rel_error == pytest.approx(0.001 / 2.001, rel=1e-5)
    assert report["x"].rel_error < 1e-9 and report["b"].rel_error < 1e-9
    with pytest.raises(AssertionError, match=r"gradient check failed for w: rel_error 4\.998e-04"):
        report.assert_ok(TOL)


def test_transposed_weight_gradient_fails(xp, rand):
    """dw.T instead of dw (same shape for a square w: the classic silent bug)."""
    def backward(dout, cache):
        dx, dw, db = F.linear_backward(dout, cache)
        return dx, dw.T, db

    with pytest.raises(AssertionError, match=r"failed for w:"):
        check_function(F.linear_forward, backward, _linear_inputs(rand)).assert_ok(TOL)


def test_one_wrong_entry_is_named_by_its_index(xp, rand):
    """One entry of a conv weight gradient off by 1e-3: the message names w and that entry."""
    def backward(dout, cache):
        dx, dw, db = F.conv2d_backward(dout, cache)
        dw[1, 0, 2, 1] += 1e-3
        return dx, dw, db

    inputs = {"x": rand(1, 2, 5, 6), "w": rand(3, 2, 3, 3), "b": rand(3)}
    report = check_function(lambda x, w, b: F.conv2d_forward(x, w, b, 1, 1), backward, inputs)
    assert report["w"].index == (1, 0, 2, 1)
    assert report["x"].rel_error < 1e-9 and report["b"].rel_error < 1e-9
    with pytest.raises(AssertionError, match=re.escape("failed for w") + r".*index \(1, 0, 2, 1\)"):
        report.assert_ok(TOL)


def test_buggy_module_parameter_gradient_fails(xp, rand):
    """check_module compares param.grad: a module that mis-scales its weight gradient is
    named by its state_dict key."""
    class ScaledWeightGradLinear(nn.Linear):
        def backward(self, dout):
            dx = super().backward(dout)
            self.weight.grad *= 1.001
            return dx

    m = ScaledWeightGradLinear(4, 3, dtype=np.float64, rng=backend.host_rng(0))
    with pytest.raises(AssertionError, match=r"failed for weight:"):
        check_module(m, rand(2, 4)).assert_ok(TOL)


def test_dropout_without_reset_fails(xp, rand):
    """Without reseeding, each evaluation draws a new mask, so the finite differences do not
    measure the backward's function: the check must catch that rather than pass by luck."""
    m = nn.Dropout(0.5, rng=backend.BackendRNG(0))
    with pytest.raises(AssertionError, match=r"failed for input:"):
        check_module(m, rand(3, 4)).assert_ok(TOL)


def test_float32_is_refused(xp, rand):
    """Finite differences with h = 1e-3 in float32 would measure rounding, not the gradient."""
    with pytest.raises(ValueError, match=r"x is float32; finite differences need float64"):
        check_function(F.linear_forward, F.linear_backward,
                       {"x": rand(2, 4, dtype=np.float32), "w": rand(3, 4), "b": rand(3)})
    with pytest.raises(ValueError, match=r"input 0 is float32"):
        check_module(nn.Linear(4, 3, dtype=np.float64), rand(2, 4, dtype=np.float32))
    with pytest.raises(ValueError, match=r"weight is float32"):
        check_module(nn.Linear(4, 3), rand(2, 4))                  # float32 by default


def test_max_entries_samples_the_requested_number(xp, rand):
    inputs = {"x": rand(3, 4, 5), "w": rand(4, 5), "b": rand(4)}       # 60, 20 and 4 entries
    report = check_function(F.linear_forward, F.linear_backward, inputs, max_entries=7)
    assert [r.checked for r in report.results] == [7, 7, 4]         # b is smaller: all of it
    report.assert_ok(TOL)

    m = nn.Linear(5, 4, dtype=np.float64, rng=backend.host_rng(0))
    report = check_module(m, rand(3, 4, 5), max_entries=9)
    assert [r.checked for r in report.results] == [9, 9, 4]
    report.assert_ok(TOL)


def test_sampled_entries_depend_on_the_seed(xp, rand):
    """max_entries draws a fresh sample per seed: a bug in one entry is found by the seeds
    whose sample contains it, and the worst index is always a sampled, wrong one."""
    def backward(dout, cache):
        dx, dw, db = F.linear_backward(dout, cache)
        dw[2, 3] += 1e-3
        return dx, dw, db

    inputs = {"x": rand(3, 4, 5), "w": rand(4, 5), "b": rand(4)}
    caught = []
    for seed in range(8):
        report = check_function(F.linear_forward, backward, inputs, seed=seed, max_entries=10)
        if report["w"].rel_error > TOL:
            assert report["w"].index == (2, 3)
            caught.append(seed)
    # each seed samples 10 of the 20 entries of w, so some seeds see (2, 3) and some do not
    assert 0 < len(caught) < 8


def test_a_report_without_gradients_fails(xp, rand):
    """A backward that returns only None compared nothing, which is not a pass."""
    report = check_function(lambda x: F.gelu_forward(x), lambda dout, cache: None, {"x": rand(3)})
    with pytest.raises(AssertionError, match="compared nothing"):
        report.assert_ok(TOL)


def test_wrong_number_of_gradients_is_an_error(xp, rand):
    with pytest.raises(ValueError, match=r"returned 2 gradients for 3 inputs"):
        check_function(F.linear_forward, lambda dout, cache: F.linear_backward(dout, cache)[:2],
                       _linear_inputs(rand))


def test_check_module_passes_non_array_inputs_through(xp, rand):
    """A CvT block is called as block(x, H, W): H and W go to forward unchanged and only x
    (and the parameters) are differentiated."""
    from minicvt.models import Block
    blk = Block(4, 4, num_heads=2, qkv_bias=True, with_cls_token=False, method="dw_bn",
                kernel_size=3, stride_kv=2, stride_q=1, padding_kv=1, padding_q=1, dtype=np.float64,
                rng=np.random.default_rng(0))
    report = check_module(blk, rand(2, 12, 4), 3, 4, max_entries=6)
    assert report.results[0].name == "input" and report.results[0].checked == 6
    # proj_k.bias (and, with no class token, the key BN's bias) shifts every key score of a
    # query equally, which softmax ignores: the gradient is exactly zero, so a relative error
    # is meaningless; assert both sides are rounding-noise-sized instead
    zero = [r for r in report.results if r.name.endswith(("proj_k.bias", "conv_proj_k.bn.bias"))]
    assert len(zero) == 2 and all(abs(r.analytic) < 1e-12 and abs(r.numeric) < 1e-9 for r in zero)
    report.results = [r for r in report.results if r not in zero]
    report.assert_ok(1e-6)
