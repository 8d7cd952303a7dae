"""The output folder of a training run (`--out`): what it holds, and what may be done to it.

A folder holds a run once the run has saved anything there (`last.npz`, `best.npz`,
`metrics.jsonl`). Such a folder is never overwritten by a new run: `check_new` refuses in one
line, offering `--resume` or `--overwrite`. A folder left by a run killed before its first
save holds at most temporaries of a save that never finished: there is nothing to protect,
so a new run simply starts there (and removes them).

How often a run saves inside an epoch is `--save-every`: minutes ('5m', the default), seconds
('90s') or a number of steps ('200'), the last for tests that must save at the same steps
every time.
"""
import re
from pathlib import Path

from .checkpoint import remove_temporaries

# everything a run writes in its folder; --overwrite removes exactly these
OUTPUTS = ("last.npz", "best.npz", "metrics.jsonl", "curves.png")
HOLDS_A_RUN = ("last.npz", "best.npz", "metrics.jsonl")
DEFAULT_SAVE_EVERY = "5m"


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (it holds a run, or nothing to resume)."""


def check_new(folder, overwrite=False):
    """Raise RunFolderError if `folder` holds a run and overwrite is False."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {folder} is a file, not a folder")
    found = [name for name in HOLDS_A_RUN if (folder / name).is_file()]
    if found and not overwrite:
        how = (f"continue it with: minicvt train --resume --out {folder}; or" if "last.npz" in found
               else "it has no last.npz to resume from;")
        raise RunFolderError(f"--out {folder} already holds a run ({', '.join(found)}); {how} add "
                             f"--overwrite to delete it and start over, or give another --out")


def clear(folder):
    """Delete what a previous run wrote in `folder` (OUTPUTS and temporaries), nothing else."""
    for name in OUTPUTS:
        (Path(folder) / name).unlink(missing_ok=True)
    remove_temporaries(folder, OUTPUTS)


def last_checkpoint(folder):
    """folder/last.npz, which --resume continues from; RunFolderError if the run saved none."""
    last = Path(folder) / "last.npz"
    if not Path(folder).exists():
        raise RunFolderError(f"--resume: {folder} does not exist (a typo in --out?)")
    if not last.is_file():
        raise RunFolderError(f"--resume: {last} does not exist: the run saved nothing before it stopped (it "
                             f"saves every few minutes, --save-every, and when stopped by Ctrl-C); start it "
                             f"again without --resume")
    return last


def position(meta):
    """Where a checkpoint's run stands, from its metadata: (epoch, step), 0-based, of the next
    step to run (the epoch count itself for a finished run)."""
    pos = meta.get("position")
    if pos:
        return pos["epoch"], pos["step"]
    return meta["epoch"] + 1, 0


def describe(meta, epochs, steps=None):
    """'after epoch 3 of 24', 'in epoch 4 of 24 at step 40 of 351', or 'finished (24 epochs)'."""
    epoch, step = position(meta)
    if epoch >= epochs:
        return f"finished ({epochs} epochs)"
    if step == 0:
        return f"after epoch {epoch} of {epochs}" if epoch else f"at the start of epoch 1 of {epochs}"
    of = f" of {steps}" if steps else ""
    return f"in epoch {epoch + 1} of {epochs} after step {step}{of}"


def check_resumable(folder, meta, epochs):
    """Raise RunFolderError if the run in `folder` (its last.npz's metadata) has finished:
    --resume continues interrupted runs; a finished one is trained further as a new run."""
    if position(meta)[0] >= epochs:
        last = Path(folder) / "last.npz"
        raise RunFolderError(f"--resume: the run in {folder} has finished (all {epochs} epochs); to train "
                             f"it further, start a new run from its weights: minicvt train --init-from "
                             f"{last} --out NEW_FOLDER (with --data, --epochs and any other settings)")


def parse_save_every(text):
    """'5m' -> (None, 300.0), '90s' -> (None, 90.0), '200' -> (200, None): (steps, seconds)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(m|min|s)?\s*", str(text))
    if not m or float(m.group(1)) <= 0 or (m.group(2) is None and not m.group(1).isdigit()):
        raise ValueError(f"--save-every {text!r}: give minutes ('5m'), seconds ('90s') or a whole "
                         f"number of steps ('200'), above 0")
    value, unit = float(m.group(1)), m.group(2)
    if unit is None:
        return int(value), None
    seconds = value * (60.0 if unit in ("m", "min") else 1.0)
    if seconds < 1:                  # a save (two flushes to disk) after nearly every step
        raise ValueError(f"--save-every {text!r}: at least 1 s; to save after every step, give 1 (steps)")
    return None, seconds
