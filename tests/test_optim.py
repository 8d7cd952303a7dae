"""Optimisers against torch.optim (float64), the decay rule, clipping, and the schedule."""
import math

import numpy as np
import pytest

from minicvt import backend, nn
from minicvt.optim import SGD, AdamW, clip_grad_norm, decays
from minicvt.schedules import cosine_lr


def _params(xp):
    """Named parameters shaped like a model's: a kernel, a bias, a norm scale, a class token,
    as arrays of module xp (numpy for the PyTorch reference, whatever the active backend)."""
    rng = np.random.default_rng(0)
    shapes = {"conv.weight": (3, 2, 3, 3), "conv.bias": (3,), "norm.weight": (3,),
              "stage2.cls_token": (1, 1, 3), "fc.weight": (4, 3)}
    return [(n, nn.Parameter(xp.asarray(rng.standard_normal(s)))) for n, s in shapes.items()]


def _grads(step, params):
    rng = np.random.default_rng(100 + step)
    return [rng.standard_normal(p.shape) for _, p in params]


def _run_ours(opt_cls, kwargs, xp, steps=4):
    params = _params(xp)
    opt = opt_cls(params, **kwargs)
    for s in range(steps):
        for (_, p), g in zip(params, _grads(s, params)):
            p.grad[...] = backend.to_device(g)
        opt.lr = kwargs["lr"] * (1.0 - 0.1 * s)          # the loop changes lr every step
        opt.step()
    return {n: backend.to_numpy(p.data) for n, p in params}, opt


def _run_torch(torch_cls, kwargs, steps=4):
    torch = pytest.importorskip("torch")
    params = _params(np)
    tensors = {n: torch.tensor(p.data, dtype=torch.float64, requires_grad=True) for n, p in params}
    wd = kwargs.pop("weight_decay")
    groups = [{"params": [t for n, t in tensors.items() if decays(n, dict(params)[n])], "weight_decay": wd},
              {"params": [t for n, t in tensors.items() if not decays(n, dict(params)[n])], "weight_decay": 0.0}]
    opt = torch_cls(groups, **kwargs)
    for s in range(steps):
        for t, g in zip(tensors.values(), _grads(s, params)):
            t.grad = torch.tensor(g)
        for group in opt.param_groups:
            group["lr"] = kwargs["lr"] * (1.0 - 0.1 * s)
        opt.step()
    return {n: t.detach().numpy() for n, t in tensors.items()}


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch(xp, nesterov):
    torch = pytest.importorskip("torch")
    kw = dict(lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=5e-4)
    ours, _ = _run_ours(SGD, dict(kw), xp)
    ref = _run_torch(torch.optim.SGD, dict(kw))
    for n in ref:
        np.testing.assert_allclose(ours[n], ref[n], rtol=1e-12, atol=1e-14, err_msg=n)


def test_adamw_matches_torch(xp):
    torch = pytest.importorskip("torch")
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    ours, _ = _run_ours(AdamW, dict(kw), xp)
    ref = _run_torch(torch.optim.AdamW, dict(kw))
    for n in ref:
        # sqrt(v / c2) vs sqrt(v) / sqrt(c2): equal up to rounding
        np.testing.assert_allclose(ours[n], ref[n], rtol=1e-10, atol=1e-13, err_msg=n)


def test_no_decay_on_norms_biases_and_cls_token(xp):
    params = dict(_params(xp))
    assert [n for n, p in params.items() if decays(n, p)] == ["conv.weight", "fc.weight"]
    # with zero gradients only decaying weights move
    opt = SGD(list(params.items()), lr=0.1, momentum=0.0, weight_decay=0.5)
    before = {n: backend.to_numpy(p.data).copy() for n, p in params.items()}
    opt.step()
    for n, p in params.items():
        moved = not np.array_equal(backend.to_numpy(p.data), before[n])
        assert moved == (n in ("conv.weight", "fc.weight")), n


def test_float32_stays_float32(xp):
    p = nn.Parameter(backend.to_device(np.ones((2, 3), np.float32)))
    p.grad[...] = 1
    for opt in (SGD([("w", p)], lr=0.1, nesterov=True, weight_decay=1e-4), AdamW([("w", p)], lr=0.1)):
        opt.step()
        assert p.data.dtype == np.float32
        assert all(v.dtype == np.float32 for v in opt.state.values())


def test_state_dict_round_trip_continues_identically(xp):
    kw = dict(lr=1e-2, weight_decay=0.05)
    full, _ = _run_ours(AdamW, dict(kw), xp, steps=4)
    # run 2 steps, save, restore into a fresh optimiser on the same params, run 2 more
    params = _params(xp)
    opt = AdamW(params, **kw)
    for s in range(4):
        if s == 2:
            sd = opt.state_dict()
            opt = AdamW(params, **kw)
            opt.load_state_dict(sd)
        for (_, p), g in zip(params, _grads(s, params)):
            p.grad[...] = backend.to_device(g)
        opt.lr = kw["lr"] * (1.0 - 0.1 * s)
        opt.step()
    for n, p in params:
        np.testing.assert_array_equal(backend.to_numpy(p.data), full[n])
    with pytest.raises(ValueError, match="unknown parameter"):
        AdamW(params, **kw).load_state_dict({"steps": 1, "exp_avg.nope": np.zeros(1)})


def test_clip_grad_norm(xp):
    params = [p for _, p in _params(xp)]
    for i, p in enumerate(params):
        p.grad[...] = float(i + 1)
    norm = float(clip_grad_norm(params, max_norm=1.0))
    expected = math.sqrt(sum((i + 1) ** 2 * p.data.size for i, p in enumerate(params)))
    assert norm == pytest.approx(expected, rel=1e-12)
    after = math.sqrt(sum(float((p.grad ** 2).sum()) for p in params))
    assert after == pytest.approx(1.0, rel=1e-5)
    # below the limit nothing changes
    before = [backend.to_numpy(p.grad).copy() for p in params]
    clip_grad_norm(params, max_norm=10.0)
    for p, b in zip(params, before):
        np.testing.assert_array_equal(backend.to_numpy(p.grad), b)


def test_cosine_lr_warmup_and_decay():
    lrs = [cosine_lr(s, 100, 1.0, warmup_steps=10, min_lr=0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))           # rising in warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))          # falling after
    assert lrs[55] == pytest.approx(0.01 + 0.99 * 0.5, rel=1e-12)   # half-way: mid-point
    assert cosine_lr(100, 100, 1.0, 10, 0.01) == pytest.approx(0.01)
