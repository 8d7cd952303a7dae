"""A newcomer's first hour, item by item: the stumbles found on a fresh clone, each a test that
failed on the code before its fix. The README's snippets are run by test_docs_snippets.py, the
eval splits by test_cli_train.py, the cache location by test_data_folders.py and minicvt.load
by test_model_io.py."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import minicvt
from minicvt import backend, cli, data, viz
from minicvt.checkpoint import load_checkpoint
from test_cli_train import folder, main, one_line_error, run, train_argv  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def restore_backend():
    previous = backend.get_backend()
    yield
    backend.set_backend(previous)


def minicvt_process(*argv, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "minicvt", *map(str, argv)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env=env, **kw)


# -- 2. the backend variable --------------------------------------------------------------------

@pytest.mark.parametrize("value, words", [("cupy", "backend 'cupy' needs CuPy"),
                                          ("foo", "MINICVT_BACKEND='foo' is not a backend")])
def test_the_backend_variable_fails_in_one_line(tmp_path, value, words, folder):
    (tmp_path / "nocupy").mkdir()
    (tmp_path / "nocupy" / "cupy.py").write_text("raise ImportError('no CuPy here')\n")   # on any machine
    env = dict(os.environ, MINICVT_BACKEND=value, PYTHONPATH=str(tmp_path / "nocupy"))
    for argv in (["check"], ["train", "--data", folder, "--out", tmp_path / "run", "--epochs", "1"]):
        proc = minicvt_process(*argv, env=env)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr


# -- 5. long phases show progress, the training bar its numbers from the start -------------------

def test_decoding_validation_and_the_first_step_show_progress(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data.folders, "PROGRESS_DELAY_S", 0.0)      # real phases: after 1 s
    argv = [a for a in train_argv(folder, tmp_path / "run", limit_train=9) if a != "--quiet"]
    assert main(*argv) == 0                                           # 3 steps of 3 images
    err = capsys.readouterr().err
    assert "decoding shapes" in err and "validation" in err
    updates = [u for u in re.split(r"[\r\n]", err) if u.startswith("epoch 1/1")]
    first_numbers = next(u for u in updates if "loss=" in u)
    assert re.search(r"\b0/3\b", first_numbers), updates              # before step 1 is counted


# -- 6. Ctrl-C before anything is saved ----------------------------------------------------------

def test_ctrl_c_in_the_first_validation_says_there_is_nothing_to_resume(folder, tmp_path, capsys,
                                                                       monkeypatch):
    import minicvt.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(minicvt.train, "evaluate", interrupted)
    out = tmp_path / "run"
    assert main(*train_argv(folder, out)) == 130
    err = capsys.readouterr().err
    assert "--resume" not in err and "nothing to resume" in err and not (out / "last.npz").exists()


# -- 7. training a finished run further ----------------------------------------------------------

def test_a_finished_run_is_trained_further_from_its_weights(run, folder, tmp_path, capsys):
    one_line_error(capsys, ["train", "--resume", "--out", run, "--epochs", "2"],
                   "'epochs': (1, 2)", "--init-from", str(run / "last.npz"))
    out = tmp_path / "more"
    assert main(*train_argv(folder, out, lr=1e-9), "--init-from", run / "last.npz") == 0
    capsys.readouterr()
    start, _, _ = load_checkpoint(run / "last.npz")
    after, _, meta = load_checkpoint(out / "last.npz")
    assert meta["train_config"]["init_from"] == str(run / "last.npz")
    weights = [k for k in start if start[k].dtype.kind == "f" and "running" not in k]   # not BN's statistics
    assert max(np.abs(after[k] - start[k]).max() for k in weights) < 1e-6   # lr 1e-9: the same weights
    one_line_error(capsys, train_argv(folder, tmp_path / "m", config="cvt-cifar-m") +
                   ["--init-from", str(run / "last.npz")], "--init-from", "differs from this run's")


def test_runs_written_before_a_setting_existed_still_resume(run, tmp_path, capsys):
    """A checkpoint's train_config without `init_from` (written before it existed) resumes."""
    import json
    import shutil
    from minicvt.checkpoint import save_checkpoint
    out = tmp_path / "old"
    shutil.copytree(run, out)
    state, optim, meta = load_checkpoint(out / "last.npz")
    del meta["train_config"]["init_from"]
    meta["train_config"]["epochs"] = 2                 # stopped after its first epoch
    model = minicvt.models.build_model(minicvt.models.CvTConfig.from_json(json.dumps(meta["model_config"])))
    model.load_state_dict(state)

    class Optim:                        # the saved optimiser state, written back as it was
        def state_dict(self):
            return optim
    save_checkpoint(out / "last.npz", model, Optim(), {k: v for k, v in meta.items() if k != "format"})
    assert main("train", "--resume", "--out", out, "--quiet") == 0
    assert f"resumed from {out / 'last.npz'}" in capsys.readouterr().out


def test_resuming_a_run_started_from_weights_does_not_read_them_again(folder, tmp_path, capsys, monkeypatch):
    from minicvt.train import Trainer
    start = tmp_path / "start"
    assert main(*train_argv(folder, start)) == 0
    out, real_epoch = tmp_path / "more", Trainer.train_epoch

    def ctrl_c_in_epoch_2(self, epoch, stop=None):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(self, epoch, stop)
    monkeypatch.setattr(Trainer, "train_epoch", ctrl_c_in_epoch_2)
    assert main(*train_argv(folder, out, epochs=2), "--init-from", start / "last.npz") == 130
    monkeypatch.undo()
    (start / "last.npz").unlink()                                   # moved away since
    capsys.readouterr()
    assert main("train", "--resume", "--out", out, "--quiet") == 0
    assert load_checkpoint(out / "last.npz")[2]["epoch"] == 1


# -- 9. errors in the user's terms ----------------------------------------------------------------

@pytest.mark.parametrize("shape, words", [
    ((2, 1, 32, 32), r"input \(N, C, H, W\) must have C = 3 channels, got shape \(2, 1, 32, 32\) with 1$"),
    ((3, 32, 32), r"got a 3-D array of shape \(3, 32, 32\); a single image needs a batch axis: x\[None\]"),
    ((2, 32, 32, 3), r"with 32; images laid out \(N, H, W, C\) need x.transpose\(0, 3, 1, 2\)")])
def test_wrong_input_shapes_are_named_as_given(shape, words):
    model = minicvt.build_model("cvt-cifar-s")
    with pytest.raises(ValueError, match=words):
        model(np.zeros(shape, np.float32))


def test_input_that_is_not_normalised_float_images_is_refused_at_the_door():
    model = minicvt.build_model("cvt-cifar-s")
    with pytest.raises(ValueError, match=r"cvt-cifar-s: input must be an array of images \(N, C, H, W\), got a "
                                         r"list; give np.asarray\(x, dtype=np.float32\)$"):
        model([[1, 2, 3]])
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32))
    for given in (pixels.astype(np.uint8), pixels):
        with pytest.raises(ValueError, match=rf"input is {given.dtype} pixels, but the model takes normalised "
                                             r"float images; use model.predict\(images\)"):
            model(given)
    with pytest.raises(ValueError, match=r"input holds values up to 255, which look like pixels on a 0..255 "
                                         r"scale; the model takes normalised images: use model.predict"):
        model(np.full((1, 3, 32, 32), 255.0, np.float32))
    # pixels on 0..1 cannot be told from normalised images: accepted (the docstring says so)
    assert model(pixels.astype(np.float32) / 255).shape == (2, 10)


def test_the_scale_check_allows_the_models_own_normalisation():
    """Images of small spread (std 0.02: medical scans, say) normalise to values far beyond 20:
    a model that knows its normalisation accepts them."""
    model = minicvt.build_model("cvt-cifar-s")
    x = np.full((1, 3, 32, 32), 30.0, np.float32)            # (1 - 0.4) / 0.02 = 30
    with pytest.raises(ValueError, match="look like pixels on a 0..255 scale"):
        model(x)
    model.normalization = {"mean": [0.4] * 3, "std": [0.02] * 3}
    assert model(x).shape == (1, 10)
    with pytest.raises(ValueError, match="look like pixels on a 0..255 scale"):
        model(np.full((1, 3, 32, 32), 255.0, np.float32) * 0.4)        # beyond twice that reach


def test_another_float_dtype_is_cast_to_the_models():
    model = minicvt.build_model("cvt-cifar-s").eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32))
    with minicvt.nn.no_grad():
        logits64 = model(x)                                   # float64 into a float32 model
        logits32 = model(x.astype(np.float32))
    assert logits64.dtype == np.float32
    np.testing.assert_array_equal(logits64, logits32)


def test_an_unreadable_image_is_named_without_internals(tmp_path):
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "cat" / "0.png")
    (root / "cat" / "1.png").write_bytes(b"not an image")
    with pytest.raises(data.DataError) as e:
        data.load_image_folder(root, use_cache=False)
    assert "cat/1.png is not a readable image" in str(e.value)
    assert "BytesIO" not in str(e.value) and "0x" not in str(e.value)


# -- 10. command-line conventions -------------------------------------------------------------------

def test_version():
    proc = minicvt_process("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"minicvt {minicvt.__version__}"


def test_every_flag_has_help_and_train_lists_the_configs(capsys):
    import argparse
    from minicvt.models import CONFIGS
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    bare = [f"{name} {'/'.join(a.option_strings)}" for name, p in commands.items() for a in p._actions
            if a.option_strings and not a.help]
    assert bare == []
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in CONFIGS), text


def test_output_into_a_closed_pipe_ends_quietly():
    """`minicvt summary ... | head -1`: the reader goes away before minicvt has written."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "minicvt", "summary", "--config", "cvt-13"],
                              stdout=write, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr


# -- 11. attention figures ------------------------------------------------------------------------

def test_figures_have_a_colour_bar_and_row_labels_and_own_files_keep_their_names(run, tmp_path, capsys,
                                                                                monkeypatch):
    import matplotlib.figure
    drawn = []
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn.append([(ax.get_label(), ax.get_ylabel()) for ax in fig.axes])
        return real_savefig(fig, *args, **kwargs)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    for name in ("cat", "dog"):
        Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(tmp_path / f"{name}.jpg")
    for kind in ("grid", "rollout", "query", "cls"):
        out = tmp_path / f"{kind}.png"
        assert cli.main(["attention", "--checkpoint", str(run / "best.npz"), "--images", str(tmp_path / "cat.jpg"),
                         str(tmp_path / "dog.jpg"), "--out", str(out), "--kind", kind]) == 0
        printed = capsys.readouterr().out
        if kind in ("query", "cls"):                  # one file per image, named after it
            assert [f"wrote {tmp_path / f'{kind}-{n}.png'}" in printed for n in ("cat", "dog")] == [True, True]
    for axes in drawn:
        assert any(label == "<colorbar>" for label, _ in axes), axes
    grid_labels, rollout_labels = {y for _, y in drawn[0]}, {y for _, y in drawn[1]}
    assert "attention rollout" in grid_labels
    assert {"image", "rollout, last stage", "rollout onto pixels"} <= rollout_labels
    assert viz.command._file_ids(["a/cat.jpg", "b/cat.png", "dog.jpg"]) == ["cat-0", "cat-1", "dog"]


def test_predict_with_a_checkpoint_minicvt_trained(run, tmp_path, capsys):
    Image.fromarray(np.full((20, 24, 3), 200, np.uint8)).save(tmp_path / "red.png")
    assert cli.main(["predict", "--checkpoint", str(run / "best.npz"), "--images", str(tmp_path / "red.png"),
                     "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{tmp_path / 'red.png'}:" and len(lines) == 3
    assert {line.split()[0] for line in lines[1:]} <= {"blue", "green", "red"}


# -- 1. inference from Python that cannot be misused ----------------------------------------------

SHIPPED = ROOT / "checkpoints" / "cvt-cifar-s.npz"


def _pictures(tmp_path):
    """Two lossless pictures of other sizes than the model's: a wide one and a tall one."""
    rng, paths = np.random.default_rng(3), []
    for name, hw in (("wide.png", (40, 70)), ("tall.png", (90, 50))):
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def _printed(out):
    """{path: [(class, probability text)]} from what `minicvt predict` printed."""
    table, current = {}, None
    for line in out.splitlines():
        if not line.startswith("  "):
            current = line.rstrip(":")
            table[current] = []
        else:
            name, p = line.split()
            table[current].append((name, p))
    return table


def test_load_knows_the_preprocessing_and_predict_gives_what_the_command_prints(tmp_path, capsys):
    paths = _pictures(tmp_path)
    model = minicvt.load(SHIPPED)
    assert model.preprocessing == {"size": 32, "crop": "square", "crop_pct": 1.0,
                                   "mean": model.normalization["mean"], "std": model.normalization["std"]}
    ranked = model.predict([str(p) for p in paths], top=3)
    assert main("predict", "--checkpoint", SHIPPED, "--images", *paths, "--top", "3") == 0
    printed = _printed(capsys.readouterr().out)
    assert [[(name, f"{p:.4f}") for name, p in r] for r in ranked] == [printed[str(p)] for p in paths]
    assert all(len(r) == 3 and r[0][1] >= r[1][1] >= r[2][1] for r in ranked)
    # uint8 pictures (N, 3, H, W) are taken as the files are; one path alone as a list of one
    pixels = np.asarray(Image.open(paths[0]).convert("RGB")).transpose(2, 0, 1)[None]     # (1, 3, 40, 70)
    alone = model.predict(paths[0], top=3)
    assert model.predict(pixels, top=3) == alone
    # (alone, not in a batch of two: float32 sums of another batch size differ in the 8th digit)
    assert [name for name, _ in alone[0]] == [name for name, _ in ranked[0]]
    assert np.allclose([p for _, p in alone[0]], [p for _, p in ranked[0]], rtol=1e-5)
    # and the model is left as it was: a model in training mode stays in it
    model.train()
    model.predict(paths[0])
    assert model.training


def test_load_reads_a_hugging_face_folder_and_predict_prepares_as_its_processor(tmp_path, capsys):
    from test_hostile_model_files import hf_folder
    folder = hf_folder(tmp_path / "hf")
    paths = _pictures(tmp_path)
    model = minicvt.load(folder)
    assert model.preprocessing["crop"] == "shortest_edge" and model.classes == ["a", "b", "c"]
    ranked = model.predict(paths, top=2)
    assert main("predict", "--pretrained", folder, "--images", *paths, "--top", "2") == 0
    printed = _printed(capsys.readouterr().out)
    assert [[(name, f"{p:.4f}") for name, p in r] for r in ranked] == [printed[str(p)] for p in paths]


def test_predict_refuses_a_model_that_knows_no_inputs_and_arrays_that_are_no_pictures(tmp_path):
    model = minicvt.build_model("cvt-cifar-s")
    with pytest.raises(ValueError, match=r"cvt-cifar-s: this model does not know how its inputs were prepared"):
        model.predict(np.zeros((1, 3, 32, 32), np.uint8))
    path = minicvt.models.save(model, tmp_path / "bare.npz")
    assert minicvt.load(path).preprocessing is None
    trained = minicvt.load(SHIPPED)
    with pytest.raises(ValueError, match=r"images: give image files, or uint8 pictures \(N, 3, H, W\); got "
                                         r"uint8 \(1, 32, 32, 3\); pictures laid out \(N, H, W, 3\) need "
                                         r"images.transpose\(0, 3, 1, 2\)"):
        trained.predict(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"got float32"):
        trained.predict(np.zeros((1, 3, 32, 32), np.float32))


def test_the_readme_inference_runs_as_written(tmp_path, monkeypatch):
    """The README's three lines, from a folder holding the shipped checkpoint and a my_cat.jpg."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(import minicvt\nmodel = minicvt.load.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) == 3, block
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / SHIPPED.name).symlink_to(SHIPPED)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(tmp_path / "my_cat.jpg")
    monkeypatch.chdir(tmp_path)
    printed = []
    exec(compile(block, "README.md", "exec"), {"print": printed.append})
    (ranked,) = printed                                      # [[(name, probability)] * 5] for one picture
    assert len(ranked) == 1 and len(ranked[0]) == 5 and all(name in minicvt.load(SHIPPED).classes
                                                            for name, _ in ranked[0])


# -- 5. advice that points the right way ---------------------------------------------------------------

def test_a_folder_or_a_hugging_face_file_given_as_a_checkpoint_says_what_to_give(run, tmp_path, capsys):
    one_line_error(capsys, ["eval", "--checkpoint", run, "--data", "cifar10"],
                   f"checkpoint {run} is a folder, not a checkpoint file; did you mean {run / 'best.npz'}?")
    with pytest.raises(minicvt.BadFileError, match=rf"{run} is a folder, not a model file; did you mean "
                                                   rf"{run / 'best.npz'}\?"):
        minicvt.load(run)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(minicvt.BadFileError, match=r"is a folder, not a model file \(nor a Hugging Face folder: "
                                                   r"it has no config.json\)"):
        minicvt.load(empty)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    one_line_error(capsys, ["predict", "--checkpoint", weights, "--images", "x.jpg"],
                   "is a file of a Hugging Face model: give the folder that holds it with its config.json")
    one_line_error(capsys, ["eval", "--checkpoint", weights, "--data", "cifar10"],
                   "is a file of a Hugging Face model, not a checkpoint of `minicvt train`; give its folder "
                   "with --pretrained")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    err = one_line_error(capsys, ["predict", "--checkpoint", text, "--images", "x.jpg"], str(text))
    assert "allow_pickle" not in err                         # NumPy's hint is not ours to repeat
    with pytest.raises(minicvt.BadFileError, match=r"x.npz is a file, not a Hugging Face model folder; a model "
                                                   r"minicvt trained loads with minicvt.load \(--checkpoint\)"):
        minicvt.from_pretrained(_touch(tmp_path / "x.npz"))


def _touch(path):
    path.write_bytes(b"")
    return path


# -- the second try on a fresh clone ------------------------------------------------------------------

def test_what_a_fresh_try_stumbled_on_is_said_plainly(run, tmp_path, capsys):
    one_line_error(capsys, ["train", "--resume", "--out", tmp_path / "nowhere"],
                   f"--resume: {tmp_path / 'nowhere'} does not exist (a typo in --out?)")
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / "last.npz").write_bytes((run / "last.npz").read_bytes())
    one_line_error(capsys, ["eval", "--checkpoint", interrupted / "best.npz", "--data", "cifar10"],
                   "does not exist; no epoch has finished yet at full size, and", "last.npz holds the weights so far")
    picture = tmp_path / "my_cat.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(picture)
    one_line_error(capsys, ["train", "--data", picture, "--out", tmp_path / "x"],
                   "is neither a folder nor a readable tar archive", "--data takes 'cifar10'")
    one_line_error(capsys, ["predict", "--pretrained", tmp_path / "cvt-13", "--images", picture],
                   f"{tmp_path / 'cvt-13'}: does not exist; get one with `hf download")
    assert main("summary", "cvt-cifar-s") == 0 and "total parameters" in capsys.readouterr().out
    model = minicvt.load(SHIPPED)
    with pytest.raises(ValueError, match=r"^images: give image files \(paths\), or uint8 pictures \(N, 3, H, W\) as "
                                         r"one array; got a list holding a ndarray; several pictures as arrays go "
                                         r"in one array: np.stack\(pictures\)$"):
        model.predict([np.zeros((32, 32, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"got a list holding a PngImageFile"):
        model.predict([Image.open(_png(tmp_path))])


def _png(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "p.png")
    return tmp_path / "p.png"
