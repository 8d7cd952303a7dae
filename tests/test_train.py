"""The trainer on a tiny learnable image folder (3 classes of 16x16 PNGs): it overfits, writes
its metrics, curves and checkpoints, resumes an interrupted run to bit-identical weights on CPU,
stops on a NaN loss keeping the last good checkpoint, refuses a checkpoint of other settings,
and `evaluate` agrees with a direct forward pass."""
import errno
import json
import os
import re
import signal
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cvt_tiny import tiny_config
from minicvt import backend, checkpoint, data, nn, run_folder
from minicvt.checkpoint import CheckpointError, load_checkpoint
from minicvt.models import build_model
from minicvt.evaluation import evaluate
from minicvt.stopping import Interrupted
from minicvt.train import DivergedError, TrainConfig, Trainer

CLASSES = ["blue", "green", "red"]           # sorted, as the folder loader orders classes
PER_CLASS, SIZE = 16, 16
# timing entries of a metrics record: the only ones that may differ between two equal runs
TIMING = ("seconds", "images_per_s")


def write_image_folder(root, classes=CLASSES, per_class=PER_CLASS, seed=0):
    """root/<class>/<i>.png, 16x16 RGB: class k is bright in one colour channel and carries
    a stripe pattern of period k + 2, plus noise, so the class is visible but no two images
    are equal. Returns root."""
    rng = np.random.default_rng(seed)
    cols = np.arange(SIZE)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.full((SIZE, SIZE, 3), 60.0)
            img[..., k % 3] = 190.0
            img[:, cols % (k + 2) == 0, :] += 40.0                      # vertical stripes
            img += rng.normal(0.0, 20.0, img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images") / "shapes")


def tiny_run(folder, **overrides):
    """A TrainConfig for the tiny folder: 36 training images (4 steps of 8), 12 validation; at
    full size throughout, validated without flips (tests/test_recipe.py has those)."""
    fields = dict(data=str(folder), val_size=12, batch_size=8, epochs=3, limit_train=0,
                  optimizer="adamw", lr=3e-3, warmup_epochs=0.5, label_smoothing=0.0,
                  crop_padding=2, augment=False, seed=0, resolutions="", eval_flip=False)
    fields.update(overrides)
    return TrainConfig(**fields)


def make_trainer(tc, out, model_config=None, **options):
    return Trainer(tc, out, model_config=model_config or tiny_config(), progress=False, log=lambda *a: None,
                   **options)


def untimed(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def test_overfits_and_writes_metrics_curves_and_checkpoints(folder, tmp_path):
    tc = tiny_run(folder, epochs=8, lr=3e-2)
    history = make_trainer(tc, tmp_path).fit()
    first, last = history[0], history[-1]
    # the loss starts near ln(3) = 1.10 (a fresh model guesses) and must fall well below it
    assert abs(first["train_loss"] - np.log(3)) < 0.2, first
    assert last["train_loss"] < 0.25 * first["train_loss"], history
    assert last["train_acc"] >= 0.95, history

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == list(range(1, 9))
    keys = {"epoch", "image_size", "train_loss", "train_acc", "seconds", "images_per_s", "lr", "val_loss", "val_acc"}
    assert all(set(r) == keys for r in records), records[0]
    assert untimed(records) == untimed(history)

    png = (tmp_path / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(tmp_path / "curves.png") as im:
        im.verify()                                          # a complete, readable PNG

    model_state, optim_state, meta = load_checkpoint(tmp_path / "last.npz")
    assert meta["epoch"] == 7 and len(meta["history"]) == 8 and optim_state["steps"] == 8 * 4
    best_state, best_optim, best_meta = load_checkpoint(tmp_path / "best.npz")
    val_acc = [h["val_acc"] for h in history]
    # best.npz is rewritten only on a strict improvement: the first epoch with the top accuracy
    assert best_meta["epoch"] == int(np.argmax(val_acc))
    assert best_meta["best_acc"] == max(val_acc) and best_optim == {}
    model = build_model(tiny_config())
    model.load_state_dict(best_state)                        # every key and shape fits
    assert set(best_state) == set(model_state) == set(model.state_dict())


def _assert_same_state(a, b):
    """Every parameter, BN buffer and optimiser array of two trainers bit for bit."""
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sorted(sa) == sorted(sb)
    assert any(".running_mean" in k for k in sa)             # BN statistics are compared too
    for k in sa:
        np.testing.assert_array_equal(backend.to_numpy(sa[k]), backend.to_numpy(sb[k]), err_msg=k)
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sorted(oa) == sorted(ob) and oa["steps"] == ob["steps"]
    for k in oa:
        np.testing.assert_array_equal(oa[k], ob[k], err_msg=k)


@pytest.mark.parametrize("optimizer, resolutions, stop", [
    ("adamw", "", "SIGINT"), ("sgd", "", "SIGTERM"), ("adamw", "8:0.34,12:0.33", "SIGINT"),
    ("adamw", "", "kill"), ("sgd", "8:0.34,12:0.33", "kill")])
def test_resume_after_interrupt_is_bit_identical(folder, tmp_path, monkeypatch, optimizer, resolutions, stop):
    # augmentation, dropout and drop path all draw random numbers: resuming must redraw them.
    # With progressive resizing the three epochs run at 8x8, 12x12 and 16x16: the interrupted
    # third epoch resumes at its own size, validated with flips.
    # SIGINT/SIGTERM: the run saves where it is (epoch 3 after step 2) and stops. kill: an
    # exception that stops it dead in epoch 3's second step, as `kill -9` would; it resumes
    # from the last save every 3 steps (after run step 9: epoch 3, step 1) and runs step 2 again
    mc = tiny_config(depth=(1, 2), drop_rate=(0.1, 0.1), attn_drop_rate=(0.1, 0.1),
                     drop_path_rate=(0.0, 0.3))
    tc = tiny_run(folder, epochs=3, optimizer=optimizer, lr=1e-2 if optimizer == "adamw" else 0.05,
                  augment=True, resolutions=resolutions, eval_flip=bool(resolutions))
    a = make_trainer(tc, tmp_path / "a", mc)
    a.fit()

    b = make_trainer(tc, tmp_path / "b", mc, save_every="3")
    real_step, steps = b.optimizer.step, []

    def step_then_maybe_stop():
        real_step()
        steps.append(1)
        if len(steps) == 2 * 4 + 2:                         # 4 steps per epoch
            if stop == "kill":
                raise SystemExit("killed")
            os.kill(os.getpid(), getattr(signal, stop))      # handled: the step finishes
    monkeypatch.setattr(b.optimizer, "step", step_then_maybe_stop)
    with pytest.raises(SystemExit if stop == "kill" else Interrupted) as stopped:
        b.fit()
    meta = load_checkpoint(tmp_path / "b" / "last.npz")[2]
    assert meta["epoch"] == 1                                  # epochs 1 and 2 finished
    assert meta["position"]["epoch"] == 2 and meta["position"]["step"] == (1 if stop == "kill" else 2)
    if stop != "kill":
        assert stopped.value.exit_code == 128 + getattr(signal, stop)
        assert f"stopped by {stop} in epoch 3 after step 2 of 4" in str(stopped.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler    # the handlers are put back

    resumed = make_trainer(tc, tmp_path / "b", mc, resuming=True)
    resumed.resume()
    assert resumed.start_epoch == 2
    resumed.fit()
    assert [h["image_size"] for h in resumed.history] == ([8, 12, 16] if resolutions else [16] * 3)
    _assert_same_state(a, resumed)
    assert untimed(resumed.history) == untimed(a.history)
    assert resumed.best_acc == a.best_acc
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert untimed([json.loads(line) for line in lines]) == untimed(a.history)
    assert load_checkpoint(tmp_path / "b" / "last.npz")[2]["position"] is None


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(folder, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_run(folder, epochs=3), tmp_path, save_every="2")
    real_epoch = trainer.train_epoch

    def poisoned(epoch, stop=None):
        if epoch == 1:                                       # the second epoch: one NaN weight
            trainer.model.head.weight.data[0, 0] = np.nan
        return real_epoch(epoch, stop)
    monkeypatch.setattr(trainer, "train_epoch", poisoned)
    with pytest.raises(DivergedError, match=r"loss became nan in epoch 2, step 1\b") as err:
        trainer.fit()
    # it names the checkpoint that exists, and where in the run it was saved
    assert f"the last good checkpoint is {tmp_path / 'last.npz'} (after epoch 1 of 3)" in str(err.value)
    model_state, optim_state, meta = load_checkpoint(tmp_path / "last.npz")
    assert meta["epoch"] == 0 and len(meta["history"]) == 1 and meta["position"] is None
    assert all(np.isfinite(v).all() for v in model_state.values())
    assert all(np.isfinite(v).all() for v in optim_state.values())
    build_model(tiny_config()).load_state_dict(model_state)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_nan_before_any_save_says_none_was_saved(folder, tmp_path):
    trainer = make_trainer(tiny_run(folder, epochs=2), tmp_path)
    trainer.model.head.weight.data[0, 0] = np.nan
    with pytest.raises(DivergedError, match=r"loss became nan in epoch 1, step 1; no checkpoint was saved yet"):
        trainer.fit()
    assert not (tmp_path / "last.npz").exists()


def test_an_error_inside_the_epoch_closes_the_progress_bar(folder, tmp_path):
    """Else the CLI's one-line error would be printed on the bar's line."""
    from tqdm import tqdm
    trainer = Trainer(tiny_run(folder, epochs=2), tmp_path, model_config=tiny_config(), progress=True,
                      log=lambda *a: None)
    trainer.model.head.weight.data[0, 0] = np.nan
    with pytest.raises(DivergedError):
        trainer.fit()
    assert len(tqdm._instances) == 0


def test_a_signal_during_validation_stops_after_the_epochs_save(folder, tmp_path, monkeypatch):
    import minicvt.train as train_module
    trainer = make_trainer(tiny_run(folder, epochs=3), tmp_path)
    real_evaluate, calls = train_module.evaluate, []

    def evaluate_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)             # while epoch 1 is validated
        return real_evaluate(*args, **kwargs)
    monkeypatch.setattr(train_module, "evaluate", evaluate_then_signal)
    with pytest.raises(Interrupted, match=r"stopped by SIGTERM after epoch 1 of 3; saved .*last.npz") as stopped:
        trainer.fit()
    assert stopped.value.exit_code == 143
    meta = load_checkpoint(tmp_path / "last.npz")[2]
    assert meta["epoch"] == 0 and meta["position"] is None and len(meta["history"]) == 1


def test_resume_on_other_images_is_refused(folder, tmp_path):
    """A folder that gained an image would give other batches: not a continuation."""
    import shutil
    data_copy = shutil.copytree(folder, tmp_path / "images")
    tc = tiny_run(data_copy, epochs=2)
    make_trainer(tc, tmp_path / "run", save_every="2").fit()
    shutil.copy(data_copy / "red" / "0.png", data_copy / "red" / "extra.png")
    with pytest.raises(CheckpointError, match=r"was written by a run on other images than --data .* holds now"):
        make_trainer(tc, tmp_path / "run", resuming=True).resume()


def test_weights_that_are_not_finite_are_never_saved(folder, tmp_path, monkeypatch):
    """The loss of a step is computed before its update: an update that makes a weight NaN is
    seen by the next loss, or by the check every save makes first."""
    trainer = make_trainer(tiny_run(folder, epochs=2), tmp_path, save_every="3")
    real_step, steps = trainer.optimizer.step, []

    def step_then_poison():
        real_step()
        steps.append(1)
        if len(steps) == 3:                                  # the step right before the save
            trainer.model.head.weight.data[0, 0] = np.inf
    monkeypatch.setattr(trainer.optimizer, "step", step_then_poison)
    with pytest.raises(DivergedError, match=r"weights became NaN or infinite in epoch 1, step 3; "
                                            r"no checkpoint was saved yet"):
        trainer.fit()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_saves_inside_the_epoch_every_n_steps(folder, tmp_path, monkeypatch):
    saved = []
    real_save = Trainer._save

    def spy(self, epoch, improved=False, position=None):
        real_save(self, epoch, improved, position)
        saved.append((position or {}).get("step"))
    monkeypatch.setattr(Trainer, "_save", spy)
    make_trainer(tiny_run(folder, epochs=2), tmp_path, save_every="3").fit()
    # run steps 3 and 6 (epoch 1 step 3, epoch 2 step 2) and each epoch's end (None)
    assert saved == [3, None, 2, None]


def test_saves_every_few_minutes_by_the_clock(folder, tmp_path, monkeypatch):
    now = [0.0]
    # the trainer's clock only (time.monotonic itself stays: others read it too)
    monkeypatch.setattr("minicvt.train.time", SimpleNamespace(monotonic=lambda: now[0], perf_counter=time.perf_counter))
    trainer = make_trainer(tiny_run(folder, epochs=1), tmp_path, save_every="2m")
    real_step = trainer.optimizer.step

    def slow_step():
        real_step()
        now[0] += 50.0                                       # 50 s per step
    monkeypatch.setattr(trainer.optimizer, "step", slow_step)
    saved = []
    real_save = trainer._save
    monkeypatch.setattr(trainer, "_save", lambda epoch, improved=False, position=None:
                        (real_save(epoch, improved, position), saved.append((position or {}).get("step"))))
    trainer.fit()
    assert saved == [3, None]                                # 150 s >= 2 minutes after step 3; the end


@pytest.mark.parametrize("text, expected", [("5m", (None, 300.0)), ("90s", (None, 90.0)), ("200", (200, None)),
                                            ("1.5min", (None, 90.0))])
def test_save_every_reads_minutes_seconds_and_steps(text, expected):
    assert run_folder.parse_save_every(text) == expected


@pytest.mark.parametrize("text", ["0", "-3", "2.5", "5h", "m", "", "0.5s"])
def test_save_every_refuses_what_it_cannot_read(text):
    with pytest.raises(ValueError, match="--save-every"):
        run_folder.parse_save_every(text)


def test_a_folder_that_holds_a_run_is_never_overwritten(folder, tmp_path):
    tc = tiny_run(folder, epochs=1)
    make_trainer(tc, tmp_path).fit()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(run_folder.RunFolderError, match=r"already holds a run \(last.npz, best.npz, "
                                                        r"metrics.jsonl\); continue it with: minicvt train "
                                                        r"--resume .* add --overwrite"):
        make_trainer(replace(tc, lr=1e-2), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # --overwrite deletes the old run's files before the new one writes its own
    (tmp_path / "notes.txt").write_text("mine")
    trainer = make_trainer(replace(tc, lr=1e-2, epochs=2), tmp_path, overwrite=True)
    (tmp_path / "best.npz").write_bytes(b"stale")            # a best.npz the new run never beats
    trainer.best_acc = 2.0
    trainer.fit()
    assert not (tmp_path / "best.npz").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # what minicvt did not write stays
    assert load_checkpoint(tmp_path / "last.npz")[2]["train_config"]["lr"] == 1e-2


def test_a_folder_left_before_the_first_save_is_reused(folder, tmp_path):
    (tmp_path / ".last.npz.k3j2.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")   # a killed save
    make_trainer(tiny_run(folder, epochs=1), tmp_path).fit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.npz", "curves.png", "last.npz", "metrics.jsonl"]


def test_resume_of_a_finished_run_points_to_init_from(folder, tmp_path):
    tc = tiny_run(folder, epochs=1)
    make_trainer(tc, tmp_path).fit()
    with pytest.raises(run_folder.RunFolderError, match=r"has finished \(all 1 epochs\); to train it further, "
                                                        r"start a new run from its weights: minicvt train "
                                                        r"--init-from .*last.npz --out NEW_FOLDER"):
        make_trainer(tc, tmp_path, resuming=True).resume()


def test_init_from_a_run_that_held_out_other_images_warns(folder, tmp_path):
    """Fine-tuning with another --seed would validate on images the starting weights learned."""
    start = tmp_path / "start"
    make_trainer(tiny_run(folder, epochs=1), start).fit()
    said = []
    Trainer(tiny_run(folder, epochs=1, seed=1, init_from=str(start / "last.npz")), tmp_path / "other",
            model_config=tiny_config(), progress=False, log=said.append)
    assert len(said) == 1 and re.fullmatch(r"warning: \d+ of this run's 12 validation images are among those the "
                                           r"starting weights \(.*last.npz\) trained on, so its validation "
                                           r"accuracy will read high; give --seed 0 --val-size 12 to hold out "
                                           r"the images that run held out", said[0]), said
    said.clear()                                             # the same split: nothing to say
    Trainer(tiny_run(folder, epochs=1, init_from=str(start / "last.npz")), tmp_path / "same",
            model_config=tiny_config(), progress=False, log=said.append)
    assert said == []


def test_resume_refuses_a_position_outside_the_epoch(folder, tmp_path):
    tc = tiny_run(folder, epochs=2)
    make_trainer(tc, tmp_path, save_every="2").fit()
    model_state, optim_state, meta = load_checkpoint(tmp_path / "last.npz")
    meta.update(epoch=0, position={"epoch": 1, "step": 9, "loss_sum": 1.0, "correct": 0.0, "bad": 0.0,
                                   "seen": 72, "seconds": 1.0})              # an epoch has 4 steps
    arrays = {**{f"model/{k}": v for k, v in model_state.items()},
              **{f"optim/{k}": np.asarray(v) for k, v in optim_state.items()}, "meta": np.array(json.dumps(meta))}
    checkpoint.atomic_savez(tmp_path / "last.npz", arrays)
    with pytest.raises(CheckpointError, match=r"its position \(epoch 2, step 9\) is not inside epoch 2 of 4 steps"):
        make_trainer(tc, tmp_path, resuming=True).resume()


def test_resume_with_nothing_saved(folder, tmp_path):
    with pytest.raises(run_folder.RunFolderError, match="last.npz does not exist: the run saved nothing"):
        make_trainer(tiny_run(folder), tmp_path, resuming=True).resume()


def test_a_full_disk_keeps_the_previous_checkpoint(folder, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_run(folder, epochs=2), tmp_path, save_every="2")
    real_savez, saves = np.savez, []

    def savez_until_the_disk_fills(f, **arrays):
        saves.append(1)
        if len(saves) == 3:                                  # the third save: half written, then ENOSPC
            f.write(b"PK\x03\x04" + bytes(1000))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_savez(f, **arrays)
    monkeypatch.setattr(np, "savez", savez_until_the_disk_fills)
    with pytest.raises(checkpoint.SaveError) as err:
        trainer.fit()
    message = str(err.value)
    assert "\n" not in message and err.value.errno == errno.ENOSPC
    assert message == (f"cannot write {tmp_path / 'last.npz'}: No space left on device; "
                       f"its previous version is intact")
    monkeypatch.undo()
    # saves 1 and 2: after step 2, and the end of epoch 1 (best.npz); the third was last.npz's
    meta = load_checkpoint(tmp_path / "last.npz")[2]
    assert meta["position"] == {**meta["position"], "epoch": 0, "step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.npz", "last.npz"]   # no temporary


def test_resume_refuses_other_settings(folder, tmp_path):
    tc = tiny_run(folder, epochs=2)
    trainer = make_trainer(tc, tmp_path)
    trainer.train_epoch = lambda epoch, stop=None: (_ for _ in ()).throw(KeyboardInterrupt) if epoch else \
        Trainer.train_epoch(trainer, epoch, stop)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()                                        # one epoch saved
    with pytest.raises(CheckpointError, match=r"'lr': \(0\.003, 0\.01\)"):
        make_trainer(replace(tc, lr=1e-2), tmp_path, resuming=True).resume()
    with pytest.raises(CheckpointError, match=r"model configuration.*dim_embed"):
        make_trainer(tc, tmp_path, tiny_config(dim_embed=(4, 12), num_heads=(1, 3)), resuming=True).resume()
    same = make_trainer(tc, tmp_path, resuming=True)
    same.resume()                                            # the same settings are accepted
    assert same.start_epoch == 1


def test_evaluate_matches_a_direct_forward_pass(folder, xp):
    images, labels, classes = data.load_dataset(str(folder))
    mean, std = data.channel_stats(images)
    # float64, in eval mode: batching cannot change a prediction by rounding
    model = build_model(tiny_config(), seed=3, dtype=np.float64)
    # a batch size that leaves a partial last batch (48 = 4 * 11 + 4)
    loader = data.Loader(images, labels, 11, mean, std, dtype=np.float64)
    loss, acc, per_class = evaluate(model, loader, len(classes))

    x = data.normalize(backend.to_device(images), backend.to_device(mean), backend.to_device(std),
                       np.float64)
    with nn.no_grad():
        logits = model.eval().forward(x)                     # (48, 3)
        direct_loss = float(nn.CrossEntropyLoss().forward(logits, backend.to_device(labels)))
    hit = backend.to_numpy(logits).argmax(axis=1) == labels  # (48,)
    assert 0.0 <= acc <= 1.0
    assert acc == pytest.approx(hit.mean(), abs=1e-12)
    assert loss == pytest.approx(direct_loss, rel=1e-12)
    assert per_class.shape == (len(classes),)
    for k in range(len(classes)):
        assert per_class[k] == pytest.approx(hit[labels == k].mean(), abs=1e-12), k
    counts = np.bincount(labels, minlength=len(classes))
    assert acc == pytest.approx((per_class * counts).sum() / counts.sum(), abs=1e-12)


@pytest.mark.parametrize("field, value, message", [
    ("lr", -0.1, "^--lr must be > 0"), ("lr", 0.0, "^--lr must be > 0"),
    ("weight_decay", -1e-4, "^--weight-decay must be >= 0"), ("warmup_epochs", -1, "^--warmup-epochs must be >= 0"),
    ("label_smoothing", 1.0, r"^--label-smoothing must be in \[0, 1\)"),
    ("limit_train", -5, "^--limit-train must be >= 0"), ("batch_size", 0, "^--batch-size must be >= 1, got 0"),
    ("eval_batch_size", 0, "^--eval-batch-size must be >= 1"), ("val_size", -1, "^--val-size must be >= 0"),
    ("resolutions", "16", "'16' is not SIZE:FRACTION"), ("resolutions", "16:a", "'16:a' is not SIZE:FRACTION"),
    ("resolutions", "2:0.5", "pixels: a whole number of at least 4"),
    ("resolutions", "16:0", "needs a fraction of the epochs in"),
    ("resolutions", "1.5:0.5", "a fraction of the image side .above 0, below 1. or, from 1 on, pixels"),
    ("resolutions", "16:0.6,24:0.5", "add up to more than 1"),
])
def test_train_config_refuses_settings_that_make_no_sense(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_a_quick_trial_holds_out_a_fifth_of_its_images():
    """--limit-train 5000 --epochs 1 would otherwise validate on 5000 images, with mirrors:
    longer than its training epoch."""
    assert TrainConfig().val_size == 5000
    assert TrainConfig(limit_train=5000).val_size == 1000
    assert TrainConfig(limit_train=200).val_size == 500 and TrainConfig(limit_train=40000).val_size == 5000
    assert TrainConfig(limit_train=5000, val_size=3000).val_size == 3000       # given: kept


def test_a_folder_of_one_class_is_refused(tmp_path):
    """It would train to 'accuracy 1.0' and then name its one class for anything."""
    one = write_image_folder(tmp_path / "cats", classes=["cat"])
    with pytest.raises(data.DataError, match=r"it has one class \('cat'\); a classifier needs two or more"):
        make_trainer(tiny_run(one), tmp_path / "run")


def test_a_validation_split_of_every_image_names_the_flag(folder, tmp_path):
    with pytest.raises(ValueError, match=r"^--val-size 48 holds out every one of the 48 images of .*; give a "
                                         r"smaller --val-size$"):
        make_trainer(tiny_run(folder, val_size=48), tmp_path / "run")


def test_labels_beyond_the_models_classes_are_refused_once_at_load(folder, tmp_path):
    """The loss checks label ranges on the host only (on a GPU that would stall every step), so
    the trainer checks them where it loads them: 3 classes of images, a 2-class model."""
    with pytest.raises(ValueError, match=r"labels range over \[0, 2\] but the model has 2 classes"):
        make_trainer(tiny_run(folder), tmp_path / "run", model_config=tiny_config(num_classes=2))
