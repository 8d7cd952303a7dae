"""Named configs: parameter counts (the issue's numbers, our model, the PyTorch twin and the
summary all agree), the summary's token grids and multiply-accumulates, and the CLI."""
from pathlib import Path

import numpy as np
import pytest

from cvt_tiny import tiny_config
from minicvt import backend, cli
from minicvt.models import CONFIGS, CvTConfig, build_model, count_parameters, get_config, stage_rows

# From the issue (official semantics, 1000 classes; cvt-cifar-s at 10 classes).
ISSUE_COUNTS = {"cvt-13": 19_997_480, "cvt-21": 31_622_696, "cvt-w24": 277_196_392,
                "cvt-cifar-s": 2_428_554}


def _twin(cfg, device="cpu"):
    torch = pytest.importorskip("torch")
    from torch_cvt import TorchCvT, spec_from_config
    with torch.device(device):
        return TorchCvT(spec_from_config(cfg), cfg.num_classes, cfg.in_chans, cfg.act, cfg.attn_scale)


@pytest.mark.parametrize("name", sorted(ISSUE_COUNTS))
def test_issue_parameter_counts(name):
    assert count_parameters(name) == ISSUE_COUNTS[name]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pytorch_twin_has_the_same_count(name):
    """Every named config, cvt-cifar-m included, counted by the independent PyTorch model
    (built on the meta device: shapes only, so even CvT-W24 costs no memory)."""
    twin = _twin(CONFIGS[name], device="meta")
    assert sum(p.numel() for p in twin.parameters()) == count_parameters(name)


@pytest.mark.parametrize("name", ["cvt-cifar-s", "cvt-cifar-m", "cvt-13"])
def test_built_model_matches_summary_per_stage(xp, name):
    model = build_model(name)
    rows = {r["name"]: r["params"] for r in stage_rows(model.config)}
    for i in range(model.config.num_stages):
        built = sum(p.data.size for k, p in model.named_parameters() if k.startswith(f"stage{i}."))
        assert built == rows[f"stage{i}"]
    head = sum(p.data.size for k, p in model.named_parameters() if k.split(".")[0] in ("norm", "head"))
    assert head == rows["head"]
    assert model.num_parameters() == count_parameters(name)
    if name in ISSUE_COUNTS:
        # the issue's numbers count parameters only: with BatchNorm's buffers they would differ
        buffers = sum(int(np.size(b)) for _, b in model.named_buffers())
        assert buffers > 0 and model.num_parameters() == ISSUE_COUNTS[name]


@pytest.mark.parametrize("method", ["dw_bn", "avg", "linear"])
def test_tiny_counts_match_the_model_and_twin(xp, method):
    cfg = tiny_config(method)
    twin_count = sum(p.numel() for p in _twin(cfg).parameters())
    assert build_model(cfg).num_parameters() == count_parameters(cfg) == twin_count


def _torch_macs(cfg, image_size):
    """Multiply-accumulates counted by hooks on the PyTorch twin's real layers at batch 1: each
    conv output entry costs (C_in / groups) * kh * kw, each linear output entry in_features, and
    an attention of probabilities (1, h, Tq, Tk) costs 2 Tq Tk C for q k^T and p v."""
    torch = pytest.importorskip("torch")
    twin = _twin(cfg).eval()
    macs = {}

    def add(name, n):
        key = name.split(".")[0] if name.startswith("stage") else "head"
        macs[key] = macs.get(key, 0) + int(n)

    for name, m in twin.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, i, o, name=name: add(
                name, o.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]))
        elif isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, i, o, name=name: add(name, o.numel() * mod.in_features))
        elif name.endswith("attn.attn_drop"):
            C = twin.get_submodule(name[:-len(".attn_drop")]).proj.out_features
            m.register_forward_hook(lambda mod, i, o, name=name, C=C: add(
                name, 2 * i[0].shape[2] * i[0].shape[3] * C))
    with torch.no_grad():
        twin(torch.zeros(1, cfg.in_chans, image_size, image_size))
    return macs


@pytest.mark.parametrize("cfg,size", [
    (get_config("cvt-cifar-s"), 32),
    (tiny_config("avg", True), 16),             # ceil_mode pooling: 8x8 -> 5x5 keys, 4x4 -> 3x3
    (tiny_config("linear", False), 20),
    (get_config("cvt-13"), 224)], ids=["cvt-cifar-s", "tiny-avg", "tiny-linear", "cvt-13"])
def test_summary_macs_match_hooks_on_pytorch(cfg, size):
    ours = {r["name"]: r["macs"] for r in stage_rows(cfg, size)}
    assert ours == _torch_macs(cfg, size)


def test_macs_near_the_papers_flops():
    """The paper (Table 2) reports 4.5G, 7.1G and 60.8G 'FLOPs' (multiply-accumulates) at 224:
    rounded, and without saying which operations its counter includes, so within 2%."""
    for name, paper in (("cvt-13", 4.5e9), ("cvt-21", 7.1e9), ("cvt-w24", 60.8e9)):
        total = sum(r["macs"] for r in stage_rows(get_config(name)))
        assert abs(total - paper) < 0.02 * paper, (name, total)


def test_grids_of_cvt_13():
    rows = stage_rows(get_config("cvt-13"))
    assert [r["grid"] for r in rows[:3]] == [(56, 56), (28, 28), (14, 14)]
    assert [r["kv_grid"] for r in rows[:3]] == [(28, 28), (14, 14), (7, 7)]
    assert [r["cls"] for r in rows[:3]] == [False, False, True]


def test_cli_summary_cvt_13(capsys):
    assert cli.main(["summary", "--config", "cvt-13"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "total parameters: 19,997,480"
    stage2 = next(line for line in lines if line.startswith("stage2"))
    assert "14x14 + cls" in stage2 and "7x7 + cls" in stage2 and " 384 " in stage2
    assert f"{stage_rows(get_config('cvt-13'))[2]['macs']:,}" in stage2


def test_cli_summary_options_and_errors(capsys):
    assert cli.main(["summary", "--config", "cvt-cifar-s", "--num-classes", "100"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"total parameters: {count_parameters('cvt-cifar-s', 100):,}"
    assert count_parameters("cvt-cifar-s", 100) == ISSUE_COUNTS["cvt-cifar-s"] + 90 * (256 + 1)
    assert cli.main(["summary", "--config", "cvt-cifar-s", "--image-size", "64"]) == 0
    assert "32x32" in capsys.readouterr().out                  # stride-2 embedding of 64x64
    assert cli.main(["summary", "--config", "no-such-model"]) == 2
    assert "unknown config" in capsys.readouterr().err


def test_config_validation_and_json_round_trip():
    cfg = get_config("cvt-w24")
    assert CvTConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="one value per stage"):
        CvTConfig(depth=(1, 2))
    with pytest.raises(ValueError, match="heads"):
        get_config("cvt-13", num_heads=(1, 5, 6))
    with pytest.raises(ValueError, match="qkv_proj_method"):
        get_config("cvt-13", qkv_proj_method=("dw_bn", "conv", "dw_bn"))
    with pytest.raises(ValueError, match="class token"):
        tiny_config(cls_token=False, pool="cls")
    with pytest.raises(ValueError, match="unknown config"):
        build_model("cvt-99")
    assert build_model("cvt-cifar-s", num_classes=7, dtype=np.float64).head.weight.data.dtype == np.float64
    assert backend.to_numpy(build_model("cvt-cifar-s", num_classes=7).forward(
        backend.to_device(np.zeros((1, 3, 32, 32), np.float32)))).shape == (1, 7)


def test_cli_summary_lists_the_configs_and_describes_a_checkpoint(capsys):
    shipped = str(Path(__file__).resolve().parents[1] / "checkpoints" / "cvt-cifar-s.npz")
    assert cli.main(["summary"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].startswith("configs (minicvt summary --config NAME")
    assert [line.split()[0] for line in listed[1:]] == list(CONFIGS)
    assert "  cvt-cifar-s  32x32 input, 10 classes, 2.4 M parameters" in listed
    # the shipped checkpoint: its own config (cvt-cifar-s), counted the same way
    assert cli.main(["summary", "--checkpoint", shipped]) == 0
    described = capsys.readouterr().out
    assert cli.main(["summary", "--config", "cvt-cifar-s"]) == 0
    assert described == capsys.readouterr().out
    assert cli.main(["summary", "--config", "cvt-13", "--checkpoint", shipped]) == 2
    assert "not both" in capsys.readouterr().err
