"""The official CIFAR-10 python archive: fetch, verify, decode once into the cache, map.

The archive holds pickled batches. It is only ever unpickled after its MD5 matched the
official one, and it is read member by member in memory: nothing is extracted to disk,
so a crafted member name cannot write outside the cache.

The first load of a split decodes it into the decoded cache (data/cache.py:
<cache>/cifar10/<archive name>-<hash>/train.images.npy, .labels.npy, .meta.json); every later
load memory-maps it, so the ranks of a run on one machine share one copy of the images.
"""
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np

from . import cache
from .download import DataError, default_cache_dir, download, verified
from .images import printable

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FILE = "cifar-10-python.tar.gz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_MEMBERS = {
    "train": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)],
    "test": ["cifar-10-batches-py/test_batch"],
}
# the decoded cache's layout: a cache of another version is decoded again
CACHE_VERSION = 1


def fetch_cifar10(cache_dir=None, url=CIFAR10_URL, md5=CIFAR10_MD5, progress=True, verify=True):
    """Path of the archive in the cache, downloading it first if it is not there (a download is
    always verified). verify: check the MD5 of an archive already there (load_dataset leaves that
    to load_cifar10_archive, which checks it whenever it unpickles)."""
    dest = Path(cache_dir or default_cache_dir()) / CIFAR10_FILE
    if dest.exists():
        return verified(dest, md5) if verify else dest
    return download(url, dest, md5, progress=progress)


def load_cifar10_archive(path, split="train", md5=CIFAR10_MD5, cache_dir=None, use_cache=True):
    """images (N, 3, 32, 32) uint8 and labels (N,) int64 from the official archive at path.
    split: 'train' (50,000 images) or 'test' (10,000).

    With use_cache (the default), the split is decoded once into the decoded cache under
    cache_dir (default: $MINICVT_CACHE, else the user cache) and the images come back as a
    read-only np.memmap of it; without, arrays in memory.

    The MD5 is checked before anything is unpickled: only the published MD5 makes the pickles
    safe to read. A whole cache of this archive (same path, size and time, and decoded after
    this same MD5 matched) is read without checking the MD5 again (0.5 s for 170 MB, on every
    load of every rank): reading it unpickles nothing, only .npy arrays whose headers are
    checked, so it is safe whatever the archive holds now; and its images are the ones the
    verified archive held."""
    if split not in _MEMBERS:
        raise ValueError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    path = Path(path)
    if not use_cache:
        return _unpickle(path, split, md5)
    where = cache.folder("cifar10", path, cache_dir)
    files = cache.paths(where, split)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    expect = {"version": CACHE_VERSION, "signature": dict(cache.file_signature(path), md5=md5, split=split)}
    decoded = None
    try:
        got = cache.read(files, expect)
        if got is None:
            with cache.locked(where) as held:
                got = cache.read(files, expect)    # another process may have written it meanwhile
                if got is None:
                    decoded = _unpickle(path, split, md5)
                    return cache.write(files, decoded[0].shape, [decoded[0]], decoded[1], expect, held)
        return got[:2]
    except OSError as e:            # a full disk, a read-only folder
        print(f"minicvt: could not write the decoded images' cache in {printable(where)} "
              f"({printable(e)}); going on without it", file=sys.stderr)
    return decoded if decoded is not None else _unpickle(path, split, md5)


def _unpickle(path, split, md5):
    """The split's arrays in memory, from the archive's pickles, after its MD5 matched."""
    verified(path, md5)
    images, labels = [], []
    with tarfile.open(path, "r:gz") as tar:
        for name in _MEMBERS[split]:
            try:
                member = tar.getmember(name)
            except KeyError:
                raise DataError(f"{path} is not the CIFAR-10 python archive: {name} is missing") from None
            batch = pickle.loads(tar.extractfile(member).read(), encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8)         # (n, 3072), rows R|G|B
            images.append(data.reshape(-1, 3, 32, 32))                 # (n, 3, 32, 32)
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)
