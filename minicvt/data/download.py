"""Fetching files safely: a download lands under a temporary name, its MD5 is checked before
anything reads it, and only then is it renamed into place. An interrupted or corrupt download
leaves nothing behind in the cache.
"""
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..errors import BadFileError


class DataError(BadFileError, RuntimeError):
    """Data is missing, unreachable or corrupt; the message says what to do."""


def default_cache_dir():
    """$MINICVT_CACHE, else $XDG_CACHE_HOME/minicvt, else ~/.cache/minicvt."""
    if os.environ.get("MINICVT_CACHE"):
        return Path(os.environ["MINICVT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minicvt"


def md5sum(path, chunk=1 << 20):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def download(url, dest, md5, timeout=60, progress=True):
    """Download url to dest (a Path) and verify its MD5 before it takes its final name.

    The bytes stream into a temporary file beside dest; on any failure (network error,
    interruption, wrong checksum) that file is removed and DataError (or the interrupt) is
    raised, so dest either does not exist or is the verified file.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    h = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)
            except (urllib.error.URLError, OSError) as e:
                raise DataError(
                    f"could not download {url} ({e}). Without internet, download it elsewhere and "
                    f"put it at {dest} (MD5 {md5}), or pass the file's path with --data; --data also "
                    f"takes an image folder ROOT/<class>/*.png|jpg, or a .tar/.tar.gz/.tar.xz of one") from e
            with response:
                total = int(response.headers.get("Content-Length") or 0) or None
                bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False,
                           disable=not progress)
                received = 0
                while True:
                    try:
                        block = response.read(1 << 16)
                    except OSError as e:           # connection reset, socket timeout, ...
                        raise DataError(f"download of {url} broke off after {received} bytes ({e}); "
                                        f"nothing was kept, run again") from e
                    if not block:
                        break
                    out.write(block)
                    h.update(block)
                    received += len(block)
                    bar.update(len(block))
                bar.close()
        if total is not None and received != total:
            raise DataError(f"download of {url} stopped after {received} of {total} bytes; run again")
        if h.hexdigest() != md5:
            raise DataError(f"download of {url} is corrupt: MD5 {h.hexdigest()}, expected {md5}; "
                            f"nothing was kept, run again")
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return dest


def verified(path, md5):
    """Raise DataError unless the file at path exists and has the expected MD5."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    actual = md5sum(path)
    if actual != md5:
        raise DataError(f"{path} is corrupt or not the expected file: MD5 {actual}, expected {md5}. "
                        f"Delete it and download again")
    return path
