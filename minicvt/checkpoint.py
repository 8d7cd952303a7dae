"""Training checkpoints: one `.npz` (no pickle) holding the model's state_dict, the optimiser's
state and a JSON metadata record (epoch, config, RNG seeds, metrics).

Written atomically: the file is assembled under a temporary name in the same folder
(`.last.npz.<random>.tmp`), flushed to disk, renamed over the old one, and the folder itself
is flushed so that the new name survives a power cut. A crash or `kill -9` at any moment leaves
either the previous checkpoint or the new one, never a torn file; a temporary left by a killed
save is never read, and the next run in the folder removes it (`remove_temporaries`). A full
disk is one line naming the file (`SaveError`), the previous checkpoint intact. Reading checks
every member's CRC (zip does), so a corrupt file is an error, not silently wrong weights.
"""
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .backend import to_numpy
from .errors import BadFileError

FORMAT = "minicvt-checkpoint-1"
TEMP_SUFFIX = ".tmp"             # what atomic_write's temporaries end with

# What a run did before a setting existed, where that differs from the setting's default: a
# checkpoint written then has no entry for it, and resuming or scoring it must go on that way.
SETTINGS_BEFORE = {"resolutions": "", "eval_flip": False}


class CheckpointError(BadFileError, RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


def _default_file_mode():
    """The mode open() would give a new file: 0o666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class SaveError(OSError):
    """A file could not be written (a full disk, a folder without write permission); the
    message names the file and says that its previous version is intact."""


def atomic_write(path, write):
    """write(f) into a temporary file beside `path`, flushed to disk, then renamed to `path`,
    and the folder flushed so that the rename itself survives a power cut. On any failure
    the temporary is removed and `path` keeps its previous content; an OSError (ENOSPC, EACCES)
    becomes a SaveError of one line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_file_mode())         # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, SaveError):
            kept = "its previous version is intact" if path.exists() else "nothing was written"
            error = SaveError(f"cannot write {path}: {e.strerror or e}; {kept}")
            error.errno = e.errno
            raise error from e
        raise


def _fsync_folder(folder):
    """Flush a folder's entries (the rename) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:                       # e.g. Windows: no file descriptors for folders
        return
    try:
        os.fsync(fd)
    except OSError:                       # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def atomic_savez(path, arrays):
    """np.savez to path through atomic_write."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def remove_temporaries(folder):
    """Remove the temporary files a killed save left in `folder` (`.NAME.<random>.tmp`);
    -> their names. Nothing ever reads them, so this only frees the space."""
    found = sorted(Path(folder).glob(f".*{TEMP_SUFFIX}")) if Path(folder).is_dir() else []
    for f in found:
        f.unlink(missing_ok=True)
    return [f.name for f in found]


def save_checkpoint(path, model, optimizer, meta):
    """model: a Module; optimizer: an Optimizer (or None); meta: a JSON-serialisable dict."""
    arrays = {f"model/{k}": to_numpy(v) for k, v in model.state_dict().items()}
    if optimizer is not None:
        arrays.update({f"optim/{k}": np.asarray(v) for k, v in optimizer.state_dict().items()})
    arrays["meta"] = np.array(json.dumps({"format": FORMAT, **meta}))   # a 0-d unicode array
    atomic_savez(path, arrays)


def load_checkpoint(path):
    """(model_state, optim_state, meta) as host arrays and a dict; CheckpointError if the file
    is missing, truncated, corrupt or not a minicvt checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}                 # reading verifies each CRC
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a .npz file ({e})") from e
    except TypeError as e:        # a .npy file loads as one bare array, which `with` refuses
        raise CheckpointError(f"checkpoint {path} is a single .npy array, not a .npz checkpoint") from e
    try:
        meta = json.loads(str(data.pop("meta")))
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable metadata") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a minicvt checkpoint (format {meta.get('format')!r})")
    model = {k[len("model/"):]: v for k, v in data.items() if k.startswith("model/")}
    optim = {k[len("optim/"):]: v for k, v in data.items() if k.startswith("optim/")}
    if "steps" in optim:
        optim["steps"] = int(optim["steps"])
    return model, optim, meta


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
