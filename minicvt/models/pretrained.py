"""Pretrained CvTs in the Hugging Face format, read in NumPy (no PyTorch at run time).

    model = minicvt.from_pretrained("cvt-13")               # a folder as `hf download microsoft/cvt-13` writes it
    shown, x = prepare_images(["cat.jpg"], model.preprocessing)   # uint8 crops (N, 3, S, S), inputs (N, 3, S, S)
    probs = softmax(model(x))                               # names: model.classes

A folder holds config.json (transformers' CvtConfig) and model.safetensors, or pytorch_model.bin
(a pickle: read only where PyTorch is installed, with its weights_only loader), and perhaps
preprocessor_config.json. The config maps to a CvTConfig and every tensor name to the official
name minicvt uses (docs/architecture.md#hugging-face-models lists both, and where transformers'
model differs from the official code: its exact GELU is kept, so minicvt computes what the file's
model computes).
"""
import json
import re
from pathlib import Path

import numpy as np

from .. import backend, data
from ..errors import BadFileError
from .configs import CVT_13, CvTConfig
from .cvt import ConvolutionalVisionTransformer


class PretrainedError(BadFileError):
    """A folder that is not a Hugging Face CvT minicvt can read; the message says why."""


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
    """A CvTConfig for transformers' CvtConfig as a dict (config.json). Refuses, naming the
    field, what transformers' own model would not run or minicvt cannot represent."""
    if hf.get("model_type") != "cvt":
        raise PretrainedError(f"model_type is {hf.get('model_type')!r}, not 'cvt': not a CvT")
    stages = {}
    for theirs, ours in _FIELDS.items():
        value = hf.get(theirs, getattr(CVT_13, ours))       # transformers' defaults are CvT-13's
        if not isinstance(value, (list, tuple)):
            raise PretrainedError(f"config.json: {theirs} must list one value per stage, got {value!r}")
        stages[ours] = tuple(value)
    bad = [m for m in stages["qkv_proj_method"] if m != "dw_bn"]
    if bad:
        raise PretrainedError(f"qkv_projection_method {list(stages['qkv_proj_method'])}: only 'dw_bn' "
                              f"(transformers' CvT builds no key/value projection for {bad[0]!r})")
    if any(stages["cls_token"][:-1]):
        raise PretrainedError(f"cls_token {list(stages['cls_token'])}: a class token before the last "
                              f"stage (transformers sizes every class token by the last stage's width)")
    labels = hf.get("id2label") or {}
    num_classes = len(labels) if labels else int(hf.get("num_labels", 2))
    try:
        return CvTConfig(name=name, in_chans=int(hf.get("num_channels", 3)), num_classes=num_classes,
                         image_size=image_size, act="gelu", attn_scale="official", pool="auto",
                         norm_eps=1e-5, **stages)
    except ValueError as e:
        raise PretrainedError(f"config.json: {e}") from None


def preprocessing_from_hf(folder):
    """How the model's image processor prepares an image (ConvNext's, which CvT uses): from
    preprocessor_config.json where the folder has one, else microsoft/cvt-13's."""
    p = {"size": 224, "crop_pct": 224 / 256, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    path = Path(folder) / "preprocessor_config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        size = cfg.get("size", p["size"])
        p["size"] = int(size["shortest_edge"] if isinstance(size, dict) else size)
        p["crop_pct"] = float(cfg.get("crop_pct") or p["crop_pct"])
        p["mean"], p["std"] = list(cfg.get("image_mean", p["mean"])), list(cfg.get("image_std", p["std"]))
    return p


def read_tensors(folder):
    """{transformers name: NumPy array} from model.safetensors (or the shards an index names), or
    from pytorch_model.bin through PyTorch's weights_only loader."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    try:
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()}) \
            if index.is_file() else [folder / "model.safetensors"]
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{index.name} has no readable weight_map ({e!r})") from None
    if all(f.is_file() for f in files):
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise PretrainedError("reading model.safetensors needs the safetensors package: "
                                  "pip install safetensors") from None
        tensors = {}
        for f in files:
            try:
                tensors.update(load_file(str(f)))
            except Exception as e:       # safetensors raises its own SafetensorError for a bad file
                raise PretrainedError(f"{f.name} is not a readable safetensors file ({e})") from None
        return tensors
    binary = folder / "pytorch_model.bin"
    if binary.is_file():
        try:
            import torch
        except ImportError:
            raise PretrainedError(f"{binary} is a PyTorch pickle: reading it needs PyTorch (pip install "
                                  f"torch), or a model.safetensors copy of it") from None
        try:
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as e:           # a truncated pickle, or one holding more than tensors
            raise PretrainedError(f"{binary.name} is not a readable PyTorch state dict ({e})") from None
        return {k: v.detach().float().numpy() if str(v.dtype) == "torch.bfloat16" else v.detach().numpy()
                for k, v in state.items()}
    raise PretrainedError("no model.safetensors or pytorch_model.bin in it")


def state_from_hf(tensors, model):
    """The model's state dict from transformers' tensors; names every missing, extra and
    mis-shaped one."""
    own, state, extra = model.state_dict(), {}, []
    for k, v in tensors.items():
        name = official_name(k)
        if name is None or name not in own:
            extra.append(k)
        else:
            state[name] = v
    missing = [hf_name(k) or k for k in own if k not in state]
    shapes = [f"{hf_name(k)} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in state.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    problems = [f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                for what, names in (("missing tensors", missing), ("unexpected tensors", extra),
                                    ("tensors of the wrong shape", shapes)) if names]
    if problems:
        raise PretrainedError("; ".join(problems))
    return state


def from_pretrained(path, dtype=np.float32):
    """The CvT in a Hugging Face model folder, in eval mode on the active backend, with
    `classes` (id2label in order) and `preprocessing` (for prepare_images)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise PretrainedError(f"{folder}: not a Hugging Face model folder (no config.json); get one "
                              f"with `hf download microsoft/cvt-13 --local-dir {folder}`")
    try:
        hf = json.loads((folder / "config.json").read_text())
        preprocessing = preprocessing_from_hf(folder)
        cfg = config_from_hf(hf, name=folder.name, image_size=preprocessing["size"])
        model = ConvolutionalVisionTransformer(cfg, dtype=dtype, seed=0)
        model.load_state_dict(state_from_hf(read_tensors(folder), model))
    except PretrainedError as e:
        raise PretrainedError(f"{folder}: {e}") from None
    except (json.JSONDecodeError, OSError) as e:
        raise PretrainedError(f"{folder}: unreadable ({e})") from None
    labels = hf.get("id2label") or {}
    model.classes = [labels.get(str(i), labels.get(i, str(i))) for i in range(cfg.num_classes)]
    model.preprocessing = preprocessing
    return model.eval()


def export_hf_state_dict(model):
    """{transformers name: NumPy array}: loads into transformers' CvtForImageClassification."""
    return {hf_name(k): backend.to_numpy(v).copy() for k, v in model.state_dict().items()}


def prepare_images(paths, preprocessing):
    """(shown uint8 (N, 3, S, S), x float32 (N, 3, S, S)) for image files, as the model's image
    processor prepares them: below 384 pixels the shorter side resized to S / crop_pct (bicubic)
    and the central S x S cropped, from 384 on resized to S x S; then scaled to 0..1 and
    normalised with the mean and std. `shown` is the crop, for drawing."""
    from PIL import Image          # imported where it is used, as data.folders does: a slow import

    S = preprocessing["size"]

    def fit(im):
        if S >= 384:
            return im.resize((S, S), Image.BICUBIC)
        w, h = im.size
        edge = int(S / preprocessing["crop_pct"])
        w, h = (edge, int(edge * h / w)) if w <= h else (int(edge * w / h), edge)
        left, top = (w - S) // 2, (h - S) // 2                      # as transformers' center_crop
        return im.resize((w, h), Image.BICUBIC).crop((left, top, left + S, top + S))

    shown = data.load_image_files(paths, fit)
    return shown, data.normalize(shown, np.asarray(preprocessing["mean"]), np.asarray(preprocessing["std"]))
