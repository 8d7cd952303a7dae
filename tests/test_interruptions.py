"""Real training processes ended the ways real jobs end: `kill -9` at random moments (and once
inside a checkpoint write), then `--resume`, several times over, must end with the very bits
an uninterrupted run ends with; SIGTERM (a scheduler's notice) saves, prints the resume command
on a line of its own after the progress bar, and exits 143.

Each run is a `python -m minicvt train` subprocess on a tiny image folder (48 16x16 PNGs:
9 steps of 4 per epoch, 3 epochs) saving after every step, so that a kill often lands inside a
save."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import minicvt
from minicvt import run_folder
from minicvt.checkpoint import load_checkpoint
from test_train import write_image_folder

REPO = Path(minicvt.__file__).resolve().parent.parent
TIMING = ("seconds", "images_per_s")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The subprocesses' environment: this checkout's minicvt, a cache folder of their own."""
    env = dict(os.environ, PYTHONPATH=str(REPO), MINICVT_CACHE=str(tmp_path_factory.mktemp("cache")),
               MINICVT_BACKEND="numpy")
    return env


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("kill") / "shapes")


def train_command(folder, out, resume=False, quiet=True):
    if resume:
        args = ["train", "--resume", "--out", str(out), "--save-every", "1"]
    else:
        args = ["train", "--data", str(folder), "--out", str(out), "--epochs", "3", "--batch-size", "4",
                "--val-size", "12", "--seed", "1", "--resolutions", "", "--save-every", "1",
                "--label-smoothing", "0.1", "--lr", "2e-3"]
    return [sys.executable, "-m", "minicvt", *args] + (["--quiet"] if quiet else [])


def finish(command, env):
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def arrays_and_history(out):
    model, optim, meta = load_checkpoint(out / "last.npz")
    history = [{k: v for k, v in h.items() if k not in TIMING} for h in meta["history"]]
    return {**{f"model/{k}": v for k, v in model.items()}, **{f"optim/{k}": v for k, v in optim.items()}}, history


def assert_same_run(a, b):
    arrays_a, history_a = arrays_and_history(a)
    arrays_b, history_b = arrays_and_history(b)
    assert sorted(arrays_a) == sorted(arrays_b)
    for k in arrays_a:
        np.testing.assert_array_equal(arrays_a[k], arrays_b[k], err_msg=k)
    assert history_a == history_b
    best_a, _, _ = load_checkpoint(a / "best.npz")
    best_b, _, _ = load_checkpoint(b / "best.npz")
    for k in best_a:
        np.testing.assert_array_equal(best_a[k], best_b[k], err_msg=k)
    lines = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in h.items() if k not in TIMING} for h in lines] == history_b


@pytest.fixture(scope="module")
def uninterrupted(folder, env, tmp_path_factory):
    out = tmp_path_factory.mktemp("through") / "run"
    finish(train_command(folder, out), env)
    return out


def temporaries(out):
    return sorted(p.name for p in out.glob(".*.tmp")) if out.exists() else []


def _inode(path):
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def saves_seen(last, count, process, timeout=120):
    """Wait until `last` has been replaced `count` times (each save renames a new file over
    it: a new inode) or the process has ended; -> whether it is still running."""
    inode, seen, deadline = _inode(last), 0, time.monotonic() + timeout
    while seen < count and process.poll() is None and time.monotonic() < deadline:
        now = _inode(last)
        if now is not None and now != inode:
            seen, inode = seen + 1, now
        time.sleep(0.002)
    return process.poll() is None


def test_kill_9_at_random_moments_then_resume_ends_bit_identical(folder, env, uninterrupted, tmp_path):
    """Each run is killed after 2 to 8 further saves plus a random fraction of a step, so that
    kills land in steps, in saves and in validations, and every kill finds the run further on."""
    out = tmp_path / "run"
    rng = np.random.default_rng(18)
    kills, mid_save, stops = 0, 0, []
    for _ in range(4):
        resume = (out / "last.npz").is_file()
        process = subprocess.Popen(train_command(folder, out, resume), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if saves_seen(out / "last.npz", int(rng.integers(2, 9)), process):
            time.sleep(rng.uniform(0.0, 0.15))              # a step takes about 0.13 s here
        if process.poll() is not None:                       # it finished before the kill
            assert process.wait() == 0, process.stderr.read()
            break
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
        process.stderr.close()
        kills += 1
        mid_save += bool(temporaries(out))                    # killed inside a save: its temporary is left
        stops.append(run_folder.position(load_checkpoint(out / "last.npz")[2]))   # never torn: it loads
    else:
        finish(train_command(folder, out, resume=True), env)
    assert kills >= 3, kills
    # every kill found the run further on than the one before (epoch, step)
    assert stops == sorted(set(stops)), stops
    print(f"{kills} kills, {mid_save} inside a save; saved (epoch, step) after each: {stops}")
    assert temporaries(out) == []                            # the next start removed any left
    assert_same_run(uninterrupted, out)


# a wrapper that runs `minicvt train` with np.savez replaced: its Nth call writes part of a
# file and kills the process, as a power cut or an OOM kill in the middle of a save would
KILL_IN_SAVE = """
import os, signal, sys
import numpy as np
calls, real_savez = [], np.savez
def savez(f, **arrays):
    calls.append(1)
    if len(calls) == int(os.environ["KILL_AT_SAVE"]):
        f.write(b"PK\\x03\\x04 half of a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_savez(f, **arrays)
np.savez = savez
from minicvt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_inside_a_checkpoint_write(folder, env, uninterrupted, tmp_path):
    out = tmp_path / "run"
    command = train_command(folder, out)
    # the 12th save, after step 2 of epoch 2 (epoch 1 saves 8 times inside it, then best.npz
    # and last.npz at its end; the 11th is after step 1 of epoch 2)
    killed = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, *command[3:]], env={**env, "KILL_AT_SAVE": "12"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(temporaries(out)) == 1                        # the torn file, under its temporary name
    meta = load_checkpoint(out / "last.npz")[2]              # last.npz: the save before, whole
    assert meta["position"] == {**meta["position"], "epoch": 1, "step": 1}
    done = finish(train_command(folder, out, resume=True), env)
    assert "resumed from" in done.stdout and "in epoch 2 of 3 after step 1 of 9" in done.stdout
    assert temporaries(out) == []
    assert_same_run(uninterrupted, out)


def test_sigterm_saves_and_prints_the_resume_command_after_the_progress_bar(folder, env, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(train_command(folder, out, quiet=False), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "last.npz").is_file() and time.monotonic() < deadline:   # it is training
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    # the progress bar redraws its line with \r; what follows the last one is what a terminal shows
    shown = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    assert shown[-1] == "" and shown[-2] == f"minicvt train --resume --out {out}", err
    assert shown[-3].endswith(f"; saved {out / 'last.npz'}; continue with:"), err
    # where it says it stopped is where the checkpoint stands: inside an epoch (the usual case),
    # or after one (the signal came during an epoch's last step or its validation)
    inside = re.match(r"minicvt train: stopped by SIGTERM in epoch (\d+) after step (\d+) of 9;", shown[-3])
    after = re.match(r"minicvt train: stopped by SIGTERM after epoch (\d+) of 3;", shown[-3])
    assert inside or after, err
    meta = load_checkpoint(out / "last.npz")[2]
    if inside:
        assert (meta["position"]["epoch"] + 1, meta["position"]["step"]) == tuple(map(int, inside.groups()))
    else:
        assert meta["position"] is None and meta["epoch"] + 1 == int(after.group(1))
    finish(train_command(folder, out, resume=True), env)      # and it resumes
