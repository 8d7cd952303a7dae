"""Every fast kernel (minicvt.fast) against its reference (minicvt.functional), in float64.

Each case runs a function of the fast set and the same function of the reference set
(minicvt.kernels.function) on the same inputs: the outputs, and the gradients of the backward
for one random upstream gradient, must agree within RTOL of the reference's largest entry.
Both sides compute the same sums in another order (threads, einsum, key-major scores, in-place
passes), so they differ by rounding, about 1e-16 of the values' size; a wrong index or a
missing term is O(1). Shapes are drawn at random from a fixed seed, plus the edge cases:
stride 2, padding 0, one token, one head, a batch of one image. Every case runs on NumPy
and on the emulated CuPy, and on NumPy once more with the thread pool splitting every array
into uneven blocks and tiny pieces (minicvt.fast.parallel), which the small shapes would
otherwise never reach. At the end, a whole CvT gives the same logits and gradients with
either set.
"""
import contextlib

import numpy as np
import pytest

from cvt_tiny import tiny_config
from minicvt import backend, fast, kernels, nn
from minicvt.fast import parallel
from minicvt.models import build_model

RTOL = 1e-12
SPLIT = dict(threads=3, min_elements=0, piece_bytes=64)      # every array through every thread path


@pytest.fixture(params=["as-is", "split"])
def threads(request, xp):
    if request.param == "split" and xp is not np:
        pytest.skip("threads are a NumPy path (CuPy runs each kernel as one call)")
    with parallel.settings(**SPLIT) if request.param == "split" else contextlib.nullcontext():
        yield request.param


def _same(fast_out, ref_out, what):
    a, b = backend.to_numpy(fast_out), backend.to_numpy(ref_out)
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    scale = float(np.abs(b).max()) if b.size else 0.0
    err = float(np.abs(a - b).max()) if b.size else 0.0
    assert err <= RTOL * scale, f"{what}: fast differs from the reference by {err:.3g} (largest entry {scale:.3g})"


def _both(name, *args, **kwargs):
    return (kernels.function(name, "fast")(*args, **kwargs),
            kernels.function(name, "reference")(*args, **kwargs))


def _forward_backward(name, args, kwargs=None, what=""):
    """name_forward on args with either set, outputs compared, then name_backward of each
    with the same random dout, every gradient compared; returns the reference's out."""
    kwargs = kwargs or {}
    (out_f, cache_f, *extra_f), (out_r, cache_r, *extra_r) = _both(f"{name}_forward", *args, **kwargs)
    _same(out_f, out_r, f"{name} {what} out")
    for i, (e_f, e_r) in enumerate(zip(extra_f, extra_r)):            # BatchNorm's running statistics
        for j, (a, b) in enumerate(zip(e_f, e_r)):
            _same(a, b, f"{name} {what} statistic {i}.{j}")
    dout = backend.to_device(np.random.default_rng(99).standard_normal(tuple(out_r.shape)))
    grads_f = kernels.function(f"{name}_backward", "fast")(dout, cache_f)
    grads_r = kernels.function(f"{name}_backward", "reference")(dout, cache_r)
    grads_f, grads_r = (g if isinstance(g, tuple) else (g,) for g in (grads_f, grads_r))
    assert len(grads_f) == len(grads_r)
    for i, (a, b) in enumerate(zip(grads_f, grads_r)):
        assert (a is None) == (b is None), f"{name} {what} gradient {i}"
        if a is not None:
            _same(a, b, f"{name} {what} gradient {i}")
    return out_r


def _shape_rng(seed):
    return np.random.default_rng(1000 + seed)


SEEDS = [0, 1, 2]


# -- convolutions -------------------------------------------------------------------------------

CONV_EDGES = [  # N, C, F, H, W, kernel, stride, padding
    (1, 3, 4, 5, 5, 3, 2, 0),              # one image, stride 2, padding 0
    (2, 2, 3, 7, 6, 3, 1, 1),
    (3, 1, 2, 4, 5, 1, 1, 0),              # 1x1 kernel
    (2, 3, 2, 6, 7, (3, 1), (2, 1), (1, 0)),
    (1, 2, 2, 1, 1, 1, 1, 0),              # one pixel: one token
]


def _conv_cases():
    cases = list(CONV_EDGES)
    for seed in SEEDS:
        r = _shape_rng(seed)
        k = int(r.choice([1, 3, 5]))
        cases.append((int(r.integers(1, 4)), int(r.integers(1, 5)), int(r.integers(1, 5)),
                      int(r.integers(k, 10)), int(r.integers(k, 10)), k, int(r.integers(1, 3)), int(r.integers(0, k // 2 + 1))))
    return cases


@pytest.mark.parametrize("case", _conv_cases(), ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d(xp, threads, rand, case, channels_last):
    N, C, F, H, W, kernel, stride, padding = case
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = rand(N, H, W, C) if channels_last else rand(N, C, H, W)
    for b in (rand(F), None):
        _forward_backward("conv2d", (x, rand(F, C, kh, kw), b, stride, padding, channels_last),
                          what=f"bias={b is not None}")


@pytest.mark.parametrize("case", _conv_cases(), ids=str)
def test_im2col_and_col2im(xp, threads, rand, case):
    N, C, _, H, W, kernel, stride, padding = case
    cols_f, cols_r = _both("im2col", rand(N, C, H, W), kernel, stride, padding)
    _same(cols_f, cols_r, "im2col")
    back_f, back_r = _both("col2im", cols_r * 1.5 + 1.0, (N, C, H, W), kernel, stride, padding)
    _same(back_f, back_r, "col2im")


@pytest.mark.parametrize("case", _conv_cases(), ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_conv2d(xp, threads, rand, case, channels_last):
    N, C, _, H, W, kernel, stride, padding = case
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = rand(N, H, W, C) if channels_last else rand(N, C, H, W)
    for b in (rand(C), None):
        _forward_backward("depthwise_conv2d", (x, rand(C, 1, kh, kw), b, stride, padding, channels_last),
                          what=f"bias={b is not None}")


@pytest.mark.parametrize("case", _conv_cases(), ids=str)
def test_depthwise_bn_inference(xp, threads, rand, case):
    N, C, _, H, W, kernel, stride, padding = case
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    args = (rand(N, H, W, C), rand(C, 1, kh, kw), rand(C), rand(C), rand(C), rand(C) ** 2 + 0.5, 1e-5, stride,
            padding, True)
    _same(*_both("depthwise_bn_inference", *args), "depthwise_bn_inference")


# -- normalisation ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 2, 3, 1), (2, 3, 4, 5), (3, 1, 1, 4)] +
                         [tuple(int(v) for v in _shape_rng(s).integers(1, 6, 4)) for s in SEEDS], ids=str)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batchnorm2d(xp, threads, rand, shape, training, channels_last):
    C = shape[3] if channels_last else shape[1]
    if training and np.prod(shape) // C < 2:
        shape = (shape[0] + 1,) + shape[1:]                  # training needs two values per channel
    args = (rand(*shape) * 2.0 + 0.5, rand(C), rand(C), rand(C), rand(C) ** 2 + 0.5, training)
    _forward_backward("batchnorm2d", args, dict(momentum=0.1, eps=1e-5, channels_last=channels_last))


TOKEN_SHAPES = [(1, 1, 4), (2, 5, 1), (3, 7, 6), (4, 6)] + \
               [tuple(int(v) for v in _shape_rng(s).integers(1, 9, 3)) for s in SEEDS]


@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=str)
def test_layernorm(xp, threads, rand, shape):
    args = (rand(*shape) * 3.0 - 1.0, rand(shape[-1]), rand(shape[-1]), 1e-5)
    out = _forward_backward("layernorm", args)
    _same(kernels.function("layernorm_inference", "fast")(*args), out, "layernorm_inference")


# -- activations ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=str)
@pytest.mark.parametrize("name, kwargs", [("gelu", {"approximate": "none"}), ("gelu", {"approximate": "tanh"}),
                                          ("quick_gelu", {})], ids=["gelu", "gelu_tanh", "quick_gelu"])
def test_activations(xp, threads, rand, shape, name, kwargs):
    x = rand(*shape, scale=30.0)                            # exp overflows for some entries
    out = _forward_backward(name, (x,), kwargs)
    _same(kernels.function(f"{name}_inference", "fast")(x, **kwargs), out, f"{name}_inference")


# -- softmax and attention --------------------------------------------------------------------------

@pytest.mark.parametrize("shape, axis", [((2, 3, 4), -1), ((2, 3, 4), -2), ((3, 5), 0), ((1, 1, 1), -1)], ids=str)
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_softmax(xp, threads, rand, shape, axis, scale):
    _forward_backward("softmax", (rand(*shape, scale=5.0), axis, scale))


ATTENTION_EDGES = [  # N, Tq, Tk, heads, d
    (1, 1, 1, 1, 4),         # one image, one token, one head
    (2, 5, 2, 1, 3),         # one head, Tq != Tk
    (2, 7, 3, 3, 2),
    (3, 1, 4, 2, 2),         # one query (a class token alone)
]


def _attention_cases():
    cases = list(ATTENTION_EDGES)
    for seed in SEEDS:
        r = _shape_rng(seed)
        cases.append(tuple(int(v) for v in (r.integers(1, 4), r.integers(1, 10), r.integers(1, 10),
                                            r.integers(1, 4), r.integers(1, 5))))
    return cases


@pytest.mark.parametrize("case", _attention_cases(), ids=str)
@pytest.mark.parametrize("dropout", [False, True])
def test_attention(xp, threads, rand, case, dropout):
    N, Tq, Tk, h, d = case
    mask = None
    if dropout:
        keep = np.random.default_rng(5).random((N, h, Tq, Tk)) >= 0.3
        mask = backend.to_device(keep / 0.7)
    for scale in (None, 0.4):
        _forward_backward("attention", (rand(N, Tq, h * d), rand(N, Tk, h * d), rand(N, Tk, h * d), h, scale, mask),
                          what=f"scale={scale}")


# -- linear ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_linear(xp, threads, rand, shape, bias):
    Cout = 3
    _forward_backward("linear", (rand(*shape), rand(Cout, shape[-1]), rand(Cout) if bias else None))


def test_every_fast_function_is_tested():
    """The cases above cover every name of minicvt.fast.FAST (a new fast kernel needs a case)."""
    covered = {"conv2d", "im2col", "col2im", "depthwise_conv2d", "depthwise_bn_inference", "batchnorm2d",
               "layernorm", "layernorm_inference", "gelu", "gelu_inference", "quick_gelu", "quick_gelu_inference",
               "softmax", "attention", "linear"}
    names = {n.removesuffix("_forward").removesuffix("_backward") for n in fast.FAST}
    assert names <= covered, names - covered


def test_a_cache_of_the_other_set_is_refused(rand):
    """Where the two sets' caches hold other arrays in the same places, a backward given the
    other set's cache (a forward and its backward run with different kernels) refuses it in one
    line rather than computing a wrong gradient."""
    x, w = rand(2, 5, 5, 3), rand(3, 1, 3, 3)
    calls = {"conv2d": (rand(4, 3, 3, 3), None, 1, 1, True), "depthwise_conv2d": (w, None, 1, 1, True),
             "batchnorm2d": (rand(3), rand(3), rand(3), rand(3) ** 2 + 0.5, True)}
    for name, args in calls.items():
        x_in = rand(2, 3, 4, 5) if name == "batchnorm2d" else x
        for made_by, used_by in (("fast", "reference"), ("reference", "fast")):
            out, cache, *_ = kernels.function(f"{name}_forward", made_by)(x_in, *args)
            with pytest.raises(TypeError, match="the same set of kernels") as refused:
                kernels.function(f"{name}_backward", used_by)(out, cache)
            assert "\n" not in str(refused.value)


# -- the whole model ----------------------------------------------------------------------------------

def _model_step(kernel_set, x, config):
    with kernels.use(kernel_set):
        model = build_model(config, seed=0, dtype=np.float64)
        logits = model.forward(x)
        dx = model.backward(backend.to_device(np.random.default_rng(4).standard_normal(tuple(logits.shape))))
        grads = {n: p.grad for n, p in model.named_parameters()}
        with nn.no_grad():
            inference = model.eval().forward(x)
        return logits, dx, grads, inference


@pytest.mark.parametrize("cls_token", [True, False])
def test_whole_model_is_the_same_with_either_set(xp, threads, cls_token):
    """Logits, the input's gradient and every parameter's gradient of a tiny CvT in train mode
    (batch statistics, drop path on: the masks come from the model's own stream, the same for
    both sets), and the inference logits (folded BatchNorm, inference forms) in eval mode.
    Each gradient within 1e-12 of its largest entry; one that is zero in exact arithmetic (the keys' bias: softmax ignores a shift
    shared by every key) is rounding noise on both sides, about 1e-18: 1e-15 absolute allows it."""
    config = tiny_config(cls_token=cls_token, drop_path_rate=(0.0, 0.3))
    x = backend.to_device(np.random.default_rng(3).standard_normal((3, 3, 16, 16)))
    fast_run, ref_run = _model_step("fast", x, config), _model_step("reference", x, config)
    for what, a, b in (("logits", fast_run[0], ref_run[0]), ("dx", fast_run[1], ref_run[1]),
                       ("inference logits", fast_run[3], ref_run[3])):
        _same(a, b, what)
    assert fast_run[2].keys() == ref_run[2].keys()
    for name in ref_run[2]:
        a, b = backend.to_numpy(fast_run[2][name]), backend.to_numpy(ref_run[2][name])
        assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max() + 1e-15, name
