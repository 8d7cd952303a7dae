"""The trainer on a tiny learnable image folder (3 classes of 16x16 PNGs): it overfits, writes
its metrics, curves and checkpoints, resumes an interrupted run to bit-identical weights on CPU,
stops on a NaN loss keeping the last good checkpoint, refuses a checkpoint of other settings,
and `evaluate` agrees with a direct forward pass."""
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from cvt_tiny import tiny_config
from minicvt import backend, data, nn
from minicvt.checkpoint import CheckpointError, load_checkpoint
from minicvt.models import build_model
from minicvt.evaluation import evaluate
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


def make_trainer(tc, out, model_config=None):
    return Trainer(tc, out, model_config=model_config or tiny_config(), progress=False, log=lambda *a: None)


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


@pytest.mark.parametrize("optimizer, resolutions", [("adamw", ""), ("sgd", ""), ("adamw", "8:0.34,12:0.33")])
def test_resume_after_interrupt_is_bit_identical(folder, tmp_path, monkeypatch, optimizer, resolutions):
    # augmentation, dropout and drop path all draw random numbers: resuming must redraw them.
    # With progressive resizing the three epochs run at 8x8, 12x12 and 16x16: the interrupted
    # third epoch resumes at its own size, validated with flips
    mc = tiny_config(depth=(1, 2), drop_rate=(0.1, 0.1), attn_drop_rate=(0.1, 0.1),
                     drop_path_rate=(0.0, 0.3))
    tc = tiny_run(folder, epochs=3, optimizer=optimizer, lr=1e-2 if optimizer == "adamw" else 0.05,
                  augment=True, resolutions=resolutions, eval_flip=bool(resolutions))
    a = make_trainer(tc, tmp_path / "a", mc)
    a.fit()

    # run B: stopped by Ctrl-C after two steps of epoch 3
    b = make_trainer(tc, tmp_path / "b", mc)
    real_step, steps = b.optimizer.step, []

    def step_then_maybe_interrupt():
        real_step()
        steps.append(1)
        if len(steps) == 2 * 4 + 2:                         # 4 steps per epoch
            raise KeyboardInterrupt
    monkeypatch.setattr(b.optimizer, "step", step_then_maybe_interrupt)
    with pytest.raises(KeyboardInterrupt):
        b.fit()
    assert load_checkpoint(tmp_path / "b" / "last.npz")[2]["epoch"] == 1    # epochs 1 and 2 saved

    resumed = make_trainer(tc, tmp_path / "b", mc)
    resumed.resume()
    assert resumed.start_epoch == 2
    resumed.fit()
    assert [h["image_size"] for h in resumed.history] == ([8, 12, 16] if resolutions else [16] * 3)
    _assert_same_state(a, resumed)
    assert untimed(resumed.history) == untimed(a.history)
    assert resumed.best_acc == a.best_acc
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert untimed([json.loads(line) for line in lines]) == untimed(a.history)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(folder, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_run(folder, epochs=3), tmp_path)
    real_epoch = trainer.train_epoch

    def poisoned(epoch):
        if epoch == 1:                                       # the second epoch: one NaN weight
            trainer.model.head.weight.data[0, 0] = np.nan
        return real_epoch(epoch)
    monkeypatch.setattr(trainer, "train_epoch", poisoned)
    with pytest.raises(DivergedError, match=r"loss became nan in epoch 2\b") as err:
        trainer.fit()
    assert str(tmp_path / "last.npz") in str(err.value)      # it says where the good state is
    model_state, optim_state, meta = load_checkpoint(tmp_path / "last.npz")
    assert meta["epoch"] == 0 and len(meta["history"]) == 1
    assert all(np.isfinite(v).all() for v in model_state.values())
    assert all(np.isfinite(v).all() for v in optim_state.values())
    build_model(tiny_config()).load_state_dict(model_state)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_resume_refuses_other_settings(folder, tmp_path):
    tc = tiny_run(folder, epochs=2)
    trainer = make_trainer(tc, tmp_path)
    trainer.train_epoch = lambda epoch: (_ for _ in ()).throw(KeyboardInterrupt) if epoch else \
        Trainer.train_epoch(trainer, epoch)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()                                        # one epoch saved
    with pytest.raises(CheckpointError, match=r"'lr': \(0\.003, 0\.01\)"):
        make_trainer(replace(tc, lr=1e-2), tmp_path).resume()
    with pytest.raises(CheckpointError, match=r"model configuration.*dim_embed"):
        make_trainer(tc, tmp_path, tiny_config(dim_embed=(4, 12), num_heads=(1, 3))).resume()
    same = make_trainer(tc, tmp_path)
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
    ("lr", -0.1, "lr must be > 0"), ("lr", 0.0, "lr must be > 0"),
    ("weight_decay", -1e-4, "weight_decay must be >= 0"), ("warmup_epochs", -1, "warmup_epochs must be >= 0"),
    ("label_smoothing", 1.0, r"label_smoothing must be in \[0, 1\)"), ("limit_train", -5, "limit_train must be >= 0"),
    ("resolutions", "16", "'16' is not SIZE:FRACTION"), ("resolutions", "16:a", "'16:a' is not SIZE:FRACTION"),
    ("resolutions", "2:0.5", "pixels: a whole number of at least 4"),
    ("resolutions", "16:0", "needs a fraction of the epochs in"),
    ("resolutions", "1.5:0.5", "a fraction of the image side .above 0, below 1. or, from 1 on, pixels"),
    ("resolutions", "16:0.6,24:0.5", "add up to more than 1"),
])
def test_train_config_refuses_settings_that_make_no_sense(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_labels_beyond_the_models_classes_are_refused_once_at_load(folder, tmp_path):
    """The loss checks label ranges on the host only (on a GPU that would stall every step), so
    the trainer checks them where it loads them: 3 classes of images, a 2-class model."""
    with pytest.raises(ValueError, match=r"labels range over \[0, 2\] but the model has 2 classes"):
        make_trainer(tiny_run(folder), tmp_path / "run", model_config=tiny_config(num_classes=2))
