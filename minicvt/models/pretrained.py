"""Pretrained CvTs in the Hugging Face format, read in NumPy (no PyTorch at run time).

    model = minicvt.load("cvt-13")              # a folder as `hf download microsoft/cvt-13` writes it
    model.predict(["cat.jpg"], top=5)           # [[('tabby, tabby cat', 0.6), ...]]: models/inputs.py

A folder holds config.json (transformers' CvtConfig) and model.safetensors, or pytorch_model.bin
(a pickle: read only where PyTorch is installed, with its weights_only loader), and perhaps
preprocessor_config.json. The config maps to a CvTConfig and every tensor name to the official
name minicvt uses (docs/architecture.md#hugging-face-models lists both, and where transformers'
model differs from the official code: its exact GELU is kept, so minicvt computes what the file's
model computes).
"""
import math
import re
import reprlib
from pathlib import Path

import numpy as np

from .. import backend
from . import hf_weights
from .configs import CVT_13, CvTConfig, stage_problem
from .cvt import ConvolutionalVisionTransformer
from .expect import config_fits, nonfinite_problem, state_problems, state_shapes
from .hf_weights import PretrainedError, read_json


# transformers' CvtConfig field -> CvTConfig field, for the per-stage lists
_FIELDS = {"patch_sizes": "patch_size", "patch_stride": "patch_stride", "patch_padding": "patch_padding",
           "embed_dim": "dim_embed", "num_heads": "num_heads", "depth": "depth", "mlp_ratio": "mlp_ratio",
           "qkv_bias": "qkv_bias", "drop_rate": "drop_rate", "attention_drop_rate": "attn_drop_rate",
           "drop_path_rate": "drop_path_rate", "cls_token": "cls_token",
           "qkv_projection_method": "qkv_proj_method", "kernel_qkv": "kernel_qkv", "padding_kv": "padding_kv",
           "stride_kv": "stride_kv", "padding_q": "padding_q", "stride_q": "stride_q"}

# tensor names: transformers' on the left, the official code's (minicvt's) on the right; {s} a
# stage, {b} a block, {p} a parameter or buffer name, {qkv} query/key/value <-> {x} q/k/v
_LAYER = "cvt.encoder.stages.{s}.layers.{b}."
_BLOCK = "stage{s}.blocks.{b}."
NAMES = [
    ("cvt.encoder.stages.{s}.cls_token", "stage{s}.cls_token"),
    ("cvt.encoder.stages.{s}.embedding.convolution_embeddings.projection.{p}", "stage{s}.patch_embed.proj.{p}"),
    ("cvt.encoder.stages.{s}.embedding.convolution_embeddings.normalization.{p}", "stage{s}.patch_embed.norm.{p}"),
    (_LAYER + "attention.attention.convolution_projection_{qkv}.convolution_projection.convolution.{p}",
     _BLOCK + "attn.conv_proj_{x}.conv.{p}"),
    (_LAYER + "attention.attention.convolution_projection_{qkv}.convolution_projection.normalization.{p}",
     _BLOCK + "attn.conv_proj_{x}.bn.{p}"),
    (_LAYER + "attention.attention.projection_{qkv}.{p}", _BLOCK + "attn.proj_{x}.{p}"),
    (_LAYER + "attention.output.dense.{p}", _BLOCK + "attn.proj.{p}"),
    (_LAYER + "intermediate.dense.{p}", _BLOCK + "mlp.fc1.{p}"),
    (_LAYER + "output.dense.{p}", _BLOCK + "mlp.fc2.{p}"),
    (_LAYER + "layernorm_before.{p}", _BLOCK + "norm1.{p}"),
    (_LAYER + "layernorm_after.{p}", _BLOCK + "norm2.{p}"),
    ("layernorm.{p}", "norm.{p}"),
    ("classifier.{p}", "head.{p}"),
]
_GROUPS = {"s": r"(?P<s>\d+)", "b": r"(?P<b>\d+)", "p": r"(?P<p>[a-z_]+)",
           "qkv": r"(?P<qkv>query|key|value)", "x": r"(?P<x>[qkv])"}


def _pattern(template):
    parts = re.split(r"\{(\w+)\}", template)      # literal, group, literal, group, ...
    return re.compile("".join(re.escape(t) if i % 2 == 0 else _GROUPS[t] for i, t in enumerate(parts)) + "$")


_TO_OFFICIAL = [(_pattern(hf), official) for hf, official in NAMES]
_TO_HF = [(_pattern(official), hf) for hf, official in NAMES]


def _rename(key, table):
    for pattern, template in table:
        m = pattern.match(key)
        if m:
            g = m.groupdict()
            if "qkv" in g:
                g["x"] = g["qkv"][0]
            elif "x" in g:
                g["qkv"] = {"q": "query", "k": "key", "v": "value"}[g["x"]]
            return template.format(**g)
    return None


def official_name(hf_key):
    """transformers' tensor name -> the official one (None if it has no counterpart)."""
    return _rename(hf_key, _TO_OFFICIAL)


def hf_name(official_key):
    """The official tensor name -> transformers' (None if it has no counterpart)."""
    return _rename(official_key, _TO_HF)


def config_from_hf(hf, name="pretrained", image_size=224):
    """A CvTConfig for transformers' CvtConfig as a dict (config.json). Refuses in one line, naming
    the field in transformers' terms, what is of the wrong type, what transformers' own model would
    not run and what minicvt cannot represent."""
    if not isinstance(hf, dict):
        raise PretrainedError(f"must hold a JSON object (transformers' CvtConfig), got {type(hf).__name__}")
    if hf.get("model_type") != "cvt":
        raise PretrainedError(f"model_type is {reprlib.repr(hf.get('model_type'))}, not 'cvt': not a CvT")
    stages = {}
    for theirs, ours in _FIELDS.items():
        value = hf.get(theirs, getattr(CVT_13, ours))       # transformers' defaults are CvT-13's
        if not isinstance(value, (list, tuple)):
            raise PretrainedError(f"{theirs} must list one value per stage, got {reprlib.repr(value)}")
        problem = stage_problem(ours, value)
        if problem:
            raise PretrainedError(f"{theirs} {problem}")
        stages[ours] = tuple(value)
    bad = [m for m in stages["qkv_proj_method"] if m != "dw_bn"]
    if bad:
        raise PretrainedError(f"qkv_projection_method {list(stages['qkv_proj_method'])}: only 'dw_bn' "
                              f"(transformers' CvT builds no key/value projection for {bad[0]!r})")
    if any(stages["cls_token"][:-1]):
        raise PretrainedError(f"cls_token {list(stages['cls_token'])}: a class token before the last "
                              f"stage (transformers sizes every class token by the last stage's width)")
    num_classes = len(_labels(hf)) or hf.get("num_labels", 2)
    channels = hf.get("num_channels", 3)
    try:
        return CvTConfig(name=name, in_chans=channels, num_classes=num_classes,
                         image_size=image_size, act="gelu", attn_scale="official", pool="auto",
                         norm_eps=1e-5, **stages)
    except ValueError as e:
        message = str(e)
        for theirs, ours in list(_FIELDS.items()) + [("num_channels", "in_chans"), ("num_labels", "num_classes")]:
            message = re.sub(rf"\b{ours}\b", theirs, message)        # in config.json's words
        raise PretrainedError(message) from None


def _labels(hf):
    """id2label as a list of names in class order ([] if the config has none); PretrainedError
    unless it maps every class number 0..N-1 (as text, JSON's keys) to a name."""
    labels = hf.get("id2label") or {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()) \
            or set(labels) != {str(i) for i in range(len(labels))}:
        raise PretrainedError(f"id2label must map the class numbers 0..N-1 to names, got {reprlib.repr(labels)}")
    return [labels[str(i)] for i in range(len(labels))]


def preprocessing_from_hf(folder):
    """How the model's image processor prepares an image (ConvNext's, which CvT uses): from
    preprocessor_config.json where the folder has one, else microsoft/cvt-13's. Each value's type
    and range is checked (PretrainedError naming the file)."""
    p = {"size": 224, "crop": "shortest_edge", "crop_pct": 224 / 256, "mean": [0.485, 0.456, 0.406],
         "std": [0.229, 0.224, 0.225]}
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return p
    cfg = read_json(path, "the image processor's settings")
    size = cfg.get("size", p["size"])
    size = size.get("shortest_edge") if isinstance(size, dict) else size
    crop = cfg.get("crop_pct") or p["crop_pct"]
    mean, std = cfg.get("image_mean", p["mean"]), cfg.get("image_std", p["std"])

    def numbers(v, low):
        return isinstance(v, list) and len(v) == 3 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > low for x in v)
    checks = [(isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= 8192, "size",
               "a whole number of pixels from 1 to 8192 (or {'shortest_edge': it})", cfg.get("size")),
              (isinstance(crop, (int, float)) and not isinstance(crop, bool) and 0 < crop <= 1, "crop_pct",
               "a fraction above 0 and at most 1", crop),
              (numbers(mean, -math.inf), "image_mean", "a list of 3 finite numbers", mean),
              (numbers(std, 0), "image_std", "a list of 3 finite numbers above 0", std)]
    for ok, field, what, value in checks:
        if not ok:
            raise PretrainedError(f"{path}: {field} must be {what}, got {reprlib.repr(value)}")
    return {"size": size, "crop": "shortest_edge", "crop_pct": float(crop), "mean": list(mean), "std": list(std)}


def read_state(folder, cfg):
    """The model's state dict (official names) from the folder's weights: model.safetensors, the
    shards an index names, or pytorch_model.bin through PyTorch's weights_only loader. Every
    tensor's name, dtype and shape is checked against the model of `cfg` before it is read
    (hf_weights), and NaN and infinity are refused after."""
    folder = Path(folder)
    index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if index.is_file() or single.is_file():
        shards = hf_weights.shard_files(folder, index) if index.is_file() else {single: None}
        headers, where, by_shard = {}, {}, {}
        for shard, listed in shards.items():
            entries = by_shard[shard] = hf_weights.safetensors_header(shard)
            if listed is not None and sorted(entries) != sorted(listed):
                others = sorted(set(entries) ^ set(listed))
                raise PretrainedError(f"{shard}: its tensors are not the ones {index.name} lists for it "
                                      f"({', '.join(others[:4])})")
            for name in entries:
                if name in headers:
                    raise PretrainedError(f"{shard}: tensor {name!r} is also in {where[name].name}")
                where[name] = shard
            headers.update(entries)
        source = index if index.is_file() else single
        _check_tensors(source, hf_weights.as_checked(headers), cfg)
        tensors = {}
        for shard, entries in by_shard.items():
            tensors.update(hf_weights.read_safetensors(shard, entries, list(entries)))
        return _official(source, tensors)
    binary = folder / "pytorch_model.bin"
    if binary.is_file():
        return _official(binary, _read_bin(binary, cfg))
    raise PretrainedError(f"{folder}: no model.safetensors or pytorch_model.bin in it")


def _check_tensors(path, found, cfg):
    """Refuse, naming them, tensors that do not fit the model of `cfg`: first the config's blocks
    against the file's tensors (so a hostile config cannot make us list a huge expectation), then
    every name, shape and dtype."""
    problem = config_fits(cfg, len(found))
    if problem:
        raise PretrainedError(f"{path}: {problem}")
    expected = {hf_name(k) or k: v for k, v in state_shapes(cfg).items()}
    problem = state_problems(found, expected, what="tensors")
    if problem:
        raise PretrainedError(f"{path}: {problem}")


def _official(path, tensors):
    """{official name: array}, refusing NaN and infinity."""
    for k, v in tensors.items():
        problem = nonfinite_problem(k, v)
        if problem:
            raise PretrainedError(f"{path}: {problem.replace('array', 'tensor', 1)}")
    return {official_name(k): v for k, v in tensors.items()}


def _read_bin(binary, cfg):
    """{transformers name: array} from pytorch_model.bin, checked before and after torch.load."""
    members, num_bytes = hf_weights.bin_members(binary)        # one member per tensor's storage
    problem = config_fits(cfg, members, num_bytes)
    if problem:
        raise PretrainedError(f"{binary}: {problem}")
    expected = state_shapes(cfg)
    numbers = sum(math.prod(shape) for shape, _ in expected.values())
    if num_bytes > 8 * numbers + 2 ** 20:           # float64 is 8 bytes a number; the pickle is small
        raise PretrainedError(f"{binary}: its members hold {num_bytes:,} bytes, far more than the "
                              f"{numbers:,} numbers of the model its config.json describes")
    try:
        import torch
    except ImportError:
        raise PretrainedError(f"{binary} is a PyTorch pickle: reading it needs PyTorch (pip install "
                              f"torch), or a model.safetensors copy of it") from None
    try:
        state = torch.load(binary, map_location="cpu", weights_only=True)
    except Exception as e:           # a damaged pickle, or one holding more than tensors
        raise PretrainedError(f"{binary.name} is not a readable PyTorch state dict "
                              f"({' '.join(str(e).split())[:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise PretrainedError(f"{binary}: holds {type(state).__name__}, not a state dict of named tensors")
    def numpy_dtype(t):            # bfloat16 becomes float32; a type NumPy lacks shows as 'void'
        name = "float32" if t.dtype == torch.bfloat16 else str(t.dtype).split(".")[-1]
        return np.dtype(getattr(np, name, np.void))
    found = {k: (numpy_dtype(v), tuple(v.shape)) for k, v in state.items()}
    problem = state_problems(found, {hf_name(k) or k: v for k, v in expected.items()}, what="tensors")
    if problem:
        raise PretrainedError(f"{binary}: {problem}")
    return {k: v.detach().float().numpy() if str(v.dtype) == "torch.bfloat16" else v.detach().numpy()
            for k, v in state.items()}


def from_pretrained(path, dtype=np.float32):
    """The CvT in a Hugging Face model folder, in eval mode on the active backend, with
    `classes` (id2label in order) and `preprocessing` (models/inputs.py: for `predict`). A folder that is not
    one, or whose files are damaged or hostile, is a PretrainedError in one line naming the file;
    nothing is allocated before it is checked (docs/files.md)."""
    folder = Path(path)
    config = folder / "config.json"
    if folder.is_file():
        raise PretrainedError(f"{folder} is a file, not a Hugging Face model folder" + (
            "; a model minicvt trained loads with minicvt.load (--checkpoint)" if folder.suffix == ".npz"
            else f"; give the folder that holds its config.json ({folder.parent})"))
    if not config.is_file():
        what = "not a Hugging Face model folder (no config.json)" if folder.exists() else "does not exist"
        raise PretrainedError(f"{folder}: {what}; get one with `hf download microsoft/cvt-13 --local-dir {folder}`")
    try:
        hf = read_json(config, "a JSON object (transformers' CvtConfig)")
        preprocessing = preprocessing_from_hf(folder)
        try:
            cfg = config_from_hf(hf, name=folder.name, image_size=preprocessing["size"])
        except PretrainedError as e:
            raise PretrainedError(f"{config}: {e}") from None
        state = read_state(folder, cfg)
    except OSError as e:
        raise PretrainedError(f"{folder}: unreadable ({' '.join(str(e).split())})") from None
    model = ConvolutionalVisionTransformer(cfg, dtype=dtype, seed=0)
    model.load_state_dict(state)
    labels = _labels(hf)
    model.classes = labels or [str(i) for i in range(cfg.num_classes)]
    model.preprocessing = preprocessing
    return model.eval()


def export_hf_state_dict(model):
    """{transformers name: NumPy array}: loads into transformers' CvtForImageClassification."""
    return {hf_name(k): backend.to_numpy(v).copy() for k, v in model.state_dict().items()}
