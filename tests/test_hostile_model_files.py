"""Hostile and broken model files: `.npz` checkpoints and model files, and Hugging Face folders
(config.json, preprocessor_config.json, model.safetensors and its shards, pytorch_model.bin).

Every refusal is a BadFileError whose message is one line naming the file, raised before the
file's claims are allocated: a lying .npy header declaring terabytes, a member inflating to a
gigabyte, a safetensors header longer than its file, a config describing a model far larger than
its file. NaN, infinite and integer weights are refused. Property-based cases (hypothesis, fixed
seed) cut, flip and retype the files: each either gives the one exception type or reads exactly
what the undamaged file holds. MINICVT_FUZZ_EXAMPLES scales their number (docs/files.md lists a
longer run). Files are written here directly (np.savez, zipfile, JSON, safetensors' format), so
nothing needs PyTorch or transformers except the pytorch_model.bin cases.
"""
import json
import os
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
import zlib
from dataclasses import asdict, replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.lib import format as npy

import minicvt
from minicvt import BadFileError, backend, cli
from minicvt.checkpoint import load_checkpoint
from minicvt.models import build_model, export_hf_state_dict, from_pretrained, load, save
from minicvt.models.configs import CVT_CIFAR_S
from minicvt.models.expect import state_shapes
from minicvt.optim import AdamW
from minicvt.train import TrainConfig
from cvt_tiny import tiny_config

EXAMPLES = int(os.environ.get("MINICVT_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CFG = tiny_config()
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats()
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)


# -- how a refusal must look ----------------------------------------------------------------------
def refused(call, name, match=None):
    """Run call(); it must raise BadFileError with one line naming `name` (and matching `match`)."""
    with pytest.raises(BadFileError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and str(name) in message, message
    if match:
        assert __import__("re").search(match, message), message
    return message


def peak_bytes(call):
    """The peak of Python and NumPy allocations (tracemalloc) while call() runs; exceptions pass."""
    tracemalloc.start()
    try:
        call()
    except BadFileError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(backend.to_numpy(a[k]), backend.to_numpy(b[k]), err_msg=k)


# -- files to damage ----------------------------------------------------------------------------------
def make_model():
    return build_model(CFG, seed=1)


def base_meta():
    return {"format": "minicvt-checkpoint-1", "epoch": 2, "train_config": asdict(TrainConfig(model="tiny")),
            "model_config": json.loads(CFG.to_json()), "classes": ["a", "b", "c"], "num_images": 30,
            "normalization": {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]},
            "data_fingerprint": "0123456789abcdef", "best_acc": 0.5,
            "history": [{"epoch": 1, "train_loss": 1.0, "train_acc": 0.4, "val_acc": 0.5}]}


def checkpoint_arrays(model=None):
    """{member: array} of a checkpoint of the tiny model with AdamW state, as save_checkpoint writes."""
    model = model or make_model()
    arrays = {f"model/{k}": backend.to_numpy(v).copy() for k, v in model.state_dict().items()}
    opt = AdamW(list(model.named_parameters()), lr=1e-3)
    opt.step()                                 # creates exp_avg / exp_avg_sq (the saved weights are before it)
    arrays.update({f"optim/{k}": np.asarray(v) for k, v in opt.state_dict().items()})
    arrays["meta"] = np.array(json.dumps(base_meta()))
    return arrays


def write_npz(path, arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Undamaged files: a checkpoint, a model file, and their states as loaded."""
    d = tmp_path_factory.mktemp("good")
    ckpt = write_npz(d / "last.npz", checkpoint_arrays())
    model_file = save(make_model(), d / "model.npz")
    return {"checkpoint": ckpt, "model": model_file, "dir": d,
            "checkpoint_state": load_checkpoint(ckpt)[0], "model_state": make_model().state_dict()}


def hf_config(cfg=CFG):
    return {"model_type": "cvt", "num_channels": cfg.in_chans, "patch_sizes": list(cfg.patch_size),
            "patch_stride": list(cfg.patch_stride), "patch_padding": list(cfg.patch_padding),
            "embed_dim": list(cfg.dim_embed), "num_heads": list(cfg.num_heads), "depth": list(cfg.depth),
            "mlp_ratio": list(cfg.mlp_ratio), "qkv_bias": list(cfg.qkv_bias), "drop_rate": [0.0] * 2,
            "attention_drop_rate": [0.0] * 2, "drop_path_rate": [0.0] * 2, "cls_token": list(cfg.cls_token),
            "qkv_projection_method": ["dw_bn"] * 2, "kernel_qkv": [3, 3], "padding_kv": [1, 1],
            "stride_kv": [2, 2], "padding_q": [1, 1], "stride_q": [1, 1],
            "id2label": {"0": "a", "1": "b", "2": "c"}, "num_labels": 3}


def write_safetensors(path, tensors, mutate=None, raw_header=None):
    """A .safetensors file written by hand (the format in minicvt/models/hf_weights.py); mutate
    edits the header dict before it is written; raw_header replaces the JSON text."""
    codes = {"float16": "F16", "float32": "F32", "float64": "F64", "int64": "I64", "uint16": "BF16"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, a in tensors.items():
        a = np.asarray(a)                                # tobytes() below is C order
        header[name] = {"dtype": codes[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a.tobytes())
        offset += a.nbytes
    if mutate:
        mutate(header)
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


def hf_folder(path, config=None, tensors=None, preprocessor=True, **kw):
    """A Hugging Face CvT folder for the tiny model at 16x16 pixels: config.json,
    preprocessor_config.json, model.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config() if config is None else config))
    if preprocessor:
        (path / "preprocessor_config.json").write_text(json.dumps(
            {"size": {"shortest_edge": 16}, "crop_pct": 0.875, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    write_safetensors(path / "model.safetensors", hf_tensors() if tensors is None else tensors, **kw)
    return path


def hf_tensors():
    return export_hf_state_dict(make_model())


# -- the undamaged files read, and state_shapes is the model's ---------------------------------------
@pytest.mark.parametrize("cfg", [tiny_config(), tiny_config(cls_token=False), tiny_config(method="avg"),
                                 tiny_config(method="linear"), CVT_CIFAR_S,
                                 replace(tiny_config(), qkv_bias=(True, False), mlp_ratio=(1.5, 3.0), in_chans=1)])
def test_state_shapes_are_the_built_models(cfg):
    built = {k: (tuple(v.shape), "i" if v.dtype.kind in "iu" else "f")
             for k, v in build_model(cfg).state_dict().items()}
    assert state_shapes(cfg) == built


def test_good_files_read(files, tmp_path):
    same_state(load(files["model"]).state_dict(), files["model_state"])
    same_state(load(files["checkpoint"]).state_dict(), files["model_state"])
    model = from_pretrained(hf_folder(tmp_path / "hf"))
    same_state(model.state_dict(), files["model_state"])
    assert model.classes == ["a", "b", "c"] and model.preprocessing["size"] == 16


def test_float16_and_bfloat16_weights_stay_legal(files, tmp_path):
    half = {k: (v.astype(np.float16) if v.dtype.kind == "f" else v) for k, v in checkpoint_arrays().items()}
    loaded = load(write_npz(tmp_path / "half.npz", half))
    w = backend.to_numpy(loaded.state_dict()["head.weight"])
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, backend.to_numpy(files["model_state"]["head.weight"]), rtol=1e-3, atol=1e-4)
    # bfloat16: the top 16 bits of each float32, widened back on reading
    tensors = hf_tensors()
    bf16 = {k: (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16) if v.dtype.kind == "f" else v
            for k, v in tensors.items()}
    codes = {"uint16": "BF16", "int64": "I64"}

    def as_bf16(header):
        for k, a in bf16.items():
            header[k]["dtype"] = codes[a.dtype.name]
    header_shapes = {k: v for k, v in bf16.items()}
    folder = hf_folder(tmp_path / "bf16", tensors=header_shapes, mutate=as_bf16)
    got = backend.to_numpy(from_pretrained(folder).state_dict()["head.weight"])
    want = tensors["classifier.weight"].astype(np.float32)
    assert np.abs(got - want).max() <= np.abs(want).max() * 2 ** -7 and np.abs(got - want).max() > 0


def test_shipped_checkpoint_still_predicts(tmp_path, capsys):
    from PIL import Image
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "x.png")
    previous = backend.get_backend()
    try:
        assert cli.main(["predict", "--checkpoint", "checkpoints/cvt-cifar-s.npz",
                         "--images", str(tmp_path / "x.png"), "--top", "2"]) == 0
    finally:
        backend.set_backend(previous)
    assert len(capsys.readouterr().out.splitlines()) == 3


# -- example-based refusals: .npz -------------------------------------------------------------------
def _with(arrays, **changes):
    out = dict(arrays)
    for k, v in changes.items():
        k = k.replace("__", "/").replace("_DOT_", ".")
        if v is None:
            out.pop(k)
        else:
            out[k] = v
    return out


def _meta(**changes):
    m = base_meta()
    for k, v in changes.items():
        m[k] = v
    return np.array(json.dumps(m))


BAD_CHECKPOINTS = {
    "nan weight": (lambda a: {**a, "model/stage0.patch_embed.proj.weight":
                              np.full_like(a["model/stage0.patch_embed.proj.weight"], np.nan)},
                   r"array 'stage0.patch_embed.proj.weight' holds NaN \(the file of a diverged run\?\)"),
    "inf optimiser": (lambda a: {**a, "optim/exp_avg.head.weight": np.full_like(a["optim/exp_avg.head.weight"], np.inf)},
                      r"array 'exp_avg.head.weight' holds infinity"),
    "integer weights": (lambda a: {**a, "model/head.weight": a["model/head.weight"].astype(np.int32)},
                        r"weights that are not float16, float32 or float64: head.weight \(int32\)"),
    "missing": (lambda a: {k: v for k, v in a.items() if k != "model/head.bias"}, r"missing arrays: head.bias"),
    "extra": (lambda a: {**a, "model/pooler.weight": np.zeros(3, np.float32)}, r"unexpected arrays: pooler.weight"),
    "shape": (lambda a: {**a, "model/norm.weight": np.zeros(7, np.float32)},
              r"arrays of the wrong shape: norm.weight \(7,\) \(expected \(8,\)\)"),
    "stray member": (lambda a: {**a, "notes": np.zeros(2)}, r"unexpected arrays: 'notes'"),
    "optimiser for no parameter": (lambda a: {**a, "optim/exp_avg.nothing": np.zeros(2, np.float32)},
                                   r"optimiser state: unexpected arrays: exp_avg.nothing"),
    "optimiser shape": (lambda a: {**a, "optim/exp_avg.head.weight": np.zeros(2, np.float32)},
                        r"optimiser state: arrays of the wrong shape: exp_avg.head.weight"),
    "no meta": (lambda a: {k: v for k, v in a.items() if k != "meta"}, r"has no metadata|is neither a minicvt model file"),
    "meta not text": (lambda a: {**a, "meta": np.zeros(3)}, r"'meta' must be a text entry"),
    "meta not json": (lambda a: {**a, "meta": np.array("{not json")}, r"metadata is not readable JSON"),
    "meta a list": (lambda a: {**a, "meta": np.array("[1, 2]")}, r"metadata must be a JSON object, got list"),
    "deep meta": (lambda a: {**a, "meta": np.array("[" * 100000 + "]" * 100000)}, r"not readable JSON"),
    "other format": (lambda a: {**a, "meta": _meta(format="x")}, r"is not a minicvt checkpoint \(format 'x'\)"),
    "epoch text": (lambda a: {**a, "meta": _meta(epoch="3")}, r"metadata epoch must be a whole number from -1, got '3'"),
    "position text": (lambda a: {**a, "meta": _meta(position="half way")},
                      r"metadata position must be a record of the epoch, step and running sums, or null"),
    "position nan": (lambda a: {**a, "meta": _meta(position={"epoch": 1, "step": 2, "seen": 8, "loss_sum": "nan",
                                                             "correct": 1.0, "bad": 0.0, "seconds": 1.0})},
                     r"metadata position must be a record"),
    "train_config list": (lambda a: {**a, "meta": _meta(train_config=[1])}, r"train_config must be a record"),
    "unknown setting": (lambda a: {**a, "meta": _meta(train_config={"lr": 0.1, "future_setting": 1})},
                        r"train_config: settings this minicvt does not know: \['future_setting'\] \(written by a "
                        r"newer version\?\)"),
    "best_acc null": (lambda a: {**a, "meta": _meta(best_acc=None)}, r"metadata best_acc must be a number, got None"),
    "history record empty": (lambda a: {**a, "meta": _meta(history=[{}])},
                             r"history must be a list of records, one per epoch, each with its epoch, train_loss"),
    "lr text": (lambda a: {**a, "meta": _meta(train_config={"lr": "0.1"})},
                r"train_config: lr must be a finite number, got '0.1'"),
    "epochs float": (lambda a: {**a, "meta": _meta(train_config={"epochs": 2.5})},
                     r"train_config: epochs must be a whole number, got 2.5"),
    "dtype int8": (lambda a: {**a, "meta": _meta(train_config={"dtype": "int8"})},
                   r"train_config: dtype must be 'float32' or 'float64'"),
    "depth strings": (lambda a: {**a, "meta": _meta(model_config={**json.loads(CFG.to_json()), "depth": ["1", 1]})},
                      r"model_config: depth must list a whole number from 1 to 1024 per stage, got \['1', 1\]"),
    "unknown model field": (lambda a: {**a, "meta": _meta(model_config={**json.loads(CFG.to_json()), "x": 1})},
                            r"model_config: .*unexpected keyword argument 'x'"),
    "classes count": (lambda a: {**a, "meta": _meta(classes=["a", "b"])},
                      r"classes lists 2 names but model_config has 3 classes"),
    "classes ints": (lambda a: {**a, "meta": _meta(classes=[1, 2, 3])}, r"classes must be a list of class names"),
    "std zero": (lambda a: {**a, "meta": _meta(normalization={"mean": [0.5] * 3, "std": [0.2, 0, 0.2]})},
                 r"normalization std must list 3 finite numbers above 0"),
    "mean short": (lambda a: {**a, "meta": _meta(normalization={"mean": [0.5], "std": [0.2] * 3})},
                   r"normalization mean must list 3 finite numbers"),
    "history": (lambda a: {**a, "meta": _meta(history=[1, 2])}, r"history must be a list of records"),
    "huge config": (lambda a: {**a, "meta": _meta(model_config={**json.loads(CFG.to_json()), "dim_embed": [4096, 8192],
                                                                "num_heads": [1, 2]})},
                    r"does not fit its own model configuration: .*arrays of the wrong shape: stage0.patch_embed.proj.weight"),
    "object array": (lambda a: {**a, "model/head.bias": np.array(["x"], dtype=object)}, None),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_are_one_line(tmp_path, case):
    change, match = BAD_CHECKPOINTS[case]
    path = tmp_path / "best.npz"
    if case == "object array":                       # np.savez needs allow_pickle for this one
        arrays = change(checkpoint_arrays())
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        refused(lambda: load(path), path, r"holds object values")
        return
    write_npz(path, change(checkpoint_arrays()))
    refused(lambda: load_checkpoint(path), path, match)
    refused(lambda: load(path), path, match)


def _model_file_arrays(config=None, **changes):
    arrays = {k: backend.to_numpy(v) for k, v in make_model().state_dict().items()}
    arrays["__config__"] = np.array(CFG.to_json() if config is None else config)
    arrays.update(changes)
    return arrays


BAD_MODEL_FILES = {
    "config a list": (_model_file_arrays("[1]"), r"__config__ is not a model configuration: .*got list"),
    "zero heads": (_model_file_arrays(json.dumps({**json.loads(CFG.to_json()), "num_heads": [0, 2]})),
                   r"num_heads must list a whole number from 1 to 65536 per stage, got \[0, 2\]"),
    "not divisible": (_model_file_arrays(json.dumps({**json.loads(CFG.to_json()), "num_heads": [3, 2]})),
                      r"stage 0: dim_embed 4 does not split into 3 heads"),
    "absurd depth": (_model_file_arrays(json.dumps({**json.loads(CFG.to_json()), "depth": [10 ** 9, 1]})),
                     r"depth must list a whole number from 1 to 1024"),
    "many blocks": (_model_file_arrays(json.dumps({**json.loads(CFG.to_json()), "depth": [1000, 1000]})),
                    r"its config describes 2,000 blocks but the file holds only \d+ arrays"),
    "nan in mlp_ratio": (_model_file_arrays(json.dumps({**json.loads(CFG.to_json()), "mlp_ratio": [float("nan"), 2]})),
                         r"mlp_ratio must list a number above 0 and below 64 per stage"),
    "inf weight": (_model_file_arrays(**{"head.bias": np.array([1, np.inf, 0], np.float32)}),
                   r"array 'head.bias' holds infinity"),
    "float64 counter": (_model_file_arrays(**{"stage1.blocks.0.attn.conv_proj_q.bn.num_batches_tracked": np.zeros(())}),
                        r"num_batches_tracked \(float64, expected whole numbers\)"),
    "complex": (_model_file_arrays(**{"head.bias": np.zeros(3, np.complex64)}), r"holds complex64 values"),
}


@pytest.mark.parametrize("case", list(BAD_MODEL_FILES))
def test_bad_model_files_are_one_line(tmp_path, case):
    arrays, match = BAD_MODEL_FILES[case]
    path = write_npz(tmp_path / "model.npz", arrays)
    refused(lambda: load(path), path, match)


def test_load_weights_checks_names_and_shapes_first(files, tmp_path):
    model = build_model(replace(CFG, num_classes=5))
    refused(lambda: minicvt.models.load_weights(model, files["model"]), files["model"],
            r"does not fit this model: arrays of the wrong shape: head.weight \(3, 8\) \(expected \(5, 8\)\)")
    same_state(minicvt.models.load_weights(make_model(), files["checkpoint"]).state_dict(), files["model_state"])


# -- lying headers and bombs ----------------------------------------------------------------------------
def npy_member(shape, dtype="<f4", data=b""):
    """The bytes of a .npy file whose header says `shape`, followed by `data` (which may not fit)."""
    import io
    f = io.BytesIO()
    npy.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    return f.getvalue() + data


def write_zip(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_a_header_declaring_terabytes_is_refused_before_allocation(tmp_path):
    arrays = checkpoint_arrays()
    members = {f"{k}.npy": npy_member(v.shape, v.dtype.str, v.tobytes()) for k, v in arrays.items() if k != "meta"}
    members["meta.npy"] = npy_member((), arrays["meta"].dtype.str, arrays["meta"].tobytes())
    members["model/head.weight.npy"] = npy_member((10 ** 6, 10 ** 6), "<f4", arrays["model/head.weight"].tobytes())
    path = write_zip(tmp_path / "lying.npz", members)
    assert peak_bytes(lambda: load(path)) < 20 * 2 ** 20                    # it declares 4 TB
    refused(lambda: load(path), path, r"array 'model/head.weight' declares shape \(1000000, 1000000\) of float32 "
                                      r"\(4,000,000,000,000 bytes\) but its member holds 96 bytes")


def raw_zip(path, members):
    """A zip written byte by byte, so that a member can hold a deflate stream made elsewhere:
    members [(name, method, stored bytes, CRC-32, uncompressed size)] (the zip format's local
    headers, then the central directory and its end record)."""
    out, central = bytearray(), bytearray()
    for name, method, data, crc, size in members:
        name = name.encode()
        fields = struct.pack("<HHHHHIII", 20, 0, method, 0, 0x21, crc, len(data), size)
        central += b"PK\x01\x02" + struct.pack("<H", 20) + fields + struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, len(out)) + name
        out += b"PK\x03\x04" + fields + struct.pack("<HH", len(name), 0) + name + data
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + end))
    return path


def write_bomb(path):
    """A model file with one more member, 'bomb.npy': about 1 MiB of deflate that inflates to a
    .npy of 1 GiB of zeros (its header declares all of them, so only the sizes tell). The stream
    is one compressed MiB of zeros repeated: a full flush makes each piece independent."""
    members = []
    for key, a in _model_file_arrays().items():
        data = npy_member(a.shape, a.dtype.str, a.tobytes())
        members.append((f"{key}.npy", zipfile.ZIP_STORED, data, zlib.crc32(data), len(data)))
    zeros, pieces = bytes(2 ** 20), 1024
    header = npy_member((pieces * 2 ** 20 // 4,), "<f4")
    first, piece, last = (zlib.compressobj(9, zlib.DEFLATED, -15) for _ in range(3))
    block = piece.compress(zeros) + piece.flush(zlib.Z_FULL_FLUSH)
    stream = first.compress(header) + first.flush(zlib.Z_FULL_FLUSH) + block * pieces + last.flush(zlib.Z_FINISH)
    crc = zlib.crc32(header)
    for _ in range(pieces):
        crc = zlib.crc32(zeros, crc)
    members.append(("bomb.npy", zipfile.ZIP_DEFLATED, stream, crc, len(header) + pieces * 2 ** 20))
    return raw_zip(path, members)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    return write_bomb(tmp_path_factory.mktemp("bomb") / "bomb.npz")


def test_a_member_inflating_to_a_gigabyte_is_refused_before_reading(bomb):
    with zipfile.ZipFile(bomb) as z:                     # the zip is honest: 1 GiB from ~1 MiB
        info = z.getinfo("bomb.npy")
        assert info.file_size > 2 ** 30 and info.compress_size < 2 * 2 ** 20
        with z.open(info) as f:                          # and its first bytes do inflate
            assert f.read(2 ** 20)[:6] == b"\x93NUMPY"
    assert peak_bytes(lambda: load(bomb)) < 20 * 2 ** 20
    refused(lambda: load(bomb), bomb, r"member 'bomb.npy' claims to inflate [\d,]+ bytes to 1,073,741,952: "
                                      r"more than weights ever compress \(a zip bomb\?\)")


def test_a_small_member_lying_about_its_size_is_refused(tmp_path):
    path = write_zip(tmp_path / "lie.npz", {"__config__.npy": npy_member((), "<U4", "abcd".encode("utf-32-le")),
                                            "w.npy": npy_member((4,), "<f4", bytes(16))}, zipfile.ZIP_DEFLATED)
    raw = bytearray(path.read_bytes())
    cd = raw.index(b"PK\x01\x02", raw.index(b"PK\x01\x02") + 1)          # w.npy's entry
    struct.pack_into("<I", raw, cd + 24, 2 ** 32 - 1)                    # declares 4 GiB
    path.write_bytes(bytes(raw))
    refused(lambda: load(path), path, r"member 'w.npy' claims to inflate")


def test_other_compressions_are_refused(tmp_path):
    path = write_zip(tmp_path / "bz.npz", {"meta.npy": npy_member((), "<U2", "{}".encode("utf-32-le"))},
                     zipfile.ZIP_BZIP2)
    refused(lambda: load_checkpoint(path), path, r"uses zip compression method 12, which numpy never writes")


def test_bombs_fit_in_a_memory_limit(bomb, tmp_path):
    """In a process whose address space is limited to what it holds plus 400 MB, the bomb, the
    terabyte header and a config describing a 10-billion-parameter model are each refused."""
    huge = json.dumps({**json.loads(CFG.to_json()), "dim_embed": [65536, 65536], "num_heads": [1, 1],
                       "depth": [1024, 1024]})
    write_npz(tmp_path / "huge.npz", _model_file_arrays(huge))
    members = {"__config__.npy": npy_member((), "<U4", "abcd".encode("utf-32-le")),
               "w.npy": npy_member((2 ** 40,), "<f8", bytes(8))}
    write_zip(tmp_path / "tb.npz", members)
    script = textwrap.dedent(f"""
        import resource, sys
        import minicvt
        from minicvt.models import load
        vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + 400 * 2 ** 20, resource.RLIM_INFINITY))
        for path in sys.argv[1:]:
            try:
                load(path)
            except minicvt.BadFileError as e:
                print('refused', str(e).count(chr(10)))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(bomb), str(tmp_path / "huge.npz"), str(tmp_path / "tb.npz")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                           "OPENBLAS_NUM_THREADS": "1"})
    assert out.stdout.split("\n")[:3] == ["refused 0"] * 3, out.stdout + out.stderr


# -- fuzz: .npz ---------------------------------------------------------------------------------------
def outcome_npz(path, reader, original):
    """The file (or folder) is refused in one line naming it, or read exactly as the undamaged one."""
    try:
        state = reader(path)
    except BadFileError as e:
        assert "\n" not in str(e) and str(path) in str(e), str(e)
        return "refused"
    same_state(state, original)
    return "read"


@FUZZ
@given(data=st.data())
def test_fuzz_truncated_and_flipped_checkpoints(files, tmp_path_factory, data):
    raw = files["checkpoint"].read_bytes()
    path = tmp_path_factory.mktemp("cut") / "last.npz"
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    path.write_bytes(raw[:cut])
    assert outcome_npz(path, lambda p: load_checkpoint(p)[0], files["checkpoint_state"]) == "refused"
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 7)), min_size=1, max_size=3))
    damaged = bytearray(raw)
    for i, bit in flips:
        damaged[i] ^= 1 << bit
    path.write_bytes(bytes(damaged))
    outcome_npz(path, lambda p: load_checkpoint(p)[0], files["checkpoint_state"])
    outcome_npz(path, lambda p: load(p).state_dict(), files["model_state"])


@FUZZ
@given(data=st.data())
def test_fuzz_truncated_and_flipped_model_files(files, tmp_path_factory, data):
    raw = files["model"].read_bytes()
    path = tmp_path_factory.mktemp("cut") / "model.npz"
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    path.write_bytes(raw[:cut])
    assert outcome_npz(path, lambda p: load(p).state_dict(), files["model_state"]) == "refused"
    i, bit = data.draw(st.integers(0, len(raw) - 1)), data.draw(st.integers(0, 7))
    path.write_bytes(raw[:i] + bytes([raw[i] ^ (1 << bit)]) + raw[i + 1:])
    outcome_npz(path, lambda p: load(p).state_dict(), files["model_state"])


def _field_paths(meta):
    """Every field of the checkpoint metadata, nested records and lists included, as key paths."""
    paths = []

    def walk(value, path):
        paths.append(path)
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, path + (k,))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, path + (i,))
    walk(meta, ())
    return paths[1:]


def _set(record, path, value):
    record = json.loads(json.dumps(record))
    target = record
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    return record


@FUZZ
@given(data=st.data())
def test_fuzz_every_metadata_field_with_every_type(files, tmp_path_factory, data):
    """Any field of a checkpoint's metadata (and of its model_config, train_config, ...) replaced
    by any JSON value: refused in one line, or read as the undamaged file."""
    meta = base_meta()
    path_ = data.draw(st.sampled_from(_field_paths(meta)), label="field")
    value = data.draw(JSON, label="value")
    arrays = {**checkpoint_arrays(), "meta": np.array(json.dumps(_set(meta, path_, value)))}
    path = write_npz(tmp_path_factory.mktemp("meta") / "best.npz", arrays)
    for reader, original in ((lambda p: load_checkpoint(p)[0], files["checkpoint_state"]),
                             (lambda p: load(p).state_dict(), files["model_state"])):
        outcome_npz(path, reader, original)


@FUZZ
@given(data=st.data())
def test_fuzz_model_file_config_fields(files, tmp_path_factory, data):
    config = json.loads(CFG.to_json())
    field = data.draw(st.sampled_from(sorted(config)), label="field")
    value = data.draw(JSON | st.lists(st.integers(-3, 2 ** 40), min_size=2, max_size=2), label="value")
    path = write_npz(tmp_path_factory.mktemp("cfg") / "model.npz",
                     _model_file_arrays(json.dumps({**config, field: value})))
    outcome_npz(path, lambda p: load(p).state_dict(), files["model_state"])


@FUZZ
@given(shape=st.lists(st.integers(0, 2 ** 40), max_size=4), dtype=st.sampled_from(["<f4", "<f2", ">f8", "<i8", "|b1", "<c8", "|O", "<U3"]))
def test_fuzz_lying_npy_headers(files, tmp_path_factory, shape, dtype):
    """head.weight's header replaced by one declaring any shape and dtype, over its real bytes."""
    arrays = _model_file_arrays()
    members = {f"{k}.npy": npy_member(v.shape, v.dtype.str, v.tobytes()) for k, v in arrays.items()}
    members["head.weight.npy"] = npy_member(shape, dtype, arrays["head.weight"].tobytes())
    path = write_zip(tmp_path_factory.mktemp("hdr") / "model.npz", members)
    tracemalloc.start()
    try:
        outcome_npz(path, lambda p: load(p).state_dict(), files["model_state"])
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 20 * 2 ** 20


# -- Hugging Face folders: examples -------------------------------------------------------------------
def _cfg(**changes):
    return {**hf_config(), **changes}


BAD_CONFIGS = {
    "a list": ([hf_config()], r"config.json: must hold a JSON object \(transformers' CvtConfig\), got a JSON list"),
    "depth strings": (_cfg(depth=["1", 1]), r"config.json: depth must list a whole number from 1 to 1024 per stage, got \['1', 1\]"),
    "zero heads": (_cfg(num_heads=[0, 2]), r"config.json: num_heads must list a whole number from 1 to 65536"),
    "negative depth": (_cfg(depth=[-1, 1]), r"config.json: depth must list"),
    "not divisible": (_cfg(num_heads=[3, 2]), r"config.json: stage 0: embed_dim 4 does not split into 3 heads"),
    "absurd embed": (_cfg(embed_dim=[10 ** 12, 8]), r"config.json: embed_dim must list a whole number from 1 to 65536"),
    "huge model": (_cfg(embed_dim=[65536, 65536], num_heads=[1, 1]),
                   r"model.safetensors: .*tensors of the wrong shape: .*\(expected \(65536, 3, 3, 3\)\)"),
    "id2label list": (_cfg(id2label=["a", "b", "c"]), r"config.json: id2label must map the class numbers 0..N-1 to names"),
    "id2label gaps": (_cfg(id2label={"0": "a", "5": "b"}), r"id2label must map"),
    "num_labels text": (_cfg(id2label=None, num_labels="3"), r"config.json: num_labels must be a whole number"),
    "channels": (_cfg(num_channels=0), r"config.json: num_channels must be a whole number from 1 to 64"),
    "padding": (_cfg(patch_padding=[5, 1]), r"config.json: stage 0: patch_padding 5 must be smaller than patch_sizes 3"),
    "not cvt": (_cfg(model_type="vit"), r"config.json: model_type is 'vit', not 'cvt'"),
    "scalar depth": (_cfg(depth=3), r"config.json: depth must list one value per stage, got 3"),
    "short list": (_cfg(embed_dim=[4]), r"config.json: .*embed_dim must list one value per stage \(2\)"),
    "not json": ("{", r"config.json: not readable JSON"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_json_is_one_line(tmp_path, case):
    config, match = BAD_CONFIGS[case]
    folder = hf_folder(tmp_path / "cvt")
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    refused(lambda: from_pretrained(folder), folder, match)


BAD_PREPROCESSORS = {
    "size text": ({"size": "224"}, r"preprocessor_config.json: size must be a whole number of pixels"),
    "huge size": ({"size": {"shortest_edge": 10 ** 9}}, r"size must be a whole number of pixels from 1 to 8192"),
    "crop": ({"crop_pct": 7}, r"crop_pct must be a fraction above 0 and at most 1, got 7"),
    "std zero": ({"image_std": [0, 1, 1]}, r"image_std must be a list of 3 finite numbers above 0"),
    "mean nan": ({"image_mean": [float("nan")] * 3}, r"image_mean must be a list of 3 finite numbers"),
    "a list": ([], r"preprocessor_config.json: must hold the image processor's settings, got a JSON list"),
}


@pytest.mark.parametrize("case", list(BAD_PREPROCESSORS))
def test_bad_preprocessor_config_is_one_line(tmp_path, case):
    value, match = BAD_PREPROCESSORS[case]
    folder = hf_folder(tmp_path / "cvt")
    (folder / "preprocessor_config.json").write_text(json.dumps(value))
    refused(lambda: from_pretrained(folder), "preprocessor_config.json", match)


def _shift(name, by):
    return lambda h: h[name]["data_offsets"].__setitem__(1, h[name]["data_offsets"][1] + by)


BAD_SAFETENSORS = {
    "header past the end": (dict(raw_header=b"{}" + b" " * 10), None),
    "not json": (dict(raw_header=b"{nope"), r"its header is not readable JSON"),
    "a list": (dict(raw_header=b"[]"), r"its header must be a JSON object, got a list"),
    "unknown dtype": (dict(mutate=lambda h: h["classifier.bias"].__setitem__("dtype", "C64")),
                      r"tensor 'classifier.bias' has dtype 'C64'"),
    "shape text": (dict(mutate=lambda h: h["classifier.bias"].__setitem__("shape", ["3"])),
                   r"tensor 'classifier.bias' has shape \['3'\], not a list of whole numbers"),
    "offsets outside": (dict(mutate=lambda h: h["classifier.bias"].__setitem__("data_offsets", [0, 10 ** 12])),
                        r"tensor 'classifier.bias' has data_offsets \[0, 1000000000000\] outside the file's"),
    "byte count": (dict(mutate=_shift("classifier.bias", -4)), r"needs 12 bytes, its offsets span 8"),
    "overlap": (dict(mutate=lambda h: h["classifier.bias"].__setitem__("data_offsets", list(h["classifier.weight"]["data_offsets"][:1]) + [h["classifier.weight"]["data_offsets"][0] + 12])),
                r"overlap"),
    "metadata": (dict(mutate=lambda h: h.__setitem__("__metadata__", {"a": 1})), r"__metadata__ must map text to text"),
    "missing": (dict(tensors={k: v for k, v in hf_tensors().items() if k != "classifier.bias"}),
                r"missing tensors: classifier.bias"),
    "wrong shape": (dict(tensors={**hf_tensors(), "layernorm.weight": np.zeros(7, np.float32)}),
                    r"tensors of the wrong shape: layernorm.weight \(7,\) \(expected \(8,\)\)"),
    "integer weights": (dict(tensors={**hf_tensors(), "layernorm.weight": np.zeros(8, np.int64)}),
                        r"weights that are not float16, float32 or float64: layernorm.weight \(int64\)"),
    "nan": (dict(tensors={**hf_tensors(), "layernorm.weight": np.full(8, np.nan, np.float32)}),
            r"tensor 'layernorm.weight' holds NaN \(the file of a diverged run\?\)"),
}


@pytest.mark.parametrize("case", list(BAD_SAFETENSORS))
def test_bad_safetensors_are_one_line(tmp_path, case):
    kw, match = BAD_SAFETENSORS[case]
    if case == "header past the end":
        folder = hf_folder(tmp_path / "cvt")
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2 ** 62) + b"{}")
        match = r"its header claims 4,611,686,018,427,387,904 bytes but the file has 10"
    else:
        folder = hf_folder(tmp_path / "cvt", **kw)
    assert peak_bytes(lambda: from_pretrained(folder)) < 20 * 2 ** 20
    refused(lambda: from_pretrained(folder), "model.safetensors", match)


def test_shards_are_checked(tmp_path, files):
    tensors = hf_tensors()
    names = sorted(tensors)
    folder = hf_folder(tmp_path / "sharded")
    (folder / "model.safetensors").unlink()
    write_safetensors(folder / "model-1.safetensors", {k: tensors[k] for k in names[:10]})
    write_safetensors(folder / "model-2.safetensors", {k: tensors[k] for k in names[10:]})
    index = folder / "model.safetensors.index.json"

    def write_index(weight_map):
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    good = {k: "model-1.safetensors" if i < 10 else "model-2.safetensors" for i, k in enumerate(names)}
    write_index(good)
    same_state(from_pretrained(folder).state_dict(), files["model_state"])
    write_index({**good, names[0]: "../../etc/passwd"})
    refused(lambda: from_pretrained(folder), index, r"maps to '../../etc/passwd', not a .safetensors file name")
    write_index({**good, names[0]: "model-2.safetensors"})
    refused(lambda: from_pretrained(folder), folder, r"model-\d.safetensors: its tensors are not the ones")
    write_index({**good, names[0]: "model-3.safetensors"})
    refused(lambda: from_pretrained(folder), index, r"names shards the folder lacks: model-3.safetensors")
    index.write_text("[]")
    refused(lambda: from_pretrained(folder), index, r"must hold an index of shards, got a JSON list")


# -- fuzz: Hugging Face folders ---------------------------------------------------------------------
def outcome_hf(folder, original):
    """The folder is refused in one line naming it, or read exactly as the undamaged one."""
    return outcome_npz(folder, lambda f: from_pretrained(f).state_dict(), original)


@FUZZ
@given(data=st.data())
def test_fuzz_config_json_fields(files, tmp_path_factory, data):
    config = hf_config()
    path_ = data.draw(st.sampled_from(_field_paths(config)), label="field")
    value = data.draw(JSON | st.lists(st.integers(-3, 2 ** 40), min_size=2, max_size=2), label="value")
    folder = hf_folder(tmp_path_factory.mktemp("hf") / "cvt", config=_set(config, path_, value))
    outcome_hf(folder, files["model_state"])


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_headers(files, tmp_path_factory, data):
    """Any field of any tensor's header entry replaced by any JSON value (or the length lying)."""
    tensors = hf_tensors()
    name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]), label="field")
    value = data.draw(JSON | st.lists(st.integers(-3, 2 ** 64), min_size=1, max_size=3), label="value")
    folder = tmp_path_factory.mktemp("st") / "cvt"
    if field is None:
        hf_folder(folder, tensors=tensors, mutate=lambda h: h.__setitem__(name, value))
    else:
        hf_folder(folder, tensors=tensors, mutate=lambda h: h[name].__setitem__(field, value))
    outcome_hf(folder, files["model_state"])
    raw = (folder / "model.safetensors").read_bytes()
    length = data.draw(st.integers(0, 2 ** 64 - 1), label="length")
    cut = data.draw(st.integers(0, len(raw)), label="cut")
    (folder / "model.safetensors").write_bytes((struct.pack("<Q", length) + raw[8:])[:cut])
    tracemalloc.start()
    try:
        outcome_hf(folder, files["model_state"])
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 20 * 2 ** 20


# -- pytorch_model.bin -----------------------------------------------------------------------------
def test_pytorch_bin_files_are_checked_before_and_after_torch_load(tmp_path, files):
    torch = pytest.importorskip("torch")
    folder = hf_folder(tmp_path / "bin")
    (folder / "model.safetensors").unlink()
    binary = folder / "pytorch_model.bin"
    tensors = {k: torch.from_numpy(v.copy()) for k, v in hf_tensors().items()}
    torch.save(tensors, binary)
    same_state(from_pretrained(folder).state_dict(), files["model_state"])
    torch.save(tensors, binary, _use_new_zipfile_serialization=False)
    refused(lambda: from_pretrained(folder), binary, r"is a legacy \(pre-1.6\) PyTorch pickle")
    torch.save({**tensors, "extra": torch.zeros(2 ** 20)}, binary)            # 4 MB for a 3k-number model
    refused(lambda: from_pretrained(folder), binary, r"its members hold [\d,]+ bytes, far more than")
    torch.save({**tensors, "layernorm.weight": torch.full((8,), float("nan"))}, binary)
    refused(lambda: from_pretrained(folder), binary, r"tensor 'layernorm.weight' holds NaN")
    torch.save({**tensors, "layernorm.weight": torch.zeros(8, dtype=torch.int64)}, binary)
    refused(lambda: from_pretrained(folder), binary, r"layernorm.weight \(int64\)")
    torch.save([torch.zeros(2000)], binary)
    refused(lambda: from_pretrained(folder), binary, r"holds list, not a state dict of named tensors")
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
    torch.save(bf16, binary)
    got = backend.to_numpy(from_pretrained(folder).state_dict()["head.weight"])
    np.testing.assert_allclose(got, backend.to_numpy(files["model_state"]["head.weight"]), rtol=2 ** -7, atol=1e-6)


# -- through the command line -----------------------------------------------------------------------
def test_command_line_refusals_are_one_line(tmp_path, capsys, bomb):
    from PIL import Image
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "x.png")
    nan = write_npz(tmp_path / "nan.npz", BAD_CHECKPOINTS["nan weight"][0](checkpoint_arrays()))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(write_npz(tmp_path / "whole.npz", checkpoint_arrays()).read_bytes()[:3000])
    hf = hf_folder(tmp_path / "hf")
    (hf / "config.json").write_text(json.dumps(BAD_CONFIGS["depth strings"][0]))
    previous = backend.get_backend()
    try:
        for args, name in ((["--checkpoint", str(nan)], nan), (["--checkpoint", str(cut)], cut),
                           (["--checkpoint", str(bomb)], bomb), (["--pretrained", str(hf)], hf)):
            code = cli.main(["predict", *args, "--images", str(tmp_path / "x.png")])
            err = capsys.readouterr().err
            assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and str(name) in err, err
            assert err.startswith("minicvt predict: error: ")
    finally:
        backend.set_backend(previous)
