"""The official CIFAR-10 python archive: fetch, verify, load into uint8 arrays.

The archive holds pickled batches. It is only ever unpickled after its MD5 matched the
official one, and it is read member by member in memory: nothing is extracted to disk,
so a crafted member name cannot write outside the cache.
"""
import pickle
import tarfile
from pathlib import Path

import numpy as np

from .download import DataError, default_cache_dir, download, verified

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FILE = "cifar-10-python.tar.gz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_MEMBERS = {
    "train": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)],
    "test": ["cifar-10-batches-py/test_batch"],
}


def fetch_cifar10(cache_dir=None, url=CIFAR10_URL, md5=CIFAR10_MD5, progress=True):
    """Path of the verified archive in the cache, downloading it first if it is not there."""
    dest = Path(cache_dir or default_cache_dir()) / CIFAR10_FILE
    if dest.exists():
        return verified(dest, md5)
    return download(url, dest, md5, progress=progress)


def load_cifar10_archive(path, split="train", md5=CIFAR10_MD5):
    """images (N, 3, 32, 32) uint8 and labels (N,) int64 from the official archive at path.
    split: 'train' (50,000 images) or 'test' (10,000). The MD5 is checked first."""
    if split not in _MEMBERS:
        raise ValueError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
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
