"""Data: the official CIFAR-10 archive, image folders, and the batch pipeline.

    images, labels, classes = load_dataset("cifar10")            # download into the cache
    images, labels, classes = load_dataset("path/to/cifar-10-python.tar.gz")
    images, labels, classes = load_dataset("path/to/train.tar.xz")  # ROOT/<class>/*.jpg
"""
from pathlib import Path

from .cifar10 import CIFAR10_MD5, CIFAR10_URL, CLASSES, fetch_cifar10, load_cifar10_archive
from .download import DataError, default_cache_dir, download, md5sum, verified
from .folders import load_image_folder
from .pipeline import Loader, channel_stats, normalize, random_crop, random_hflip, split_indices


def load_dataset(data, split="train", cache_dir=None, progress=True):
    """(images (N, 3, H, W) uint8, labels (N,) int64, class names) from `data`:
    - 'cifar10': the official archive, downloaded into the cache (verified by MD5) if absent;
    - a path ending in 'cifar-10-python.tar.gz': that official archive (verified by MD5);
    - any other directory or .tar/.tar.gz/.tar.xz: an image folder ROOT/<class>/*.jpg|png.
    `split` ('train'/'test') applies to the official archive only. cache_dir: where downloads
    and decoded image folders go (default: $MINICVT_CACHE, else the user cache)."""
    if str(data) == "cifar10":
        path = fetch_cifar10(cache_dir, progress=progress)
    else:
        path = Path(data)
        if not path.exists():
            raise DataError(f"--data {data}: no such file or directory (give 'cifar10', the official "
                            f"archive cifar-10-python.tar.gz, or an image folder or its tar)")
    if path.name.endswith("cifar-10-python.tar.gz"):
        images, labels = load_cifar10_archive(path, split)
        return images, labels, list(CLASSES)
    return load_image_folder(path, cache_dir=cache_dir)
