"""Dtypes are kept and mistakes are refused.

1. float32 in, float32 out: for every layer, functional and module, the output, dx and every
   parameter gradient keep the input dtype (a stray float64 constant or allocation would
   silently double memory and time on the GPU). The same for float64.
2. Mixing float32 and float64 is a ValueError naming the layer, never a silent promotion.
3. Wrong shapes and arguments are ValueErrors that name the layer and say what was expected
   and what arrived.
"""
import inspect
import re

import numpy as np
import pytest

from minicvt import backend, nn
from minicvt.collectives import SingleProcess, ThreadWorld
from minicvt import functional as F
from minicvt.nn import layers

DTYPES = [np.float32, np.float64]


# -- 1. every functional layer keeps its dtype -----------------------------------------------------
# Each case runs forward and backward in dtype dt and returns {name: array} of everything that
# must come out in dt. The key is the forward function the case exercises.

def _conv2d(rand, dt):
    x, w, b = rand(2, 3, 5, 5, dtype=dt), rand(4, 3, 3, 3, dtype=dt), rand(4, dtype=dt)
    out, cache = F.conv2d_forward(x, w, b, stride=2, padding=1)
    dx, dw, db = F.conv2d_backward(rand(*out.shape, dtype=dt), cache)
    return dict(out=out, dx=dx, dw=dw, db=db)


def _im2col(rand, dt):
    x = rand(2, 3, 5, 5, dtype=dt)
    cols = F.im2col(x, 3, stride=2, padding=1)
    return dict(cols=cols, x_back=F.col2im(cols, x.shape, 3, stride=2, padding=1))


def _depthwise(rand, dt):
    x, w, b = rand(2, 3, 5, 5, dtype=dt), rand(3, 1, 3, 3, dtype=dt), rand(3, dtype=dt)
    out, cache = F.depthwise_conv2d_forward(x, w, b, stride=2, padding=1)
    dx, dw, db = F.depthwise_conv2d_backward(rand(*out.shape, dtype=dt), cache)
    return dict(out=out, dx=dx, dw=dw, db=db)


def _linear(rand, dt):
    x, w, b = rand(2, 4, 6, dtype=dt), rand(5, 6, dtype=dt), rand(5, dtype=dt)
    out, cache = F.linear_forward(x, w, b)
    dx, dw, db = F.linear_backward(rand(*out.shape, dtype=dt), cache)
    return dict(out=out, dx=dx, dw=dw, db=db)


def _batchnorm(training):
    def run(rand, dt):
        x = rand(2, 3, 3, 4, dtype=dt)
        gamma, beta, mean, var = (rand(3, dtype=dt) for _ in range(4))
        out, cache, (new_mean, new_var) = F.batchnorm2d_forward(x, gamma, beta, mean, var * var, training)
        dx, dgamma, dbeta = F.batchnorm2d_backward(rand(*out.shape, dtype=dt), cache)
        return dict(out=out, dx=dx, dgamma=dgamma, dbeta=dbeta, running_mean=new_mean, running_var=new_var)
    return run


def _sync_batchnorm(training):
    """Two ThreadWorld ranks, so the dtype is kept through the all-reduces too."""
    def run(rand, dt):
        xs = [rand(2, 3, 3, 4, dtype=dt), rand(1, 3, 3, 4, dtype=dt)]
        gamma, beta, mean, var = (rand(3, dtype=dt) for _ in range(4))
        douts = [rand(*x.shape, dtype=dt) for x in xs]

        def rank(comm):
            out, cache, stats = F.sync_batchnorm2d_forward(xs[comm.rank], gamma, beta, mean, var * var, training,
                                                           comm)
            return (out, *stats, *F.sync_batchnorm2d_backward(douts[comm.rank], cache, comm))

        names = ("out", "running_mean", "running_var", "dx", "dgamma", "dbeta")
        return {f"rank{r} {n}": a for r, arrays in enumerate(ThreadWorld(2).run(rank))
                for n, a in zip(names, arrays)}
    return run


def _layernorm(rand, dt):
    x, gamma, beta = rand(2, 4, 6, dtype=dt), rand(6, dtype=dt), rand(6, dtype=dt)
    out, cache = F.layernorm_forward(x, gamma, beta)
    dx, dgamma, dbeta = F.layernorm_backward(rand(*out.shape, dtype=dt), cache)
    return dict(out=out, dx=dx, dgamma=dgamma, dbeta=dbeta)


def _gelu(approximate):
    def run(rand, dt):
        x = rand(3, 5, dtype=dt)
        out, cache = F.gelu_forward(x, approximate)
        return dict(out=out, dx=F.gelu_backward(rand(3, 5, dtype=dt), cache))
    return run


def _quick_gelu(rand, dt):
    out, cache = F.quick_gelu_forward(rand(3, 5, dtype=dt))
    return dict(out=out, dx=F.quick_gelu_backward(rand(3, 5, dtype=dt), cache))


def _softmax(rand, dt):
    out, cache = F.softmax_forward(rand(3, 5, dtype=dt))
    return dict(out=out, dx=F.softmax_backward(rand(3, 5, dtype=dt), cache))


def _attention(rand, dt):
    q, k, v = rand(2, 9, 8, dtype=dt), rand(2, 4, 8, dtype=dt), rand(2, 4, 8, dtype=dt)
    out, cache = F.attention_forward(q, k, v, num_heads=2)
    dq, dk, dv = F.attention_backward(rand(*out.shape, dtype=dt), cache)
    return dict(out=out, attention=cache[3], dq=dq, dk=dk, dv=dv)


def _dropout(rand, dt):
    x = rand(3, 5, dtype=dt)
    mask = F.dropout_mask(backend.BackendRNG(0), x.shape, 0.3, dt)
    out, cache = F.dropout_forward(x, mask)
    return dict(mask=mask, out=out, dx=F.dropout_backward(rand(3, 5, dtype=dt), cache))


def _avg_pool(rand, dt):
    out, cache = F.avg_pool2d_forward(rand(2, 3, 5, 6, dtype=dt), 3, 2, 1, ceil_mode=True)
    return dict(out=out, dx=F.avg_pool2d_backward(rand(*out.shape, dtype=dt), cache))


def _token_mean(rand, dt):
    out, cache = F.token_mean_forward(rand(2, 4, 6, dtype=dt))
    return dict(out=out, dx=F.token_mean_backward(rand(*out.shape, dtype=dt), cache))


def _cross_entropy(rand, dt):
    labels = backend.to_device(np.array([0, 4, 2]))
    loss, cache = F.cross_entropy_forward(rand(3, 5, dtype=dt), labels, label_smoothing=0.1)
    return dict(loss=loss, dlogits=F.cross_entropy_backward(1.0, cache))


FUNCTIONAL = {
    "conv2d_forward": _conv2d, "im2col": _im2col, "depthwise_conv2d_forward": _depthwise,
    "linear_forward": _linear, "batchnorm2d_forward[train]": _batchnorm(True),
    "batchnorm2d_forward[eval]": _batchnorm(False), "layernorm_forward": _layernorm,
    "sync_batchnorm2d_forward[train]": _sync_batchnorm(True),
    "sync_batchnorm2d_forward[eval]": _sync_batchnorm(False),
    "gelu_forward[none]": _gelu("none"), "gelu_forward[tanh]": _gelu("tanh"),
    "quick_gelu_forward": _quick_gelu, "softmax_forward": _softmax, "attention_forward": _attention,
    "dropout_forward": _dropout, "avg_pool2d_forward": _avg_pool, "token_mean_forward": _token_mean,
    "cross_entropy_forward": _cross_entropy,
}


def _assert_dtype(arrays, dt, xp):
    for name, a in arrays.items():
        assert a.dtype == dt, f"{name} is {a.dtype}, expected {np.dtype(dt)}"
        assert backend.get_array_module(a) is xp, f"{name} left the active backend"


def test_every_functional_layer_has_a_dtype_case():
    forwards = {n for n in dir(F) if n.endswith("_forward")}
    assert forwards <= {name.split("[")[0] for name in FUNCTIONAL}


@pytest.mark.parametrize("dt", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", sorted(FUNCTIONAL))
def test_functional_keeps_dtype(xp, rand, case, dt):
    _assert_dtype(FUNCTIONAL[case](rand, dt), dt, xp)


# -- 1b. every module keeps its dtype --------------------------------------------------------------
# Each case builds a module (float32 by default; the test casts it with .to) and its inputs.

MODULES = {
    "Conv2d": lambda r, dt: (nn.Conv2d(3, 4, 3, stride=2, padding=1), (r(2, 3, 5, 6, dtype=dt),)),
    "DepthwiseConv2d": lambda r, dt: (nn.DepthwiseConv2d(3, 3, stride=2, padding=1, bias=True),
                                      (r(2, 3, 5, 6, dtype=dt),)),
    "Linear": lambda r, dt: (nn.Linear(6, 5), (r(2, 4, 6, dtype=dt),)),
    "BatchNorm2d[train]": lambda r, dt: (nn.BatchNorm2d(3), (r(2, 3, 3, 4, dtype=dt),)),
    "BatchNorm2d[eval]": lambda r, dt: (nn.BatchNorm2d(3).eval(), (r(2, 3, 3, 4, dtype=dt),)),
    "SyncBatchNorm2d[train]": lambda r, dt: (nn.SyncBatchNorm2d(3, SingleProcess()), (r(2, 3, 3, 4, dtype=dt),)),
    "SyncBatchNorm2d[eval]": lambda r, dt: (nn.SyncBatchNorm2d(3, SingleProcess()).eval(),
                                            (r(2, 3, 3, 4, dtype=dt),)),
    "LayerNorm": lambda r, dt: (nn.LayerNorm(6), (r(2, 4, 6, dtype=dt),)),
    "GELU[none]": lambda r, dt: (nn.GELU(), (r(3, 5, dtype=dt),)),
    "GELU[tanh]": lambda r, dt: (nn.GELU("tanh"), (r(3, 5, dtype=dt),)),
    "QuickGELU": lambda r, dt: (nn.QuickGELU(), (r(3, 5, dtype=dt),)),
    "Dropout": lambda r, dt: (nn.Dropout(0.3, rng=backend.BackendRNG(0)), (r(3, 5, dtype=dt),)),
    "DropPath": lambda r, dt: (nn.DropPath(0.3, rng=backend.BackendRNG(0)), (r(4, 3, 5, dtype=dt),)),
    "AvgPool2d": lambda r, dt: (nn.AvgPool2d(3, 2, 1, ceil_mode=True), (r(2, 3, 5, 6, dtype=dt),)),
    "TokenMean": lambda r, dt: (nn.TokenMean(), (r(2, 4, 6, dtype=dt),)),
    "ScaledDotProductAttention": lambda r, dt: (
        nn.ScaledDotProductAttention(2), (r(2, 9, 8, dtype=dt), r(2, 4, 8, dtype=dt), r(2, 4, 8, dtype=dt))),
    "CrossEntropyLoss": lambda r, dt: (nn.CrossEntropyLoss(0.1),
                                       (r(3, 5, dtype=dt), backend.to_device(np.array([1, 0, 4])))),
}


def test_every_module_has_a_dtype_case():
    classes = {name for name, c in vars(layers).items()
               if inspect.isclass(c) and issubclass(c, nn.Module) and c.__module__ == layers.__name__
               and not name.startswith("_")}
    assert classes == {name.split("[")[0] for name in MODULES}


@pytest.mark.parametrize("dt", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", sorted(MODULES))
def test_module_keeps_dtype(xp, rand, case, dt):
    module, inputs = MODULES[case](rand, dt)
    module.to(dtype=dt)
    out = module(*inputs)
    if isinstance(module, nn.CrossEntropyLoss):
        dx = (module.backward(),)                         # dloss = 1.0, a Python float
    else:
        dx = module.backward(rand(*out.shape, dtype=dt))
        dx = dx if isinstance(dx, tuple) else (dx,)
    arrays = {"out": out, **{f"dx{i}": d for i, d in enumerate(dx)}}
    arrays.update({f"{n}.grad": p.grad for n, p in module.named_parameters()})
    # buffers written by the forward (BatchNorm's running statistics) keep the dtype too
    arrays.update({n: b for n, b in module.named_buffers() if n != "num_batches_tracked"})
    _assert_dtype(arrays, dt, xp)


# -- 2. mixed dtypes are refused --------------------------------------------------------------------

def _mixed(f):
    """Call f with a float32 maker for inputs and a float64 maker for weights."""
    def run(rand):
        return f(lambda *s: rand(*s, dtype=np.float32), lambda *s: rand(*s, dtype=np.float64))
    return run


MIXED = [
    ("conv2d", _mixed(lambda x, w: F.conv2d_forward(x(1, 2, 3, 3), w(2, 2, 3, 3), w(2))),
     r"^conv2d: all arrays must have the same dtype, got x=float32, w=float64"),
    ("depthwise_conv2d", _mixed(lambda x, w: F.depthwise_conv2d_forward(x(1, 2, 3, 3), w(2, 1, 3, 3))),
     r"^depthwise_conv2d: .*x=float32, w=float64"),
    ("linear", _mixed(lambda x, w: F.linear_forward(x(2, 3), w(4, 3))), r"^linear: .*x=float32, w=float64"),
    ("linear module", lambda rand: nn.Linear(3, 4, dtype=np.float64)(rand(2, 3, dtype=np.float32)),
     r"^linear: .*x=float32, w=float64"),
    ("batchnorm2d", _mixed(lambda x, w: F.batchnorm2d_forward(x(2, 2, 2, 2), w(2), w(2), w(2), w(2), True)),
     r"^batchnorm2d: .*x=float32, gamma=float64"),
    ("layernorm", _mixed(lambda x, w: F.layernorm_forward(x(2, 3), w(3), w(3))),
     r"^layernorm: .*x=float32, gamma=float64"),
    ("attention", _mixed(lambda x, w: F.attention_forward(x(1, 2, 4), w(1, 2, 4), w(1, 2, 4), 2)),
     r"^attention: .*q=float32, k=float64, v=float64"),
    ("dropout", _mixed(lambda x, w: F.dropout_forward(x(2, 3), w(2, 3))),
     r"^dropout: mask dtype float64 differs from x dtype float32"),
    ("conv2d integer x", lambda rand: F.conv2d_forward(backend.to_device(np.ones((1, 1, 3, 3), np.int64)),
                                                       rand(1, 1, 3, 3)),
     r"^conv2d: x must be float32 or float64, got int64"),
]


@pytest.mark.parametrize("call, pattern", [c[1:] for c in MIXED], ids=[c[0] for c in MIXED])
def test_mixed_dtypes_are_refused(xp, rand, call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(rand)


# -- 3. wrong shapes and arguments -----------------------------------------------------------------

def _s(shape):
    """The regex for a shape as the messages print it: (2, 4, 5, 5)."""
    return re.escape(str(tuple(shape)))


def _labels(*values, dtype=np.int64):
    return backend.to_device(np.array(values, dtype=dtype))


ERRORS = [
    ("conv2d channels", lambda r: F.conv2d_forward(r(2, 4, 5, 5), r(2, 3, 3, 3)),
     rf"^conv2d: x of shape {_s((2, 4, 5, 5))} has 4 channels but w of shape {_s((2, 3, 3, 3))} expects 3"),
    ("Conv2d module channels", lambda r: nn.Conv2d(3, 2, 3, dtype=np.float64)(r(2, 4, 5, 5)),
     rf"^conv2d: x of shape {_s((2, 4, 5, 5))} has 4 channels but w of shape {_s((2, 3, 3, 3))}"),
    ("conv2d x ndim", lambda r: F.conv2d_forward(r(4, 5, 5), r(2, 4, 3, 3)),
     rf"^conv2d: x must be 4-D \(N, C, H, W\), got shape {_s((4, 5, 5))}"),
    ("depthwise weight", lambda r: F.depthwise_conv2d_forward(r(2, 3, 5, 5), r(3, 2, 3, 3)),
     rf"^depthwise_conv2d: w must have shape \(3, 1, kh, kw\) for 3 channels, got {_s((3, 2, 3, 3))}"),
    ("linear in-features", lambda r: F.linear_forward(r(2, 4, 7), r(5, 6)),
     rf"^linear: x must have shape \(\.\.\., 6\) for w of shape {_s((5, 6))}, got {_s((2, 4, 7))}"),
    ("batchnorm channels", lambda r: nn.BatchNorm2d(3, dtype=np.float64)(r(2, 4, 3, 3)),
     rf"^batchnorm2d: gamma must have shape {_s((4,))}, got {_s((3,))}"),
    ("batchnorm one value", lambda r: nn.BatchNorm2d(3, dtype=np.float64)(r(1, 3, 1, 1)),
     rf"^batchnorm2d: training needs more than one value per channel, got input shape {_s((1, 3, 1, 1))}"),
    ("sync batchnorm one value", lambda r: nn.SyncBatchNorm2d(3, SingleProcess(), dtype=np.float64)(r(1, 3, 1, 1)),
     rf"^batchnorm2d: training needs more than one value per channel, got input shape {_s((1, 3, 1, 1))}"),
    ("layernorm channels", lambda r: nn.LayerNorm(6, dtype=np.float64)(r(2, 4, 5)),
     rf"^layernorm: x must have shape \(\.\.\., 6\), got {_s((2, 4, 5))}"),
    ("attention k/v tokens", lambda r: F.attention_forward(r(2, 5, 8), r(2, 3, 8), r(2, 4, 8), 2),
     rf"^attention: expected k and v of shape \(2, Tk, 8\) for q of shape {_s((2, 5, 8))}, "
     rf"got k {_s((2, 3, 8))}, v {_s((2, 4, 8))}"),
    ("attention k/v channels", lambda r: F.attention_forward(r(2, 5, 8), r(2, 3, 6), r(2, 3, 6), 2),
     rf"^attention: expected k and v of shape \(2, Tk, 8\) .* got k {_s((2, 3, 6))}, v {_s((2, 3, 6))}"),
    ("attention heads", lambda r: F.attention_forward(r(2, 5, 8), r(2, 5, 8), r(2, 5, 8), 3),
     r"^attention: 8 channels do not split into 3 heads"),
    ("cross_entropy label too large", lambda r: F.cross_entropy_forward(r(3, 5), _labels(0, 5, 2)),
     r"^cross_entropy: labels must lie in \[0, 5\), got range \[0, 5\]"),
    ("cross_entropy label negative", lambda r: F.cross_entropy_forward(r(3, 5), _labels(1, -1, 2)),
     r"^cross_entropy: labels must lie in \[0, 5\), got range \[-1, 2\]"),
    ("cross_entropy label dtype", lambda r: F.cross_entropy_forward(r(3, 5), _labels(0, 1, 2, dtype=np.float64)),
     rf"^cross_entropy: labels must be integers of shape {_s((3,))}, got float64 {_s((3,))}"),
    ("cross_entropy label shape", lambda r: F.cross_entropy_forward(r(3, 5), _labels([0], [1], [2])),
     rf"^cross_entropy: labels must be integers of shape {_s((3,))}, got int64 {_s((3, 1))}"),
    ("conv2d kernel too large", lambda r: F.conv2d_forward(r(1, 1, 3, 3), r(1, 1, 5, 5), padding=0),
     r"^conv2d: kernel \(5, 5\) does not fit input \(3, 3\) with padding \(0, 0\)"),
    ("depthwise kernel too large", lambda r: F.depthwise_conv2d_forward(r(1, 2, 3, 4), r(2, 1, 4, 4)),
     r"^depthwise_conv2d: kernel \(4, 4\) does not fit input \(3, 4\) with padding \(0, 0\)"),
    ("avg_pool kernel too large", lambda r: F.avg_pool2d_forward(r(1, 1, 3, 3), 5, 1),
     r"^avg_pool2d: kernel \(5, 5\) does not fit input \(3, 3\)"),
    ("Dropout p = 1", lambda r: nn.Dropout(1.0), r"^Dropout: p must be in \[0, 1\), got 1\.0"),
    ("Dropout p < 0", lambda r: nn.Dropout(-0.1), r"^Dropout: p must be in \[0, 1\), got -0\.1"),
    ("dropout_mask p > 1", lambda r: F.dropout_mask(backend.BackendRNG(0), (2, 3), 1.5, np.float64),
     r"^dropout: p must be in \[0, 1\), got 1\.5"),
    ("GELU approximate", lambda r: nn.GELU("exact"), r"^GELU: approximate must be 'none' or 'tanh', got 'exact'"),
    ("gelu approximate", lambda r: F.gelu_forward(r(2, 3), "erf"),
     r"^gelu: approximate must be 'none' or 'tanh', got 'erf'"),
    ("avg_pool padding", lambda r: F.avg_pool2d_forward(r(1, 1, 6, 6), 3, 1, padding=2),
     r"^avg_pool2d: padding \(2, 2\) must be at most half the kernel \(3, 3\)"),
]


@pytest.mark.parametrize("call, pattern", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_wrong_shapes_and_arguments_are_refused(xp, rand, call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(rand)


def test_batchnorm_eval_accepts_one_value_per_channel(xp, rand):
    # the one-value refusal is about batch statistics; eval uses the running ones and is fine
    out = nn.BatchNorm2d(3, dtype=np.float64).eval()(rand(1, 3, 1, 1))
    assert out.shape == (1, 3, 1, 1)


# -- promotions and inputs that used to slip through ---------------------------------------------

def test_cross_entropy_backward_keeps_float32_for_a_float64_dloss(xp, rand):
    logits = rand(4, 3, dtype=np.float32)
    labels = backend.to_device(np.array([0, 2, 1, 2]))
    loss, cache = F.cross_entropy_forward(logits, labels)
    for dloss in (np.float64(1.0), backend.to_device(np.array(2.0)), 1.0):
        assert F.cross_entropy_backward(dloss, cache).dtype == np.float32


def test_cross_entropy_refuses_an_empty_batch(xp, rand):
    with pytest.raises(ValueError, match=r"^cross_entropy: empty batch"):
        F.cross_entropy_forward(rand(0, 3), backend.to_device(np.zeros(0, np.int64)))


def test_attention_refuses_a_drop_mask_of_wrong_dtype_or_shape(xp, rand):
    q, k = rand(2, 5, 4, dtype=np.float32), rand(2, 3, 4, dtype=np.float32)
    with pytest.raises(ValueError, match=r"^attention: drop_mask must be float32 of shape \(2, 2, 5, 3\), got float64"):
        F.attention_forward(q, k, k, 2, drop_mask=rand(2, 2, 5, 3))
    with pytest.raises(ValueError, match=r"got float32 \(2, 2, 3, 5\)"):
        F.attention_forward(q, k, k, 2, drop_mask=rand(2, 2, 3, 5, dtype=np.float32))


@pytest.mark.parametrize("layer, call", [
    ("avg_pool2d", lambda x: F.avg_pool2d_forward(x.reshape(1, 1, 4, 6), 2)),
    ("token_mean", lambda x: F.token_mean_forward(x.reshape(1, 4, 6))),
])
def test_pooling_refuses_integer_input(xp, layer, call):
    x = backend.to_device(np.arange(24))
    with pytest.raises(ValueError, match=rf"^{layer}: x must be float32 or float64, got int64"):
        call(x)
