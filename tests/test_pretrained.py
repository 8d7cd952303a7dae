"""Hugging Face CvT folders read by minicvt, against transformers' own CvtForImageClassification:
random weights for the CvT-13 shape and a tiny config, written with save_pretrained, loaded by
minicvt.from_pretrained. Logits and every block's attention probabilities agree to 1e-9 in float64;
the weights exported back under transformers' names give transformers the same logits; the .bin
format reads through PyTorch; each bad folder is one clear error. Skips without transformers
(CI installs it through the parity extra)."""
import json

import numpy as np
import pytest
from PIL import Image

import minicvt
from minicvt import backend, cli
from minicvt.models import PretrainedError, export_hf_state_dict, from_pretrained, prepare_images
from minicvt.models.pretrained import NAMES, hf_name, official_name

transformers = pytest.importorskip("transformers", reason="the parity tests need transformers: "
                                                          "pip install -e '.[parity]'")
torch = pytest.importorskip("torch")

TINY = dict(embed_dim=[16, 24, 32], num_heads=[1, 2, 4], depth=[1, 2, 3])   # (transformers needs depth[i] > i)


def hf_model(**config):
    """transformers' CvT with random weights and random BatchNorm statistics (fresh ones are 0 and
    1, which would hide a mix-up of mean and variance), float64, eval mode."""
    torch.manual_seed(0)
    labels = config.pop("num_labels", 5)
    cfg = transformers.CvtConfig(num_labels=labels, id2label={i: f"class{i}" for i in range(labels)},
                                 label2id={f"class{i}": i for i in range(labels)}, **config)
    model = transformers.CvtForImageClassification(cfg).double().eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_()
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    return model


def forward_with_attention(model, x):
    """(logits, [attention probabilities of every block, in order]) of transformers' model: its
    only softmax calls are the attention's, recorded as they happen."""
    probs, softmax = [], torch.nn.functional.softmax

    def recording(*args, **kwargs):
        p = softmax(*args, **kwargs)
        probs.append(p.detach().numpy())
        return p
    torch.nn.functional.softmax = recording
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(x)).logits.numpy()
    finally:
        torch.nn.functional.softmax = softmax
    return logits, probs


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{'tiny': (folder, hf model), 'cvt13': ...} written with save_pretrained (safetensors)."""
    out = {}
    for name, config in (("tiny", TINY), ("cvt13", {"num_labels": 1000})):
        model = hf_model(**dict(config))
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = folder, model
    return out


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name, size", [("tiny", 64), ("cvt13", 224)])
def test_logits_and_attention_match_transformers(folders, name, size):
    folder, hf = folders[name]
    model = from_pretrained(folder, dtype=np.float64)
    x = np.random.default_rng(1).standard_normal((2 if name == "tiny" else 1, 3, size, size))
    ref_logits, ref_probs = forward_with_attention(hf, x)
    model.keep_attention(True)
    logits = backend.to_numpy(model(backend.to_device(x)))
    maps = model.attention_maps()
    assert rel(logits, ref_logits) < 1e-9
    blocks = [f"stage{s}.blocks.{b}.attn" for s, d in enumerate(model.config.depth) for b in range(d)]
    assert list(maps) == blocks and len(ref_probs) == len(blocks)
    for block, ref in zip(blocks, ref_probs):
        ours = backend.to_numpy(maps[block])
        assert ours.shape == ref.shape and rel(ours, ref) < 1e-9, block
    last = blocks[-model.config.depth[-1]:]                            # the class token's rows
    assert all(rel(backend.to_numpy(maps[b])[:, :, 0], ref_probs[blocks.index(b)][:, :, 0]) < 1e-9 for b in last)
    assert model.classes[:2] == ["class0", "class1"] and not model.training


def test_exported_weights_give_transformers_the_same_logits(folders):
    folder, _ = folders["tiny"]
    model = from_pretrained(folder, dtype=np.float64)
    fresh = hf_model(**dict(TINY))                                      # other random weights
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in export_hf_state_dict(model).items()}, strict=True)
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64))
    with torch.no_grad():
        theirs = fresh(torch.from_numpy(x)).logits.numpy()
    assert rel(backend.to_numpy(model(x)), theirs) < 1e-9


def test_pytorch_bin_files_load_too(folders, tmp_path):
    """Older hub folders (microsoft/cvt-13 among them) hold pytorch_model.bin, a pickle of the
    state dict; transformers 5 writes safetensors only, so the .bin is written as they were."""
    folder, hf = folders["tiny"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64))
    with torch.no_grad():
        ref = hf(torch.from_numpy(x)).logits.numpy()
    assert rel(backend.to_numpy(from_pretrained(tmp_path, dtype=np.float64)(x)), ref) < 1e-9


def test_names_map_both_ways(folders):
    _, hf = folders["tiny"]
    for key in hf.state_dict():
        assert hf_name(official_name(key)) == key, key
    assert official_name("cvt.encoder.stages.2.layers.1.attention.attention.projection_value.bias") == \
        "stage2.blocks.1.attn.proj_v.bias"
    assert len(NAMES) == 13


def _copy(folder, tmp_path, name="bad"):
    import shutil
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def test_bad_folders_are_one_clear_line(folders, tmp_path):
    from safetensors.numpy import load_file, save_file
    folder, _ = folders["tiny"]
    with pytest.raises(PretrainedError, match="not a Hugging Face model folder"):
        from_pretrained(tmp_path)
    vit = _copy(folder, tmp_path, "vit")
    (vit / "config.json").write_text(json.dumps({**json.loads((vit / "config.json").read_text()), "model_type": "vit"}))
    with pytest.raises(PretrainedError, match="model_type is 'vit', not 'cvt'"):
        from_pretrained(vit)
    avg = _copy(folder, tmp_path, "avg")
    cfg = json.loads((avg / "config.json").read_text())
    (avg / "config.json").write_text(json.dumps({**cfg, "qkv_projection_method": ["dw_bn", "avg", "dw_bn"]}))
    with pytest.raises(PretrainedError, match="qkv_projection_method"):
        from_pretrained(avg)
    tensors = load_file(str(folder / "model.safetensors"))
    cases = {"missing": lambda t: t.pop("classifier.bias"),
             "extra": lambda t: t.__setitem__("pooler.weight", np.zeros(3)),
             "shape": lambda t: t.__setitem__("layernorm.weight", np.zeros(7))}
    words = {"missing": "missing tensors: classifier.bias", "extra": "unexpected tensors: pooler.weight",
             "shape": r"wrong shape: layernorm.weight \(7,\) \(expected \(32,\)\)"}
    for case, change in cases.items():
        bad = _copy(folder, tmp_path, case)
        t = dict(tensors)
        change(t)
        save_file(t, str(bad / "model.safetensors"))
        with pytest.raises(PretrainedError, match=words[case]):
            from_pretrained(bad)
    empty = _copy(folder, tmp_path, "empty")
    (empty / "model.safetensors").unlink()
    with pytest.raises(PretrainedError, match="no model.safetensors or pytorch_model.bin"):
        from_pretrained(empty)
    cut = _copy(folder, tmp_path, "truncated")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(PretrainedError, match="model.safetensors is not a readable safetensors file"):
        from_pretrained(cut)
    pickle = _copy(folder, tmp_path, "pickle")
    (pickle / "model.safetensors").unlink()
    (pickle / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(PretrainedError, match="pytorch_model.bin is not a readable PyTorch state dict"):
        from_pretrained(pickle)
    scalar = _copy(folder, tmp_path, "scalar")
    (scalar / "config.json").write_text(json.dumps({**cfg, "depth": 3}))
    with pytest.raises(PretrainedError, match="depth must list one value per stage"):
        from_pretrained(scalar)


def test_preprocessing_follows_the_image_processor(tmp_path):
    """Shorter side to S / crop_pct, the central S x S, then mean and std; the crop is what is shown."""
    img = np.zeros((300, 400, 3), np.uint8)
    img[:, 200:] = 255                                                  # right half white
    Image.fromarray(img).save(tmp_path / "wide.png")
    prep = {"size": 224, "crop_pct": 0.875, "mean": [0.5] * 3, "std": [0.25] * 3}
    shown, x = prepare_images([tmp_path / "wide.png"], prep)
    assert shown.shape == (1, 3, 224, 224) and x.dtype == np.float32
    # 300 x 400 -> 256 x 341, then the central 224: columns 58..282 of 341, the edge at 170.5 - 58
    assert shown[0, 0, 100, 100] == 0 and shown[0, 0, 100, 120] == 255
    np.testing.assert_allclose(x[0, :, 0, 0], (0 - 0.5) / 0.25)


@pytest.mark.parametrize("hw", [(300, 400), (400, 300), (256, 259), (256, 263), (257, 300), (500, 500)])
def test_preprocessing_equals_transformers_pillow_processor(tmp_path, hw):
    prep = {"size": 224, "crop_pct": 0.875, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    processor = transformers.ConvNextImageProcessorPil(size={"shortest_edge": 224}, crop_pct=0.875, resample=3,
                                                       image_mean=prep["mean"], image_std=prep["std"])
    img = np.random.default_rng(hw[0] * hw[1]).integers(0, 256, hw + (3,), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "photo.png")
    _, x = prepare_images([tmp_path / "photo.png"], prep)
    with Image.open(tmp_path / "photo.png") as im:
        ref = processor(im, return_tensors="np")["pixel_values"]
    assert x.shape == ref.shape and np.abs(x - ref).max() < 1e-5          # float32 rounding


def test_predict_and_attention_commands_on_a_saved_folder(folders, tmp_path, capsys):
    folder, _ = folders["tiny"]
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 90, 3), dtype=np.uint8)).save(tmp_path / "cat.jpg")
    previous = backend.get_backend()
    try:
        assert cli.main(["predict", "--pretrained", str(folder), "--images", str(tmp_path / "cat.jpg")]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"{tmp_path / 'cat.jpg'}:") and len(out) == 6       # the top 5
        probs = [float(line.split()[-1]) for line in out[1:]]
        assert probs == sorted(probs, reverse=True) and all(line.strip().split()[0].startswith("class")
                                                             for line in out[1:])
        for kind in ("query", "cls", "rollout"):
            fig = tmp_path / f"{kind}.png"
            assert cli.main(["attention", "--pretrained", str(folder), "--images", str(tmp_path / "cat.jpg"),
                             "--kind", kind, "--out", str(fig)]) == 0
            assert fig.read_bytes()[:4] == b"\x89PNG"
        capsys.readouterr()
        code = cli.main(["predict", "--pretrained", str(tmp_path), "--images", str(tmp_path / "cat.jpg")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "not a Hugging Face model folder" in err
    finally:
        backend.set_backend(previous)


def test_minicvt_from_pretrained_is_the_package_function():
    assert minicvt.from_pretrained is from_pretrained
