"""Data: the official CIFAR-10 archive, image folders, the held-out split and the batch
pipeline.

    images, labels, classes = load_dataset("cifar10")            # download into the cache
    images, labels, classes = load_dataset("path/to/cifar-10-python.tar.gz")
    images, labels, classes = load_dataset("path/to/train.tar.xz")  # ROOT/<class>/*.jpg
    train_idx, val_idx = split_indices(len(labels), val_size=5000, seed=0)
    path = find_cifar10()          # $MINICVT_DATA, else the downloaded archive, else None
"""
import lzma
import os
import tarfile
import zlib
from pathlib import Path

from .cifar10 import CIFAR10_FILE, CIFAR10_MD5, CIFAR10_URL, CLASSES, fetch_cifar10, load_cifar10_archive
from .download import DataError, default_cache_dir, download, md5sum, verified
from .folders import load_image_files, load_image_folder, open_tar
from .images import decode_image
from .pipeline import Loader, channel_stats, normalize, random_crop, random_hflip, resize, resize_matrix
from .split import fingerprint, held_out, is_training_data, run_split, split_indices


def load_dataset(data, split="train", cache_dir=None, progress=True):
    """(images (N, 3, H, W) uint8, labels (N,) int64, class names) from `data`:
    - 'cifar10': the official archive, downloaded into the cache (verified by MD5) if absent;
    - the official archive cifar-10-python.tar.gz, under any name (verified by MD5);
    - any other directory or .tar/.tar.gz/.tar.xz: an image folder ROOT/<class>/*.jpg|png.
    `split` ('train'/'test') applies to the official archive only. cache_dir: where downloads
    and decoded image folders go (default: $MINICVT_CACHE, else the user cache)."""
    if str(data) == "cifar10":
        # an archive already there is verified by load_cifar10_archive when it unpickles it
        path = fetch_cifar10(cache_dir, progress=progress, verify=False)
    else:
        path = Path(data)
        if not path.exists():
            raise DataError(f"--data {data}: no such file or directory (give 'cifar10', the official "
                            f"archive cifar-10-python.tar.gz, or an image folder or its tar)")
    if _is_official_archive(path):
        images, labels = load_cifar10_archive(path, split, cache_dir=cache_dir)
        return images, labels, list(CLASSES)
    if path.is_dir() and ((path / "data_batch_1").exists() or (path / OFFICIAL_FOLDER).is_dir()):
        # its files are pickles: only the archive's published MD5 makes them safe to read
        raise DataError(f"--data {data}: this is the unpacked official archive; give the archive "
                        f"cifar-10-python.tar.gz itself, whose MD5 is checked before anything in it is read")
    return load_image_folder(path, cache_dir=cache_dir, progress=progress)


OFFICIAL_FOLDER = "cifar-10-batches-py"         # the one folder inside the official archive


def find_cifar10(cache_dir=None):
    """Where this machine has CIFAR-10, for the notebooks (None if nowhere): $MINICVT_DATA if
    set (the official archive, an image folder or its tar; an error if it does not exist),
    else the official archive in the cache, where `minicvt train --data cifar10` downloads it."""
    given = os.environ.get("MINICVT_DATA", "").strip()
    if given:
        path = Path(given).expanduser()
        if not path.exists():
            raise DataError(f"MINICVT_DATA={given}: no such file or directory (give the official archive "
                            f"cifar-10-python.tar.gz, or an image folder or its tar)")
        return path
    cached = Path(cache_dir or default_cache_dir()) / CIFAR10_FILE
    return cached if cached.is_file() else None


def has_test_split(data):
    """Whether `data` has a test split of its own: 'cifar10' and the official archive do (its
    test batch); an image folder is one set of images."""
    return str(data) == "cifar10" or _is_official_archive(Path(data))


def _is_official_archive(path):
    """The official archive by its name, or a renamed one by its first member: reading one tar
    header says it apart from a .tar.gz of image folders without unpacking anything."""
    if path.name.endswith("cifar-10-python.tar.gz"):
        return True
    if not (path.is_file() and path.name.endswith((".tar.gz", ".tgz"))):
        return False
    try:
        with open_tar(path) as tar:       # a header that declares gigabytes is refused, not read
            first = tar.next()
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, DataError):
        return False                  # not a gzip tar: the image-folder loader says what is wrong
    return first is not None and first.name.split("/")[0] == OFFICIAL_FOLDER
