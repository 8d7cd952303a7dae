"""The decoded-image cache: a dataset decoded once into .npy files, memory-mapped read-only by
every later load.

    <cache>/folders/<name>-<hash>/<name>.images.npy  .labels.npy  .meta.json   (image folders)
    <cache>/cifar10/<name>-<hash>/train.images.npy   .labels.npy  .meta.json   (the official
                                  test.images.npy    ...                        archive, per split)

<cache> is --cache-dir, else $MINICVT_CACHE, else the user cache; <hash> is of the source's full
path, so two sources of one name get two caches. Nothing is ever written beside the user's data.

**Why memory-mapped.** The images (N, 3, H, W) uint8 are not read into the process: the
operating system reads the pages of the file that are touched into its page cache, and every
process that maps the file sees those same pages. The ranks of a data-parallel run on one
machine thus share one copy of the dataset instead of holding one each, and a dataset larger
than memory streams from disk (pages are dropped and read again) instead of failing. The map is
read-only: an accidental write into the dataset raises instead of changing the file.

**Whole or not at all.** meta.json names the arrays' shapes and SHA-1 sums and what the cache
was made from (a signature of the source, the decoder's version). It is removed first and written
last, and each file is written under a temporary name and renamed (atomic_write): a run killed
in between leaves no cache rather than half of one, and a reader never sees half of one. Before
an .npy file is mapped, its header is checked against meta.json and the file's size, so a header
that lies (10¹² images) maps nothing; then the sums are checked (0.1 s for CIFAR-10's 150 MB).

**Several processes at once.** The ranks of a run start together and all find no cache. The
first to lock the cache's folder (flock, the operating system's lock: it goes with the process,
so a killed run leaves none behind) decodes and writes; the others wait for the lock, then find
the cache whole and map it: the set is decoded once, not once per rank.
"""
import contextlib
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from ..atomic import atomic_write, remove_temporaries
from .download import default_cache_dir

FILES = ("images.npy", "labels.npy", "meta.json")


def folder(kind, source, cache_dir=None):
    """The cache folder of `source` (a Path): <cache_dir>/<kind>/<name>-<hash of its full path>."""
    stem = source.resolve().name         # 'train.tar.xz' and 'train/' get different caches
    key = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:10]
    return Path(cache_dir or default_cache_dir()) / kind / f"{stem}-{key}"


def paths(where, prefix):
    """{'images.npy' | 'labels.npy' | 'meta.json': where/<prefix>.<that>}."""
    return {k: where / f"{prefix}.{k}" for k in FILES}


def file_signature(source):
    """What says a file is unchanged without reading it: its full path, size and time."""
    st = source.stat()
    return {"source": str(source.resolve()), "size": st.st_size, "mtime": st.st_mtime}


def sha1(a):
    """Of an array's bytes (a memmap is read page by page, never copied)."""
    return hashlib.sha1(np.ascontiguousarray(a).data).hexdigest()


def read(files, expect):
    """(images (N, 3, H, W) uint8 memmap, read-only; labels (N,) int64 in memory; meta) from
    the cache if it is whole and meta.json holds every key of `expect` with that value (the
    version, the source's signature), else None (decode again). A cache a killed run or a full
    disk left, or one damaged since, is never used."""
    try:
        if files["meta.json"].stat().st_size > 1 << 20:          # far more than any list of classes
            return None
        meta = json.loads(files["meta.json"].read_text())
        if not (isinstance(meta, dict) and all(meta.get(k) == v for k, v in expect.items())):
            return None
        shape = tuple(meta["shape"])
        if not (len(shape) == 4 and all(type(k) is int and k > 0 for k in shape) and shape[1] == 3):
            return None
        images = map_npy(files["images.npy"], np.uint8, shape)
        labels = map_npy(files["labels.npy"], np.int64, shape[:1])
        if images is None or labels is None:
            return None
        labels = np.array(labels)                   # small: in memory, the file closed
        if meta["sha1"] != [sha1(images), sha1(labels)]:
            return None
        return images, labels, meta
    except Exception:
        # unreadable, not JSON, wrong fields, or a damaged .npy header (NumPy parses it with
        # Python's tokenizer: SyntaxError, tokenize.TokenError...): whatever it is, decode again
        return None


def map_npy(path, dtype, shape):
    """The array of a .npy file, memory-mapped read-only, if its header says exactly this dtype
    and C-order shape and the file holds exactly that many bytes after it; else None. Nothing
    is mapped before the checks (np.load would trust the header), and the map is made from the
    file that was checked (a rename by another process in between cannot swap it)."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return None
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        got_shape, fortran, got_dtype = read_header(f)
        if (got_shape != shape or fortran or got_dtype != np.dtype(dtype)
                or os.fstat(f.fileno()).st_size != f.tell() + math.prod(shape) * np.dtype(dtype).itemsize):
            return None
        return np.memmap(f, dtype=dtype, mode="r", offset=f.tell(), shape=shape)


@contextlib.contextmanager
def locked(where):
    """Hold the lock of the cache folder `where` (made if absent): one process at a time
    writes a cache; the others wait here. Yields whether the lock is held. Where the system
    has no flock (Windows) or refuses it (some network file systems), it is not: each writer
    then decodes on its own and renames identical files into place, which a reader sees whole
    either way."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
        fd = os.open(where, os.O_RDONLY)         # a folder can be locked: no lock file to leave
    except (ImportError, OSError):
        fd = None
    try:
        held = False
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
                held = True
        except OSError:
            pass                                 # no locks here: see above
        yield held
    except BaseException:
        with contextlib.suppress(OSError):       # a refused source leaves no empty folder behind
            os.rmdir(where)                      # (refused if anything is in it)
        raise
    finally:
        if fd is not None:
            os.close(fd)                         # releases the lock


def write(files, shape, chunks, labels, meta, held=True):
    """Write the cache and map it back: images.npy (the uint8 `shape`) from `chunks`, uint8
    arrays whose concatenation along axis 0 is the images (a decoder's output, one image or a
    batch at a time: the whole set is never in memory), labels.npy, then meta.json (`meta` plus
    the shape and sums). -> (images memmap, labels). Call it in `locked`, held: what it yielded
    (without the lock, another writer's temporaries are not taken for a killed run's). Raises OSError
    (SaveError) if the disk has no room or the folder cannot be written; an error a chunk
    raises (a bad image) passes through. Either way no cache is left."""
    where = files["meta.json"].parent
    need = math.prod(shape) + 8 * shape[0]
    free = shutil.disk_usage(where).free
    if free < need + (64 << 20):                  # a margin for the file system's own needs
        raise OSError(f"{need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")
    files["meta.json"].unlink(missing_ok=True)
    if held:
        remove_temporaries(where, [p.name for p in files.values()])  # of killed writes
    h = hashlib.sha1()

    def write_images(f):
        fmt = np.lib.format
        fmt.write_array_header_1_0(f, {"descr": fmt.dtype_to_descr(np.dtype(np.uint8)),
                                       "fortran_order": False, "shape": tuple(shape)})
        written = 0
        for chunk in chunks:
            b = np.ascontiguousarray(chunk, dtype=np.uint8)
            f.write(b.data)
            h.update(b.data)
            written += len(b)
        if written != shape[0]:                    # a caller's mistake, never a user's
            raise ValueError(f"cache.write: {written} images for a shape of {shape}")

    atomic_write(files["images.npy"], write_images)
    atomic_write(files["labels.npy"], lambda f: np.save(f, labels, allow_pickle=False))
    meta = dict(meta, shape=list(shape), sha1=[h.hexdigest(), sha1(labels)])
    atomic_write(files["meta.json"], lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return map_npy(files["images.npy"], np.uint8, tuple(shape)), labels
