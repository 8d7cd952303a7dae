"""The model's API: save/load (.npz), importing a PyTorch/official state_dict, inference without
caches, kept attention maps, accumulation of gradients, dtypes."""
import numpy as np
import pytest

from cvt_tiny import tiny_config
from minicvt import backend, nn
from minicvt.checkpoint import CheckpointError
from minicvt.models import (build_model, export_state_dict, import_state_dict, load, load_weights,
                            save)


def _x(cfg, n=2, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return backend.to_device(rng.standard_normal((n, 3, cfg.image_size, cfg.image_size)), dtype=dtype)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert np.array_equal(backend.to_numpy(sa[k]), backend.to_numpy(sb[k])), k
        assert sa[k].dtype == sb[k].dtype, k


# -- our own files ---------------------------------------------------------------------------------
def test_save_load_round_trip(xp, tmp_path):
    model = build_model("cvt-cifar-s", seed=1, dtype=np.float64)
    model.forward(_x(model.config))                           # BN running statistics move
    path = tmp_path / "model.npz"
    save(model, path)
    with np.load(path, allow_pickle=False) as f:               # numbers and text only
        assert all(f[k].dtype != object for k in f.files)
    loaded = load(path)
    assert loaded.config == model.config
    _same_state(model, loaded)
    model.eval(), loaded.eval()
    x = _x(model.config, seed=2)
    np.testing.assert_array_equal(backend.to_numpy(model.forward(x)), backend.to_numpy(loaded.forward(x)))
    fresh = build_model("cvt-cifar-s", seed=9, dtype=np.float64)
    _same_state(load_weights(fresh, path), model)
    with pytest.raises(ValueError):
        load_weights(build_model("cvt-cifar-m", dtype=np.float64), path)


def test_load_refuses_a_file_without_config(tmp_path):
    path = tmp_path / "bare.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"bare.npz: is neither a minicvt model file \(models.save\) "
                                              r"nor a checkpoint of `minicvt train`"):
        load(path)


# -- PyTorch / official state_dicts -------------------------------------------------------------------
def _twin(cfg):
    torch = pytest.importorskip("torch")
    from torch_cvt import TorchCvT, spec_from_config
    return torch, TorchCvT(spec_from_config(cfg), cfg.num_classes, cfg.in_chans).double()


def test_state_dict_round_trip_through_pytorch(xp):
    """ours -> torch load_state_dict -> torch state_dict() -> import into a fresh model: equal."""
    model = build_model("cvt-cifar-s", seed=1, dtype=np.float64)
    model.forward(_x(model.config))
    torch, twin = _twin(model.config)
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in export_state_dict(model).items()})
    fresh = build_model("cvt-cifar-s", seed=2, dtype=np.float64)
    _same_state(import_state_dict(fresh, twin.state_dict()), model)


def test_import_weights_trained_elsewhere(xp):
    """A torch model with its own (perturbed) weights, saved the way checkpoints are (a
    'module.' prefix from DataParallel, nested under 'state_dict', float32): after the import our
    float64 model computes the same logits as the torch model in float32 precision."""
    cfg = tiny_config("dw_bn", True)
    torch, twin = _twin(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for name, b in twin.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                b.normal_()
    checkpoint = {"state_dict": {"module." + k: v.float() for k, v in twin.state_dict().items()}}
    model = import_state_dict(build_model(cfg, seed=5, dtype=np.float64), checkpoint).eval()
    x = _x(cfg, n=3)
    ref = twin.float().eval()(torch.from_numpy(backend.to_numpy(x)).float()).detach().numpy()
    ours = backend.to_numpy(model.forward(x))
    # weights were rounded to float32 once on both sides; the forwards differ by float32 rounding
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_import_checks_names_and_shapes(xp):
    model = build_model(tiny_config(), dtype=np.float64)
    state = export_state_dict(model)
    missing = {k: v for k, v in state.items() if k != "head.bias"}
    with pytest.raises(ValueError, match="missing"):
        import_state_dict(model, missing)
    import_state_dict(model, missing, strict=False)          # a head left as it was is allowed
    wrong = dict(state, **{"head.weight": np.zeros((5, 8))})
    with pytest.raises(ValueError, match="head.weight"):
        import_state_dict(model, wrong)


# -- inference, attention maps, gradients ---------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_no_grad_keeps_no_cache(xp, train):
    model = build_model("cvt-cifar-s", seed=0, dtype=np.float64).train(train)
    x = _x(model.config)
    with nn.no_grad():
        logits = model.forward(x)
    holding = [name for name, m in model.named_modules() if m._cache is not None]
    assert holding == [], f"modules holding a cache after no_grad: {holding[:5]}"
    with pytest.raises(RuntimeError, match="without a forward"):
        model.backward(xp.ones_like(logits))
    if not train:
        # equal up to rounding: under no_grad the projections fold BatchNorm into their
        # convolutions (tests/test_model_layers.py)
        np.testing.assert_allclose(backend.to_numpy(logits), backend.to_numpy(model.forward(x)),
                                   rtol=1e-12, atol=1e-14)
        assert any(m._cache is not None for _, m in model.named_modules())   # caches outside no_grad


def test_attention_maps_are_kept_only_when_asked(xp):
    model = build_model("cvt-cifar-s", seed=0, dtype=np.float64).eval()
    x = _x(model.config)
    model.forward(x)
    assert model.attention_maps() == {}
    with nn.no_grad():
        model.keep_attention(True).forward(x)
    maps = model.attention_maps()
    # (N, h, Tq, Tk): 16x16 queries over 8x8 keys; 8x8 over 4x4; 4x4 + cls over 2x2 + cls
    assert maps["stage0.blocks.0.attn"].shape == (2, 1, 256, 64)
    assert maps["stage1.blocks.1.attn"].shape == (2, 2, 64, 16)
    assert maps["stage2.blocks.1.attn"].shape == (2, 4, 17, 5)
    assert len(maps) == 5
    for p in maps.values():
        np.testing.assert_allclose(backend.to_numpy(p).sum(axis=-1), 1.0, rtol=1e-12)
    model.keep_attention(False).forward(x)
    assert model.attention_maps() == {}


def test_gradients_accumulate_until_zero_grad(xp):
    model = build_model(tiny_config(), seed=0, dtype=np.float64).eval()
    x = _x(model.config)
    g = backend.to_device(np.random.default_rng(1).standard_normal((2, 3)))
    model.zero_grad()
    model.forward(x)
    dx1 = model.backward(g)
    once = {k: backend.to_numpy(p.grad).copy() for k, p in model.named_parameters()}
    model.forward(x)
    dx2 = model.backward(g)
    np.testing.assert_array_equal(backend.to_numpy(dx1), backend.to_numpy(dx2))
    for k, p in model.named_parameters():
        np.testing.assert_allclose(backend.to_numpy(p.grad), 2 * once[k], rtol=1e-15, atol=0)
    assert any(np.any(v != 0) for v in once.values())
    with pytest.raises(RuntimeError):
        model.backward(g)                                    # a second backward without a forward


def test_float32_stays_float32(xp):
    model = build_model("cvt-cifar-s", seed=0, dtype=np.float32)
    x = _x(model.config, dtype=np.float32)
    logits = model.forward(x)
    dx = model.backward(xp.ones_like(logits))
    assert logits.dtype == dx.dtype == np.float32
    assert all(p.grad.dtype == np.float32 for p in model.parameters())
    assert all(b.dtype == np.float32 for k, b in model.named_buffers() if "running" in k)


def test_train_eval_reach_every_module(xp):
    model = build_model(tiny_config(), seed=0).eval()
    assert not any(m.training for _, m in model.named_modules())
    model.train()
    assert all(m.training for _, m in model.named_modules())


def test_minicvt_load_reads_every_model_file_we_write(tmp_path):
    """minicvt.load: a models.save file, a training checkpoint (last.npz/best.npz) and the inference
    copy shipped in checkpoints/, each as the same model in eval mode."""
    import json
    import minicvt
    from minicvt.checkpoint import save_checkpoint, save_inference_copy
    cfg = tiny_config()
    model = build_model(cfg, seed=3, dtype=np.float64).eval()
    x = _x(cfg)
    want = backend.to_numpy(model(x))
    meta = {"epoch": 0, "model_config": json.loads(cfg.to_json()), "classes": ["a", "b", "c"],
            "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}, "train_config": {"dtype": "float64"}}
    save(model, tmp_path / "model.npz")
    save_checkpoint(tmp_path / "best.npz", model, None, meta)
    save_inference_copy(tmp_path / "best.npz", tmp_path / "small.npz")
    for name, rtol in (("model.npz", 0), ("best.npz", 0), ("small.npz", 1e-2)):
        loaded = minicvt.load(tmp_path / name)
        assert not loaded.training and loaded.config == cfg, name
        np.testing.assert_allclose(backend.to_numpy(loaded(x)), want, rtol=rtol, atol=rtol, err_msg=name)
    assert minicvt.load(tmp_path / "best.npz").classes == ["a", "b", "c"]
    assert minicvt.load(tmp_path / "model.npz").classes is None
    from pathlib import Path
    shipped = minicvt.load(Path(__file__).resolve().parents[1] / "checkpoints" / "cvt-cifar-s.npz")
    assert len(shipped.classes) == 10 and shipped.config.name == "cvt-cifar-s"
