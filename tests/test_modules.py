"""Module machinery: the forward cache, gradient accumulation, no_grad, train/eval, names and
state dicts, dtype casts, and the behaviour of the stateful layers (BatchNorm statistics,
Sequential, attention maps, dropout)."""
import math

import numpy as np
import pytest

from minicvt import backend, nn
from minicvt import functional as F

f64 = np.float64


def host(a):
    return backend.to_numpy(a)


# -- Parameter and the forward cache ------------------------------------------------------------

def test_parameter_has_a_zero_grad_like_its_data(xp, rand):
    p = nn.Parameter(rand(3, 4, dtype=np.float32))
    assert backend.get_array_module(p.grad) is xp
    assert p.grad.shape == (3, 4) and p.grad.dtype == np.float32 and p.shape == (3, 4)
    assert not host(p.grad).any()


_SIMPLE = {
    "Linear": (lambda: nn.Linear(4, 3), (2, 4)),
    "Conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1), (1, 2, 4, 4)),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(2), (2, 2, 3, 3)),
    "GELU": (nn.GELU, (2, 4)),
    "Dropout": (lambda: nn.Dropout(0.5), (2, 4)),
    "TokenMean": (nn.TokenMean, (2, 3, 4)),
}


@pytest.mark.parametrize("name", sorted(_SIMPLE))
def test_backward_without_forward_names_the_module(xp, rand, name):
    make, x_shape = _SIMPLE[name]
    layer = make()
    with pytest.raises(RuntimeError, match=rf"^{name}\.backward called without a forward"):
        layer.backward(rand(*x_shape, dtype=np.float32))


@pytest.mark.parametrize("name", sorted(_SIMPLE))
def test_second_backward_after_one_forward_raises(xp, rand, name):
    make, x_shape = _SIMPLE[name]
    layer = make()
    out = layer(rand(*x_shape, dtype=np.float32))
    dout = backend.to_device(np.ones(out.shape, np.float32))
    layer.backward(dout)
    with pytest.raises(RuntimeError, match=rf"^{name}\.backward"):
        layer.backward(dout)


def test_gradients_accumulate_until_zero_grad(xp, rand):
    layer = nn.Linear(4, 3, dtype=f64)
    x, dout = rand(2, 5, 4), rand(2, 5, 3)
    layer(x)
    layer.backward(dout)
    once = {n: host(p.grad).copy() for n, p in layer.named_parameters()}
    assert all(g.any() for g in once.values())
    layer(x)
    layer.backward(dout)
    for n, p in layer.named_parameters():
        # g + g is exactly 2 g in floating point; the tolerance only allows a GPU matmul that
        # sums in a different order on the second call
        np.testing.assert_allclose(host(p.grad), 2 * once[n], rtol=1e-12, err_msg=n)
    layer.zero_grad()
    for n, p in layer.named_parameters():
        assert p.grad.shape == p.shape and p.grad.dtype == f64 and not host(p.grad).any(), n


def test_no_grad_keeps_no_cache_and_gives_the_same_output(xp, rand):
    layer = nn.Conv2d(2, 3, 3, padding=1, dtype=f64)
    x = rand(2, 2, 4, 4)
    out_with_grad = host(layer(x))
    layer.backward(rand(2, 3, 4, 4))                      # uses up the cache
    with nn.no_grad():
        assert not nn.grad_enabled()
        out = layer(x)
    assert nn.grad_enabled()
    np.testing.assert_array_equal(host(out), out_with_grad)
    with pytest.raises(RuntimeError, match="Conv2d.backward"):
        layer.backward(rand(2, 3, 4, 4))


@pytest.mark.parametrize("make", [lambda: nn.LayerNorm(4, dtype=f64), nn.QuickGELU, nn.GELU,
                                  lambda: nn.GELU("tanh")], ids=["LayerNorm", "QuickGELU", "GELU", "GELU-tanh"])
def test_no_grad_inference_forward_drops_an_earlier_cache(xp, rand, make):
    """These layers run a cheaper forward under no_grad (F.*_inference): same output, and the
    cache of a forward before it is gone, so a backward cannot use a stale one."""
    layer, x = make(), rand(2, 3, 4, scale=4.0)
    out_with_grad = host(layer(x))                        # leaves a cache
    with nn.no_grad():
        out = host(layer(x))
    np.testing.assert_allclose(out, out_with_grad, rtol=1e-15, atol=0)
    with pytest.raises(RuntimeError, match="without a forward"):
        layer.backward(rand(2, 3, 4))


def test_no_grad_is_restored_after_an_error():
    with pytest.raises(KeyError):
        with nn.no_grad():
            raise KeyError("boom")
    assert nn.grad_enabled()


# -- train / eval -------------------------------------------------------------------------------

def test_train_and_eval_reach_every_child(xp, rand):
    model = nn.Sequential([nn.BatchNorm2d(3, dtype=f64), nn.Sequential([nn.Dropout(0.5)])])
    modules = [m for _, m in model.named_modules()]
    assert len(modules) == 4 and all(m.training for m in modules)
    assert model.eval() is model
    assert not any(m.training for m in modules)
    model.train()
    assert all(m.training for m in modules)


def test_batchnorm_uses_batch_statistics_in_training_and_running_ones_in_eval(xp, rand):
    bn = nn.BatchNorm2d(3, dtype=f64)
    x = rand(4, 3, 2, 2)
    out = host(bn(x))
    # training: each channel normalised by its own batch statistics (biased variance)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0.0, atol=1e-12)
    xh = host(x)
    np.testing.assert_allclose(out.var(axis=(0, 2, 3)), xh.var(axis=(0, 2, 3)) / (xh.var(axis=(0, 2, 3)) + 1e-5))
    bn.eval()
    bn.load_state_dict({"running_mean": np.zeros(3), "running_var": np.ones(3)}, strict=False)
    # eval with mean 0, var 1 and the initial gamma 1, beta 0: just x / sqrt(1 + eps)
    np.testing.assert_allclose(host(bn(x)), xh / math.sqrt(1 + 1e-5), rtol=1e-14)


def test_dropout_is_active_only_in_training(xp):
    drop = nn.Dropout(0.5, rng=backend.BackendRNG(0))
    x = backend.to_device(np.ones((8, 16), np.float32))
    # 128 entries at p = 0.5: the chance that none is dropped is 2^-128
    assert (host(drop(x)) == 0).any()
    drop.eval()
    np.testing.assert_array_equal(host(drop(x)), host(x))


# -- names and state dicts ----------------------------------------------------------------------

class _MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)


class _Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv_proj = nn.Sequential([nn.DepthwiseConv2d(dim, 3, padding=1), nn.BatchNorm2d(dim)])
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = _MLP(dim)


class _Net(nn.Module):
    def __init__(self, dim=4, depth=2):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, 3, bias=False)


def _torch_net(dim=4, depth=2):
    """The same structure in PyTorch, the reference for the names."""
    torch = pytest.importorskip("torch")
    tnn = torch.nn

    class MLP(tnn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = tnn.Linear(dim, 2 * dim), tnn.Linear(2 * dim, dim)

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv_proj = tnn.Sequential(tnn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False),
                                            tnn.BatchNorm2d(dim))
            self.norm1 = tnn.LayerNorm(dim)
            self.mlp = MLP()

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = tnn.ModuleList([Block() for _ in range(depth)])
            self.head = tnn.Linear(dim, 3, bias=False)

    return Net()


def test_names_match_pytorch(xp):
    ours, theirs = _Net(), _torch_net()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    sd, tsd = ours.state_dict(), theirs.state_dict()
    assert set(sd) == set(tsd)
    for key in tsd:
        assert tuple(sd[key].shape) == tuple(tsd[key].shape), key


def test_state_dict_holds_dotted_names_and_buffers(xp):
    sd = _Net().state_dict()
    for key in ("blocks.0.conv_proj.0.weight", "blocks.1.mlp.fc2.bias", "blocks.0.norm1.weight",
                "head.weight", "blocks.1.conv_proj.1.running_mean",
                "blocks.1.conv_proj.1.running_var", "blocks.1.conv_proj.1.num_batches_tracked"):
        assert key in sd, key
    assert "head.bias" not in sd
    assert sd["blocks.0.conv_proj.1.num_batches_tracked"].dtype == np.int64


def test_module_list_names_its_children_by_index(xp):
    blocks = nn.ModuleList([nn.Linear(2, 3), nn.Linear(3, 1)])
    assert [n for n, _ in blocks.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert len(blocks) == 2 and blocks[1].weight.shape == (1, 3)


def _random_state(module, seed=0):
    """Host float64 arrays of the right shapes for every key (integers for integer buffers)."""
    rng = np.random.default_rng(seed)
    return {k: (np.array(7) if v.dtype.kind == "i" else rng.standard_normal(v.shape))
            for k, v in module.state_dict().items()}


def test_load_state_dict_casts_into_the_module_dtype_and_backend(xp):
    net = _Net()                                           # float32
    state = _random_state(net)
    net.load_state_dict(state)
    for key, value in net.state_dict().items():
        assert backend.get_array_module(value) is xp, key
        want = state[key].astype(np.int64 if key.endswith("num_batches_tracked") else np.float32)
        assert value.dtype == want.dtype, key
        np.testing.assert_array_equal(host(value), want, err_msg=key)
    for name, p in net.named_parameters():
        assert p.grad.shape == p.shape and p.grad.dtype == np.float32, name


def test_load_state_dict_copies(xp):
    a, b = nn.Linear(3, 2, dtype=f64), nn.Linear(3, 2, dtype=f64)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(host(b.weight.data), host(a.weight.data))
    a.weight.data[...] = 0.0                               # training a must not move b
    assert host(b.weight.data).any()


def test_load_state_dict_rejects_missing_and_unexpected_keys(xp):
    net = _Net()
    state = _random_state(net)
    del state["blocks.1.mlp.fc1.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['blocks\.1\.mlp\.fc1\.bias'\]"):
        net.load_state_dict(state)
    state = _random_state(net)
    state["head.bias"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"unexpected keys \['head\.bias'\]"):
        net.load_state_dict(state)
    net.load_state_dict(state, strict=False)               # non-strict: the extra key is ignored
    np.testing.assert_array_equal(host(net.head.weight.data), state["head.weight"].astype(np.float32))


def test_load_state_dict_rejects_wrong_shapes(xp):
    net = _Net()
    state = _random_state(net)
    state["blocks.0.mlp.fc1.weight"] = np.zeros((4, 8))
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight has shape \(4, 8\), expected \(8, 4\)"):
        net.load_state_dict(state)


def test_to_float64_casts_params_grads_and_float_buffers(xp):
    model = nn.Sequential([nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)])
    before = {k: host(v).copy() for k, v in model.state_dict().items()}
    assert model.to(dtype=f64) is model
    for key, value in model.state_dict().items():
        want = np.int64 if key.endswith("num_batches_tracked") else f64
        assert value.dtype == want and backend.get_array_module(value) is xp, key
        np.testing.assert_array_equal(host(value), before[key], err_msg=key)   # float32 -> 64 is exact
    for name, p in model.named_parameters():
        assert p.grad.dtype == f64 and p.grad.shape == p.shape, name


def test_to_moves_dropout_streams_to_the_backend(xp):
    """A module moved with .to() draws its masks on the new backend (from the same key)."""
    name = "cupy" if xp.__name__ == "cupy" else "numpy"
    backend.set_backend("numpy")                        # built on the host, then moved
    model = nn.Sequential([nn.Linear(4, 4), nn.Dropout(0.5, rng=backend.BackendRNG(3)), nn.DropPath(0.5)])
    model.to(name)
    for m in (model[1], model[2]):
        assert backend.get_array_module(m.mask((2, 4), xp.float32)) is xp
        assert m.rng.backend == name


# -- BatchNorm running statistics -----------------------------------------------------------------

def test_batchnorm_running_statistics(xp, rand):
    bn = nn.BatchNorm2d(3, dtype=f64)
    x1, x2 = rand(4, 3, 2, 3), rand(4, 3, 2, 3, scale=3.0)
    mean, var = np.zeros(3), np.ones(3)
    for x in (x1, x2):
        bn(x)
        xh = host(x)
        # PyTorch's rule: momentum 0.1, running variance from the unbiased batch variance
        mean = 0.9 * mean + 0.1 * xh.mean(axis=(0, 2, 3))
        var = 0.9 * var + 0.1 * xh.var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(host(bn.running_mean), mean, rtol=1e-13)
    np.testing.assert_allclose(host(bn.running_var), var, rtol=1e-13)
    assert int(bn.num_batches_tracked) == 2
    bn.eval()
    bn(rand(4, 3, 2, 3, scale=5.0))
    np.testing.assert_allclose(host(bn.running_mean), mean, rtol=1e-13)
    np.testing.assert_allclose(host(bn.running_var), var, rtol=1e-13)
    assert int(bn.num_batches_tracked) == 2


# -- Sequential -----------------------------------------------------------------------------------

class _Logged(nn.Module):
    """Doubles its input and writes each call into a shared log."""

    def __init__(self, tag, log):
        super().__init__()
        self.tag, self.log = tag, log

    def forward(self, x):
        self.log.append(("forward", self.tag))
        self._save(True)
        return 2.0 * x

    def backward(self, dout):
        self._take()
        self.log.append(("backward", self.tag))
        return 2.0 * dout


def test_sequential_calls_forward_in_order_and_backward_in_reverse(xp, rand):
    log = []
    seq = nn.Sequential([_Logged("a", log), _Logged("b", log), _Logged("c", log)])
    seq.backward(seq(rand(2)))
    assert log == [("forward", "a"), ("forward", "b"), ("forward", "c"),
                   ("backward", "c"), ("backward", "b"), ("backward", "a")]


def test_sequential_composes_the_layers(xp, rand):
    fc1, act, fc2 = nn.Linear(4, 3, dtype=f64), nn.GELU(), nn.Linear(3, 2, dtype=f64)
    seq = nn.Sequential([fc1, act, fc2])
    x, dout = rand(5, 4), rand(5, 2)
    out = seq(x)
    dx = seq.backward(dout)
    # the same chain written out with the pure functions
    h1, c1 = F.linear_forward(x, fc1.weight.data, fc1.bias.data)
    h2, c2 = F.gelu_forward(h1)
    y, c3 = F.linear_forward(h2, fc2.weight.data, fc2.bias.data)
    d2, dw2, _ = F.linear_backward(dout, c3)
    d1, dw1, _ = F.linear_backward(F.gelu_backward(d2, c2), c1)
    np.testing.assert_array_equal(host(out), host(y))
    np.testing.assert_array_equal(host(dx), host(d1))
    np.testing.assert_array_equal(host(fc1.weight.grad), host(dw1))
    np.testing.assert_array_equal(host(fc2.weight.grad), host(dw2))


# -- attention maps ------------------------------------------------------------------------------

def test_keep_attention_stores_the_probabilities(xp, rand):
    N, Tq, Tk, h, C = 2, 5, 3, 2, 8
    attn = nn.ScaledDotProductAttention(h)
    q, k, v = rand(N, Tq, C), rand(N, Tk, C), rand(N, Tk, C)
    attn(q, k, v)
    assert attn.attention is None                          # off by default: nothing is kept
    attn.keep_attention = True
    attn(q, k, v)
    p = host(attn.attention)
    assert p.shape == (N, h, Tq, Tk)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-14)
    # the same maps from a per-head loop: head i owns channels i*d .. (i+1)*d
    d = C // h
    qh, kh = host(q), host(k)
    for i in range(h):
        s = qh[:, :, i * d:(i + 1) * d] @ kh[:, :, i * d:(i + 1) * d].transpose(0, 2, 1) / math.sqrt(d)
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        np.testing.assert_allclose(p[:, i], e / e.sum(axis=-1, keepdims=True), rtol=1e-12)
    attn.keep_attention = False
    attn(q, k, v)
    assert attn.attention is None


# -- dropout ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("p, training", [(0.0, True), (0.5, False)])
def test_dropout_identity_cases_pass_dout_through(xp, rand, p, training):
    drop = nn.Dropout(p).train(training)
    x, dout = rand(3, 4), rand(3, 4)
    np.testing.assert_array_equal(host(drop(x)), host(x))
    np.testing.assert_array_equal(host(drop.backward(dout)), host(dout))


def test_dropout_mask_keeps_one_minus_p_and_preserves_the_mean(xp):
    p, n = 0.3, 200_000
    drop = nn.Dropout(p, rng=backend.BackendRNG(1))
    x = backend.to_device(np.ones((400, n // 400), np.float32))
    out = host(drop(x))
    scale = np.float32(1.0 / (1.0 - p))          # kept entries, rounded to float32 once
    assert out.dtype == np.float32
    assert set(np.unique(out)) == {np.float32(0.0), scale}
    # kept fraction ~ Binomial(n, 0.7) / n: standard deviation sqrt(0.21 / n) ~ 0.001, bound 10x
    assert abs((out != 0).mean() - (1.0 - p)) < 0.01
    # E[out] = 1 for x = 1; standard deviation sqrt(p / (1 - p) / n) ~ 0.0015, bound 10x
    assert abs(out.mean(dtype=np.float64) - 1.0) < 0.015
    dout = backend.to_device(np.full(out.shape, 3.0, np.float32))
    dx = host(drop.backward(dout))
    np.testing.assert_array_equal(dx, 3.0 * out)           # the same mask scales the gradient


def test_dropout_modules_built_without_rng_draw_different_masks(xp, monkeypatch):
    """Each gets its own stream from the host default generator (reproducible after
    manual_seed), so two dropouts on the same input do not drop the same entries."""
    monkeypatch.setitem(backend._default_host, "rng", backend._default_host["rng"])  # restored after
    x = backend.to_device(np.ones((64, 64), np.float32))
    backend.manual_seed(5)
    a, b = nn.Dropout(0.5), nn.Dropout(0.5)
    ma, mb = backend.to_numpy(a(x)), backend.to_numpy(b(x))
    assert not np.array_equal(ma, mb)
    backend.manual_seed(5)
    assert np.array_equal(backend.to_numpy(nn.Dropout(0.5)(x)), ma)
