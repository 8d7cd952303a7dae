"""Scoring a model: loss and accuracy over a dataset, overall and per class.

    loss, acc, per_class = evaluate(model, loader, num_classes, flip=True)
    loss, acc, per_class, classes, n, split = evaluate_checkpoint("runs/cvt/best.npz", "cifar10")

`evaluate` is what the trainer runs after every epoch; `evaluate_checkpoint` is `minicvt eval`:
it re-creates a run's model, normalisation and held-out images from its checkpoint alone.
"""
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import backend, data, nn
from . import functional as F
from .checkpoint import CheckpointError, load_checkpoint, saved_train_settings
from .models import from_checkpoint


def evaluate(model, loader, num_classes, progress=False, flip=False, size=None, world=None):
    """(mean loss, accuracy, per-class accuracy (K,)) over one pass, in eval mode, no caches.
    size: the images resized to size×size first (as the epoch's training images were).
    flip: the logits are the mean of the image's and its left-right mirror's (test-time
    augmentation; training flips too, so both are images the model has learnt to read).
    Every sum stays on the device until one read-back at the end. world: under data
    parallelism each rank's loader holds its share of the images, and the sums of all ranks
    are added (one all-reduce) before the means are taken."""
    model.eval()
    criterion = nn.CrossEntropyLoss(check_labels=False)
    xp = backend.xp()
    classes = xp.arange(num_classes)
    total_loss, bad = xp.zeros(()), xp.zeros(())
    correct, seen = xp.zeros(num_classes), xp.zeros(num_classes)
    batches = tqdm(loader.epoch(0), total=len(loader), desc="validation", leave=False, disable=not progress,
                   delay=data.folders.PROGRESS_DELAY_S)
    with nn.no_grad():
        for x, y in batches:
            if size is not None:
                x = data.resize(x, size)
            logits = model.forward(x)
            if flip:
                logits = (logits + model.forward(x[..., ::-1])) * 0.5
            total_loss += criterion.forward(logits, y) * len(y)
            bad += F.label_errors(y, num_classes)
            # per-class counts as sums of a one-hot (B, K) mask: bincount would read the largest
            # label back from the GPU twice a batch
            onehot = y[:, None] == classes
            hit = (logits.argmax(axis=1) == y)[:, None]
            correct += (onehot & hit).sum(axis=0)
            seen += onehot.sum(axis=0)
    host = backend.to_numpy(xp.concatenate([correct, seen, xp.stack([total_loss, bad])]))
    if world is not None:
        world.allreduce(host)                    # float64 sums (K + K + 2,) on the host
    correct, seen, (total_loss, bad) = host[:num_classes], host[num_classes:-2], host[-2:]
    if bad:
        raise ValueError(f"{int(bad)} labels lie outside [0, {num_classes}): the labels must be "
                         f"class indices of the model's {num_classes} classes")
    n = float(seen.sum())
    return float(total_loss) / n, float(correct.sum()) / n, correct / np.maximum(seen, 1)


def evaluate_checkpoint(path, data_path, split=None, batch_size=500, cache_dir=None, progress=False, flip=None):
    """(loss, accuracy, per-class accuracy, class names, images evaluated, split) of the
    checkpoint at path on data_path. split 'val' re-creates the run's held-out split (the same
    data, seed and size it was trained with), 'all' uses every image, 'test' the official
    archive's test batch (other data has none: refused). None: 'val' on the run's own training
    data, 'all' on any other. flip: score each image with its mirror; None: as the run's
    validation did (its eval_flip setting)."""
    model_state, _, meta = load_checkpoint(path)
    settings = saved_train_settings(meta["train_config"])
    if split == "test" and Path(data_path).exists() and not data.has_test_split(data_path):
        raise data.DataError(f"--split test: {data_path} has no test split (only 'cifar10' and the official "
                             f"archive cifar-10-python.tar.gz have one); --split all scores every image of it")
    images, labels, classes = data.load_dataset(data_path, split="test" if split == "test" else "train",
                                                cache_dir=cache_dir, progress=progress)
    if list(classes) != meta["classes"]:
        raise CheckpointError(f"{path} was trained on classes {meta['classes']}, but {data_path} has {list(classes)}")
    if split is None:
        split = "val" if data.is_training_data(images, labels, meta) else "all"
    if split == "val":
        images, labels = data.held_out(images, labels, meta, data_path)
    dtype = np.dtype(settings["dtype"])
    model = from_checkpoint(model_state, meta, path, dtype)
    norm = meta["normalization"]
    loader = data.Loader(images, labels, batch_size, norm["mean"], norm["std"], dtype=dtype)
    flip = settings["eval_flip"] if flip is None else flip     # by default as the run validated
    loss, acc, per_class = evaluate(model, loader, len(classes), progress, flip=flip)
    return loss, acc, per_class, list(classes), len(labels), split
