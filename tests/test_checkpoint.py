"""Checkpoints: round trip, atomic writes under a crash, corrupt and foreign files."""
import numpy as np
import pytest

from minicvt import backend, checkpoint, nn
from minicvt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from minicvt.optim import SGD


def _model_and_optimizer(seed):
    backend.manual_seed(seed)
    model = nn.Sequential([nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)])
    x = backend.to_device(np.random.default_rng(seed).standard_normal((2, 3, 5, 5)), dtype=np.float32)
    out = model.forward(x)                       # moves the BN running statistics
    model.backward(backend.xp().ones_like(out))
    opt = SGD(list(model.named_parameters()), lr=0.1, momentum=0.9)
    opt.step()
    return model, opt


def test_round_trip(tmp_path, xp):
    model, opt = _model_and_optimizer(0)
    save_checkpoint(tmp_path / "c.npz", model, opt, {"epoch": 3, "note": "é"})
    model_state, optim_state, meta = load_checkpoint(tmp_path / "c.npz")
    assert meta["epoch"] == 3 and meta["note"] == "é" and meta["format"] == checkpoint.FORMAT
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(model_state[k], backend.to_numpy(v), err_msg=k)
    assert "1.running_mean" in model_state and "1.num_batches_tracked" in model_state
    assert optim_state["steps"] == 1
    for k, v in opt.state.items():
        np.testing.assert_array_equal(optim_state[k], backend.to_numpy(v))
    # the arrays restore into fresh objects
    other, other_opt = _model_and_optimizer(1)
    other.load_state_dict(model_state)
    other_opt.load_state_dict(optim_state)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(backend.to_numpy(other.state_dict()[k]), backend.to_numpy(v))


def test_crash_while_writing_keeps_previous(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer(0)
    path = tmp_path / "last.npz"
    save_checkpoint(path, model, opt, {"epoch": 1})

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, opt, {"epoch": 2})
    monkeypatch.undo()
    _, _, meta = load_checkpoint(path)           # the previous checkpoint, intact
    assert meta["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.npz"]   # no temporary left


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "not-npz"])
def test_corrupt_file_is_an_error(tmp_path, damage):
    model, opt = _model_and_optimizer(0)
    path = tmp_path / "c.npz"
    save_checkpoint(path, model, opt, {"epoch": 1})
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":                       # a flipped byte inside the conv weight's data
        i = raw.index(b"\x93NUMPY", raw.index(b"model/0.weight.npy")) + 128 + 40
        path.write_bytes(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("hello")
    with pytest.raises(CheckpointError, match="corrupt|metadata"):
        load_checkpoint(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.npz")
    np.savez(tmp_path / "weights.npz", w=np.zeros(3))
    with pytest.raises(CheckpointError, match="metadata"):
        load_checkpoint(tmp_path / "weights.npz")
    np.savez(tmp_path / "other.npz", meta=np.array('{"format": "something-else"}'))
    with pytest.raises(CheckpointError, match="not a minicvt checkpoint"):
        load_checkpoint(tmp_path / "other.npz")


def test_no_pickle_needed(tmp_path):
    model, opt = _model_and_optimizer(0)
    save_checkpoint(tmp_path / "c.npz", model, opt, {"epoch": 0})
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:   # raises if any member is an object array
        assert all(z[k].dtype != object for k in z.files)


def test_inference_copy_is_half_precision_and_loads(tmp_path):
    model, opt = _model_and_optimizer(0)
    save_checkpoint(tmp_path / "full.npz", model, opt, {"epoch": 4})
    checkpoint.save_inference_copy(tmp_path / "full.npz", tmp_path / "small.npz")
    state, optim_state, meta = load_checkpoint(tmp_path / "small.npz")
    assert optim_state == {} and meta["epoch"] == 4 and meta["inference_copy"]["dtype"] == "float16"
    assert state["0.weight"].dtype == np.float16 and state["1.num_batches_tracked"].dtype == np.int64
    other, _ = _model_and_optimizer(1)
    other.load_state_dict(state)                                  # cast back to float32
    w = backend.to_numpy(other.state_dict()["0.weight"])
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, backend.to_numpy(model.state_dict()["0.weight"]), rtol=1e-3, atol=1e-4)


def test_checkpoint_gets_the_usual_file_mode(tmp_path):
    """Not the 0600 of the temporary file it is written through: what open() would give."""
    import os
    import stat
    old = os.umask(0o022)
    try:
        model, opt = _model_and_optimizer(0)
        save_checkpoint(tmp_path / "c.npz", model, opt, {"epoch": 0})
        assert stat.S_IMODE((tmp_path / "c.npz").stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_a_save_flushes_the_file_then_the_folder_after_the_rename(tmp_path, monkeypatch):
    """Without the folder's fsync, a power cut after the rename may bring back the old name."""
    import os
    import stat
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoint.atomic_savez(tmp_path / "w.npz", {"w": np.zeros(3)})
    assert events == ["fsync file", "rename", "fsync folder"]


def test_temporaries_of_killed_saves_are_removed_and_nothing_else(tmp_path):
    for name in (".last.npz.x1y2.tmp", ".metrics.jsonl.abc.tmp", "last.npz", "notes.tmp", ".hidden",
                 ".my-notes.tmp"):
        (tmp_path / name).write_bytes(b"x")
    names = ("last.npz", "best.npz", "metrics.jsonl")
    assert checkpoint.remove_temporaries(tmp_path, names) == [".last.npz.x1y2.tmp", ".metrics.jsonl.abc.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", ".my-notes.tmp", "last.npz", "notes.tmp"]
