"""`minicvt train`, `eval` and `attention` from the command line, on a tiny image folder (3
classes of 16x16 PNGs) with the real cvt-cifar-s config (its three stride-2 stages fit a 16x16
input): a short run writes its checkpoints and metrics, `eval` prints the accuracy that a
forward pass written here gives and a row for every class, `--resume` continues an interrupted
run and refuses other settings, and every error (bad data, a corrupt or foreign checkpoint, a
missing backend, an unknown config) is one line on stderr and exit code 2, never a traceback.
The attention command's own errors and figures are tested in test_viz.py."""
import contextlib
import errno
import io
import json
import os
import re
import signal
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import minicvt
import minicvt.optim
from minicvt import backend, checkpoint, cli, data, nn
from minicvt.checkpoint import load_checkpoint
from minicvt.models import CvTConfig, build_model, configs, get_config
from minicvt.train import Trainer
from test_train import CLASSES, write_image_folder

PER_CLASS, VAL = 6, 6          # 18 images: 6 held out, 12 to train on, of which --limit-train 6 used
EVAL_LINE = re.compile(r"\((\w+) split, (\d+) images\): accuracy (\d\.\d{4}), loss (\d+\.\d{4})$")


@pytest.fixture(autouse=True)
def restore_backend():
    """Every command selects a backend for the whole process; put the previous one back."""
    previous = backend.get_backend()
    yield
    backend.set_backend(previous)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("cli") / "shapes", per_class=PER_CLASS)


def main(*argv):
    """cli.main on the arguments as strings (paths may be given as Path)."""
    return cli.main([str(a) for a in argv])


def train_argv(folder, out, **flags):
    """`minicvt train` on the tiny folder: one epoch of two steps (6 images in batches of 3);
    keyword arguments replace flags (limit_train=4 -> --limit-train 4)."""
    settings = dict(config="cvt-cifar-s", backend="numpy", epochs=1, batch_size=3, limit_train=6,
                    val_size=VAL, optimizer="adamw", lr=2e-3, seed=1)
    settings.update(flags)
    argv = ["train", "--data", str(folder), "--out", str(out), "--quiet"]
    for k, v in settings.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    """A finished one-epoch run on NumPy: its folder, holding last.npz, best.npz, metrics.jsonl."""
    out = tmp_path_factory.mktemp("run") / "cvt"
    previous = backend.get_backend()
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(*train_argv(folder, out))
    backend.set_backend(previous)
    assert code == 0
    return out


def one_line_error(capsys, argv, *words):
    """Run a command that must fail: exit code 2, nothing on stdout, one line on stderr that
    starts 'minicvt <command>: error:' and contains every word; no traceback anywhere."""
    code = main(*argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    assert code == 2 and out == "", (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith(f"minicvt {argv[0]}: error: "), err
    for word in words:
        assert str(word) in lines[0], (word, err)
    return lines[0]


def parse_eval(out):
    """(split, images, accuracy, {class: accuracy}) from the text `minicvt eval` prints."""
    lines = out.strip().splitlines()
    split, n, acc, _ = EVAL_LINE.search(lines[0]).groups()
    assert lines[1].split() == ["class", "accuracy"], out
    rows = dict(line.split() for line in lines[2:])
    return split, int(n), acc, rows


def direct_accuracy(ckpt, folder):
    """(accuracy, per-class accuracy (K,)) of a checkpoint on every image of folder, from one
    float64 forward pass written here rather than minicvt.evaluation.evaluate."""
    state, _, meta = load_checkpoint(ckpt)
    model = build_model(CvTConfig.from_json(json.dumps(meta["model_config"])), dtype=np.float64)
    model.load_state_dict(state)
    images, labels, _ = data.load_dataset(str(folder))
    mean = np.array(meta["normalization"]["mean"])[None, :, None, None]   # (1, 3, 1, 1)
    std = np.array(meta["normalization"]["std"])[None, :, None, None]
    x = backend.to_device((images / 255.0 - mean) / std, dtype=np.float64)    # (N, 3, 16, 16)
    with nn.no_grad():
        logits = backend.to_numpy(model.eval().forward(x))                  # (N, K)
    top2 = np.sort(logits, axis=1)[:, -2:]                                  # (N, 2)
    # the checkpoint's float32 eval must make the same predictions: no near-ties to round either way
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-4, np.sort(top2[:, 1] - top2[:, 0])[:3]
    hit = logits.argmax(axis=1) == labels                                  # (N,)
    return hit.mean(), np.array([hit[labels == k].mean() for k in range(len(CLASSES))])


# -- a real run ------------------------------------------------------------------------------------
def test_train_then_eval_prints_the_accuracy_of_a_direct_forward_pass(folder, tmp_path, xp, capsys):
    name, out = backend.get_backend(), tmp_path / "run"
    assert main(*train_argv(folder, out, backend=name)) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"training cvt-cifar-s on {folder} with {name}: 6 images/epoch, 1 epochs")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the last line says where the best model is and which epochs it counted (its one epoch
    # is at full size: the last epoch always is)
    assert printed.splitlines()[-1] == (f"done: best validation accuracy {records[0]['val_acc']:.4f} at full "
                                        f"size (16x16), epoch 1, in {out / 'best.npz'}; checkpoints in {out}")
    for f in ("last.npz", "best.npz", "metrics.jsonl", "curves.png"):
        assert (out / f).is_file(), f
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]

    # every flag reached the run's settings, and the model was sized from the data
    _, optim_state, meta = load_checkpoint(out / "last.npz")
    tc, mc = meta["train_config"], meta["model_config"]
    assert (tc["model"], tc["epochs"], tc["batch_size"], tc["lr"], tc["optimizer"], tc["seed"],
            tc["limit_train"], tc["val_size"]) == ("cvt-cifar-s", 1, 3, 2e-3, "adamw", 1, 6, VAL)
    assert (mc["name"], mc["num_classes"], mc["image_size"]) == ("cvt-cifar-s", 3, 16)
    assert optim_state["steps"] == 2 and meta["num_images"] == 3 * PER_CLASS

    # every image: the printed accuracy and table are those of the forward pass above
    assert main("eval", "--checkpoint", out / "best.npz", "--data", folder, "--split", "all",
                "--backend", name) == 0
    split, n, acc, rows = parse_eval(capsys.readouterr().out)
    assert (split, n, list(rows)) == ("all", 3 * PER_CLASS, CLASSES)
    direct, direct_per_class = direct_accuracy(out / "best.npz", folder)
    assert acc == f"{direct:.4f}"
    assert [rows[c] for c in CLASSES] == [f"{a:.4f}" for a in direct_per_class]

    # the default split re-creates the held-out images: the validation accuracy of training
    assert main("eval", "--checkpoint", out / "best.npz", "--data", folder, "--backend", name) == 0
    split, n, acc, rows = parse_eval(capsys.readouterr().out)
    assert (split, n, list(rows)) == ("val", VAL, CLASSES)
    assert acc == f"{records[0]['val_acc']:.4f}"


def resume_command(out, name):
    return f"minicvt train --resume --out {out}" + (f" --backend {name}" if name != "numpy" else "")


def test_resume_continues_an_interrupted_run(folder, tmp_path, capsys, monkeypatch, xp):
    """A second Ctrl-C (or one while the data loads) stops at once: the run resumes from its
    last save, here the end of epoch 1."""
    out, name = tmp_path / "run", backend.get_backend()
    argv = train_argv(folder, out, epochs=2, optimizer="sgd", lr=0.05, limit_train=3,   # 1 step/epoch
                      backend=name)
    real_epoch = Trainer.train_epoch

    def ctrl_c_in_epoch_2(self, epoch, stop=None):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(self, epoch, stop)
    monkeypatch.setattr(Trainer, "train_epoch", ctrl_c_in_epoch_2)
    assert main(*argv) == 130
    err = capsys.readouterr().err
    assert err == f"minicvt train: interrupted; continue with:\n{resume_command(out, name)}\n"
    first = json.loads((out / "metrics.jsonl").read_text())
    assert load_checkpoint(out / "last.npz")[2]["epoch"] == 0

    monkeypatch.undo()
    # the settings come from the checkpoint; a flag that agrees with them is accepted
    assert main("train", "--resume", "--out", out, "--lr", "0.05", "--quiet", "--backend", name) == 0
    printed = capsys.readouterr().out
    assert f"resumed from {out / 'last.npz'} after epoch 1 of 2" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[0] == first
    _, optim_state, meta = load_checkpoint(out / "last.npz")
    assert meta["epoch"] == 1 and optim_state["steps"] == 2
    assert meta["train_config"]["optimizer"] == "sgd"


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_saves_inside_the_epoch_and_prints_the_resume_command(folder, tmp_path, capsys, monkeypatch,
                                                                       sig, xp):
    out, name = tmp_path / "run", backend.get_backend()
    argv = train_argv(folder, out, epochs=2, optimizer="sgd", lr=0.05, backend=name)    # 2 steps per epoch
    real_step, steps = minicvt.optim.SGD.step, []

    def step_then_signal(self):
        real_step(self)
        steps.append(1)
        if len(steps) == 3:                                  # epoch 2, step 1
            os.kill(os.getpid(), getattr(signal, sig))
    monkeypatch.setattr(minicvt.optim.SGD, "step", step_then_signal)
    assert main(*argv) == 128 + getattr(signal, sig)
    captured = capsys.readouterr()
    # at once, what will happen; then the reason, and the command alone on its own line, on stderr
    assert captured.err == (f"{sig}: stopping after this step, with a save (once more to stop at once, from "
                            f"the last save)\n"
                            f"minicvt train: stopped by {sig} in epoch 2 after step 1 of 2; saved "
                            f"{out / 'last.npz'}; continue with:\n{resume_command(out, name)}\n")
    meta = load_checkpoint(out / "last.npz")[2]
    assert meta["position"]["epoch"] == 1 and meta["position"]["step"] == 1

    monkeypatch.undo()
    assert main("train", "--resume", "--out", out, "--quiet", "--backend", name) == 0
    assert f"resumed from {out / 'last.npz'} in epoch 2 of 2 after step 1 of 2" in capsys.readouterr().out
    _, optim_state, meta = load_checkpoint(out / "last.npz")
    assert meta["epoch"] == 1 and meta["position"] is None and optim_state["steps"] == 4


def test_train_refuses_a_folder_that_holds_a_run(run, folder, tmp_path, capsys):
    out = shutil.copytree(run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    one_line_error(capsys, train_argv(folder, out), str(out), "already holds a run",
                   f"continue it with: minicvt train --resume --out {out}", "--overwrite")
    one_line_error(capsys, ["train", "--resume", "--overwrite", "--out", out], "not both")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Ctrl-C while the data loads: the old run is still there, and --resume would continue it
    real_load = data.load_dataset

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    data.load_dataset = ctrl_c
    try:
        assert main(*train_argv(folder, out, lr=1e-3), "--overwrite") == 130
    finally:
        data.load_dataset = real_load
    assert capsys.readouterr().err == (f"minicvt train: interrupted; {out} still holds the run --overwrite was "
                                       f"to replace (it is deleted when training starts)\n")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(*train_argv(folder, out, lr=1e-3), "--overwrite") == 0
    assert load_checkpoint(out / "last.npz")[2]["train_config"]["lr"] == 1e-3


def test_resume_of_a_finished_run_points_to_init_from(run, capsys):
    one_line_error(capsys, ["train", "--resume", "--out", run], f"the run in {run} has finished",
                   f"minicvt train --init-from {run / 'last.npz'} --out NEW_FOLDER")


def test_the_last_line_says_that_smaller_epochs_are_not_counted(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(*train_argv(folder, out, epochs=2, resolutions="8:0.5")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["image_size"] for r in records] == [8, 16]
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"done: best validation accuracy {records[1]['val_acc']:.4f} at full size (16x16), epoch 2, in "
        f"{out / 'best.npz'} (the epochs at smaller sizes validated on smaller images and are not counted); "
        f"checkpoints in {out}")


def test_eval_batch_size_names_the_flag(run, folder, capsys):
    one_line_error(capsys, ["eval", "--checkpoint", run / "best.npz", "--data", folder, "--batch-size", "0"],
                   "--batch-size must be >= 1, got 0")


def test_a_full_disk_is_one_line_and_loses_nothing(folder, tmp_path, capsys, monkeypatch):
    """ENOSPC injected into the third save (the end of epoch 1's last.npz, after best.npz): the
    error names the file, the run exits 2, the save before is intact, no temporary is left."""
    out = tmp_path / "run"
    real_savez, saves = np.savez, []

    def savez_until_the_disk_fills(f, **arrays):
        saves.append(1)
        if len(saves) == 3:
            f.write(b"PK\x03\x04" + bytes(4096))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_savez(f, **arrays)
    monkeypatch.setattr(np, "savez", savez_until_the_disk_fills)
    assert main(*train_argv(folder, out, epochs=2, save_every=1, resolutions="")) == 2
    err = capsys.readouterr().err
    assert err == (f"minicvt train: error: cannot write {out / 'last.npz'}: No space left on device; "
                   f"its previous version is intact\n")
    monkeypatch.undo()
    assert load_checkpoint(out / "last.npz")[2]["position"]["step"] == 1      # the save after step 1
    assert sorted(p.name for p in out.iterdir()) == ["best.npz", "last.npz"]
    with contextlib.redirect_stdout(io.StringIO()):          # once there is space again, it resumes
        assert main("train", "--resume", "--out", out, "--quiet") == 0


@pytest.mark.parametrize("every", ["0", "5h", "x"])
def test_save_every_that_cannot_be_read(folder, tmp_path, capsys, every):
    one_line_error(capsys, train_argv(folder, tmp_path / "out", save_every=every), f"--save-every {every!r}")
    assert not (tmp_path / "out").exists()


# -- train and resume errors --------------------------------------------------------------------------
def test_resume_with_other_flags_names_them(run, capsys):
    one_line_error(capsys, ["train", "--resume", "--out", run, "--lr", "0.01"],
                   "--resume", str(run), "'lr': (0.002, 0.01)")
    one_line_error(capsys, ["train", "--resume", "--out", run, "--config", "cvt-cifar-m", "--seed", "1"],
                   "'model': ('cvt-cifar-s', 'cvt-cifar-m')")


def unfinished_copy(run, out):
    """A copy of the finished one-epoch run `run` whose settings ask for two epochs: a run
    stopped after its first."""
    out.mkdir()
    model_state, optim_state, meta = load_checkpoint(run / "last.npz")
    meta["train_config"]["epochs"] = 2
    arrays = {**{f"model/{k}": v for k, v in model_state.items()}, **{f"optim/{k}": np.asarray(v) for k, v in
                                                                     optim_state.items()}}
    checkpoint.atomic_savez(out / "last.npz", {**arrays, "meta": np.array(json.dumps(meta))})
    return out


def test_resume_of_a_run_with_another_model_config(run, tmp_path, capsys, monkeypatch):
    # as if cvt-cifar-s had been given other depths since the run was written
    out = unfinished_copy(run, tmp_path / "run")
    monkeypatch.setitem(configs.CONFIGS, "cvt-cifar-s", replace(configs.CVT_CIFAR_S, depth=(1, 1, 1)))
    one_line_error(capsys, ["train", "--resume", "--out", out], out / "last.npz",
                   "different model configuration", "depth")


DAMAGE = {"missing": "does not exist", "truncated": "corrupt", "garbage": "corrupt", "npy": ".npy array",
          "best": "no optimiser state"}


def damage(good, path, kind):
    """Write at `path` a broken form of the checkpoint `good` (or, for 'missing', nothing)."""
    if kind == "truncated":         # an interrupted copy: the zip directory at the end is gone
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(good.stat().st_size))
    elif kind == "npy":             # a bare array from np.save
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif kind == "best":            # best.npz copied over last.npz: weights, no optimiser state
        shutil.copy(good.parent / "best.npz", path)
    return path


@pytest.mark.parametrize("kind", DAMAGE)
def test_resume_from_a_broken_checkpoint(run, tmp_path, capsys, kind):
    out = tmp_path / "run"
    out.mkdir()
    damage(run / "last.npz", out / "last.npz", kind)
    words = ["does not exist: the run saved nothing before it stopped"] if kind == "missing" else [DAMAGE[kind]]
    one_line_error(capsys, ["train", "--resume", "--out", out], out / "last.npz", *words)


BAD_DATA = {"missing": "no such file or directory", "empty": "no .jpg/.jpeg/.png images found",
            "file": "neither a folder nor a readable tar archive"}


def bad_data(tmp_path, kind):
    path = tmp_path / {"missing": "nowhere", "empty": "empty", "file": "noise.tar.gz"}[kind]
    if kind == "empty":
        path.mkdir()
    elif kind == "file":            # tarfile's message for this spans five lines: printed as one
        path.write_bytes(np.random.default_rng(0).bytes(1000))
    return path


@pytest.mark.parametrize("kind", BAD_DATA)
def test_bad_data_path(run, tmp_path, capsys, kind):
    path = bad_data(tmp_path, kind)
    one_line_error(capsys, train_argv(path, tmp_path / "out"), path, BAD_DATA[kind])
    one_line_error(capsys, ["eval", "--checkpoint", run / "best.npz", "--data", path], path, BAD_DATA[kind])
    one_line_error(capsys, ["attention", "--checkpoint", run / "best.npz", "--data", path,
                            "--out", tmp_path / "a.png"], path, BAD_DATA[kind])
    assert not (tmp_path / "out").exists()


def test_unknown_config_fails_before_loading_any_data(tmp_path, capsys, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("the config name must be checked before CIFAR-10 is fetched")
    monkeypatch.setattr(data, "fetch_cifar10", no_download)
    one_line_error(capsys, train_argv("cifar10", tmp_path / "out", config="cvt-99"),
                   "unknown config 'cvt-99'", "cvt-cifar-s")


def test_settings_that_cannot_train(folder, tmp_path, capsys):
    # drop_last keeps only full batches: a batch larger than the 6 training images would give none
    one_line_error(capsys, train_argv(folder, tmp_path, batch_size=8), "--batch-size 8", "6 training images")
    one_line_error(capsys, train_argv(folder, tmp_path, epochs=0), "--epochs must be >= 1")
    one_line_error(capsys, train_argv(folder, tmp_path, val_size=3 * PER_CLASS), "--val-size 18 holds out every "
                   "one of the 18 images", "give a smaller --val-size")


@pytest.mark.parametrize("command", ["train", "eval"])
def test_cupy_backend_without_cupy(run, folder, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "cupy", None)        # `import cupy` now fails on any machine
    argv = train_argv(folder, tmp_path, backend="cupy") if command == "train" else \
        ["eval", "--checkpoint", run / "best.npz", "--data", folder, "--backend", "cupy"]
    one_line_error(capsys, argv, "backend 'cupy' needs CuPy", "pip install")


# -- eval errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [k for k in DAMAGE if k != "best"])
def test_eval_of_a_broken_checkpoint(run, folder, tmp_path, capsys, kind):
    path = damage(run / "best.npz", tmp_path / "model.npz", kind)
    one_line_error(capsys, ["eval", "--checkpoint", path, "--data", folder], path, DAMAGE[kind])


def rewrite_meta(src, dst, **changes):
    """A copy of checkpoint src whose metadata has some entries replaced."""
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["meta"] = np.array(json.dumps({**json.loads(str(arrays["meta"])), **changes}))
    np.savez(dst, **arrays)
    return dst


def test_eval_of_a_checkpoint_of_another_config_or_data(run, tmp_path, capsys):
    # weights of cvt-cifar-s under the name and shapes of cvt-cifar-m
    other = json.loads(get_config("cvt-cifar-m", num_classes=3, image_size=16).to_json())
    path = rewrite_meta(run / "best.npz", tmp_path / "m.npz", model_config=other)
    shapes = write_image_folder(tmp_path / "shapes", per_class=2)
    one_line_error(capsys, ["eval", "--checkpoint", path, "--data", shapes, "--split", "all"],
                   path, "does not fit its own model configuration", "missing arrays")
    # data with other classes, or (for the held-out split) other images than the run's
    animals = write_image_folder(tmp_path / "animals", classes=["ant", "bee", "cat"], per_class=2)
    one_line_error(capsys, ["eval", "--checkpoint", run / "best.npz", "--data", animals, "--split", "all"],
                   "was trained on classes", "'ant'")
    one_line_error(capsys, ["eval", "--checkpoint", run / "best.npz", "--data", shapes, "--split", "val"],
                   f"({3 * PER_CLASS} images)", "other images (6)", "--split all")


def test_eval_splits_follow_the_data(run, folder, tmp_path, capsys):
    """Without --split: the run's held-out images on its own training data, every image on any
    other data (a folder of test images, say); --split test only where the data has a test split."""
    assert main("eval", "--checkpoint", run / "best.npz", "--data", folder) == 0
    assert parse_eval(capsys.readouterr().out)[:2] == ("val", VAL)
    others = write_image_folder(tmp_path / "other", per_class=2, seed=5)     # same classes, other images
    assert main("eval", "--checkpoint", run / "best.npz", "--data", others) == 0
    assert parse_eval(capsys.readouterr().out)[:2] == ("all", 6)
    one_line_error(capsys, ["eval", "--checkpoint", run / "best.npz", "--data", folder, "--split", "test"],
                   "--split test", "has no test split", "--split all")


# -- across the process boundary ----------------------------------------------------------------------
def test_python_m_minicvt_eval_error_has_no_traceback(folder, tmp_path):
    bad = damage(None, tmp_path / "model.npz", "npy")
    root = Path(minicvt.__file__).parent.parent
    proc = subprocess.run([sys.executable, "-m", "minicvt", "eval", "--checkpoint", str(bad), "--data",
                           str(folder), "--backend", "numpy"], capture_output=True, text=True, cwd=root,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr == (f"minicvt eval: error: checkpoint {bad} is a single .npy array, "
                           f"not a .npz checkpoint\n")


def test_ranks_without_an_mpiexec_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))     # nothing beside it
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert cli.main(["train", "--ranks", "2", "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no mpiexec" in err and 'pip install -e ".[mpi]"' in err


def test_a_batch_that_does_not_divide_among_the_ranks_is_refused():
    from minicvt.train import check_ranks
    check_ranks(6, 3)
    with pytest.raises(ValueError, match=r"--batch-size 7 does not divide among 3 ranks.*such as 6"):
        check_ranks(7, 3)
    with pytest.raises(ValueError, match=r"--batch-size 2 is smaller than the 3 ranks"):
        check_ranks(2, 3)
