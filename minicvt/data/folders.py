"""Image-folder datasets: ROOT/<class>/*.jpg|png, from a directory or a .tar/.tar.gz/.tar.xz.

The class index is the position of the folder name in sorted order. Images are decoded once
(with Pillow) and cached as .npy files in the cache folder (--cache-dir, else $MINICVT_CACHE,
else the user cache; never beside the user's data); the cache is used again only while the
source's size and time (for a folder, those of every image in it) match.
"""
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from .download import DataError, default_cache_dir

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# a phase that may be long (decoding a dataset, a validation pass) shows a progress bar once it
# has taken this long: a small folder in a test or a quick trial stays quiet
PROGRESS_DELAY_S = 1.0


def _is_image(name):
    return name.lower().endswith(IMAGE_SUFFIXES)


def _list_directory(root):
    """[(class_dir, name, reader)] for every image file below root."""
    found = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if _is_image(f):
                p = Path(dirpath) / f
                found.append((str(p.parent.relative_to(root)), f, p.read_bytes))
    return found


def _list_tar(tar):
    """Same, from a tar read in memory: members are never extracted, so names such as
    '../x' cannot write anywhere; links and other non-files are ignored. A name that leaves
    the archive's folder ('../x', '/x') is refused: its folder would become a class. Bytes are
    read in archive order (a compressed stream cannot seek backwards cheaply)."""
    found = []
    for m in tar:
        if m.isfile() and _is_image(m.name):
            p = PurePosixPath(m.name)
            if p.is_absolute() or ".." in p.parts:
                raise DataError(f"{tar.name}: member {m.name!r} points outside the archive's folder; "
                                f"refusing this archive")
            data = tar.extractfile(m).read()
            found.append((str(p.parent), p.name, lambda data=data: data))
    return found


def _decode(found, source, progress=False):
    """Group files by their folder, check they share one parent, decode to uint8 arrays (with a
    progress bar: 50,000 CIFAR-10 JPEGs take about 11 s)."""
    from PIL import Image
    from tqdm import tqdm

    if not found:
        raise DataError(f"{source}: no .jpg/.jpeg/.png images found (expected ROOT/<class>/*.jpg)")
    loose = [name for d, name, _ in found if not PurePosixPath(d).name]   # d is '.' at ROOT
    if loose:
        raise DataError(f"{source}: {loose[0]} is not inside a class folder (expected ROOT/<class>/*.jpg)")
    parents = {str(PurePosixPath(d).parent) for d, _, _ in found}
    if len(parents) != 1:
        raise DataError(f"{source}: class folders must share one parent folder, found {sorted(parents)[:4]}")
    classes = sorted({PurePosixPath(d).name for d, _, _ in found})
    index = {c: i for i, c in enumerate(classes)}
    found = sorted(found, key=lambda t: (PurePosixPath(t[0]).name, t[1]))
    images, labels = [], []
    for d, name, read in tqdm(found, desc=f"decoding {Path(source).name}", unit="img", leave=False,
                              disable=not progress, delay=PROGRESS_DELAY_S):
        try:
            with Image.open(io.BytesIO(read())) as im:
                a = np.asarray(im.convert("RGB"), dtype=np.uint8)     # (H, W, 3)
        except (OSError, SyntaxError) as e:   # what Pillow raises for a file it cannot decode
            # Pillow names the in-memory file (<_io.BytesIO object at 0x...>): name the image instead
            reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e))
            raise DataError(f"{source}: {d}/{name} is not a readable image ({reason})") from e
        if images and a.shape != images[0].shape:
            raise DataError(f"{source}: {d}/{name} is {a.shape[1]}x{a.shape[0]}, but the first image "
                            f"is {images[0].shape[1]}x{images[0].shape[0]}; all must share one size")
        images.append(a)
        labels.append(index[PurePosixPath(d).name])
    images = np.stack(images).transpose(0, 3, 1, 2)                  # (N, H, W, 3) -> (N, 3, H, W)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64), classes


def _cache_paths(source, cache_dir=None):
    """In cache_dir (default: $MINICVT_CACHE, else the user cache), a folder per source named
    after it and its full path's hash: two sources of the same name get different caches.
    Nothing is ever written beside the user's data."""
    stem = source.resolve().name         # 'train.tar.xz' and 'train/' get different caches
    key = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:10]
    folder = Path(cache_dir or default_cache_dir()) / "folders" / f"{stem}-{key}"
    return {k: folder / f"{stem}.{k}" for k in ("images.npy", "labels.npy", "meta.json")}


def _signature(source):
    """Size and time of a tar; for a folder, of every image below it (the folder's own time
    does not change when a file inside one of its class folders is added or rewritten)."""
    if source.is_dir():
        h = hashlib.sha1()
        for d, name, _ in sorted(_list_directory(source), key=lambda t: t[:2]):
            st = (source / d / name).stat()
            h.update(f"{d}/{name} {st.st_size} {st.st_mtime_ns}\n".encode())
        return {"source": str(source.resolve()), "images": h.hexdigest()}
    st = source.stat()
    return {"source": str(source.resolve()), "size": st.st_size, "mtime": st.st_mtime}


def _atomic_save(path, write):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)                  # mkstemp makes 0600; a cache is shareable
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def load_image_folder(path, use_cache=True, cache_dir=None, progress=False):
    """images (N, 3, H, W) uint8, labels (N,) int64, classes (list of folder names).
    path: a directory ROOT/<class>/* or a tar archive of one. The decoded arrays are cached
    under cache_dir (default: $MINICVT_CACHE, else the user cache)."""
    source = Path(path)
    if not source.exists():
        raise DataError(f"{source} does not exist")
    paths = _cache_paths(source, cache_dir)
    if use_cache and all(p.exists() for p in paths.values()):
        meta = json.loads(paths["meta.json"].read_text())
        if meta["signature"] == _signature(source):
            return (np.load(paths["images.npy"], allow_pickle=False),
                    np.load(paths["labels.npy"], allow_pickle=False), meta["classes"])
    if source.is_dir():
        images, labels, classes = _decode(_list_directory(source), source, progress)
    else:
        try:
            with tarfile.open(source, "r:*") as tar:
                images, labels, classes = _decode(_list_tar(tar), source, progress)
        # a truncated or corrupt .gz/.xz stream raises its own errors, not TarError
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as e:
            raise DataError(f"{source} is neither a folder nor a readable tar archive ({e})") from e
    if use_cache:
        _atomic_save(paths["images.npy"], lambda f: np.save(f, images, allow_pickle=False))
        _atomic_save(paths["labels.npy"], lambda f: np.save(f, labels, allow_pickle=False))
        meta = {"classes": classes, "signature": _signature(source)}
        _atomic_save(paths["meta.json"], lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return images, labels, classes


def load_image_files(paths, fit):
    """uint8 (N, 3, H, W) from the user's image files (`--images`): each decoded by Pillow,
    converted to RGB, and brought to one size by fit(image) -> image (a crop and a resize)."""
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(np.asarray(fit(im.convert("RGB")), dtype=np.uint8).transpose(2, 0, 1))  # -> (3, H, W)
        except FileNotFoundError:
            raise DataError(f"--images: {p} does not exist") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"--images: {p} is not a readable image ({e})") from e
    return np.stack(out)
