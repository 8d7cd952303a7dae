"""The pieces the model adds to the core layers: DropPath (stochastic depth), the token/map
rearrangements with the class token's split and join, and the official initialisation."""
import numpy as np
import pytest

from minicvt import backend, gradcheck, nn
from minicvt.models import build_model
from minicvt.models.init import trunc_normal
from minicvt.models.tokens import cat_cls, map_to_tokens, split_cls, tokens_to_map


# -- DropPath ------------------------------------------------------------------------------------
def test_drop_path_gradcheck(xp, rand):
    """Linear in x for a fixed mask (held by reseeding before every forward): about 1e-10."""
    layer = nn.DropPath(0.4, rng=backend.BackendRNG(3))
    x = rand(6, 5, 4)
    report = gradcheck.check_module(layer, x, reset=lambda: layer.rng.seed(3)).assert_ok(1e-7)
    assert report["input"].checked == x.size


def test_drop_path_matches_timm_formula(xp, rand):
    """timm's drop_path: x / keep * floor(keep + u), u ~ U[0, 1) of shape (N, 1, 1); with the
    same u our mask (u >= p) / keep is the same, forward and backward (autograd)."""
    torch = pytest.importorskip("torch")
    p, N = 0.5, 8
    layer = nn.DropPath(p, rng=backend.BackendRNG(5))
    x = rand(N, 3, 4)
    out = layer.forward(x)
    dout = rand(N, 3, 4)
    dx = layer.backward(dout)
    u = torch.from_numpy(backend.to_numpy(backend.BackendRNG(5).random((N, 1, 1), dtype=np.float64)))
    xt = torch.from_numpy(backend.to_numpy(x).copy()).requires_grad_(True)
    keep = 1.0 - p
    out_t = xt.div(keep) * torch.floor(keep + u)
    out_t.backward(torch.from_numpy(backend.to_numpy(dout)))
    np.testing.assert_allclose(backend.to_numpy(out), out_t.detach().numpy(), rtol=1e-14, atol=0)
    np.testing.assert_allclose(backend.to_numpy(dx), xt.grad.numpy(), rtol=1e-14, atol=0)
    # whole samples are dropped or kept: every (T, C) slab is 0 or x / keep
    o, xn = backend.to_numpy(out), backend.to_numpy(x)
    for n in range(N):
        assert np.all(o[n] == 0) or np.allclose(o[n], xn[n] / keep, rtol=1e-15, atol=0)


def test_drop_path_rate_and_identity(xp):
    x = backend.to_device(np.ones((20000, 1, 1)))
    layer = nn.DropPath(0.3, rng=backend.BackendRNG(0))
    kept = float(backend.to_numpy(layer.forward(x) != 0).mean())
    # binomial with n = 20000: standard error sqrt(0.21 / 20000) = 0.0032; allow 4 of them
    assert abs(kept - 0.7) < 0.013
    assert layer.eval().forward(x) is x
    assert nn.DropPath(0.0).forward(x) is x
    with pytest.raises(ValueError):
        nn.DropPath(1.0)


# -- tokens and the class token ------------------------------------------------------------------
def test_token_layout_matches_rearrange(xp, rand):
    """'b c h w -> b (h w) c' as PyTorch's flatten(2).transpose(1, 2), and back."""
    torch = pytest.importorskip("torch")
    x = rand(2, 3, 4, 5)
    t = map_to_tokens(x)
    ref = torch.from_numpy(backend.to_numpy(x)).flatten(2).transpose(1, 2).numpy()
    np.testing.assert_array_equal(backend.to_numpy(t), ref)
    np.testing.assert_array_equal(backend.to_numpy(tokens_to_map(t, 4, 5)), backend.to_numpy(x))
    with pytest.raises(ValueError):
        tokens_to_map(t, 5, 5)


def test_rearrangements_are_adjoint(xp, rand):
    """<A x, y> == <x, A^T y>: tokens_to_map is map_to_tokens' backward, split is cat's."""
    x, y = rand(2, 3, 4, 5), rand(2, 20, 3)
    lhs = float((map_to_tokens(x) * y).sum())
    rhs = float((x * tokens_to_map(y, 4, 5)).sum())
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)
    cls, tok, z = rand(2, 1, 3), rand(2, 20, 3), rand(2, 21, 3)
    dcls, dtok = split_cls(z)
    lhs = float((cat_cls(cls, tok) * z).sum())
    rhs = float((cls * dcls).sum() + (tok * dtok).sum())
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)
    np.testing.assert_array_equal(backend.to_numpy(cat_cls(dcls, dtok)), backend.to_numpy(z))


# -- initialisation ------------------------------------------------------------------------------
def test_trunc_normal_matches_torch_distribution():
    """Same distribution as torch.nn.init.trunc_normal_ (the streams differ, so statistics):
    with tight bounds the truncation bites; mean and std agree within sampling error."""
    torch = pytest.importorskip("torch")
    n, std, a, b = 200_000, 1.0, -0.5, 1.5
    ours = trunc_normal(np.random.default_rng(0), (n,), std, a, b)
    torch.manual_seed(0)
    ref = torch.nn.init.trunc_normal_(torch.empty(n, dtype=torch.float64), 0.0, std, a, b).numpy()
    assert ours.min() >= a and ours.max() <= b
    # standard errors of the mean and the std are about s / sqrt(n) and s / sqrt(2n), s ~ 0.5
    assert abs(ours.mean() - ref.mean()) < 5 * 0.5 * np.sqrt(2.0 / n)
    assert abs(ours.std() - ref.std()) < 5 * 0.5 * np.sqrt(1.0 / n)
    # the official call trunc_normal_(std=.02) truncates at +-2 absolute: +-100 std, never hit
    w = trunc_normal(np.random.default_rng(1), (100_000,), 0.02)
    assert abs(w.std() - 0.02) < 5 * 0.02 / np.sqrt(2 * 100_000)


def test_official_initialisation(xp):
    model = build_model("cvt-cifar-s", seed=0)
    params = {k: backend.to_numpy(p.data) for k, p in model.named_parameters()}
    linear_w = np.concatenate([v.ravel() for k, v in params.items()
                               if k.endswith("weight") and v.ndim == 2])
    # std 0.02 over ~2.4M draws: the sample std is 0.02 to about 1e-5
    assert abs(linear_w.std() - 0.02) < 2e-4 and np.abs(linear_w).max() < 0.2
    for k, v in params.items():
        if ".blocks." in k and v.ndim == 1 and "bias" in k and "norm" not in k and "bn" not in k:
            assert np.all(v == 0), k                                    # Linear biases 0
        if ("norm" in k or ".bn." in k) and k.endswith("weight"):
            assert np.all(v == 1), k
        if ("norm" in k or ".bn." in k) and k.endswith("bias"):
            assert np.all(v == 0), k
    assert abs(params["stage2.cls_token"].std() - 0.02) < 0.005             # 256 draws
    # convolutions keep PyTorch's default U(+-1/sqrt(fan_in)): patch embedding, fan_in 3*3*3
    w = params["stage0.patch_embed.proj.weight"]
    assert np.abs(w).max() <= 1 / np.sqrt(27) and w.std() > 0.5 / np.sqrt(27) / np.sqrt(3)
    # the head's bias keeps PyTorch's default too, as the official code leaves it
    assert np.abs(params["head.bias"]).max() <= 1 / np.sqrt(256) and np.any(params["head.bias"] != 0)


def test_same_seed_same_weights_on_every_backend(xp):
    a = build_model("cvt-cifar-s", seed=3).state_dict()
    b = build_model("cvt-cifar-s", seed=3).state_dict()
    c = build_model("cvt-cifar-s", seed=4).state_dict()
    assert all(np.array_equal(backend.to_numpy(a[k]), backend.to_numpy(b[k])) for k in a)
    assert not np.array_equal(backend.to_numpy(a["head.weight"]), backend.to_numpy(c["head.weight"]))


# -- inference: BatchNorm folded into the depthwise convolution --------------------------------
def test_inference_folds_batchnorm_into_the_projection(xp):
    """Under no_grad in eval mode the convolutional projection runs one depthwise convolution
    with scaled filters and a bias instead of conv then BatchNorm: the same logits, float64,
    with running statistics away from 0 and 1 so the fold has something to do."""
    from cvt_tiny import tiny_config
    model = build_model(tiny_config(), seed=0, dtype=np.float64)
    rng = np.random.default_rng(5)
    for _, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            C = m.running_mean.shape[0]
            m.running_mean = backend.to_device(rng.standard_normal(C))
            m.running_var = backend.to_device(rng.uniform(0.3, 3.0, C))
            m.weight.data = backend.to_device(rng.standard_normal(C))
            m.bias.data = backend.to_device(rng.standard_normal(C))
    model.eval()
    x = backend.to_device(rng.standard_normal((3, 3, 16, 16)))
    unfolded = backend.to_numpy(model.forward(x))            # gradients on: conv, then BatchNorm
    calls = []
    bn_forward = nn.BatchNorm2d.forward
    nn.BatchNorm2d.forward = lambda self, x: calls.append(1) or bn_forward(self, x)
    try:
        with nn.no_grad():
            folded = backend.to_numpy(model.forward(x))
    finally:
        nn.BatchNorm2d.forward = bn_forward
    assert calls == []                                       # no BatchNorm pass was made
    np.testing.assert_allclose(folded, unfolded, rtol=1e-12, atol=1e-12)
