"""The CIFAR-10 downloader and loader, without the internet: the test builds an archive in the
official format (a few images per batch), serves it from 127.0.0.1, and checks that a good
download is verified and loaded exactly, and that every failure (wrong checksum, cut-off
download, no server, Ctrl-C, corrupt cached file) raises DataError and leaves the cache empty."""
import functools
import hashlib
import http.server
import importlib
import io
import mmap
import os
import pickle
import socket
import tarfile
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import minicvt.data as data
from minicvt.data import (CLASSES, DataError, default_cache_dir, fetch_cifar10, load_cifar10_archive,
                          load_dataset, md5sum)

download_module = importlib.import_module("minicvt.data.download")   # data.download is its function
ARCHIVE = "cifar-10-python.tar.gz"
# images per batch: data_batch_1..5, then test_batch (small, but not all equal)
_SIZES = {**{f"data_batch_{i}": 2 + i % 2 for i in range(1, 6)}, "test_batch": 4}


def _pickle_batch(images, labels):
    """One batch as the official archive stores it: a protocol-2 pickle of a dict with bytes
    keys; each row of b'data' is the 1024 red, then 1024 green, then 1024 blue values of one
    32x32 image, row-major."""
    rows = np.stack([np.concatenate([im[0].ravel(), im[1].ravel(), im[2].ravel()]) for im in images])
    batch = {b"batch_label": b"a batch", b"data": rows,               # (n, 3072) uint8
             b"labels": [int(v) for v in labels], b"filenames": [b"x.png"] * len(labels)}
    return pickle.dumps(batch, protocol=2)


def _write_archive(path, members):
    """gzip tar of {member name: bytes}."""
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def cifar_archive(tmp_path):
    """(folder holding cifar-10-python.tar.gz, its MD5, {'train'|'test': (images, labels)})."""
    rng = np.random.default_rng(7)
    members, packed = {}, {"train": ([], []), "test": ([], [])}
    for name, n in _SIZES.items():
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        members[f"cifar-10-batches-py/{name}"] = _pickle_batch(images, labels)
        split = "test" if name == "test_batch" else "train"
        packed[split][0].append(images)
        packed[split][1].append(labels)
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps(
        {b"label_names": [c.encode() for c in CLASSES]}, protocol=2)
    folder = tmp_path / "served"
    folder.mkdir()
    md5 = _write_archive(folder / ARCHIVE, members)
    expected = {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in packed.items()}
    return folder, md5, expected


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 5                                    # a stuck client cannot hold the server

    def do_GET(self):
        server = self.server
        server.requests.append(self.path)
        path = server.folder / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        self.send_response(200)
        if server.mode == "truncate":
            # promise more bytes than are sent, then close: a download cut off halfway
            self.send_header("Content-Length", str(len(body) + 1000))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(cifar_archive, monkeypatch):
    """An HTTP server on 127.0.0.1 (ephemeral port, background thread) serving the archive's
    folder; `.url(name)`, `.requests` (paths asked for), `.mode` ('ok' or 'truncate')."""
    # a proxy from the environment must not see these requests
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    httpd.folder, httpd.requests, httpd.mode = cifar_archive[0], [], "ok"
    httpd.url = lambda name: f"http://127.0.0.1:{httpd.server_address[1]}/{name}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _files(folder):
    return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).exists() else []


# -- a good download ----------------------------------------------------------------------------

def test_fetch_downloads_verifies_and_loads_the_exact_arrays(cifar_archive, server, tmp_path):
    _, md5, expected = cifar_archive
    cache = tmp_path / "cache"
    path = fetch_cifar10(cache, url=server.url(ARCHIVE), md5=md5, progress=True)
    assert path == cache / ARCHIVE and _files(cache) == [ARCHIVE]     # no .part left beside it
    assert md5sum(path) == md5 and server.requests == [f"/{ARCHIVE}"]
    for split in ("train", "test"):
        images, labels = load_cifar10_archive(path, split, md5=md5)
        assert images.dtype == np.uint8 and images.shape == (sum(
            n for k, n in _SIZES.items() if (k == "test_batch") == (split == "test")), 3, 32, 32)
        assert labels.dtype == np.int64 and labels.shape == images.shape[:1]
        np.testing.assert_array_equal(images, expected[split][0])
        np.testing.assert_array_equal(labels, expected[split][1])


def test_second_fetch_uses_the_cache_without_a_request(cifar_archive, server, tmp_path):
    md5 = cifar_archive[1]
    first = fetch_cifar10(tmp_path / "cache", url=server.url(ARCHIVE), md5=md5, progress=False)
    second = fetch_cifar10(tmp_path / "cache", url=server.url(ARCHIVE), md5=md5, progress=False)
    assert first == second and len(server.requests) == 1


def test_cache_folder_comes_from_the_environment(cifar_archive, server, tmp_path, monkeypatch):
    monkeypatch.setenv("MINICVT_CACHE", str(tmp_path / "envcache"))
    path = fetch_cifar10(None, url=server.url(ARCHIVE), md5=cifar_archive[1], progress=False)
    assert path == tmp_path / "envcache" / ARCHIVE and path.is_file()


def test_default_cache_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MINICVT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "minicvt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "minicvt"
    monkeypatch.setenv("MINICVT_CACHE", str(tmp_path / "mine"))     # wins over XDG
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("MINICVT_CACHE", "~/c")
    assert default_cache_dir() == tmp_path / "home" / "c"


# -- every failure raises DataError and leaves the cache empty -----------------------------------

def test_checksum_mismatch_keeps_nothing(server, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"corrupt: MD5 [0-9a-f]{32}, expected 0{32}"):
        fetch_cifar10(cache, url=server.url(ARCHIVE), md5="0" * 32, progress=False)
    assert _files(cache) == []


def test_interrupted_download_keeps_nothing(cifar_archive, server, tmp_path):
    server.mode = "truncate"
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"stopped after \d+ of \d+ bytes; run again"):
        fetch_cifar10(cache, url=server.url(ARCHIVE), md5=cifar_archive[1], progress=False)
    assert _files(cache) == []


def test_missing_file_on_the_server_keeps_nothing(cifar_archive, server, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"404"):
        fetch_cifar10(cache, url=server.url("nothing-here.tar.gz"), md5=cifar_archive[1], progress=False)
    assert _files(cache) == []


def test_unreachable_server_says_where_to_put_the_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with socket.socket() as s:                     # a port that was free a moment ago: refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        fetch_cifar10(cache, url=f"http://127.0.0.1:{port}/{ARCHIVE}", md5="a" * 32, progress=False)
    message = str(info.value)
    assert f"put it at {cache / ARCHIVE}" in message and "a" * 32 in message and "--data" in message
    # what else works offline: the images in class folders, or a tar of them
    assert "--data also takes an image folder ROOT/<class>/*.png|jpg, or a .tar/.tar.gz/.tar.xz of one" in message
    assert _files(cache) == []


def test_ctrl_c_during_download_removes_the_partial_file(cifar_archive, server, tmp_path, monkeypatch):
    cache, seen = tmp_path / "cache", {}
    real_urlopen = urllib.request.urlopen

    def urlopen(*args, **kwargs):
        response = real_urlopen(*args, **kwargs)
        real_read = response.read

        def read(n=-1):                            # the first block arrives, then Ctrl-C
            if seen:
                seen["during"] = _files(cache)
                raise KeyboardInterrupt
            seen["first"] = True
            return real_read(n)

        response.read = read
        return response

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(KeyboardInterrupt):
        fetch_cifar10(cache, url=server.url(ARCHIVE), md5=cifar_archive[1], progress=False)
    # the bytes went to a temporary name while downloading, and that file is gone now
    assert len(seen["during"]) == 1 and seen["during"][0].endswith(".part")
    assert _files(cache) == []


def test_connection_reset_mid_download_is_a_data_error(cifar_archive, server, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_urlopen = urllib.request.urlopen

    def urlopen(*args, **kwargs):
        response = real_urlopen(*args, **kwargs)
        real_read, calls = response.read, []

        def read(n=-1):                            # the first block arrives, then the peer resets
            calls.append(n)
            if len(calls) > 1:
                raise ConnectionResetError("connection reset by peer")
            return real_read(n)

        response.read = read
        return response

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(DataError, match="broke off after .* bytes"):
        fetch_cifar10(cache, url=server.url(ARCHIVE), md5=cifar_archive[1], progress=False)
    assert _files(cache) == []


# -- nothing is unpickled before the MD5 matched ------------------------------------------------

@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("pickle.loads was called on an unverified file")
    monkeypatch.setattr(pickle, "loads", refuse)


def test_corrupt_file_in_the_cache_is_refused_before_reading(cifar_archive, server, tmp_path,
                                                              no_unpickling):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ARCHIVE).write_bytes(b"not the archive")
    with pytest.raises(DataError, match=r"corrupt or not the expected file: MD5 .*Delete it"):
        fetch_cifar10(cache, url=server.url(ARCHIVE), md5=cifar_archive[1], progress=False)
    assert server.requests == []                   # refused, not silently replaced


def test_loader_checks_the_md5_before_unpickling(cifar_archive, no_unpickling):
    # a well-formed archive that is not the expected one (here: not the official MD5)
    folder, md5, _ = cifar_archive
    with pytest.raises(DataError, match=rf"MD5 {md5}, expected {data.CIFAR10_MD5}"):
        load_cifar10_archive(folder / ARCHIVE, "train")


def test_missing_member_is_a_data_error(tmp_path):
    path = tmp_path / ARCHIVE
    images = np.zeros((1, 3, 32, 32), np.uint8)
    md5 = _write_archive(path, {"cifar-10-batches-py/data_batch_1": _pickle_batch(images, [0])})
    with pytest.raises(DataError, match=r"cifar-10-batches-py/data_batch_2 is missing"):
        load_cifar10_archive(path, "train", md5=md5)
    with pytest.raises(DataError, match=r"cifar-10-batches-py/test_batch is missing"):
        load_cifar10_archive(path, "test", md5=md5)


def test_unknown_split_is_a_value_error(cifar_archive):
    folder, md5, _ = cifar_archive
    with pytest.raises(ValueError, match=r"'train' or 'test', got 'val'"):
        load_cifar10_archive(folder / ARCHIVE, "val", md5=md5)


# -- load_dataset -------------------------------------------------------------------------------

def test_load_dataset_cifar10_downloads_into_the_cache(cifar_archive, server, tmp_path, monkeypatch):
    # load_dataset passes the official URL and MD5; point them at the local archive
    _, md5, expected = cifar_archive
    monkeypatch.setattr(data, "fetch_cifar10",
                        functools.partial(fetch_cifar10, url=server.url(ARCHIVE), md5=md5))
    monkeypatch.setattr(data, "load_cifar10_archive", functools.partial(load_cifar10_archive, md5=md5))
    images, labels, classes = load_dataset("cifar10", split="test", cache_dir=tmp_path / "c",
                                           progress=False)
    # the archive, and beside it the decoded cache of its test split
    assert classes == list(CLASSES) and _files(tmp_path / "c") == [ARCHIVE, "cifar10"]
    (decoded,) = (tmp_path / "c" / "cifar10").iterdir()
    assert _files(decoded) == ["test.images.npy", "test.labels.npy", "test.meta.json"]
    assert isinstance(images, np.memmap) and images.filename == str(decoded / "test.images.npy")
    np.testing.assert_array_equal(images, expected["test"][0])
    np.testing.assert_array_equal(labels, expected["test"][1])


def test_load_dataset_checks_an_archive_given_by_path(cifar_archive, no_unpickling):
    # a file named like the official archive is verified against the MD5 published for it
    with pytest.raises(DataError, match=r"expected c58f30108f718f92721af3b95e74349a"):
        load_dataset(cifar_archive[0] / ARCHIVE)


def test_load_dataset_knows_a_renamed_official_archive_by_its_content(cifar_archive, tmp_path, monkeypatch):
    folder, md5, expected = cifar_archive
    renamed = tmp_path / "my-download.tar.gz"
    renamed.write_bytes((folder / ARCHIVE).read_bytes())
    monkeypatch.setattr(data, "load_cifar10_archive", functools.partial(load_cifar10_archive, md5=md5))
    images, labels, classes = load_dataset(renamed)
    assert classes == list(CLASSES)
    np.testing.assert_array_equal(images, expected["train"][0])
    np.testing.assert_array_equal(labels, expected["train"][1])


def test_load_dataset_refuses_the_unpacked_official_archive(cifar_archive, tmp_path, no_unpickling):
    with tarfile.open(cifar_archive[0] / ARCHIVE) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    for given in (tmp_path / "x", tmp_path / "x" / "cifar-10-batches-py"):
        with pytest.raises(DataError, match=r"unpacked official archive; give the archive cifar-10-python\.tar\.gz"):
            load_dataset(given)


def test_load_dataset_missing_path_says_what_to_give(tmp_path):
    with pytest.raises(DataError, match=r"no such file or directory \(give 'cifar10'"):
        load_dataset(tmp_path / "nowhere")


# -- the decoded cache of the archive -----------------------------------------------------------

_real_loads = pickle.loads


def _decoded_files(cache):
    (folder,) = (Path(cache) / "cifar10").iterdir()
    return folder, _files(folder)


def test_each_split_is_decoded_once_then_mapped_without_unpickling_or_md5(cifar_archive, tmp_path,
                                                                          monkeypatch):
    folder, md5, expected = cifar_archive
    cache = tmp_path / "c"
    first = {split: load_cifar10_archive(folder / ARCHIVE, split, md5=md5, cache_dir=cache)
             for split in ("train", "test")}
    where, files = _decoded_files(cache)
    assert files == sorted(f"{s}.{f}" for s in ("train", "test")
                           for f in ("images.npy", "labels.npy", "meta.json"))
    # later loads: no pickle read, no 170 MB hashed; the images are the cache file's pages
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled although cached"))
    monkeypatch.setattr(download_module, "md5sum", lambda *a: pytest.fail("MD5 computed although cached"))
    for split in ("train", "test"):
        for images, labels in (first[split], load_cifar10_archive(folder / ARCHIVE, split, md5=md5,
                                                                  cache_dir=cache)):
            assert isinstance(images, np.memmap) and images.filename == str(where / f"{split}.images.npy")
            assert not images.flags.writeable and isinstance(images.base, mmap.mmap)
            np.testing.assert_array_equal(images, expected[split][0])
            np.testing.assert_array_equal(labels, expected[split][1])


def test_a_cache_serves_only_the_md5_it_was_verified_against(cifar_archive, tmp_path, no_unpickling):
    # a cache made from this archive under its own MD5 (as the tests do) must not let the same
    # file pass as the official archive: the official MD5 is checked, and refuses it
    folder, md5, _ = cifar_archive
    cache = tmp_path / "c"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(pickle, "loads", _real_loads)
        load_cifar10_archive(folder / ARCHIVE, "train", md5=md5, cache_dir=cache)
    with pytest.raises(DataError, match=rf"MD5 {md5}, expected {data.CIFAR10_MD5}"):
        load_cifar10_archive(folder / ARCHIVE, "train", cache_dir=cache)


def test_a_changed_archive_is_verified_again(cifar_archive, tmp_path):
    folder, md5, _ = cifar_archive
    cache, path = tmp_path / "c", folder / ARCHIVE
    load_cifar10_archive(path, "test", md5=md5, cache_dir=cache)
    st = path.stat()
    path.write_bytes(path.read_bytes()[:-10])                     # damaged since: MD5 checked again
    os.utime(path, (st.st_atime + 10, st.st_mtime + 10))
    with pytest.raises(DataError, match="corrupt or not the expected file"):
        load_cifar10_archive(path, "test", md5=md5, cache_dir=cache)


def test_a_damaged_decoded_cache_is_decoded_again(cifar_archive, tmp_path):
    folder, md5, expected = cifar_archive
    cache = tmp_path / "c"
    load_cifar10_archive(folder / ARCHIVE, "train", md5=md5, cache_dir=cache)
    where, _ = _decoded_files(cache)
    npy = where / "train.images.npy"
    good = npy.read_bytes()
    npy.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))            # one pixel changed: its SHA-1 differs
    images, labels = load_cifar10_archive(folder / ARCHIVE, "train", md5=md5, cache_dir=cache)
    np.testing.assert_array_equal(images, expected["train"][0])
    assert npy.read_bytes() == good                               # and the cache rewritten


def test_an_unwritable_decoded_cache_is_said_in_one_line(cifar_archive, tmp_path, capsys):
    folder, md5, expected = cifar_archive
    blocker = tmp_path / "c"
    blocker.write_text("a file where the cache folder would go")
    images, labels = load_cifar10_archive(folder / ARCHIVE, "test", md5=md5, cache_dir=blocker)
    np.testing.assert_array_equal(images, expected["test"][0])
    assert not isinstance(images, np.memmap)                      # in memory, as before the cache
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "could not write the decoded images' cache" in err, err


def test_load_dataset_cifar10_hashes_the_archive_only_to_decode_it(cifar_archive, server, tmp_path,
                                                                   monkeypatch):
    # the first load downloads (hashing the bytes as they arrive) and decodes after checking
    # the MD5; the second finds the archive and its decoded cache and reads neither
    _, md5, expected = cifar_archive
    monkeypatch.setattr(data, "fetch_cifar10",
                        functools.partial(fetch_cifar10, url=server.url(ARCHIVE), md5=md5))
    monkeypatch.setattr(data, "load_cifar10_archive", functools.partial(load_cifar10_archive, md5=md5))
    load_dataset("cifar10", cache_dir=tmp_path / "c", progress=False)
    monkeypatch.setattr(download_module, "md5sum", lambda *a: pytest.fail("MD5 computed although cached"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled although cached"))
    images, labels, _ = load_dataset("cifar10", cache_dir=tmp_path / "c", progress=False)
    assert isinstance(images, np.memmap) and len(server.requests) == 1
    np.testing.assert_array_equal(images, expected["train"][0])
