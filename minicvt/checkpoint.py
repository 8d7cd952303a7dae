"""Training checkpoints: one `.npz` (no pickle) holding the model's state_dict, the optimiser's
state and a JSON metadata record (epoch, config, RNG seeds, metrics).

Written atomically (minicvt/atomic.py): a crash or `kill -9` at any moment leaves either the
previous checkpoint or the new one, never a torn file; a full disk is one line naming the file,
the previous checkpoint intact.

Reading trusts nothing in the file: sizes, types and shapes are checked before anything is
allocated, every member's CRC is checked (zip does), and NaN or infinite weights are refused,
so a corrupt or hostile file is an error in one line, not a traceback or silently wrong
weights (docs/files.md).
"""
import json
import math
import reprlib
from pathlib import Path

import numpy as np

from .atomic import SaveError, atomic_write, remove_temporaries  # noqa: F401  (re-exported)
from .backend import to_numpy
from .errors import BadFileError
from .npz import NpzReader

FORMAT = "minicvt-checkpoint-1"

# What a run did before a setting existed, where that differs from the setting's default: a
# checkpoint written then has no entry for it, and resuming or scoring it must go on that way.
SETTINGS_BEFORE = {"resolutions": "", "eval_flip": False}


class CheckpointError(BadFileError, RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


def atomic_savez(path, arrays):
    """np.savez to path through atomic_write."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def save_checkpoint(path, model, optimizer, meta):
    """model: a Module; optimizer: an Optimizer (or None); meta: a JSON-serialisable dict."""
    arrays = {f"model/{k}": to_numpy(v) for k, v in model.state_dict().items()}
    if optimizer is not None:
        arrays.update({f"optim/{k}": np.asarray(v) for k, v in optimizer.state_dict().items()})
    arrays["meta"] = np.array(json.dumps({"format": FORMAT, **meta}))   # a 0-d unicode array
    atomic_savez(path, arrays)


def load_checkpoint(path):
    """(model_state, optim_state, meta) as host arrays and a dict; CheckpointError, one line
    naming the file, if it is missing, truncated, corrupt, hostile or not a minicvt checkpoint.

    Nothing is read before it is checked (docs/files.md): the zip's and arrays' headers first
    (minicvt.npz), then the metadata (size-bounded, every field's type checked: check_meta),
    then every array's name, dtype and shape against the model its model_config describes
    (minicvt.models.expect) and the optimiser state against the model's parameters; only then
    are the arrays read, and NaN or infinity in any of them is refused."""
    from .models.expect import nonfinite_problem

    with _open(path) as z:
        meta = _read_meta(z)
        _check_arrays(z, meta)
        arrays = {}
        for key in z.headers:
            if key != "meta":
                arrays[key] = z.read(key)
                problem = nonfinite_problem(key.split("/", 1)[-1], arrays[key])
                if problem:
                    z.fail(problem)
    model = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    optim = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
    if "steps" in optim:
        optim["steps"] = int(optim["steps"])
        if optim["steps"] < 0:
            raise CheckpointError(f"{path}: optimiser state: steps is {optim['steps']}, below 0")
    return model, optim, meta


def read_meta(path):
    """(meta, whether the file holds an optimiser state) of a checkpoint, checked as
    load_checkpoint checks them, without reading an array: what `--resume` and `--init-from`
    look at before the run loads the weights."""
    with _open(path) as z:
        return _read_meta(z), any(k.startswith("optim/") for k in z.headers)


def run_checkpoint_in(folder):
    """folder/best.npz or folder/last.npz, the first that exists (None): what a user who gave a
    run's folder where a file is wanted meant."""
    found = [Path(folder) / name for name in ("best.npz", "last.npz") if (Path(folder) / name).is_file()]
    return found[0] if found else None


def _open(path):
    """An NpzReader on a checkpoint, after refusing in one line what is not one: a folder (with
    the file the user probably meant), a missing file, a Hugging Face weights file, a .npy."""
    if Path(path).is_dir():          # a run's folder, or a Hugging Face model's
        meant = run_checkpoint_in(path)
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file" + (
            f"; did you mean {meant}?" if meant else ""))
    if not Path(path).is_file():
        last = Path(path).with_name("last.npz")
        so_far = (f"; no epoch has finished yet at full size, and {last} holds the weights so far"
                  if Path(path).name == "best.npz" and last.is_file() else "")
        raise CheckpointError(f"checkpoint {path} does not exist{so_far}")
    if Path(path).suffix in (".safetensors", ".bin"):
        raise CheckpointError(f"checkpoint {path} is a file of a Hugging Face model, not a checkpoint of "
                              f"`minicvt train`; give its folder with --pretrained (minicvt.load in Python)")
    with open(path, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            raise CheckpointError(f"checkpoint {path} is a single .npy array, not a .npz checkpoint")
    return NpzReader(path, CheckpointError)


def _read_meta(z):
    """The metadata of the checkpoint open in z: bounded, JSON, this format, every field checked."""
    if "meta" not in z.headers:
        z.fail("has no metadata ('meta'): not a checkpoint of `minicvt train`")
    text = z.read_text("meta", MAX_META_CHARS)
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        z.fail(f"its metadata is not readable JSON ({type(e).__name__})")
    if not isinstance(meta, dict):
        z.fail(f"its metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        z.fail(f"is not a minicvt checkpoint (format {reprlib.repr(meta.get('format'))})")
    problem = check_meta(meta)
    if problem:
        z.fail(f"metadata {problem}")
    return meta


# The metadata of a 1000-epoch run is about 350 000 characters.
MAX_META_CHARS = 4_000_000
_OPTIM_KINDS = ("momentum", "exp_avg", "exp_avg_sq")      # minicvt.optim's per-parameter state


def _check_arrays(z, meta):
    """Refuse, before any array is read, arrays that do not belong in the checkpoint: with a
    model_config, every model array against the model it describes; the optimiser state against
    the model's parameters (one array per kind and parameter, of its shape, and 'steps')."""
    from .models.configs import CvTConfig
    from .models.expect import config_fits, state_problems, state_shapes

    found = {k[len("model/"):]: v for k, v in z.headers.items() if k.startswith("model/")}
    others = [k for k in z.headers if k != "meta" and not k.startswith(("model/", "optim/"))]
    if others:
        z.fail(f"unexpected arrays: {', '.join(map(repr, others[:4]))} (a checkpoint holds model/, "
               f"optim/ and meta)")
    if "model_config" in meta:
        cfg = CvTConfig(**meta["model_config"])                # check_meta has checked it
        problem = config_fits(cfg, len(z.headers))
        if problem:
            z.fail(f"does not fit its own model configuration: {problem}")
        expected = state_shapes(cfg)
    else:                        # a checkpoint of some other module: floats, and whole-number counters
        expected = {k: (shape, "i" if k.endswith("num_batches_tracked") else "f")
                    for k, (_, shape) in found.items()}
    problem = state_problems(found, expected)
    if problem:
        z.fail(f"does not fit its own model configuration: {problem}" if "model_config" in meta else problem)
    optim = {k[len("optim/"):]: v for k, v in z.headers.items() if k.startswith("optim/")}
    if optim:
        want = {"steps": ((), "i")}
        for key in optim:
            kind, _, name = key.partition(".")
            if kind in _OPTIM_KINDS and name in expected and expected[name][1] == "f":
                want[key] = expected[name]          # a parameter's state has the parameter's shape
        problem = state_problems(optim, want)
        if problem:
            z.fail(f"optimiser state: {problem}")


def check_meta(meta):
    """What is wrong with a checkpoint's metadata, or None. A field may be absent (checkpoints
    of other modules, and older ones, have fewer); one that is present must have its type and a
    possible value. Unknown fields are left alone (a later minicvt may add some)."""
    from .models.configs import CvTConfig

    def whole(v, lo=0):
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def position(v):          # where a save inside an epoch stands (train.Trainer._save)
        return v is None or (isinstance(v, dict) and whole(v.get("epoch")) and whole(v.get("step"), 1)
                             and whole(v.get("seen")) and all(number(v.get(k)) for k in
                                                              ("loss_sum", "correct", "bad", "seconds")))

    # epoch: the last finished one, 0-based; -1 in a save inside the first epoch
    simple = {"epoch": (lambda v: whole(v, -1), "a whole number from -1"),
              "num_images": (whole, "a whole number from 0"),
              "position": (position, "a record of the epoch, step and running sums, or null"),
              "data_fingerprint": (lambda v: isinstance(v, str), "text"),
              "best_acc": (number, "a number"),
              # the trainer reads these entries of every record (the curves, the last line)
              "history": (lambda v: isinstance(v, list) and all(
                  isinstance(h, dict) and whole(h.get("epoch"), 1)
                  and all(number(h.get(k)) for k in ("train_loss", "train_acc")) for h in v),
                          "a list of records, one per epoch, each with its epoch, train_loss and train_acc"),
              "inference_copy": (lambda v: isinstance(v, dict), "a record"),
              "train_config": (lambda v: isinstance(v, dict), "a record of settings"),
              "model_config": (lambda v: isinstance(v, dict), "a record of the model's fields")}
    for field, (ok, what) in simple.items():
        if field in meta and not ok(meta[field]):
            return f"{field} must be {what}, got {reprlib.repr(meta[field])}"
    problem = _train_config_problem(meta.get("train_config", {}))
    if problem:
        return f"train_config: {problem}"
    cfg = None
    if "model_config" in meta:
        try:
            cfg = CvTConfig(**meta["model_config"])
        except (TypeError, ValueError) as e:       # TypeError: a field CvTConfig does not have
            return f"model_config: {' '.join(str(e).split())}"
    if "classes" in meta:
        classes = meta["classes"]
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            return f"classes must be a list of class names, got {reprlib.repr(classes)}"
        if cfg is not None and len(classes) != cfg.num_classes:
            return f"classes lists {len(classes)} names but model_config has {cfg.num_classes} classes"
    if "normalization" in meta:
        norm, channels = meta["normalization"], cfg.in_chans if cfg else 3
        if not isinstance(norm, dict):
            return f"normalization must be a record of mean and std, got {reprlib.repr(norm)}"
        for key, lo in (("mean", -math.inf), ("std", 0.0)):
            v = norm.get(key)
            if not (isinstance(v, list) and len(v) == channels and all(number(x) and x > lo for x in v)):
                what = "finite numbers" if key == "mean" else "finite numbers above 0"
                return f"normalization {key} must list {channels} {what}, got {reprlib.repr(v)}"
    return None


def _train_config_problem(tc):
    """What is wrong with a saved train_config's settings, or None: a setting TrainConfig does
    not know, or one of another type than TrainConfig's own."""
    import dataclasses

    from .train_config import TrainConfig       # here: train_config imports this module
    words = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text"}
    unknown = sorted(set(tc) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:             # a newer minicvt's setting: this one cannot run it as that one would
        return f"settings this minicvt does not know: {reprlib.repr(unknown)} (written by a newer version?)"
    for f in dataclasses.fields(TrainConfig):
        if f.name not in tc:
            continue
        v, want = tc[f.name], {"bool": bool, "int": int, "float": float, "str": str}.get(f.type, f.type)
        if v is None and f.default is None:                      # "the optimiser's default"
            continue
        if want is bool:
            ok = isinstance(v, bool)
        elif want is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif want is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        else:
            ok = not isinstance(want, type) or isinstance(v, want)
        if not ok:
            return f"{f.name} must be {words.get(want, want)}, got {reprlib.repr(v)}"
    if tc.get("dtype", "float32") not in ("float32", "float64"):       # the model is built in it
        return f"dtype must be 'float32' or 'float64', got {reprlib.repr(tc['dtype'])}"
    return None


def saved_train_settings(saved):
    """A checkpoint's train_config (meta["train_config"]) as its run ran: a setting the
    checkpoint predates takes the value in SETTINGS_BEFORE, not today's default."""
    return {**SETTINGS_BEFORE, **saved}


def save_inference_copy(src, dst, dtype=np.float16):
    """A small copy of a checkpoint for inference and pictures: the model's floating arrays
    cast to dtype (float16 halves the size; loading casts back to the model's dtype), the
    optimiser state dropped, the metadata kept and marked with what was done."""
    model_state, _, meta = load_checkpoint(src)
    arrays = {f"model/{k}": (v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in model_state.items()}
    meta = {**meta, "inference_copy": {"source": str(src), "dtype": np.dtype(dtype).name}}
    arrays["meta"] = np.array(json.dumps(meta))
    atomic_savez(dst, arrays)
