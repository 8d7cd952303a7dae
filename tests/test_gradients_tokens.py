"""Finite-difference gradient checks of the token-side layers: linear, the activations (GELU
exact and tanh, QuickGELU), softmax, attention, dropout, token_mean and cross_entropy
(pure functions and their modules), on every backend.

Float64, every input and parameter, a random upstream gradient (minicvt.gradcheck); asserted
below TOL. Shapes: N batch, T tokens (Tq queries, Tk keys/values), C channels, h heads, K classes.
"""
import numpy as np
import pytest

from minicvt import backend
from minicvt.kernels import ops as F      # the reference and the fast kernels, in turn
from minicvt import nn
from minicvt.gradcheck import check_function, check_module

pytestmark = pytest.mark.usefixtures("both_kernels")

TOL = 1e-7          # these layers give 1e-8 or less; no kinks here, so no case is looser


# -- linear -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead", [(4,), (2, 3), (2, 3, 2)], ids=["N-Cin", "N-T-Cin", "N-H-W-Cin"])
def test_linear_gradients(xp, rand, lead, bias):
    x, w = rand(*lead, 5), rand(3, 5)
    if bias:
        report = check_function(F.linear_forward, F.linear_backward, {"x": x, "w": w, "b": rand(3)})
    else:
        def backward(dout, cache):
            dx, dw, db = F.linear_backward(dout, cache)
            assert db is None, "a layer without bias returned a bias gradient"
            return dx, dw
        report = check_function(lambda x, w: F.linear_forward(x, w), backward, {"x": x, "w": w})
    assert [r.name for r in report.results] == ["x", "w", "b"][:3 if bias else 2]
    report.assert_ok(TOL)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_module_gradients(xp, rand, bias):
    m = nn.Linear(5, 3, bias=bias, dtype=np.float64, rng=backend.host_rng(0))
    report = check_module(m, rand(2, 4, 5))
    assert [r.name for r in report.results] == ["input", "weight"] + (["bias"] if bias else [])
    report.assert_ok(TOL)


# -- activations --------------------------------------------------------------------------------
# [-6, 6] is covered in three arrays. The finite-difference noise is about 1e-16 |<g, f(x)>| / h,
# so next to O(1) values the left tail, where GELU' is ~1e-8, would drown in it (a limit of
# finite differences, not of the backward): the tail gets an array of its own scale.
BANDS = [
    pytest.param((-6.0, -4.5), id="left-tail[-6,-4.5]"),
    pytest.param((-4.5, 0.0), id="negative[-4.5,0]"),
    pytest.param((0.0, 6.0), id="positive[0,6]"),
]


def _band(lo, hi):
    """12 points from lo to hi, as a (3, 4) float64 array on the active backend."""
    return backend.to_device(np.linspace(lo, hi, 12).reshape(3, 4))


@pytest.mark.parametrize("band", BANDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"], ids=["exact", "tanh"])
def test_gelu_gradients(xp, approximate, band):
    report = check_function(lambda x: F.gelu_forward(x, approximate), F.gelu_backward,
                            {"x": _band(*band)})
    report.assert_ok(TOL)


@pytest.mark.parametrize("band", BANDS)
def test_quick_gelu_gradients(xp, band):
    check_function(F.quick_gelu_forward, F.quick_gelu_backward, {"x": _band(*band)}).assert_ok(TOL)


@pytest.mark.parametrize("module", [
    pytest.param(lambda: nn.GELU(), id="GELU-exact"),
    pytest.param(lambda: nn.GELU("tanh"), id="GELU-tanh"),
    pytest.param(lambda: nn.QuickGELU(), id="QuickGELU"),
])
def test_activation_module_gradients(xp, rand, module):
    check_module(module(), rand(2, 3, 4, scale=2.0)).assert_ok(TOL)


# -- softmax ------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0.0, 1000.0], ids=["offset0", "offset1000"])
@pytest.mark.parametrize("axis", [-1, 1], ids=["last-axis", "axis1"])
def test_softmax_gradients(xp, rand, axis, offset):
    """With +1000 a naive exp() overflows to inf; the max-subtracted form stays finite, and
    its gradient is unchanged (softmax ignores a constant shift)."""
    x = rand(2, 3, 5, scale=2.0) + offset
    p, _ = F.softmax_forward(x, axis)
    p = backend.to_numpy(p)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=axis), 1.0, rtol=0, atol=1e-12)
    report = check_function(lambda x: F.softmax_forward(x, axis), F.softmax_backward, {"x": x})
    report.assert_ok(TOL)


@pytest.mark.parametrize("axis", [-1, 0], ids=["last-axis", "axis0"])
def test_softmax_with_scale(xp, rand, axis):
    """softmax(scale * x), the scale applied inside (attention's): equal to scaling first, and
    its gradient is the scaled one; a scale that is not positive is refused."""
    x = rand(3, 4, 5, scale=2.0) + 50.0
    p, _ = F.softmax_forward(x, axis, 0.3)
    want, _ = F.softmax_forward(x * 0.3, axis)
    np.testing.assert_allclose(backend.to_numpy(p), backend.to_numpy(want), rtol=1e-12, atol=1e-15)
    check_function(lambda x: F.softmax_forward(x, axis, 0.3), F.softmax_backward, {"x": x}).assert_ok(TOL)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="softmax: scale must be positive"):
            F.softmax_forward(x, axis, bad)


# -- attention ----------------------------------------------------------------------------------

@pytest.mark.parametrize("N, Tq, Tk, C, heads, scale", [
    pytest.param(2, 9, 4, 4, 1, None, id="n2-q9-k4-C4-h1"),
    pytest.param(1, 16, 4, 8, 2, "C", id="n1-q16-k4-C8-h2-scaleC"),
    pytest.param(2, 3, 7, 8, 4, None, id="n2-q3-k7-C8-h4"),            # Tq < Tk
    pytest.param(1, 9, 4, 8, 4, "C", id="n1-q9-k4-C8-h4-scaleC"),
    pytest.param(2, 5, 5, 6, 2, None, id="n2-q5-k5-C6-h2"),
])
def test_attention_gradients(xp, rand, N, Tq, Tk, C, heads, scale):
    """scale None is d ** -0.5; 'C' is C ** -0.5, the official CvT code's choice."""
    scale = C ** -0.5 if scale == "C" else None
    report = check_function(lambda q, k, v: F.attention_forward(q, k, v, heads, scale),
                            F.attention_backward,
                            {"q": rand(N, Tq, C), "k": rand(N, Tk, C), "v": rand(N, Tk, C)})
    assert [r.name for r in report.results] == ["q", "k", "v"]
    report.assert_ok(TOL)


def test_attention_gradients_with_dropped_probabilities(xp, rand):
    """attn_drop: a fixed mask on the probabilities (N, h, Tq, Tk) enters the forward as
    p * mask and the backward through the same product."""
    N, Tq, Tk, C, h = 2, 5, 3, 8, 2
    mask = F.dropout_mask(backend.BackendRNG(1), (N, h, Tq, Tk), 0.3, np.float64)
    assert (backend.to_numpy(mask) == 0).any()
    check_function(lambda q, k, v: F.attention_forward(q, k, v, h, None, mask), F.attention_backward,
                   {"q": rand(N, Tq, C), "k": rand(N, Tk, C), "v": rand(N, Tk, C)}).assert_ok(TOL)


@pytest.mark.parametrize("heads, scale", [(2, None), (4, 8 ** -0.5)], ids=["h2", "h4-scaleC"])
def test_attention_module_gradients(xp, rand, heads, scale):
    m = nn.ScaledDotProductAttention(heads, scale)
    report = check_module(m, rand(2, 6, 8), rand(2, 3, 8), rand(2, 3, 8), input_names=["q", "k", "v"])
    assert [r.name for r in report.results] == ["q", "k", "v"]
    report.assert_ok(TOL)


# -- dropout ------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.25, 0.5], ids=["p0.25", "p0.5"])
def test_dropout_gradients(xp, rand, p):
    x = rand(3, 4, 5)
    mask = F.dropout_mask(backend.BackendRNG(3), x.shape, p, np.float64)
    values = set(np.unique(backend.to_numpy(mask)).tolist())
    assert values == {0.0, 1.0 / (1.0 - p)}                    # some dropped, some kept
    check_function(lambda x: F.dropout_forward(x, mask), F.dropout_backward, {"x": x}).assert_ok(TOL)


def test_dropout_module_gradients(xp, rand):
    """A fresh mask every forward would make the finite differences meaningless: `reset`
    reseeds the module's RNG before each forward, so every evaluation uses the same mask."""
    m = nn.Dropout(0.5, rng=backend.BackendRNG(7))
    check_module(m, rand(3, 4, 5), reset=lambda: m.rng.seed(7)).assert_ok(TOL)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: nn.Dropout(0.5).eval(), id="eval"),
    pytest.param(lambda: nn.Dropout(0.0), id="p0"),
])
def test_dropout_identity_gradients(xp, rand, make):
    """In eval mode, or with p = 0, dropout is the identity: out = x and dx = dout."""
    m = make()
    x, dout = rand(3, 4), rand(3, 4)
    assert np.array_equal(backend.to_numpy(m(x)), backend.to_numpy(x))
    assert np.array_equal(backend.to_numpy(m.backward(dout)), backend.to_numpy(dout))
    check_module(m, x).assert_ok(TOL)


# -- token_mean ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 4, 3), (2, 5, 3)], ids=["n1-T4-C3", "n2-T5-C3"])
def test_token_mean_gradients(xp, rand, shape):
    check_function(F.token_mean_forward, F.token_mean_backward, {"x": rand(*shape)}).assert_ok(TOL)
    check_module(nn.TokenMean(), rand(*shape)).assert_ok(TOL)


# -- cross_entropy ------------------------------------------------------------------------------

CE_CASES = [
    pytest.param([2], 5, 0.0, 0.0, id="n1-K5-ls0"),
    pytest.param([0, 3, 3, 1], 5, 0.0, 0.0, id="n4-K5-ls0"),
    pytest.param([1, 0, 2], 4, 0.1, 0.0, id="n3-K4-ls0.1"),
    pytest.param([4], 5, 0.1, 0.0, id="n1-K5-ls0.1"),
    pytest.param([3, 1], 4, 1.0, 0.0, id="n2-K4-ls1"),
    pytest.param([0, 2, 1], 3, 0.1, 1000.0, id="n3-K3-ls0.1-offset1000"),
    pytest.param([4], 5, 0.0, 1000.0, id="n1-K5-ls0-offset1000"),
]


@pytest.mark.parametrize("labels, K, label_smoothing, offset", CE_CASES)
def test_cross_entropy_gradients(xp, rand, labels, K, label_smoothing, offset):
    """logits + 1000 would overflow exp(); the loss goes through log-softmax of the
    max-shifted logits, so it stays finite and the gradient is unchanged."""
    y = backend.to_device(np.array(labels))
    logits = rand(len(labels), K, scale=2.0) + offset
    loss, _ = F.cross_entropy_forward(logits, y, label_smoothing)
    assert np.isfinite(backend.to_numpy(loss))
    report = check_function(lambda z: F.cross_entropy_forward(z, y, label_smoothing),
                            F.cross_entropy_backward, {"logits": logits})
    report.assert_ok(TOL)


class _LossOnFixedLabels(nn.Module):
    """CrossEntropyLoss with its labels held: check_module perturbs float64 inputs only, and
    integer labels are not differentiable, so they live in the wrapper."""

    def __init__(self, labels, label_smoothing):
        super().__init__()
        self.loss = nn.CrossEntropyLoss(label_smoothing)
        self.labels = labels

    def forward(self, logits):
        return self.loss(logits, self.labels)

    def backward(self, dout):
        return self.loss.backward(dout)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["ls0", "ls0.1"])
def test_cross_entropy_module_gradients(xp, rand, label_smoothing):
    m = _LossOnFixedLabels(backend.to_device(np.array([2, 0, 2])), label_smoothing)
    check_module(m, rand(3, 4, scale=2.0)).assert_ok(TOL)
