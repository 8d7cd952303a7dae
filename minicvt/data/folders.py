"""Image-folder datasets: ROOT/<class>/*.jpg|png, from a directory or a .tar/.tar.gz/.tar.xz.

The class index is the position of the folder name in sorted order. Images are decoded once
(images.decode_image, the one decoder of every path) straight into the decoded cache
(data/cache.py: .npy files in --cache-dir, else $MINICVT_CACHE, else the user cache; never beside
the user's data), which every load then memory-maps: the ranks of a run on one machine share one
copy, and a folder larger than memory streams from disk. The cache is used again only while the
source's size and time (for a folder, those of every image in it) match and its files are whole.
What is refused, and why: docs/files.md.
"""
import bz2
import contextlib
import gzip
import hashlib
import itertools
import lzma
import os
import sys
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from . import cache
from .download import DataError
from .images import decode_image, printable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# a phase that may be long (decoding a dataset, a validation pass) shows a progress bar once it
# has taken this long: a small folder in a test or a quick trial stays quiet
PROGRESS_DELAY_S = 1.0
# one image file of a dataset (a CIFAR-10 JPEG is 1 KB, a large photo 10 MB): checked against
# a tar member's declared size or a file's size before a byte of it is read
MAX_IMAGE_BYTES = 64 << 20
# the .npy cache's layout and the decoder's rules: a cache of another version is decoded again
# (2: EXIF orientation, 16-bit greyscale scaled, transparency on white, sizes and sums in meta)
CACHE_VERSION = 2
# --images: a picture more elongated than this is refused (after the central crop it would show
# a sliver, and resizing its short side to the model's size could take gigabytes)
MAX_ASPECT = 100


def _is_image(name):
    return name.lower().endswith(IMAGE_SUFFIXES)


def memory_bytes():
    """This machine's memory in bytes (8 GiB where the system does not say): for a tar, the
    image files read from it are held in memory, and so is the decoded dataset where it is not
    decoded into the cache."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 8 << 30


def _list_directory(root):
    """[(class_dir, name, read() -> bytes)] for every image file below root. A FIFO or a device
    named x.png is left out (reading one could block, or never end)."""
    found = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if _is_image(f) and p.is_file():
                d = str(p.parent.relative_to(root))
                found.append((d, f, lambda p=p, d=d: _read_file(p, f"{root}: {d}/{p.name}")))
    return found


def _read_file(path, label):
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise DataError(f"{printable(label)}: {size} bytes is more than the {MAX_IMAGE_BYTES} an "
                            f"image file in a dataset may have")
        return path.read_bytes()
    except OSError as e:     # unreadable (permissions), or removed since the folder was listed
        raise DataError(f"{printable(label)}: cannot read it ({printable(e.strerror or e)})") from e


class _BoundedReader:
    """The (decompressed) bytes of a tar, as tarfile reads them: no single read may ask for
    more than an image file may have (a header declaring 4 GB is refused before tarfile
    allocates it), nor all reads together for more than half this machine's memory (what is
    read is kept: members are read in memory, never extracted). Seeks, which skip what is not
    read, pass through."""

    def __init__(self, stream, source):
        self.stream, self.source = stream, source
        self.total, self.limit = 0, memory_bytes() // 2
        self.last = (None, b"")             # (where, bytes) of the last read, for _check_end

    def read(self, n=-1):
        if n is None or n < 0 or n > MAX_IMAGE_BYTES:
            raise DataError(f"{printable(self.source)}: a header near byte {self.stream.tell()} declares "
                            f"{n} bytes, more than the {MAX_IMAGE_BYTES} an image file may have; "
                            f"refusing this archive")
        where = self.stream.tell()
        data = self.stream.read(n)
        self.last = (where, data)
        self.total += len(data)
        if self.total > self.limit:
            raise DataError(f"{printable(self.source)}: its images add up to more than "
                            f"{self.limit / 1e9:.1f} GB, half this machine's memory; refusing this archive")
        return data

    def seek(self, pos, whence=0):
        return self.stream.seek(pos, whence)

    def tell(self):
        return self.stream.tell()


@contextlib.contextmanager
def open_tar(path):
    """tarfile.TarFile of a .tar, .tar.gz, .tar.xz or .tar.bz2 (told apart by their first
    bytes), read through _BoundedReader."""
    with open(path, "rb") as f:
        magic = f.read(6)
    opener = (gzip.open if magic[:2] == b"\x1f\x8b" else lzma.open if magic == b"\xfd7zXZ\x00"
              else bz2.open if magic[:3] == b"BZh" else open)
    with opener(path, "rb") as stream, \
            tarfile.open(fileobj=_BoundedReader(stream, path), mode="r:") as tar:
        yield tar


def _list_tar(tar, source):
    """Same, from a tar read in memory: members are never extracted, so names such as
    '../x' cannot write anywhere; links (symbolic or hard: never followed), devices, folders
    and other files are ignored. A name that leaves the archive's folder ('../x', '/x') is
    refused: its folder would become a class. Bytes are read in archive order (a compressed
    stream cannot seek backwards cheaply); each member's declared size is checked first."""
    found = []
    for m in tar:
        if not (m.isfile() and _is_image(m.name)):
            continue
        p = PurePosixPath(m.name)
        if p.is_absolute() or ".." in p.parts:
            raise DataError(f"{printable(source)}: member {m.name!r} points outside the archive's folder; "
                            f"refusing this archive")
        if m.size > MAX_IMAGE_BYTES:          # a sparse member or a run of zeros inflates cheaply
            raise DataError(f"{printable(source)}: member {m.name!r} declares {m.size} bytes, more than "
                            f"the {MAX_IMAGE_BYTES} an image file may have; refusing this archive")
        data = tar.extractfile(m).read()
        found.append((str(p.parent), p.name, lambda data=data: data))
    _check_end(tar, source)
    return found


def _check_end(tar, source):
    """tarfile stops quietly at a damaged header or at the end of the data, as if the archive
    ended there: a truncated or damaged archive would lose its last images without a word.
    A whole archive ends with a zero block; then the rest (its padding, up to 16 MiB) is read,
    so a .gz or .xz stream checks its CRC. The block where tarfile stopped is the one it read
    last (seeking back to it would make a .gz or .xz stream decompress again from its start)."""
    where, block = tar.fileobj.last
    if where != tar.offset:
        tar.fileobj.seek(tar.offset)
        block = tar.fileobj.read(tarfile.BLOCKSIZE)
    block = block[:tarfile.BLOCKSIZE]
    after = f"after member {tar.members[-1].name!r}" if tar.members else "at its start"
    if len(block) < tarfile.BLOCKSIZE:
        raise DataError(f"{printable(source)}: the archive is cut short {after} (no end-of-archive marker)")
    if block.count(0) != tarfile.BLOCKSIZE:
        raise DataError(f"{printable(source)}: the archive has a damaged header {after}")
    for _ in range(16):
        if not tar.fileobj.read(1 << 20):
            break


def _plan(found, source):
    """Group files by their folder and check they share one parent -> (found in load order,
    labels (N,) int64, classes). Load order is (class name, file name); the class index is the
    position of the folder name in sorted order."""
    where = printable(source)
    if not found:
        raise DataError(f"{where}: no .jpg/.jpeg/.png images found (expected ROOT/<class>/*.jpg)")
    loose = [name for d, name, _ in found if not PurePosixPath(d).name]   # d is '.' at ROOT
    if loose:
        raise DataError(f"{where}: {printable(loose[0])} is not inside a class folder (expected ROOT/<class>/*.jpg)")
    parents = {str(PurePosixPath(d).parent) for d, _, _ in found}
    if len(parents) != 1:
        # the usual cause: a folder inside a class folder (dog/puppies/*.jpg beside dog/*.jpg)
        folders = {str(PurePosixPath(d)) for d, _, _ in found}
        nested = sorted(d for d in folders if str(PurePosixPath(d).parent) in folders)
        if nested:
            inner = PurePosixPath(nested[0])
            raise DataError(f"{where}: {printable(str(inner))} is a folder inside the class folder "
                            f"{printable(inner.parent.name)}; a dataset is one level of class folders "
                            f"(ROOT/<class>/*.jpg): move its images up into {printable(str(inner.parent))}, "
                            f"or make it a class folder of its own")
        raise DataError(f"{where}: class folders must share one parent folder, found images in "
                        f"{printable(sorted(folders)[:4])}; a dataset is one level of class folders "
                        f"(ROOT/<class>/*.jpg)")
    classes = sorted({PurePosixPath(d).name for d, _, _ in found})
    index = {c: i for i, c in enumerate(classes)}
    found = sorted(found, key=lambda t: (PurePosixPath(t[0]).name, t[1]))
    labels = np.array([index[PurePosixPath(d).name] for d, _, _ in found], dtype=np.int64)
    return found, labels, classes


def _decoded(found, source, progress=False):
    """Each image of `found` (in its order) decoded by decode_image, (3, H, W) uint8, one at a
    time, with a progress bar (50,000 CIFAR-10 JPEGs take about 11 s); all must share the
    first one's size."""
    from tqdm import tqdm

    first = None
    for d, name, read in tqdm(found, desc=f"decoding {Path(source).name}", unit="img",
                              leave=False, disable=not progress, delay=PROGRESS_DELAY_S):
        a = np.asarray(decode_image(read(), f"{source}: {d}/{name}"))     # (H, W, 3) uint8
        if first is None:
            first = a.shape[:2]
        elif a.shape[:2] != first:
            raise DataError(f"{printable(source)}: {printable(d)}/{printable(name)} is {a.shape[1]}x{a.shape[0]}, "
                            f"but the first image is {first[1]}x{first[0]}; all must share one size")
        yield a.transpose(2, 0, 1)                                         # (H, W, 3) -> (3, H, W)


def _decode(found, source, progress=False):
    """(images (N, 3, H, W) uint8 in memory, labels, classes): without a cache, or where the
    cache cannot be written."""
    found, labels, classes = _plan(found, source)
    images = None
    for i, a in enumerate(_decoded(found, source, progress)):
        if images is None:           # allocated once the first image gives H and W
            images = _allocate(len(found), a.shape[1:], printable(source))
        images[i] = a
    return images, labels, classes


def _decode_to_cache(found, source, files, signature, held, progress=False):
    """Decode straight into the cache's images.npy, image by image: the decoded set is never
    in this process's memory, so a folder larger than memory can be decoded (its cache then
    streams from disk). -> (images memmap, labels, classes). Raises OSError if the cache cannot
    be written (nothing is left of it)."""
    found, labels, classes = _plan(found, source)
    images = _decoded(found, source, progress)
    first = next(images)                                  # its size gives the array's shape
    shape = (len(found),) + first.shape
    meta = {"version": CACHE_VERSION, "classes": classes, "signature": signature}
    chunks = itertools.chain([first[None]], (a[None] for a in images))
    mapped, labels = cache.write(files, shape, chunks, labels, meta, held)
    return mapped, labels, classes


def _allocate(n, hw, where):
    """uint8 (n, 3, H, W), refused in one line if it would take more than half this machine's
    memory (a folder of large photos: each is kept at its full size)."""
    need, memory = n * 3 * hw[0] * hw[1], memory_bytes()
    if need > memory // 2:
        raise DataError(f"{where}: {n} images of {hw[1]}x{hw[0]} take {need / 1e9:.1f} GB decoded, more "
                        f"than half this machine's memory ({memory / 1e9:.1f} GB); resize them first")
    return np.empty((n, 3) + tuple(hw), dtype=np.uint8)


def _signature(source):
    """Size and time of a tar; for a folder, of every image below it (the folder's own time
    does not change when a file inside one of its class folders is added or rewritten)."""
    if source.is_dir():
        h = hashlib.sha1()
        for d, name, _ in sorted(_list_directory(source), key=lambda t: t[:2]):
            st = (source / d / name).stat()
            h.update(f"{d}/{name} {st.st_size} {st.st_mtime_ns}\n".encode())
        return {"source": str(source.resolve()), "images": h.hexdigest()}
    return cache.file_signature(source)


def _read_cache(files, signature):
    """(images memmap, labels, classes) from a whole cache of this source, else None."""
    got = cache.read(files, {"version": CACHE_VERSION, "signature": signature})
    if got is None:
        return None
    images, labels, meta = got
    classes = meta.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)
            and labels.min() >= 0 and labels.max() < len(classes)):
        return None
    return images, labels, classes


def _find(source):
    """[(class_dir, name, read() -> bytes)] of a folder or a tar (read in memory)."""
    if source.is_dir():
        return _list_directory(source)
    tar = None
    try:
        with open_tar(source) as tar:
            return _list_tar(tar, source)
    # a truncated or corrupt .gz/.xz/.bz2 stream raises its own errors, not TarError
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
        after = f", after member {tar.members[-1].name!r}" if tar is not None and tar.members else ""
        raise DataError(f"{printable(source)} is neither a folder nor a readable tar archive "
                        f"({printable(' '.join(str(e).split()))}{after}); --data takes 'cifar10', the "
                        f"official archive, an image folder ROOT/<class>/*.jpg, or a tar of one") from e


def load_image_folder(path, use_cache=True, cache_dir=None, progress=False):
    """images (N, 3, H, W) uint8, labels (N,) int64, classes (list of folder names).
    path: a directory ROOT/<class>/* or a tar archive of one. With use_cache, the images are
    decoded once into a cache under cache_dir (default: $MINICVT_CACHE, else the user cache)
    and come back as a read-only np.memmap of it (see data/cache.py: processes share it, and a
    set larger than memory streams from disk); without, an array in memory."""
    source = Path(path)
    if not source.exists():
        raise DataError(f"{printable(source)} does not exist")
    if not (source.is_dir() or source.is_file()):
        raise DataError(f"{printable(source)} is neither a folder nor a file")
    if not use_cache:
        return _decode(_find(source), source, progress)
    where = cache.folder("folders", source, cache_dir)
    files = cache.paths(where, source.resolve().name)
    signature = _signature(source)
    found = None
    try:
        cached = _read_cache(files, signature)
        if cached is not None:
            return cached
        with cache.locked(where) as held:
            cached = _read_cache(files, signature)     # another process may have written it meanwhile
            if cached is not None:
                return cached
            found = _find(source)
            return _decode_to_cache(found, source, files, signature, held, progress)
    except OSError as e:            # a full disk, a read-only folder: the source's errors are DataErrors
        print(f"minicvt: could not write the decoded images' cache in {printable(where)} "
              f"({printable(e)}); going on without it", file=sys.stderr)
    return _decode(found if found is not None else _find(source), source, progress)


def load_image_files(paths, fit):
    """uint8 (N, 3, H, W) from the user's image files (`--images`): each decoded by
    decode_image (8-bit RGB, refusals in one line) and brought to one size by
    fit(image) -> image (a crop and a resize)."""
    out = []
    for p in paths:
        label = f"--images {p}"
        if os.path.exists(p) and not os.path.isfile(p):
            raise DataError(f"{printable(label)} is not a file")
        im = decode_image(p, label)
        w, h = im.size
        if max(w, h) > MAX_ASPECT * min(w, h):
            raise DataError(f"{printable(label)}: {w}x{h} is more elongated than 1:{MAX_ASPECT}; "
                            f"crop it to the part to classify")
        out.append(np.asarray(fit(im), dtype=np.uint8).transpose(2, 0, 1))   # -> (3, H, W)
    return np.stack(out)
