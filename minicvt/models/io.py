"""Weights in and out: our own `.npz` files, and the official / PyTorch state_dict.

Our file: one array per state_dict key (parameters and BatchNorm buffers, the official names)
plus the config as a JSON string under `__config__`, read back with allow_pickle=False, so a
file can only ever hold numbers and text.

PyTorch and the official code store the same names with the same layouts (conv (F, C, kh, kw),
depthwise conv (C, 1, kh, kw), linear (out, in), class token (1, 1, C)), because minicvt keeps
PyTorch's layouts throughout; importing is therefore a matter of names, device and dtype.
"""
from pathlib import Path

import numpy as np

from .. import backend
from ..checkpoint import CheckpointError, atomic_savez, check_meta, load_checkpoint, run_checkpoint_in
from ..npz import NpzReader
from .configs import CvTConfig
from .cvt import ConvolutionalVisionTransformer
from .expect import config_fits, nonfinite_problem, state_problems, state_shapes
from .inputs import run_preprocessing

CONFIG_KEY = "__config__"


def save(model, path):
    """Write model's parameters, buffers and config to `path` ('.npz' is added if missing),
    atomically: a crash while writing leaves any previous file intact."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    arrays = {k: backend.to_numpy(v) for k, v in model.state_dict().items()}
    arrays[CONFIG_KEY] = np.array(model.config.to_json())          # 0-d unicode array, no pickle
    atomic_savez(path, arrays)
    return path


def load(path, dtype=None):
    """Any model minicvt reads, as a model in eval mode on the active backend (`.train()`
    switches it back), ready for `model.predict(images)`:
    - a checkpoint of `minicvt train` (last.npz, best.npz, or an inference copy such as the one
      shipped in checkpoints/), in its run's dtype; `classes`, `normalization` (per-channel mean
      and std on the 0..1 scale) and `preprocessing` (models/inputs.py) come from the run;
    - a Hugging Face CvT folder (config.json and model.safetensors): `from_pretrained`;
    - a model file written by `save`, in its saved dtype (`classes`, `normalization` and
      `preprocessing` None: it knows no inputs).
    dtype replaces the file's. A file that is missing, damaged, hostile or not one of these is a
    CheckpointError (or PretrainedError) in one line naming it; nothing is allocated before it
    is checked."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            from .pretrained import from_pretrained
            return from_pretrained(path, **({"dtype": dtype} if dtype else {}))
        meant = run_checkpoint_in(path)
        raise CheckpointError(f"{path} is a folder, not a model file" + (
            f"; did you mean {meant}?" if meant else " (nor a Hugging Face folder: it has no config.json)"))
    if path.suffix in (".safetensors", ".bin"):
        raise CheckpointError(f"{path} is a file of a Hugging Face model: give the folder that holds it with "
                              f"its config.json ({path.parent})")
    with NpzReader(path, CheckpointError) as z:
        model_file = CONFIG_KEY in z.headers
        if model_file:
            cfg, state = _read_model_file(z)
        elif "meta" not in z.headers:
            z.fail("is neither a minicvt model file (models.save) nor a checkpoint of `minicvt train`")
    if model_file:
        model = _build(cfg, state, dtype or state["head.weight"].dtype, path)
        model.classes = model.normalization = model.preprocessing = None
        return model.eval()
    state, _, meta = load_checkpoint(path)
    return from_checkpoint(state, meta, path, dtype)


MAX_CONFIG_CHARS = 100_000          # a config is about 1000 characters


def _read_model_file(z):
    """(config, state) of a models.save file opened by NpzReader: the config first (bounded,
    every field checked), then every array's header against the model it describes, then the
    arrays, each refused if it holds NaN or infinity."""
    try:
        cfg = CvTConfig.from_json(z.read_text(CONFIG_KEY, MAX_CONFIG_CHARS))
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        z.fail(f"its {CONFIG_KEY} is not a model configuration: {' '.join(str(e).split())}")
    found = {k: v for k, v in z.headers.items() if k != CONFIG_KEY}
    problem = (config_fits(cfg, len(found))
               or state_problems(found, state_shapes(cfg)))
    if problem:
        z.fail(f"does not fit its own model configuration: {problem}")
    return cfg, _read_arrays(z, found)


def _read_arrays(z, keys):
    """{key: array} of the checked arrays `keys`, refusing NaN and infinity."""
    state = {}
    for k in keys:
        state[k] = z.read(k)
        problem = nonfinite_problem(k, state[k])
        if problem:
            z.fail(problem)
    return state


def from_checkpoint(state, meta, path, dtype=None):
    """The model of a loaded `minicvt train` checkpoint (load_checkpoint's state and meta), in
    eval mode, with `classes`, `normalization` and `preprocessing` from its metadata."""
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise CheckpointError(f"{path} has no model_config in its metadata (not written by `minicvt train`)")
    problem = check_meta(meta)
    if problem:
        raise CheckpointError(f"{path}: metadata {problem}")
    cfg = CvTConfig(**meta["model_config"])
    dtype = dtype or np.dtype(meta.get("train_config", {}).get("dtype", "float32"))
    model = _build(cfg, state, dtype, path)
    model.classes, model.normalization = meta.get("classes"), meta.get("normalization")
    model.preprocessing = run_preprocessing(cfg, model.normalization) if model.normalization else None
    return model.eval()


def _build(cfg, state, dtype, path):
    model = ConvolutionalVisionTransformer(cfg, dtype=dtype, seed=0)
    try:
        model.load_state_dict(state)
    except ValueError as e:
        raise CheckpointError(f"{path} does not fit its own model configuration ({e})") from e
    return model


def load_weights(model, path):
    """Load a saved file's weights (a models.save file, or a checkpoint's model) into an
    existing model; every name and shape must match, checked before the arrays are read."""
    with NpzReader(path, CheckpointError) as z:
        if "meta" in z.headers and CONFIG_KEY not in z.headers:
            state = None                                  # a checkpoint: load_checkpoint checks it
        else:
            found = {k: v for k, v in z.headers.items() if k != CONFIG_KEY}
            expected = {k: (tuple(v.shape), "i" if v.dtype.kind in "iu" else "f")
                        for k, v in model.state_dict().items()}
            problem = state_problems(found, expected)
            if problem:
                z.fail(f"does not fit this model: {problem}")
            state = _read_arrays(z, found)
    if state is None:
        state = load_checkpoint(path)[0]
    try:
        model.load_state_dict(state)
    except ValueError as e:
        raise CheckpointError(f"{path} does not fit this model ({e})") from e
    return model


def _to_array(value):
    """A torch tensor (any device, bfloat16 included) or array-like -> NumPy array, duck-typed so
    that minicvt never imports torch."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":                    # NumPy has no bfloat16
            value = value.float()
        value = value.numpy()
    return backend.to_numpy(value)


def import_state_dict(model, state_dict, strict=True):
    """Load an official CvT checkpoint or any PyTorch `state_dict()` of the same architecture.

    Accepts a dict of torch tensors or arrays, or a checkpoint dict holding one under 'state_dict'
    or 'model'; a 'module.' prefix (DataParallel / DistributedDataParallel) is stripped. Values
    are cast to the model's dtype and moved to its backend. With strict=False, keys missing on
    either side are skipped (e.g. to keep a freshly initialised head), but shapes must still match.
    Returns the model.
    """
    for key in ("state_dict", "model"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    state = {}
    for k, v in state_dict.items():
        state[k[len("module."):] if k.startswith("module.") else k] = _to_array(v)
    model.load_state_dict(state, strict=strict)
    return model


def export_state_dict(model):
    """{key: NumPy array copy} in PyTorch's names and layouts: `{k: torch.from_numpy(v)}` of it
    loads into the official model with load_state_dict."""
    return {k: backend.to_numpy(v).copy() for k, v in model.state_dict().items()}
