"""The whole CvT against an independent PyTorch implementation (tests/torch_cvt.py), in float64.

Weights are copied by name (our parameter names are the official state_dict keys); then the
logits, the cross-entropy loss, the input gradient, every parameter gradient and the BatchNorm
running statistics must agree to a relative 1e-9 (max |ours - torch| / max |torch| per array:
both sides do the same float64 arithmetic in different orders, so about 1e-14 is expected).
"""
import numpy as np
import pytest

from cvt_tiny import tiny_config
from minicvt import backend, nn
from minicvt.models import build_model, get_config

torch = pytest.importorskip("torch")
from torch_cvt import TorchCvT, spec_from_config  # noqa: E402

TOL = 1e-9


def rel_error(ours, ref):
    ours, ref = backend.to_numpy(ours).astype(np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / max(float(np.max(np.abs(ref))), 1e-300))


def twin_of(model):
    """The PyTorch model with our weights and buffers, by name."""
    cfg = model.config
    twin = TorchCvT(spec_from_config(cfg), cfg.num_classes, cfg.in_chans, cfg.act, cfg.attn_scale).double()
    state = {k: torch.from_numpy(backend.to_numpy(v).copy()) for k, v in model.state_dict().items()}
    twin.load_state_dict(state, strict=True)           # raises if any name or shape differs
    return twin


def randomise_bn_statistics(model, rng):
    """Non-trivial running statistics, so eval mode really uses them."""
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            C = m.running_mean.shape[0]
            m.running_mean = backend.to_device(rng.standard_normal(C) * 0.3, dtype=np.float64)
            m.running_var = backend.to_device(rng.uniform(0.5, 2.0, C), dtype=np.float64)


def replay_drop_path_masks(model, twin):
    """Queue our drop-path masks (drawn in our forward) in the twin, in its call order:
    per block, the attention branch then the MLP branch through the one `drop_path` module."""
    modules, masks = dict(twin.named_modules()), []
    for name, m in model.named_modules():
        if isinstance(m, nn.DropPath) and not isinstance(m._cache, str):
            masks.append(backend.to_numpy(m._cache).copy())           # (N, 1, 1)
            target = modules[name[:-len("drop_pathX.")] + "drop_path"]
            target.masks.append(torch.from_numpy(masks[-1]))
    return masks


def shifts_keys_only(name, cfg):
    """proj_k.bias, and the key projection's BatchNorm bias where no class token joins the keys
    (with one, the shift skips the class token's key, and the gradient is not 0)."""
    if name.endswith("attn.proj_k.bias"):
        return True
    if not name.endswith("attn.conv_proj_k.bn.bias"):
        return False
    stage = int(name.split(".")[0][len("stage"):])         # 'stage2.blocks...' -> 2
    return not cfg.cls_token[stage]


def run_both(model, x, labels, train):
    model.train(train)
    twin = twin_of(model).train(train)
    before = {k: backend.to_numpy(v).copy() for k, v in model.named_buffers()}
    loss_fn = nn.CrossEntropyLoss()
    model.zero_grad()
    logits = model.forward(x)
    masks = replay_drop_path_masks(model, twin)
    loss = loss_fn.forward(logits, labels)
    dx = model.backward(loss_fn.backward(1.0))

    xt = torch.from_numpy(backend.to_numpy(x).copy()).requires_grad_(True)
    logits_t = twin(xt)
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(backend.to_numpy(labels)))
    loss_t.backward()
    assert all(not getattr(m, "masks", []) for m in twin.modules()), "a queued mask was not used"
    return logits, loss, dx, logits_t, loss_t, xt, twin, before, masks


def check_parity(model, x, labels, train):
    """Returns the drop-path masks that were replayed."""
    logits, loss, dx, logits_t, loss_t, xt, twin, before, masks = run_both(model, x, labels, train)
    errors = {"logits": rel_error(logits, logits_t.detach().numpy()),
              "loss": rel_error(loss, loss_t.detach().numpy()),
              "input grad": rel_error(dx, xt.grad.numpy())}
    twin_params = dict(twin.named_parameters())
    ours = dict(model.named_parameters())
    assert sorted(ours) == sorted(twin_params)
    for name, p in ours.items():
        ref = twin_params[name].grad.numpy()
        if shifts_keys_only(name, model.config):
            # such a parameter adds the same vector to every key, i.e. q.b to every score of a
            # query, which softmax ignores: its gradient is exactly 0 and both sides hold only
            # rounding noise. Check that it is noise-sized next to the key weight's gradient
            # instead of comparing noise with noise.
            key_weight = twin_params[name.split(".attn.")[0] + ".attn.proj_k.weight"]
            scale = float(key_weight.grad.abs().max())
            assert max(np.abs(backend.to_numpy(p.grad)).max(), np.abs(ref).max()) <= 1e-12 * scale, name
            continue
        errors[name] = rel_error(p.grad, ref)
    twin_buffers = dict(twin.named_buffers())
    ours_buffers = dict(model.named_buffers())
    assert sorted(ours_buffers) == sorted(twin_buffers)
    for name, b in ours_buffers.items():
        if name.endswith("num_batches_tracked"):
            assert int(backend.to_numpy(b)) == int(twin_buffers[name]) == int(before[name]) + train
        else:
            errors[name] = rel_error(b, twin_buffers[name].numpy())
            changed = not np.array_equal(backend.to_numpy(b), before[name])
            assert changed == train, f"{name} changed={changed} in {'train' if train else 'eval'} mode"
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, f"worst: {worst} rel_error {errors[worst]:.2e}"
    return masks


def _inputs(cfg, batch, seed=0):
    rng = np.random.default_rng(seed)
    x = backend.to_device(rng.standard_normal((batch, cfg.in_chans, cfg.image_size, cfg.image_size)))
    labels = backend.to_device(rng.integers(0, cfg.num_classes, size=batch))
    return x, labels


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cvt_cifar_s_matches_pytorch(xp, train):
    cfg = get_config("cvt-cifar-s")
    model = build_model(cfg, seed=1, dtype=np.float64)
    if not train:
        randomise_bn_statistics(model, np.random.default_rng(2))
    # drop path 0.1 in the last block: seed 6 drops one of the two samples' branches at least
    # once, so the replayed masks are exercised (asserted below)
    model.drop_rng.seed(6)
    x, labels = _inputs(cfg, batch=2)
    masks = check_parity(model, x, labels, train)
    if train:
        assert len(masks) == 2 and any((m == 0).any() for m in masks), "no branch dropped: pick another seed"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("method", ["dw_bn", "avg", "linear"])
@pytest.mark.parametrize("cls_token", [True, False], ids=["cls", "mean"])
def test_tiny_matches_pytorch(xp, method, cls_token, train):
    cfg = tiny_config(method, cls_token, drop_path_rate=(0.5, 0.5), depth=(1, 2))
    model = build_model(cfg, seed=4, dtype=np.float64)
    if not train:
        randomise_bn_statistics(model, np.random.default_rng(5))
    x, labels = _inputs(cfg, batch=3, seed=6)
    masks = check_parity(model, x, labels, train)
    # drop-path rates linspace(0, 0.5, depth): only stage 1's second block has p > 0, two branches
    assert len(masks) == (2 if train else 0)


@pytest.mark.parametrize("act,scale", [("gelu", "head"), ("quick_gelu", "head"), ("gelu", "official")])
def test_options_match_pytorch(xp, act, scale):
    """The non-default choices (exact GELU, per-head attention scale) match too."""
    cfg = tiny_config(act=act, attn_scale=scale)
    model = build_model(cfg, seed=7, dtype=np.float64)
    x, labels = _inputs(cfg, batch=2, seed=8)
    check_parity(model, x, labels, train=True)
