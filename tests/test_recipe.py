"""The pieces of the one-hour recipe. Progressive resizing: the resize against a loop over its
definition and against torch's antialiased bilinear interpolation, the epoch plan of
`--resolutions`, the loader's resized batches, and a run whose epochs change size (its resume
is in test_train.py). Flip test-time augmentation: `evaluate` against direct forward passes.
`--minutes`: the plan's arithmetic on a fake clock, and a planned run equal, bit for bit, to
the run of `--epochs` with the number it planned. Old checkpoints, written before these
existed, keep training as they did."""
import json

import numpy as np
import pytest

from cvt_tiny import tiny_config
from minicvt import backend, cli, data, nn, planner, schedules, train
from minicvt.checkpoint import load_checkpoint, save_checkpoint
from minicvt.evaluation import evaluate
from minicvt.models import CvTConfig, build_model
from minicvt.train import TrainConfig
from test_train import _assert_same_state, folder, make_trainer, tiny_run, untimed  # noqa: F401  (a fixture)


def resize_matrix_loop(n_in, n_out):
    """The definition, one weight at a time: output pixel i is centred at (i + 1/2) n_in/n_out
    input pixels; input pixel j (centred at j + 1/2) weighs 1 - distance / half-width, where
    the half-width is the scale (at least 1), and is left out beyond it; each row normalised."""
    scale = n_in / n_out
    half = max(scale, 1.0)
    R = np.zeros((n_out, n_in))
    for i in range(n_out):
        for j in range(n_in):
            distance = abs((j + 0.5) - (i + 0.5) * scale)
            if distance < half:
                R[i, j] = 1.0 - distance / half
        R[i] /= R[i].sum()
    return R


@pytest.mark.parametrize("n_in, n_out", [(32, 16), (32, 24), (32, 20), (16, 8), (16, 12), (32, 40), (5, 5)])
def test_resize_matrix_follows_its_definition(n_in, n_out):
    R = data.resize_matrix(n_in, n_out)
    assert R.shape == (n_out, n_in)
    np.testing.assert_allclose(R, resize_matrix_loop(n_in, n_out), rtol=0, atol=1e-15)
    np.testing.assert_allclose(R.sum(axis=1), 1.0, rtol=0, atol=1e-15)
    if n_in == 2 * n_out:            # a halving averages 4 pixels: 1/8, 3/8, 3/8, 1/8 inside
        np.testing.assert_allclose(R[1, 1:5], [1 / 8, 3 / 8, 3 / 8, 1 / 8], rtol=0, atol=1e-15)
    if n_in == n_out:
        np.testing.assert_array_equal(R, np.eye(n_in))


@pytest.mark.parametrize("size", [16, 24, 20, 40])
def test_resize_equals_torch_antialiased_bilinear(size):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32))
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear",
                                          antialias=True, align_corners=False).numpy()
    np.testing.assert_allclose(data.resize(x, size), ref, rtol=0, atol=1e-12)


def test_resize_on_each_backend(xp):
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    out = data.resize(backend.to_device(x), 16)
    assert isinstance(out, xp.ndarray) and out.shape == (2, 3, 16, 16) and out.dtype == np.float32
    R = data.resize_matrix(32, 16)
    np.testing.assert_allclose(backend.to_numpy(out), np.einsum("ih,bchw,jw->bcij", R, x, R), rtol=1e-5, atol=1e-6)
    assert data.resize(out, 16) is out                # the images' own size: nothing to do


def test_resolution_plan_splits_the_epochs_by_fraction():
    tc = TrainConfig(epochs=22, resolutions="16:0.45,24:0.27")
    # 0.45 * 22 = 9.9 -> epochs 0..9 at 16; 0.72 * 22 = 15.84 -> 10..15 at 24; the rest full size
    assert tc.resolution_plan(32) == [(16, 0, 10), (24, 10, 16)]
    assert [tc.train_size(e, 32) for e in range(22)] == [16] * 10 + [24] * 6 + [32] * 6
    # the default: half the side for half the epochs, three quarters for a quarter, of any side
    assert TrainConfig(epochs=24).resolution_plan(32) == [(16, 0, 12), (24, 12, 18)]
    assert TrainConfig(epochs=24).resolution_plan(224) == [(112, 0, 12), (168, 12, 18)]
    assert TrainConfig(epochs=9, resolutions="16:0.45,24:0.27").resolution_plan(32) == [(16, 0, 4), (24, 4, 6)]
    assert TrainConfig(epochs=5, resolutions="").resolution_plan(32) == []
    assert [TrainConfig(epochs=3, resolutions=" 8:0.34, 12:0.33 ").train_size(e, 16) for e in range(3)] == [8, 12, 16]
    # the last epoch is always at full size, even where the fractions leave it none
    assert [TrainConfig(epochs=2, resolutions="16:1").train_size(e, 32) for e in range(2)] == [16, 32]
    assert [TrainConfig(epochs=1).train_size(0, 32)] == [32]
    with pytest.raises(ValueError, match="40x40 is larger than the 32x32 images"):
        TrainConfig(resolutions="40:0.5").resolution_plan(32)


def test_a_size_below_1_is_a_fraction_of_the_side_and_from_1_on_pixels():
    """The rule `--help` states: SIZE below 1 is a fraction of the image side, SIZE of 1 or more
    is pixels, a whole number however it is written (16 and 16.0 alike), and at least 4."""
    assert schedules.parse_resolutions("16.0:0.5") == schedules.parse_resolutions("16:0.5") == [(16, 0.5)]
    assert schedules.parse_resolutions("0.5:0.5") == [(0.5, 0.5)]
    assert schedules.parse_resolutions("0.5:0.5,24.0:0.25") == [(0.5, 0.5), (24, 0.25)]
    for text in ("16.0:0.5", "16:0.5", "0.5:0.5"):
        assert schedules.resolution_plan(text, 32, 4) == [(16, 0, 2)], text
    # the default is unchanged: 16x16 for half the epochs, 24x24 for a quarter
    assert schedules.resolution_plan(TrainConfig.resolutions, 32, 24) == [(16, 0, 12), (24, 12, 18)]
    for bad in ("16.5:0.5", "1:0.5", "1.0:0.5", "3:0.5", "0:0.5", "-0.5:0.5", "nan:0.5", "inf:0.5"):
        with pytest.raises(ValueError, match=r"SIZE is a fraction of the image side \(above 0, below 1\) or, "
                                             r"from 1 on, pixels: a whole number of at least 4"):
            schedules.parse_resolutions(bad)
    for bad in ("16", "16:0.5:1", "half:0.5", "16:0", "16:1.5"):
        with pytest.raises(ValueError, match="resolutions: "):
            schedules.parse_resolutions(bad)


def test_a_refused_resolution_is_one_line_before_any_data_is_read(tmp_path, capsys):
    code = cli.main(["train", "--data", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "run"),
                     "--resolutions", "16.5:0.5", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'16.5:0.5'" in err and "a whole number of at least 4" in err


def test_loader_resizes_after_augmenting_at_full_size():
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 20)
    loader = data.Loader(images, labels, 8, *data.channel_stats(images), shuffle=True, augment=True, seed=3)
    full = list(loader.epoch(2))
    small = list(loader.epoch(2, size=16))
    assert len(full) == len(small) == 3
    for (x, y), (xs, ys) in zip(full, small):        # the same images, crops and flips, then resized
        assert xs.shape == (len(y), 3, 16, 16)
        np.testing.assert_array_equal(ys, y)
        np.testing.assert_allclose(xs, data.resize(x, 16), rtol=0, atol=1e-6)


def test_evaluate_with_flips_averages_the_mirrored_logits(folder, xp):  # noqa: F811
    images, labels, classes = data.load_dataset(str(folder))
    mean, std = data.channel_stats(images)
    model = build_model(tiny_config(), seed=3, dtype=np.float64)
    loader = data.Loader(images, labels, 11, mean, std, dtype=np.float64)
    x = data.normalize(backend.to_device(images), backend.to_device(mean), backend.to_device(std), np.float64)
    y = backend.to_device(labels)
    for size in (None, 12):
        loss, acc, _ = evaluate(model, loader, len(classes), flip=True, size=size)
        xs = x if size is None else data.resize(x, size)
        with nn.no_grad():
            model.eval()
            logits = (model.forward(xs) + model.forward(xs[..., ::-1])) / 2       # (48, 3)
            direct_loss = float(nn.CrossEntropyLoss().forward(logits, y))
        hit = backend.to_numpy(logits).argmax(axis=1) == labels
        assert acc == pytest.approx(hit.mean(), abs=1e-12), size
        assert loss == pytest.approx(direct_loss, rel=1e-12), size
        # the mirrors count: without them the loss is another one
        assert evaluate(model, loader, len(classes), size=size)[0] != pytest.approx(loss, rel=1e-6), size


def test_a_progressive_run_trains_and_validates_each_epoch_at_its_size(folder, tmp_path, monkeypatch):  # noqa: F811
    tc = tiny_run(folder, epochs=4, resolutions="8:0.5,12:0.25", eval_flip=True)
    trainer = make_trainer(tc, tmp_path)
    seen = []
    real_forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward", lambda x: seen.append((trainer.model.training, x.shape[-1]))
                        or real_forward(x))
    # the smaller the epoch's images, the higher its (pretended) validation score: best.npz must
    # still be a full-size epoch, the only one whose score `minicvt eval` reproduces
    real_evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a, size=None, **k: (
        1.0, 1.0 - (size or 16) / 100, real_evaluate(*a, size=size, **k)[2]))
    history = trainer.fit()
    assert [h["image_size"] for h in history] == [8, 8, 12, 16]
    train_sizes = [s for training, s in seen if training]
    val_sizes = [s for training, s in seen if not training]
    assert train_sizes == [8] * 8 + [12] * 4 + [16] * 4                   # 4 steps an epoch
    # validation at the epoch's size, its one batch of 12 twice (the images, their mirrors)
    assert val_sizes == [8, 8, 8, 8, 12, 12, 16, 16]
    assert [h["val_acc"] for h in history] == [0.92, 0.92, 0.88, 0.84]
    assert load_checkpoint(tmp_path / "best.npz")[2]["epoch"] == 3


def test_checkpoints_from_before_the_recipe_keep_their_behaviour(folder, tmp_path):  # noqa: F811
    """A run saved before --resolutions and flips existed trained at full size and validated
    without flips: resuming it must go on that way, not switch to the new defaults."""
    tc = tiny_run(folder, epochs=2)
    trainer = make_trainer(tc, tmp_path)
    trainer.train_epoch = lambda epoch, stop=None: (_ for _ in ()).throw(KeyboardInterrupt) if epoch else \
        type(trainer).train_epoch(trainer, epoch, stop)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    model_state, optim_state, meta = load_checkpoint(tmp_path / "last.npz")
    for key in ("resolutions", "eval_flip"):                # as an older minicvt wrote it
        del meta["train_config"][key]
    model = build_model(tiny_config())
    model.load_state_dict(model_state)
    opt = trainer.optimizer
    opt.load_state_dict(optim_state)
    save_checkpoint(tmp_path / "last.npz", model, opt, meta)
    old = TrainConfig.from_saved(meta["train_config"])
    assert old.resolutions == "" and old.eval_flip is False
    resumed = make_trainer(old, tmp_path, resuming=True)
    resumed.resume()
    assert resumed.fit()[-1]["image_size"] == 16
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2


# the planner's own time on the fake clock, which it takes from the budget: its first reading,
# then per image size (8 and 16 here) two readings a training step and two for the forward,
# then the reading that sets the budget: 25 intervals of 0.1 s
PLANNING_S = (2 * (2 * (planner.PLAN_WARMUP + planner.PLAN_STEPS) + 2) + 1) * 0.1


class FakeClock:
    """Stands in for the time module in minicvt.train (and its perf_counter for the planner's
    clock): every perf_counter() call is `tick` seconds after the one before, so every interval
    the planner times is one tick."""
    def __init__(self, tick):
        self.now, self.tick = 0.0, tick

    def perf_counter(self):
        self.now += self.tick
        return self.now

    def monotonic(self):          # the trainer's clock for --save-every: read without a tick
        return self.now


def test_minutes_plans_as_many_epochs_as_its_timings_allow(folder, tmp_path, monkeypatch):  # noqa: F811
    tc = tiny_run(folder, epochs=99, resolutions="8:0.5", eval_flip=True)
    trainer = make_trainer(tc, tmp_path)
    clock = FakeClock(0.1)

    def plan(seconds):
        return planner.plan_epochs(seconds, tc, trainer.mc, trainer.train_loader, trainer.val_loader,
                                   trainer.dtype, log=lambda *a: None, clock=clock.perf_counter)
    # each timed step and forward lasts 0.1 s on the fake clock: an epoch is 4 steps (0.4 s)
    # plus 12 validation images, twice (flips), at 0.1 s per forward of a batch of 8: 0.3 s
    epoch_s = 4 * 0.1 + 12 * 2 * 0.1 / 8
    for n in (1, 2, 7):
        seconds = PLANNING_S + (n + 0.5) * epoch_s / (1 - planner.PLAN_RESERVE)
        assert plan(seconds) == n
    with pytest.raises(ValueError, match=r"not one epoch fits \(1 s at 8x8, 1 s at 16x16 an epoch here"):
        plan(0.5 * epoch_s)


def test_a_minutes_run_is_the_run_of_the_epochs_it_planned(folder, tmp_path, monkeypatch):  # noqa: F811
    clock = FakeClock(0.1)
    monkeypatch.setattr(train, "time", clock)
    epoch_s = 4 * 0.1 + 12 * 2 * 0.1 / 8
    # loading the data takes one interval on the fake clock, the planning PLANNING_S: budget 3.5
    # epochs after them
    minutes = (0.1 + PLANNING_S + 3.5 * epoch_s / (1 - planner.PLAN_RESERVE)) / 60
    planned = make_trainer(tiny_run(folder, epochs=1, resolutions="8:0.5", eval_flip=True, minutes=minutes,
                                    augment=True), tmp_path / "a")
    assert planned.tc.epochs == 3 and planned.tc.minutes == minutes
    planned.fit()
    assert load_checkpoint(tmp_path / "a" / "last.npz")[2]["train_config"]["epochs"] == 3   # kept for --resume
    fixed = make_trainer(tiny_run(folder, epochs=3, resolutions="8:0.5", eval_flip=True, augment=True),
                         tmp_path / "b")
    fixed.fit()
    _assert_same_state(planned, fixed)                      # the timing steps touched nothing
    assert untimed(planned.history) == untimed(fixed.history)


def test_minutes_and_epochs_together_are_refused(folder, tmp_path, capsys):  # noqa: F811
    code = cli.main(["train", "--data", str(folder), "--out", str(tmp_path), "--epochs", "3", "--minutes", "5",
                     "--quiet"])
    assert code == 2
    assert "give --epochs or --minutes, not both" in capsys.readouterr().err


def test_a_resumed_minutes_run_keeps_its_plan(folder, tmp_path, monkeypatch):  # noqa: F811
    """--resume of a --minutes run takes the epochs its checkpoint saved; it plans nothing."""
    monkeypatch.setattr(train, "plan_epochs", lambda *args, **kwargs: pytest.fail("planned again"))
    tc = tiny_run(folder, epochs=7, minutes=30.0)
    resumed = train.Trainer(tc, tmp_path, model_config=tiny_config(), progress=False, log=lambda *a: None,
                            resuming=True)
    assert resumed.tc.epochs == 7


def test_an_old_run_resumes_from_the_command_line_with_its_own_settings(folder, tmp_path, capsys):  # noqa: F811
    """A checkpoint written before --resolutions and flips existed ran without them: --resume
    accepts `--resolutions ''` and `--no-eval-flip` (what it ran with) and refuses the new
    defaults given explicitly, naming the setting."""
    from test_cli_train import train_argv
    out = tmp_path / "run"
    assert cli.main(train_argv(folder, out, resolutions="") + ["--no-eval-flip"]) == 0
    model_state, optim_state, meta = load_checkpoint(out / "last.npz")
    for key in ("resolutions", "eval_flip", "minutes"):      # as an older minicvt wrote it
        del meta["train_config"][key]
    meta["train_config"]["epochs"] = 2                       # stopped after its first epoch
    model = build_model(CvTConfig(**meta["model_config"]))
    model.load_state_dict(model_state)
    from minicvt.optim import AdamW
    opt = AdamW(model.named_parameters(), 1e-3)
    opt.load_state_dict(optim_state)
    save_checkpoint(out / "last.npz", model, opt, meta)
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--out", str(out), "--resolutions", "", "--no-eval-flip", "--quiet"]) == 0
    assert cli.main(["train", "--resume", "--out", str(out), "--resolutions", "0.5:0.5", "--quiet"]) == 2
    assert "'resolutions': ('', '0.5:0.5')" in capsys.readouterr().err
