"""Attention maps (minicvt.viz, `minicvt attention`): captured probabilities and their grids,
per-query and class-token maps, rollout (with hand-derived cases), figures and the command.
Everything runs on the two-stage tiny config (16x16 images: an 8x8 grid, then 4x4)."""
import json
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

from cvt_tiny import tiny_config
from minicvt import backend, cli, data, viz
from minicvt.checkpoint import load_checkpoint, save_checkpoint
from minicvt.models import build_model
from minicvt.train import TrainConfig

METHODS = ("dw_bn", "avg", "linear")
# Key grids per side for stages 0 and 1 (grids 8 and 4), from the output-size formulas:
#   dw_bn  (n + 2 - 3) // 2 + 1:                  8 -> 4, 4 -> 2
#   avg    ceil_mode (n + 2 - 3 + 1) // 2 + 1:    8 -> 5, 4 -> 3 (last windows start at 7 < 8, 3 < 4: kept)
#   linear no projection:                         8 -> 8, 4 -> 4
KEY_SIDES = {"dw_bn": (4, 2), "avg": (5, 3), "linear": (8, 4)}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# float32 probabilities: a softmax row sums to 1 within a few float32 ulps
F32_SUM = dict(rtol=0, atol=1e-6)


@pytest.fixture
def restore_backend():
    previous = backend.get_backend()
    yield
    backend.set_backend(previous)


def _capture(method, cls, n=2):
    model = build_model(tiny_config(method, cls), seed=3)
    x = backend.to_device(np.random.default_rng(0).standard_normal((n, 3, 16, 16)), dtype=np.float32)
    return model, *viz.capture_attention(model, x)


def _assert_png(path, width, height):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        assert im.size == (width, height)
    assert not list(path.parent.glob(".*.tmp*")), "a temporary file was left behind"


# -- capture and grids ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_captured_rows_sum_to_one_with_the_predicted_shapes(xp, method, cls):
    model, logits, maps = _capture(method, cls)
    c = int(cls)                                         # the class token is in stage 1 only
    k0, k1 = KEY_SIDES[method]
    assert logits.shape == (2, 3) and isinstance(logits, np.ndarray)
    assert maps["stage0.blocks.0.attn"].shape == (2, 1, 64, k0 * k0)
    assert maps["stage1.blocks.0.attn"].shape == (2, 2, c + 16, c + k1 * k1)
    for g in viz.stage_geometry(model.config, 16):
        assert g.grid == g.query_grid == ((8, 8), (4, 4))[g.index]
        assert g.key_grid == (KEY_SIDES[method][g.index],) * 2
        assert maps[f"stage{g.index}.blocks.0.attn"].shape == g.map_shape(2)
    for p in maps.values():
        assert isinstance(p, np.ndarray) and (p >= 0).all()
        np.testing.assert_allclose(p.sum(axis=-1), 1.0, **F32_SUM)
    # nothing is kept once the capture is over: keep_attention is off again, mode restored
    assert model.training and model.attention_maps() == {}
    model.forward(backend.to_device(np.zeros((1, 3, 16, 16)), dtype=np.float32))
    assert model.attention_maps() == {}


def test_box_matrix_by_hand():
    # 4 cells laid over 8: cell i covers 2i and 2i+1, each taking half of its weight
    M = viz.box_matrix(4, 8)
    np.testing.assert_array_equal(M[0], [1 / 2, 1 / 2, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(M[3], [0, 0, 0, 0, 0, 0, 1 / 2, 1 / 2])
    # avg's 5 keys over 8 tokens: token Y falls in key floor(5 Y / 8) = 0 0 1 1 2 3 3 4
    np.testing.assert_array_equal(viz.box_index(8, 5), [0, 0, 1, 1, 2, 3, 3, 4])
    np.testing.assert_array_equal(viz.box_matrix(5, 8)[2], [0, 0, 0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(viz.box_matrix(5, 8)[3], [0, 0, 0, 0, 0, 1 / 2, 1 / 2, 0])
    np.testing.assert_array_equal(viz.box_matrix(5, 5), np.eye(5))
    x = np.random.default_rng(0).random((2, 5, 3))
    np.testing.assert_allclose(viz.share(x, (8, 7)).sum(axis=(1, 2)), x.sum(axis=(1, 2)), rtol=1e-13)
    with pytest.raises(ValueError, match="cannot be shared"):
        viz.box_matrix(3, 2)                              # more coarse cells than fine ones


def test_upsample_nearest_by_hand():
    x = np.arange(4.0).reshape(2, 2)
    np.testing.assert_array_equal(viz.upsample_nearest(x, 4), [[0, 0, 1, 1]] * 2 + [[2, 2, 3, 3]] * 2)
    # 5 cells over 8: cell floor(8 * i / 8 ...) = floor(i * 5 / 8) for i = 0..7
    row = viz.upsample_nearest(np.arange(5.0)[None, :], (1, 8))[0]
    np.testing.assert_array_equal(row, [0, 0, 1, 1, 2, 3, 3, 4])


# -- one query, the class token ---------------------------------------------------------------------
@pytest.mark.parametrize("cls", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_query_and_cls_maps(xp, method, cls):
    model, _, maps = _capture(method, cls)
    cfg, c = model.config, int(cls)
    for stage, (side, k) in enumerate(zip((8, 4), KEY_SIDES[method])):
        r, col = side - 2, 1                              # any query cell of the grid
        grid, w = viz.query_attention(maps, cfg, 16, stage, 0, (r, col))
        heads = cfg.num_heads[stage]
        assert grid.shape == (2, heads, k, k)
        p = maps[f"stage{stage}.blocks.0.attn"][:, :, c * (stage == 1) + r * side + col]   # (N, h, [1+]Tk)
        has_cls = cls and stage == 1
        # key (y, x) is column y * k + x after the class token's column
        np.testing.assert_array_equal(grid[:, :, k - 1, 0], p[:, :, int(has_cls) + (k - 1) * k])
        total = grid.sum(axis=(2, 3)) + (w if has_cls else 0)
        np.testing.assert_allclose(total, 1.0, **F32_SUM)
        assert (w is not None) == has_cls
    with pytest.raises(ValueError, match="outside"):
        viz.query_attention(maps, cfg, 16, 1, 0, (4, 0))
    if cls:
        grid, self_w = viz.cls_attention(maps, cfg, 16)
        k = KEY_SIDES[method][1]
        assert grid.shape == (2, 2, k, k) and self_w.shape == (2, 2)
        np.testing.assert_array_equal(self_w, maps["stage1.blocks.0.attn"][:, :, 0, 0])
        np.testing.assert_allclose(grid.sum(axis=(2, 3)) + self_w, 1.0, **F32_SUM)
    else:
        with pytest.raises(ValueError, match="no class token"):
            viz.cls_attention(maps, cfg, 16)


# -- rollout ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_rollout_shapes_rows_and_mass(xp, method, cls):
    model, _, maps = _capture(method, cls)
    cfg = model.config
    for stage, T in ((0, 64), (1, 16 + int(cls))):
        R = viz.stage_rollout(maps, cfg, 16, stage)
        assert R.shape == (2, T, T) and (R >= 0).all()
        np.testing.assert_allclose(R.sum(axis=-1), 1.0, rtol=0, atol=1e-12)   # float64 products
    ro = viz.rollout(maps, cfg, 16)
    assert ro.last.shape == (2, 4, 4) and ro.stages[0].shape == (2, 8, 8)
    assert ro.image.shape == ro.last_upsampled().shape == (2, 16, 16)
    assert ro.cls[0] is None and (ro.cls[1] is not None) == cls
    # every bit of the read-out's flow ends on a pixel or on a class token
    left_on_cls = ro.cls[1] if cls else 0.0
    np.testing.assert_allclose(ro.image.sum(axis=(1, 2)) + left_on_cls, 1.0, rtol=0, atol=1e-12)


def _uniform_maps(cfg):
    """Every query attends equally to every key, in every block."""
    return {f"stage{g.index}.blocks.{j}.attn": np.full(g.map_shape(1), 1.0 / g.map_shape(1)[-1])
            for g in viz.stage_geometry(cfg, 16) for j in range(g.depth)}


@pytest.mark.parametrize("method", ["dw_bn", "linear"])
def test_rollout_of_uniform_attention_by_hand(method):
    # No class token, mean read-out. Keys 4x4 over 8x8 (or 8x8 over 8x8) share evenly, so each
    # block is M = U/2 + I/2 with U uniform, and the uniform row u gives u M = u: the flow
    # stays uniform through the blocks, and sharing a uniform map over even blocks keeps it
    # uniform: 1/16 on the 4x4 grid, 1/64 on the 8x8 grid, 1/256 on the 16x16 pixels.
    cfg = tiny_config(method, cls_token=False)
    ro = viz.rollout(_uniform_maps(cfg), cfg, 16)
    np.testing.assert_allclose(ro.last, np.full((1, 4, 4), 1 / 16), rtol=1e-12)
    np.testing.assert_allclose(ro.stages[0], np.full((1, 8, 8), 1 / 64), rtol=1e-12)
    np.testing.assert_allclose(ro.image, np.full((1, 16, 16), 1 / 256), rtol=1e-12)
    # With the class token read out (one block in stage 1): the class token's query gives
    # 1/(1+Tk) to its own key and Tk/(1+Tk) to the grid keys, shared evenly by the 16 tokens,
    # and e_cls M = (that row)/2 + e_cls/2. Tk = 2x2 keys (dw_bn) or 4x4 (linear).
    Tk = KEY_SIDES[method][1] ** 2
    cfg = tiny_config(method, cls_token=True)
    ro = viz.rollout(_uniform_maps(cfg), cfg, 16)
    per_token = 0.5 * Tk / (1 + Tk) / 16
    np.testing.assert_allclose(ro.last, np.full((1, 4, 4), per_token), rtol=1e-12)
    np.testing.assert_allclose(ro.cls[1], [0.5 + 0.5 / (1 + Tk)], rtol=1e-12)
    np.testing.assert_allclose(ro.image, np.full((1, 16, 16), 16 * per_token / 256), rtol=1e-12)


def test_rollout_of_attention_to_self_by_hand():
    # Every query attends only to its own token ('linear': the key grid is the token grid):
    # M = I, the rollout is the identity, and the read-out's mean row comes out unchanged.
    cfg = tiny_config("linear", cls_token=False)
    maps = {}
    for g in viz.stage_geometry(cfg, 16):
        eye = np.eye(g.map_shape(1)[-1])[None, None]      # (1, 1, T, T)
        maps[f"stage{g.index}.blocks.0.attn"] = np.repeat(eye, g.num_heads, axis=1)
        np.testing.assert_array_equal(viz.stage_rollout(maps, cfg, 16, g.index)[0], eye[0, 0])
    np.testing.assert_allclose(viz.rollout(maps, cfg, 16).image, np.full((1, 16, 16), 1 / 256))


# -- figures ------------------------------------------------------------------------------------------
def test_figures_are_pngs_of_the_expected_size(tmp_path):
    model, _, maps = _capture("dw_bn", True, n=3)
    cfg, P, B = model.config, viz.PANEL_PX, viz.BAR_PX
    images = np.random.default_rng(1).integers(0, 256, (3, 3, 16, 16), dtype=np.uint8)
    # query: one row per block (1 + 1), columns 1 + the most heads (2)
    path = viz.plot_query_attention(images[1], maps, cfg, (5, 11), tmp_path / "q.png", index=1, title="t")
    _assert_png(path, 3 * P + B, 2 * P)
    # cls: one row per block of the last stage (1), columns 1 + its heads (2)
    _assert_png(viz.plot_cls_attention(images[0], maps, cfg, tmp_path / "c.png"), 3 * P + B, 1 * P)
    ro = viz.rollout(maps, cfg, 16)
    _assert_png(viz.plot_rollout(images, ro, tmp_path / "r.png"), 3 * P + B, 3 * P)   # 3 rows, 3 images
    titles = ["pred a\ntrue b"] * 3
    _assert_png(viz.plot_grid(images, ro.image, tmp_path / "g.png", titles, [True, False, True]),
                3 * P + B, 2 * P)                              # an image row and a map row
    seven = np.concatenate([images, images, images[:1]])
    _assert_png(viz.plot_grid(seven, np.ones((7, 16, 16)), tmp_path / "g7.png", ["x"] * 7),
                6 * P + B, 4 * P)                          # 6 per row: two pairs of rows


# -- the command ----------------------------------------------------------------------------------------
CLASSES = ["ant", "bee", "cat"]


@pytest.fixture
def run(tmp_path):
    """A tiny checkpoint with the metadata `minicvt train` writes, and an image folder of two
    16x16 images per class."""
    cfg = tiny_config()
    model = build_model(cfg, seed=0)
    folder = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (folder / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    tc = TrainConfig(model="tiny", data=str(folder), epochs=1, batch_size=2, val_size=0)
    meta = {"epoch": 0, "train_config": asdict(tc), "model_config": json.loads(cfg.to_json()),
            "classes": CLASSES, "num_images": 6,
            "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
            "best_acc": 0.0, "history": []}
    ckpt = tmp_path / "best.npz"
    save_checkpoint(ckpt, model, None, meta)
    return ckpt, folder, tmp_path


def _one_line_error(capsys, argv, starts):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"minicvt attention: error: {starts}"), err


@pytest.mark.parametrize("kind", viz.KINDS)
def test_command_writes_figures_from_a_checkpoint_and_data(run, kind, capsys, restore_backend):
    ckpt, folder, tmp = run
    out = tmp / "fig" / "att.png"
    argv = ["attention", "--checkpoint", str(ckpt), "--data", str(folder), "--out", str(out),
            "--kind", kind, "--index", "0", "5", "--query", "3", "12"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "image 5: pred" in printed and "true cat" in printed        # image 5 is the last 'cat'
    written = [tmp / "fig" / "att-0.png", tmp / "fig" / "att-5.png"] if kind in ("query", "cls") else [out]
    for p in written:
        assert f"wrote {p}" in printed
        assert p.read_bytes()[:8] == PNG_MAGIC


def test_command_on_every_backend(run, xp, capsys):
    """`minicvt attention --backend cupy` (under the emulated CuPy in CI): the maps come back to
    the host before they are drawn, and match NumPy's."""
    ckpt, folder, tmp = run
    name = backend.get_backend()
    outs = {}
    for b in ("numpy", name):
        out = tmp / f"every-{b}.png"
        assert cli.main(["attention", "--checkpoint", str(ckpt), "--data", str(folder), "--out", str(out),
                         "--kind", "rollout", "--index", "0", "5", "--backend", b]) == 0
        outs[b] = capsys.readouterr().out
        assert out.read_bytes()[:8] == PNG_MAGIC
    assert outs["numpy"].replace("every-numpy", "?") == outs[name].replace(f"every-{name}", "?")


def test_command_split_val_shows_the_runs_held_out_images(run, capsys, restore_backend, monkeypatch):
    ckpt, folder, tmp = run
    meta = load_checkpoint(ckpt)[2]
    meta["train_config"]["val_size"] = 2                     # the run held out 2 of the 6 images
    save_checkpoint(ckpt, build_model(tiny_config(), seed=0), None, meta)
    _, val_idx = data.split_indices(6, 2, meta["train_config"]["seed"])
    labels = data.load_dataset(str(folder))[1]
    out = tmp / "val.png"
    for split in (["--split", "val"], []):                  # 'val' is the default on the run's own data
        argv = ["attention", "--checkpoint", str(ckpt), "--data", str(folder), *split, "--out", str(out)]
        assert cli.main(argv) == 0
        printed = capsys.readouterr().out
        # the default for a grid is every image of the split: here its 2 held-out images, in order
        trues = [line.split("true ")[1] for line in printed.splitlines() if line.startswith("image ")]
        assert trues == [CLASSES[k] for k in labels[val_idx]]
        assert out.read_bytes()[:8] == PNG_MAGIC


def test_command_split_test_on_an_image_folder_is_refused(run, capsys, restore_backend):
    """An image folder has no test split: its images (the training images, here) must not pass
    for unseen ones."""
    ckpt, folder, tmp = run
    _one_line_error(capsys, ["attention", "--checkpoint", str(ckpt), "--data", str(folder), "--split", "test",
                             "--out", str(tmp / "t.png")], f"--split test: {folder} has no test split")
    assert not (tmp / "t.png").exists()


def test_command_reads_own_image_files(run, capsys, restore_backend):
    ckpt, _, tmp = run
    Image.fromarray(np.zeros((12, 20, 3), dtype=np.uint8)).save(tmp / "wide.png")          # resized
    Image.fromarray(np.full((40, 30), 200, dtype=np.uint8), mode="L").save(tmp / "grey.jpg")  # to RGB
    images = viz.read_image_files([tmp / "wide.png", tmp / "grey.jpg"], 16)
    assert images.shape == (2, 3, 16, 16) and images.dtype == np.uint8
    out = tmp / "mine.png"
    argv = ["attention", "--checkpoint", str(ckpt), "--images", str(tmp / "wide.png"),
            str(tmp / "grey.jpg"), "--out", str(out)]
    assert cli.main(argv) == 0
    assert "true" not in capsys.readouterr().out                       # no labels for own files
    with Image.open(out) as im:
        assert im.size == (2 * viz.PANEL_PX + viz.BAR_PX, 2 * viz.PANEL_PX)   # 2 images: 2 columns, 2 rows


def test_command_errors_are_one_line(run, capsys, restore_backend):
    ckpt, folder, tmp = run
    out = str(tmp / "x.png")
    _one_line_error(capsys, ["attention", "--checkpoint", str(tmp / "none.npz"), "--data", str(folder),
                             "--out", out], "checkpoint")
    _one_line_error(capsys, ["attention", "--checkpoint", str(ckpt), "--data", str(folder), "--out", out,
                             "--index", "6"], f"--index 6: the train split of {folder} has 6 images (0..5)")
    (tmp / "bad.png").write_bytes(b"not an image")
    _one_line_error(capsys, ["attention", "--checkpoint", str(ckpt), "--images", str(tmp / "bad.png"),
                             "--out", out], "--images")
    _one_line_error(capsys, ["attention", "--checkpoint", str(ckpt), "--out", out], "give either")
    _one_line_error(capsys, ["attention", "--checkpoint", str(ckpt), "--data", str(folder), "--out", out,
                             "--query", "16", "0"], "--query")
