"""Which images validate a run: the seeded held-out split, re-created later from a checkpoint.

    train_idx, val_idx = split_indices(len(labels), val_size=5000, seed=0)
    images, labels = held_out(images, labels, meta, "cifar10")     # the run's validation images

A checkpoint keeps the split's size and seed (meta["train_config"]) and a fingerprint of the
data it was trained on, so `minicvt eval` and `minicvt attention --split val` take exactly the
images the run never trained on, and refuse other data.
"""
import hashlib

import numpy as np


def split_indices(n, val_size, seed=0):
    """Deterministic train/validation split: (train_idx, val_idx), sorted, disjoint."""
    if not 0 <= val_size < n:
        raise ValueError(f"validation size must be in [0, {n}), got {val_size}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def run_split(n, val_size, seed=0, limit_train=0):
    """(train_idx, val_idx) of a run: split_indices, and with limit_train the random subset of
    that many training images it draws (sorted: the sorted indices run class by class, so the
    first ones would all be of the first classes)."""
    train_idx, val_idx = split_indices(n, val_size, seed)
    if limit_train:
        pick = np.random.default_rng(seed).permutation(len(train_idx))[:limit_train]
        train_idx = np.sort(train_idx[pick])
    return train_idx, val_idx


def fingerprint(images, labels):
    """A short hash that tells one dataset from another: its shape, every label, and a sample
    of the images (64 of them, evenly spaced). A checkpoint keeps the one of its training data.
    Of a memmap (the decoded cache), only the 64 sampled images are read: a strided view, then
    a copy of those alone; the same hash as of the array in memory."""
    step = max(1, len(images) // 64)
    h = hashlib.sha256(repr((images.shape, str(images.dtype))).encode())
    h.update(np.ascontiguousarray(labels).tobytes())
    h.update(np.ascontiguousarray(images[::step]).tobytes())
    return h.hexdigest()[:16]


def is_training_data(images, labels, meta):
    """Whether these are the images the run was trained on (its training images and held-out
    split both): by the fingerprint its checkpoint keeps, or for an older checkpoint without
    one, by their number."""
    if "data_fingerprint" in meta:
        return fingerprint(images, labels) == meta["data_fingerprint"]
    return len(labels) == meta["num_images"]


def held_out(images, labels, meta, data_path):
    """The run's validation images and labels, (V, 3, H, W) and (V,), re-created from the
    checkpoint metadata `meta` (the split's size and seed) on the data it was trained on.
    Only the V images are gathered (in memory), not a copy of the whole set."""
    if not is_training_data(images, labels, meta):
        raise ValueError(f"--split val needs the data the run was trained on ({meta['num_images']} images), "
                         f"but {data_path} holds other images ({len(labels)}); leave --split out (or "
                         f"give --split all) to score all of them")
    tc = meta["train_config"]
    _, idx = split_indices(len(labels), tc["val_size"], tc["seed"])
    return images[idx], labels[idx]
