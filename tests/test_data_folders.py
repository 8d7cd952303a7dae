"""Image folders ROOT/<class>/*.png|jpg, read from a directory or a tar: classes in sorted order,
exact pixels, the .npy cache (written, reused, rebuilt, or put in the user cache when the
source's folder is read-only; memory-mapped, and written once when two processes load at
once), and errors that name the file at fault."""
import hashlib
import io
import mmap
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minicvt.data import DataError, folders, load_dataset, load_image_folder

REPO = Path(__file__).resolve().parents[1]

H, W = 6, 8
# created in this (unsorted) order; the class index is the position in sorted order
_CLASSES = ("zebra", "ant", "moth")
_CACHE_FILES = ("images.npy", "labels.npy", "meta.json")


def _png(path, pixels, mode="RGB"):
    Image.fromarray(pixels, mode=mode).save(path)


@pytest.fixture
def folder(tmp_path):
    """(root, expected images (N, 3, H, W) uint8 in load order, labels (N,), classes).
    Each class has two RGB PNGs (random pixels), and 'ant' also a grayscale PNG and a flat-colour
    JPEG; load order is (class name, file name)."""
    rng = np.random.default_rng(3)
    root = tmp_path / "src" / "imgs"
    expected = {}
    for c in _CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)   # (H, W, 3)
            _png(root / c / f"{i}.png", pixels)
            expected[(c, f"{i}.png")] = pixels.transpose(2, 0, 1)       # (3, H, W)
    gray = rng.integers(0, 256, (H, W), dtype=np.uint8)
    _png(root / "ant" / "g.png", gray, mode="L")
    expected[("ant", "g.png")] = np.stack([gray] * 3)                    # RGB of gray: v, v, v
    Image.new("RGB", (W, H), (200, 30, 90)).save(root / "ant" / "j.jpg", quality=95)
    expected[("ant", "j.jpg")] = None                                    # lossy: checked apart
    (root / "moth" / "notes.txt").write_text("not an image")             # ignored
    keys = sorted(expected)
    classes = sorted(_CLASSES)
    labels = np.array([classes.index(c) for c, _ in keys], dtype=np.int64)
    return root, keys, [expected[k] for k in keys], labels, classes


def _check(result, folder):
    """The loaded (images, labels, classes) against what the fixture wrote."""
    images, labels, classes = result
    _, keys, expected, want_labels, want_classes = folder
    assert classes == want_classes == ["ant", "moth", "zebra"]
    assert images.dtype == np.uint8 and images.shape == (len(keys), 3, H, W)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, want_labels)
    for k, got, want in zip(keys, images, expected):
        if want is None:
            # JPEG is lossy; a flat colour at quality 95 comes back within a few levels
            assert np.abs(got.astype(int) - np.array([200, 30, 90])[:, None, None]).max() <= 3, k
        else:
            np.testing.assert_array_equal(got, want, err_msg=str(k))


def _tar(root, path, mode, arcname="train"):
    with tarfile.open(path, mode) as tar:
        tar.add(root, arcname=arcname)
    return path


def _tree(top):
    return sorted(str(p.relative_to(top)) for p in Path(top).rglob("*"))


# -- reading ------------------------------------------------------------------------------------

def test_directory_gives_sorted_classes_and_exact_pixels(folder):
    _check(load_image_folder(folder[0], use_cache=False), folder)


@pytest.mark.parametrize("suffix, mode", [(".tar", "w"), (".tar.gz", "w:gz"), (".tar.xz", "w:xz")])
@pytest.mark.parametrize("arcname", ["train", "."])
def test_tar_gives_the_same_arrays(folder, tmp_path, suffix, mode, arcname):
    # 'train/<class>/..' as in the shared archive, and './<class>/..' as `tar -C ROOT .` writes
    path = _tar(folder[0], tmp_path / f"train{suffix}", mode, arcname)
    _check(load_image_folder(path, use_cache=False), folder)
    _check(load_dataset(path), folder)            # the same path through the public entry


def test_symlinks_in_a_tar_are_ignored_and_nothing_is_written_outside(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("MINICVT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "box").mkdir()
    path = _tar(folder[0], tmp_path / "box" / "train.tar", "w")
    outside = tmp_path / "outside.png"
    with tarfile.open(path, "a") as tar:
        links = [("train/ant/link.png", "../../outside.png"), ("train/moth/abs.png", "/etc/passwd")]
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    before = _tree(tmp_path.parent)
    _check(load_image_folder(path), folder)       # the links are neither followed nor counted
    new = sorted(n for n in set(_tree(tmp_path.parent)) - set(before) if (tmp_path.parent / n).is_file())
    assert [n.rsplit("/", 1)[-1] for n in new] == [f"train.tar.{f}" for f in _CACHE_FILES]
    assert all(n.startswith(f"{tmp_path.name}/cache/folders/") for n in new)     # the cache only
    assert not outside.exists()


@pytest.mark.parametrize("evil", ["../evil.png", "train/../../evil.png", "/tmp/evil.png"])
def test_member_outside_the_archive_folder_is_refused_by_name(folder, tmp_path, evil):
    # such a name is never extracted (tars are read in memory); without this check its folder
    # '..' or '/tmp' would silently become a class
    path = _tar(folder[0], tmp_path / "train.tar", "w", arcname=".")
    with tarfile.open(path, "a") as tar:
        info = tarfile.TarInfo(evil)
        payload = (folder[0] / "ant" / "0.png").read_bytes()
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    before = _tree(tmp_path.parent)
    with pytest.raises(DataError, match=rf"member '{evil}'"):
        load_image_folder(path)
    assert _tree(tmp_path.parent) == before and not Path("/tmp/evil.png").exists()


# -- the .npy cache -----------------------------------------------------------------------------

def _forbid_decoding(monkeypatch):
    """From now on any image decode fails the test: a load must come from the cache."""
    def refuse(*args, **kwargs):
        pytest.fail("an image was decoded although the cache was valid")
    monkeypatch.setattr(Image, "open", refuse)


def test_cache_goes_to_the_cache_folder_never_beside_the_data(folder, tmp_path, monkeypatch):
    """Beside a writable data folder too (it used to land there: 154 MB for CIFAR-10)."""
    root = folder[0]
    monkeypatch.setenv("MINICVT_CACHE", str(tmp_path / "usercache"))
    before = _tree(root.parent)
    first = load_image_folder(root)
    assert _tree(root.parent) == before                        # nothing written beside the source
    (cached,) = (tmp_path / "usercache" / "folders").iterdir()
    assert sorted(p.name for p in cached.iterdir()) == sorted(f"imgs.{f}" for f in _CACHE_FILES)
    np.testing.assert_array_equal(np.load(cached / "imgs.images.npy"), first[0])
    np.testing.assert_array_equal(np.load(cached / "imgs.labels.npy"), first[1])
    _forbid_decoding(monkeypatch)
    _check(load_image_folder(root), folder)


def test_cache_dir_argument_wins(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("MINICVT_CACHE", str(tmp_path / "usercache"))
    load_image_folder(folder[0], cache_dir=tmp_path / "mine")
    assert len(list((tmp_path / "mine" / "folders").rglob("*.npy"))) == 2
    assert not (tmp_path / "usercache").exists()


def test_tar_cache_is_rebuilt_when_the_tar_changes(folder, tmp_path, monkeypatch):
    path = _tar(folder[0], tmp_path / "train.tar.gz", "w:gz")
    _check(load_image_folder(path), folder)
    st = path.stat()
    # a new archive with one more image, given a later time
    _png(folder[0] / "zebra" / "9.png", np.full((H, W, 3), 7, np.uint8))
    _tar(folder[0], path, "w:gz")
    os.utime(path, (st.st_atime + 10, st.st_mtime + 10))
    images, labels, _ = load_image_folder(path)
    assert len(images) == len(folder[1]) + 1
    assert labels[-1] == 2 and (images[-1] == 7).all()          # zebra/9.png sorts last


@pytest.mark.parametrize("change", ["add", "rewrite"])
def test_directory_cache_is_rebuilt_when_an_image_inside_changes(folder, change):
    # a change inside a class folder leaves the root folder's own size and time untouched
    root = folder[0]
    load_image_folder(root)
    target = root / "moth" / ("5.png" if change == "add" else "0.png")
    old = (root / "moth" / "1.png").stat()
    _png(target, np.full((H, W, 3), 9, np.uint8))
    os.utime(target, (old.st_atime + 10, old.st_mtime + 10))     # later even on a coarse clock
    images, labels, classes = load_image_folder(root)
    keys = [k for k in folder[1] if k != ("moth", "0.png") or change == "add"]
    keys = sorted(keys + [("moth", target.name)])
    assert len(images) == len(keys)
    np.testing.assert_array_equal(images[keys.index(("moth", target.name))], 9)


def test_read_only_source_folder_puts_the_cache_in_the_user_cache(folder, tmp_path, monkeypatch):
    root = folder[0]
    monkeypatch.setenv("MINICVT_CACHE", str(tmp_path / "usercache"))
    before = _tree(root.parent)
    os.chmod(root.parent, 0o555)
    try:
        _check(load_image_folder(root), folder)
        assert _tree(root.parent) == before        # nothing written beside the source
        cached = sorted(p.name for p in (tmp_path / "usercache" / "folders").rglob("*.*"))
        assert cached == sorted(f"imgs.{f}" for f in _CACHE_FILES)
        _forbid_decoding(monkeypatch)
        _check(load_image_folder(root), folder)   # and found there the next time
    finally:
        os.chmod(root.parent, 0o755)


# -- the cache is mapped, shared, and written once ------------------------------------------------

def test_a_cached_folder_comes_back_mapped_from_the_cache_file(folder, tmp_path, monkeypatch):
    root = folder[0]
    first = load_image_folder(root, cache_dir=tmp_path / "c")          # decoded into the cache
    _forbid_decoding(monkeypatch)
    second = load_dataset(root, cache_dir=tmp_path / "c")              # read from it
    (npy,) = (tmp_path / "c" / "folders").rglob("*.images.npy")
    for images, _, _ in (first, second):
        # not read into this process: the file's pages, which every process mapping it shares
        assert isinstance(images, np.memmap) and images.filename == str(npy)
        assert isinstance(images.base, mmap.mmap) and not images.flags.writeable
        _check((images, first[1], first[2]), folder)
    with pytest.raises(ValueError, match="read-only"):
        second[0][0, 0, 0, 0] = 1                                      # the dataset cannot be changed by accident


def test_a_folder_larger_than_memory_is_decoded_into_the_cache_not_refused(folder, tmp_path, monkeypatch):
    # 8 images of 8x6 take 1152 bytes decoded: with a 1000-byte "machine" they cannot be held in
    # memory, but they stream into the cache image by image, and come back mapped from disk
    monkeypatch.setattr(folders, "memory_bytes", lambda: 1000)
    with pytest.raises(DataError, match="more than half this machine's memory"):
        load_image_folder(folder[0], use_cache=False)
    images, labels, classes = load_image_folder(folder[0], cache_dir=tmp_path / "c")
    assert isinstance(images, np.memmap)
    _check((images, labels, classes), folder)


_RACE = r"""
import hashlib, sys, time
from pathlib import Path
import numpy as np
from minicvt.data import folders

root, cache, me, other = sys.argv[1:5]
Path(me).touch()
deadline = time.monotonic() + 60
while not Path(other).exists():          # both processes start loading at the same moment
    if time.monotonic() > deadline:
        sys.exit("the other process never started")
    time.sleep(0.005)
decodes, real = [], folders.decode_image

def slow(*args):                         # decoding takes long enough for the other to arrive
    decodes.append(1)
    time.sleep(0.05)
    return real(*args)

folders.decode_image = slow
images, labels, classes = folders.load_image_folder(root, cache_dir=cache)
print(len(decodes), type(images).__name__, images.filename,
      hashlib.sha1(np.ascontiguousarray(images)).hexdigest(), labels.tolist())
"""


def test_two_processes_loading_at_once_decode_once_and_map_one_cache(folder, tmp_path):
    root, cache = folder[0], tmp_path / "c"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    ready = [tmp_path / "ready-0", tmp_path / "ready-1"]
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(root), str(cache), str(ready[i]),
                               str(ready[1 - i])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in range(2)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0 and not err, err
            outs.append(out.split(maxsplit=4))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    images, labels, _ = load_image_folder(root, use_cache=False)
    (npy,) = cache.rglob("*.images.npy")
    # one process decoded every image while the other waited for the cache folder's lock
    assert sorted(int(o[0]) for o in outs) == [0, len(labels)], outs
    for o in outs:          # and both map the same file: one copy in the page cache
        assert o[1:4] == ["memmap", str(npy), hashlib.sha1(images).hexdigest()], o
        assert o[4].strip() == str(labels.tolist())
    assert sorted(p.name for p in npy.parent.iterdir()) == sorted(f"imgs.{f}" for f in _CACHE_FILES)


# -- errors -------------------------------------------------------------------------------------

def test_images_of_different_sizes_name_the_file(folder):
    _png(folder[0] / "moth" / "small.png", np.zeros((5, 5, 3), np.uint8))
    with pytest.raises(DataError, match=r"moth/small\.png is 5x5, but the first image is 8x6"):
        load_image_folder(folder[0], use_cache=False)


def test_undecodable_image_names_the_file(folder):
    (folder[0] / "zebra" / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match=r"zebra/broken\.png is not a readable image"):
        load_image_folder(folder[0], use_cache=False)


def test_images_outside_a_class_folder_are_refused(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    _png(root / "a.png", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DataError, match=r"a\.png is not inside a class folder"):
        load_image_folder(root, use_cache=False)


def test_a_folder_inside_a_class_folder_is_named(tmp_path):
    root = tmp_path / "pets"
    for d in ("cat", "dog", "dog/puppies"):
        (root / d).mkdir(parents=True)
        _png(root / d / "0.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match=r"pets: dog/puppies is a folder inside the class folder dog; a dataset is "
                                        r"one level of class folders \(ROOT/<class>/\*.jpg\): move its images up "
                                        r"into dog, or make it a class folder of its own$"):
        load_image_folder(root, use_cache=False)


def test_class_folders_under_different_parents_are_named(tmp_path):
    root = tmp_path / "mixed"
    for d in ("a/cat", "b/dog"):
        (root / d).mkdir(parents=True)
        _png(root / d / "0.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match=r"class folders must share one parent folder, found images in "
                                        r"\['a/cat', 'b/dog'\]"):
        load_image_folder(root, use_cache=False)


def test_empty_folder_is_a_data_error(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no \.jpg/\.jpeg/\.png images found"):
        load_image_folder(tmp_path / "empty")


def test_missing_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"does not exist"):
        load_image_folder(tmp_path / "nowhere")


@pytest.mark.parametrize("suffix, mode", [(".tar", "w"), (".tar.gz", "w:gz"), (".tar.xz", "w:xz")])
def test_truncated_archive_is_a_data_error(folder, tmp_path, suffix, mode):
    path = _tar(folder[0], tmp_path / f"train{suffix}", mode)
    if suffix == ".tar":   # cut inside the last image (the second half may be only padding)
        with tarfile.open(path) as tar:
            cut = max(m.offset_data for m in tar if m.isfile()) + 10
    else:                  # cut the compressed stream in half
        cut = path.stat().st_size // 2
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(DataError, match=r"neither a folder nor a readable tar archive"):
        load_image_folder(path)


def test_file_that_is_not_a_tar_is_a_data_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt is neither a folder nor a readable tar archive"):
        load_image_folder(path)
