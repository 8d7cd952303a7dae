"""N ranks compute what one process computes (issue 20): `mpiexec -n 2` and `-n 3` training runs
against one process, in float64 on cvt-cifar-s (drop path on) over a small image folder, 2
epochs. Every weight, BatchNorm statistic and optimiser moment must agree within 1e-9
relative; a run whose every rank is killed, or whose one rank gets SIGTERM, resumes to the
same end; each rank is given only its share of every batch; and without the gradient
all-reduce the ranks part.

The tolerance has an absolute floor of 1e-12: a few parameters have a gradient of exactly zero
in exact arithmetic (a key projection's bias adds a constant to each query's scores, which
softmax ignores), so their values are round-off of about 1e-15, which the order of a sum over
ranks changes.

Skipped without mpi4py and an mpiexec (pip install -e ".[mpi]"). Every process has a timeout.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import minicvt
from minicvt.checkpoint import load_checkpoint
from minicvt.distributed import find_mpiexec
from test_train import write_image_folder

REPO = Path(minicvt.__file__).resolve().parent.parent
TIMEOUT = 240
pytest.importorskip("mpi4py", reason='mpi4py is not installed (pip install -e ".[mpi]")')
MPIEXEC = find_mpiexec()
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec beside this Python or on PATH")

SETTINGS = ["--epochs", "2", "--batch-size", "6", "--val-size", "30", "--seed", "1", "--resolutions", "",
            "--dtype", "float64", "--config", "cvt-cifar-s", "--quiet"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """This checkout's minicvt, one decoded-image cache for every run, one thread per rank."""
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", MINICVT_BACKEND="numpy",
                MINICVT_CACHE=str(tmp_path_factory.mktemp("cache")), MINICVT_NUM_THREADS="1")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("dp") / "shapes", per_class=30)   # 90: 60 to train on, 10 steps


def launcher(ranks):
    return [MPIEXEC, "-n", str(ranks)] if ranks > 1 else []


def train(ranks, env, args, check=True):
    done = subprocess.run(launcher(ranks) + [sys.executable, "-m", "minicvt", "train", *args],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def arrays(out):
    """{name: array} of a run's last.npz: the model's weights and buffers, the optimiser's state."""
    model, optim, _ = load_checkpoint(out / "last.npz")
    return {**{f"model/{k}": v for k, v in model.items()}, **{f"optim/{k}": v for k, v in optim.items()}}


def assert_same_run(a, b):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-9, atol=1e-12, err_msg=name)


def watched(case, ranks, folder, env, out):
    """tests/mpi_train.py CASE as `ranks` ranks: -> each rank's report (its run folder: out/run)."""
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(launcher(ranks) + [sys.executable, str(REPO / "tests" / "mpi_train.py"), case,
                                             str(folder), str(out)],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


@pytest.fixture(scope="module")
def one_process(folder, env, tmp_path_factory):
    """(report, run folder) of the one-process run."""
    out = tmp_path_factory.mktemp("one")
    return watched("train", 1, folder, env, out)[0], out / "run"


@pytest.fixture(scope="module")
def two_ranks(folder, env, tmp_path_factory):
    """(reports, run folder) of the same run as 2 ranks."""
    out = tmp_path_factory.mktemp("two")
    return watched("train", 2, folder, env, out), out / "run"


def test_two_ranks_end_where_one_process_ends_each_given_its_share(one_process, two_ranks):
    """Every batch of 6 goes 3 and 3 to the two ranks, disjoint, together the one process's
    batch, each image cropped and flipped as one process does it (an implementation where each
    rank runs the whole batch fails here); the ranks end
    with the same weights as each other, and as one process within the tolerance."""
    (one, one_run), (ranks, run) = one_process, two_ranks
    whole = {(e, i): images for e, i, images in one["batches"]}
    for r, report in enumerate(ranks):
        assert len(report["batches"]) == len(whole) == 2 * 10
        for e, i, images in report["batches"]:
            assert images == whole[(e, i)][3 * r:3 * r + 3]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert_same_run(arrays(one_run), arrays(run))
    for got, want in zip(ranks[0]["history"], one["history"], strict=True):
        assert got == pytest.approx(want, rel=1e-9)


def test_three_ranks_end_where_one_process_ends(one_process, folder, env, tmp_path):
    """`minicvt train --ranks 3`, which starts `mpiexec -n 3 minicvt train`."""
    train(1, env, ["--ranks", "3", "--data", str(folder), "--out", str(tmp_path / "run"), *SETTINGS])
    one = one_process[1]
    assert_same_run(arrays(one), arrays(tmp_path / "run"))
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    for got, want in zip(history, expected, strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert got[key] == pytest.approx(want[key], rel=1e-9), key


def test_without_the_allreduce_the_ranks_part(folder, env, tmp_path):
    ranks = watched("no-allreduce", 2, folder, env, tmp_path)
    assert ranks[0]["weights"] != ranks[1]["weights"]


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("dp") / "small", per_class=16)   # 48: 3 steps


def test_on_the_emulated_cupy_with_nccl(small_folder, env, tmp_path):
    """The same equality on the emulated CuPy, the ranks joined by the emulated NCCL; every step
    runs under no_sync() (a host round trip raises) outside the ranks' meetings and the saves,
    and makes one all-reduce of the gradients and two per SyncBatchNorm layer."""
    from cupy_emulation import subprocess_env
    env = subprocess_env(**{k: v for k, v in env.items() if k != "PYTHONPATH"}, MINICVT_EMULATED_DEVICES="2",
                         PYTHONPATH=env["PYTHONPATH"])
    (one,) = watched("cupy", 1, small_folder, env, tmp_path / "one")
    ranks = watched("cupy", 2, small_folder, env, tmp_path / "two")
    assert_same_run(arrays(tmp_path / "one" / "run"), arrays(tmp_path / "two" / "run"))
    assert ranks[0]["weights"] == ranks[1]["weights"]
    for report in ranks:
        assert report["batchnorms"] == 15
        assert report["nccl"] == {"allReduce": report["steps"] * (1 + 2 * 15)}
    assert one["nccl"] == {}                         # one process: no collective at all


def rank_pids(tag):
    """{rank: pid} of the ranks an mpiexec started (Linux: their environment names the rank)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"minicvt" in cmdline and b"train" in cmdline and f"MINICVT_TEST_RUN={tag}".encode() in environ:
            rank = next((int(v.split(b"=")[1]) for v in environ if v.startswith(b"PMI_RANK=")), None)
            if rank is not None:
                found[rank] = int(proc.name)
    return found


def start(ranks, env, args):
    """An mpiexec in its own process group, whose ranks carry a mark to be found by."""
    tag = str(time.monotonic_ns())
    proc = subprocess.Popen(launcher(ranks) + [sys.executable, "-m", "minicvt", "train", *args],
                            env=dict(env, MINICVT_TEST_RUN=tag), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    proc.tag = tag
    return proc


def wait_for_saves(out, count, proc):
    """Until last.npz has been replaced `count` times (or the run ended)."""
    last, seen, deadline = out / "last.npz", 0, time.monotonic() + TIMEOUT
    stamp = None
    while seen < count and proc.poll() is None and time.monotonic() < deadline:
        now = last.stat().st_mtime_ns if last.exists() else None
        if now != stamp and now is not None:
            seen, stamp = seen + 1, now
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be stopped"


def test_every_rank_killed_then_resumed_ends_the_same(two_ranks, folder, env, tmp_path):
    """kill -9 to the launcher and every rank in the middle of the run, then `--resume` as 2
    ranks: the bits of the uninterrupted 2-rank run."""
    out = tmp_path / "run"
    proc = start(2, env, ["--data", str(folder), "--out", str(out), *SETTINGS, "--save-every", "2"])
    wait_for_saves(out, 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)              # the launcher and every rank at once
    proc.communicate(timeout=TIMEOUT)
    assert load_checkpoint(out / "last.npz")[2]["position"] is not None     # inside an epoch
    train(2, env, ["--resume", "--out", str(out)])
    whole, resumed = arrays(two_ranks[1]), arrays(out)
    assert whole.keys() == resumed.keys()
    assert all(np.array_equal(whole[k], resumed[k]) for k in whole), "not bit for bit"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc (Linux)")
def test_sigterm_to_one_rank_stops_every_rank_saved(one_process, folder, env, tmp_path):
    """A scheduler's SIGTERM that reaches rank 1 alone: the ranks agree at their next meeting,
    save together and exit 143, and the command to continue names the ranks. Resumed as 3
    ranks (another number of ranks continues a run too), it ends as one process ends, within
    the tolerance."""
    out = tmp_path / "run"
    proc = start(2, env, ["--data", str(folder), "--out", str(out), *SETTINGS, "--save-every", "1000"])
    deadline = time.monotonic() + TIMEOUT
    while len(pids := rank_pids(proc.tag)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(pids) == 2, "the ranks did not start"
    time.sleep(2.0)                                  # into the first epoch's steps
    os.kill(pids[1], signal.SIGTERM)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "mpiexec -n 2 minicvt train --resume" in stderr
    assert load_checkpoint(out / "last.npz")[2]["epoch"] < 1          # stopped before the end
    train(3, env, ["--resume", "--out", str(out)])
    assert_same_run(arrays(one_process[1]), arrays(out))


def test_a_batch_the_ranks_cannot_share_is_refused_once(folder, env, tmp_path):
    """Every rank meets the error; rank 0 says it, once, and its abort ends the others."""
    for batch, words in ((4, "does not divide among 3 ranks"), (2, "is smaller than the 3 ranks")):
        done = train(3, env, ["--data", str(folder), "--out", str(tmp_path / "run"), "--batch-size", str(batch)],
                     check=False)
        assert done.returncode == 2
        errors = [line for line in done.stderr.splitlines() if line.startswith("minicvt train")]
        assert len(errors) == 1 and words in errors[0] and "(rank 0 of 3)" in errors[0], done.stderr


def test_an_error_on_one_rank_stops_every_rank(folder, env, tmp_path):
    """Rank 1 alone cannot read its data (the launcher's MPMD form gives it other flags) while
    rank 0 goes on into training, where it waits for rank 1 in a collective: rank 1's one-line
    message, and every rank ended, not a hang."""
    common = ["--out", str(tmp_path / "run"), *SETTINGS]
    done = subprocess.run([MPIEXEC, "-n", "1", sys.executable, "-m", "minicvt", "train", "--data", str(folder),
                           *common, ":", "-n", "1", sys.executable, "-m", "minicvt", "train",
                           "--data", str(tmp_path / "missing"), *common],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("minicvt train")]
    assert len(errors) == 1 and "(rank 1 of 2)" in errors[0] and "missing: no such file" in errors[0], done.stderr


def test_more_cupy_ranks_than_gpus_is_refused_once(folder, env, tmp_path):
    """2 ranks on a machine whose (emulated) CuPy shows 1 GPU: refused while the ranks are set
    up, before any World exists, said once and every rank ended."""
    from cupy_emulation import subprocess_env
    env = subprocess_env(**{k: v for k, v in env.items() if k != "PYTHONPATH"}, MINICVT_EMULATED_DEVICES="1",
                         PYTHONPATH=env["PYTHONPATH"])
    done = train(2, env, ["--backend", "cupy", "--data", str(folder), "--out", str(tmp_path / "run")], check=False)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("minicvt train")]
    assert len(errors) == 1 and "2 ranks on this machine but 1 GPU(s) visible" in errors[0], done.stderr
