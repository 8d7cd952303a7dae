"""Every layer against PyTorch in float64: the forward, and the gradients of every input and
parameter for the same random upstream gradient g (torch via `.backward(g)`).

Skips as a whole where PyTorch is not installed. Our side runs on the backend under test
(`xp`); torch runs on the CPU. Torch tensors are created as float64 explicitly (the global
default dtype is never changed).

Tolerance: TOL = 1e-12 on the max-norm relative error max|ours - torch| / max|torch|. The
two sides use different summation orders over at most a few hundred float64 terms, so they
agree to about 1e-15; a wrong term shows up as O(1).
"""
import numpy as np
import pytest

from minicvt import backend, nn
from minicvt.kernels import ops as F      # the reference and the fast kernels, in turn

pytestmark = pytest.mark.usefixtures("both_kernels")

torch = pytest.importorskip("torch")
TF = torch.nn.functional
TOL = 1e-12


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny shapes gain nothing from threads, and the test machine's cores are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _leaf(a):
    """A float64 torch leaf tensor (a copy of the host array) that collects .grad."""
    return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True)


def _assert_close(name, ours, theirs, tol=TOL):
    a = backend.to_numpy(ours)
    b = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    assert a.shape == b.shape, f"{name}: shape {a.shape} vs torch {b.shape}"
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def _compare(our_forward, our_backward, torch_forward, arrays, seed=0):
    """Run both sides on the same host arrays (a dict name -> array, all differentiable) and
    the same upstream gradient; compare the output and the gradient of every array.
    our_backward(dout, cache) returns the gradients in the order of `arrays` (then None for
    an absent bias)."""
    leaves = {n: _leaf(a) for n, a in arrays.items()}
    out_t = torch_forward(**leaves)
    g = np.random.default_rng(seed).standard_normal(tuple(out_t.shape))
    out_t.backward(torch.tensor(g, dtype=torch.float64))

    out, cache = our_forward(**{n: backend.to_device(a) for n, a in arrays.items()})
    grads = our_backward(backend.to_device(g), cache)
    grads = grads if isinstance(grads, tuple) else (grads,)
    # layers without their bias still return a slot for db, which must then be None
    assert len(grads) >= len(arrays) and all(d is None for d in grads[len(arrays):])
    _assert_close("out", out, out_t)
    for (n, leaf), d in zip(leaves.items(), grads):
        _assert_close(f"d{n}", d, leaf.grad)


def _host(seed, *shape, scale=1.0):
    """(shape) standard-normal float64 host array from its own seed, times scale."""
    return np.random.default_rng(seed).standard_normal(shape) * scale


# ---------------------------------------------------------------------------------------------
# convolutions and linear
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape, F_out, kernel, stride, padding, bias", [
    ((2, 3, 7, 7), 4, 3, 1, 1, True),
    ((2, 3, 7, 6), 4, 3, 2, 1, True),
    ((2, 2, 6, 9), 3, 7, 1, 2, False),
    ((1, 3, 8, 5), 2, (3, 2), (2, 1), (1, 0), True),
    ((2, 4, 5, 5), 3, 1, 1, 0, False),
])
def test_conv2d(xp, x_shape, F_out, kernel, stride, padding, bias):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    arrays = {"x": _host(1, *x_shape), "w": _host(2, F_out, x_shape[1], kh, kw)}
    if bias:
        arrays["b"] = _host(3, F_out)
    _compare(lambda **a: F.conv2d_forward(**a, stride=stride, padding=padding), F.conv2d_backward,
             lambda **a: TF.conv2d(a["x"], a["w"], a.get("b"), stride, padding),
             arrays)


@pytest.mark.parametrize("kernel, stride, padding, bias", [
    (3, 1, 1, False), (3, 2, 1, True), ((3, 5), (2, 1), (0, 2), True),
])
def test_depthwise_conv2d(xp, kernel, stride, padding, bias):
    C = 3
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    arrays = {"x": _host(1, 2, C, 7, 6), "w": _host(2, C, 1, kh, kw)}
    if bias:
        arrays["b"] = _host(3, C)
    _compare(lambda **a: F.depthwise_conv2d_forward(**a, stride=stride, padding=padding),
             F.depthwise_conv2d_backward,
             lambda **a: TF.conv2d(a["x"], a["w"], a.get("b"), stride, padding, groups=C),
             arrays)


@pytest.mark.parametrize("x_shape, bias", [((2, 3, 5), True), ((4, 5), False)])
def test_linear(xp, x_shape, bias):
    arrays = {"x": _host(1, *x_shape), "w": _host(2, 4, x_shape[-1])}
    if bias:
        arrays["b"] = _host(3, 4)
    _compare(F.linear_forward, F.linear_backward, lambda **a: TF.linear(a["x"], a["w"], a.get("b")), arrays)


# ---------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------

def _set_params(ours, theirs, gamma, beta):
    """The same affine parameters in both modules (not the 1/0 defaults, which hide bugs)."""
    ours.weight.data, ours.bias.data = backend.to_device(gamma), backend.to_device(beta)
    with torch.no_grad():
        theirs.weight.copy_(torch.tensor(gamma, dtype=torch.float64))
        theirs.bias.copy_(torch.tensor(beta, dtype=torch.float64))


def _module_step(ours, theirs, x, g):
    """One forward and backward of both modules from zeroed gradients; compare out and dx,
    and the parameter gradients."""
    ours.zero_grad()
    theirs.zero_grad()
    out = ours(backend.to_device(x))
    dx = ours.backward(backend.to_device(g))
    xt = _leaf(x)
    out_t = theirs(xt)
    out_t.backward(torch.tensor(g, dtype=torch.float64))
    _assert_close("out", out, out_t)
    _assert_close("dx", dx, xt.grad)
    _assert_close("dweight", ours.weight.grad, theirs.weight.grad)
    _assert_close("dbias", ours.bias.grad, theirs.bias.grad)


def test_batchnorm2d_train_then_eval(xp):
    """Three training steps (running statistics drift from their initial 0 / 1), then eval."""
    C = 3
    ours = nn.BatchNorm2d(C, dtype=np.float64)
    theirs = torch.nn.BatchNorm2d(C, dtype=torch.float64)
    _set_params(ours, theirs, _host(1, C), _host(2, C))
    for step in range(3):
        x = _host(10 + step, 2, C, 3, 4, scale=2.0) + step     # shifted so the mean moves
        _module_step(ours, theirs, x, _host(20 + step, 2, C, 3, 4))
    _assert_close("running_mean", ours.running_mean, theirs.running_mean)
    _assert_close("running_var", ours.running_var, theirs.running_var)
    assert int(backend.to_numpy(ours.num_batches_tracked)) == int(theirs.num_batches_tracked) == 3

    ours.eval()
    theirs.eval()
    _module_step(ours, theirs, _host(30, 2, C, 3, 4), _host(31, 2, C, 3, 4))
    _assert_close("running_mean after eval", ours.running_mean, theirs.running_mean)
    assert int(backend.to_numpy(ours.num_batches_tracked)) == 3   # eval leaves the count alone


def test_layernorm(xp):
    C = 6
    arrays = {"x": _host(1, 2, 5, C, scale=3.0) - 1.0, "gamma": _host(2, C), "beta": _host(3, C)}
    _compare(F.layernorm_forward, F.layernorm_backward,
             lambda x, gamma, beta: TF.layer_norm(x, (C,), gamma, beta, eps=1e-5), arrays)


# ---------------------------------------------------------------------------------------------
# activations, softmax, attention, dropout
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(xp, approximate):
    _compare(lambda x: F.gelu_forward(x, approximate), F.gelu_backward,
             lambda x: TF.gelu(x, approximate=approximate), {"x": _host(1, 3, 4, 5, scale=3.0)})


def test_quick_gelu(xp):
    _compare(F.quick_gelu_forward, F.quick_gelu_backward,
             lambda x: x * torch.sigmoid(1.702 * x), {"x": _host(1, 3, 4, 5, scale=3.0)})


_INFERENCE = {   # name: (ours, torch's forward, inputs): the forwards that cache nothing (no_grad)
    "gelu": (F.gelu_inference, TF.gelu, {"x": _host(1, 3, 4, 5, scale=3.0)}),
    "gelu_tanh": (lambda x: F.gelu_inference(x, "tanh"), lambda x: TF.gelu(x, approximate="tanh"),
                  {"x": _host(1, 3, 4, 5, scale=3.0)}),
    "quick_gelu": (F.quick_gelu_inference, lambda x: x * torch.sigmoid(1.702 * x),
                   {"x": _host(1, 3, 4, 5, scale=30.0)}),       # exp(-1.702 x) overflows for some
    "layernorm": (F.layernorm_inference, lambda x, gamma, beta: TF.layer_norm(x, (6,), gamma, beta, eps=1e-5),
                  {"x": _host(1, 2, 5, 6, scale=3.0) - 1.0, "gamma": _host(2, 6), "beta": _host(3, 6)}),
}


@pytest.mark.parametrize("name", list(_INFERENCE))
def test_inference_forward(xp, name):
    ours, theirs, arrays = _INFERENCE[name]
    out = ours(**{n: backend.to_device(a) for n, a in arrays.items()})
    _assert_close("out", out, theirs(**{n: torch.tensor(a, dtype=torch.float64) for n, a in arrays.items()}))


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax(xp, axis):
    _compare(lambda x: F.softmax_forward(x, axis), F.softmax_backward,
             lambda x: torch.softmax(x, dim=axis), {"x": _host(1, 2, 3, 4, 5, scale=3.0)})


def _torch_heads(a, h):
    """(N, T, C) -> (N, h, T, d)."""
    N, T, C = a.shape
    return a.view(N, T, h, C // h).transpose(1, 2)


def _torch_merge(a):
    """(N, h, T, d) -> (N, T, h*d)."""
    N, h, T, d = a.shape
    return a.transpose(1, 2).reshape(N, T, h * d)


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("scale", [None, 8 ** -0.5])          # default d^-1/2, and CvT's C^-1/2
def test_attention_vs_sdpa(xp, heads, scale):
    arrays = {"q": _host(1, 2, 5, 8), "k": _host(2, 2, 3, 8), "v": _host(3, 2, 3, 8)}   # Tq=5, Tk=3
    _compare(lambda q, k, v: F.attention_forward(q, k, v, heads, scale), F.attention_backward,
             lambda q, k, v: _torch_merge(TF.scaled_dot_product_attention(
                 _torch_heads(q, heads), _torch_heads(k, heads), _torch_heads(v, heads), scale=scale)),
             arrays)


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_vs_manual_torch(xp, heads):
    """Against softmax(q k^T * scale) v written in torch, including the probabilities cache[3]."""
    scale = 0.3
    arrays = {"q": _host(1, 2, 4, 6), "k": _host(2, 2, 7, 6), "v": _host(3, 2, 7, 6)}   # Tq=4, Tk=7
    probs = {}

    def manual(q, k, v):
        p = torch.softmax(_torch_heads(q, heads) @ _torch_heads(k, heads).transpose(-1, -2) * scale, dim=-1)
        probs["torch"] = p
        return _torch_merge(p @ _torch_heads(v, heads))

    def ours(q, k, v):
        out, cache = F.attention_forward(q, k, v, heads, scale)
        probs["ours"] = cache[3]
        return out, cache

    _compare(ours, F.attention_backward, manual, arrays)
    _assert_close("probabilities", probs["ours"], probs["torch"])


def test_dropout_same_mask(xp):
    """Torch draws the mask; it is recovered by dropping out a tensor of ones with the same
    seed, then handed to ours, so both sides drop and rescale the same entries."""
    p, shape = 0.3, (4, 5, 6)
    with torch.random.fork_rng():                             # leave torch's global RNG alone
        torch.manual_seed(7)
        mask = TF.dropout(torch.ones(shape, dtype=torch.float64), p, training=True).numpy()
    assert set(np.unique(mask)) == {0.0, 1.0 / (1.0 - p)}     # some kept, some dropped

    def torch_dropout(x):
        with torch.random.fork_rng():
            torch.manual_seed(7)
            return TF.dropout(x, p, training=True)

    _compare(lambda x: F.dropout_forward(x, backend.to_device(mask)), F.dropout_backward,
             torch_dropout, {"x": _host(1, *shape)})


# ---------------------------------------------------------------------------------------------
# pooling and loss
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel, stride, padding", [
    (3, 2, 1), (2, 2, 1), ((3, 2), (2, 1), (1, 0)), (2, 3, 0), (3, None, 1),
])
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avg_pool2d(xp, kernel, stride, padding, ceil_mode, count_include_pad):
    # H = 5 with kernel 2, stride 2, padding 1 and ceil_mode: the last window would start in
    # the right padding and is dropped
    _compare(lambda x: F.avg_pool2d_forward(x, kernel, stride, padding, ceil_mode, count_include_pad),
             F.avg_pool2d_backward,
             lambda x: TF.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad),
             {"x": _host(1, 2, 2, 5, 7)})


def test_token_mean(xp):
    _compare(F.token_mean_forward, F.token_mean_backward, lambda x: x.mean(dim=1), {"x": _host(1, 2, 5, 4)})


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
def test_cross_entropy(xp, label_smoothing):
    labels = np.random.default_rng(5).integers(0, 7, size=6)
    _compare(lambda logits: F.cross_entropy_forward(logits, backend.to_device(labels), label_smoothing),
             F.cross_entropy_backward,
             lambda logits: TF.cross_entropy(logits, torch.tensor(labels), label_smoothing=label_smoothing),
             {"logits": _host(1, 6, 7, scale=3.0)})


# ---------------------------------------------------------------------------------------------
# modules: state_dict layout and loading torch's weights
# ---------------------------------------------------------------------------------------------

f64 = torch.float64
_MODULES = {
    "conv": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, dtype=np.float64),
             lambda: torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, dtype=f64), (2, 3, 7, 6)),
    "conv_no_bias": (lambda: nn.Conv2d(3, 4, (3, 2), bias=False, dtype=np.float64),
                     lambda: torch.nn.Conv2d(3, 4, (3, 2), bias=False, dtype=f64), (2, 3, 5, 5)),
    "depthwise": (lambda: nn.DepthwiseConv2d(3, 3, padding=1, dtype=np.float64),
                  lambda: torch.nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False, dtype=f64), (2, 3, 5, 4)),
    "linear": (lambda: nn.Linear(5, 4, dtype=np.float64),
               lambda: torch.nn.Linear(5, 4, dtype=f64), (2, 3, 5)),
    "batchnorm": (lambda: nn.BatchNorm2d(3, dtype=np.float64),
                  lambda: torch.nn.BatchNorm2d(3, dtype=f64), (2, 3, 4, 5)),
    "layernorm": (lambda: nn.LayerNorm(6, dtype=np.float64),
                  lambda: torch.nn.LayerNorm(6, dtype=f64), (2, 4, 6)),
}


@pytest.mark.parametrize("name", list(_MODULES))
def test_module_state_dict_matches_torch(xp, name):
    make_ours, make_theirs, x_shape = _MODULES[name]
    ours, theirs = make_ours(), make_theirs()
    rng = np.random.default_rng(3)
    with torch.no_grad():
        for p in theirs.parameters():                         # not torch's init: any values
            p.copy_(torch.tensor(rng.standard_normal(tuple(p.shape)), dtype=f64))
        if name == "batchnorm":                                # give the running stats history
            for _ in range(2):
                theirs(torch.tensor(_host(4, *x_shape) * 2.0 + 1.0, dtype=f64))
    theirs.eval()

    sd = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    ours.load_state_dict(sd)
    ours.eval()
    x = _host(5, *x_shape)
    _assert_close("forward", ours(backend.to_device(x)), theirs(torch.tensor(x, dtype=f64)))
    if name == "batchnorm":
        assert int(backend.to_numpy(ours.num_batches_tracked)) == 2
