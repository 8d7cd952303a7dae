"""Training and evaluation of a CvT on an image dataset (CIFAR-10 by default).

The loop itself is the five lines every trainer has:

    model.zero_grad()
    logits = model.forward(x)                    # (B, K)
    loss = criterion.forward(logits, y)          # scalar
    model.backward(criterion.backward())         # fills every param.grad
    optimizer.step()

Around it: a cosine learning-rate schedule with warm-up, progressive resizing (the first
epochs on smaller images, `TrainConfig.train_size`), evaluation after every epoch, metrics
appended to metrics.jsonl, curves drawn to curves.png, and an atomic checkpoint after every
epoch (last.npz, and best.npz when validation accuracy improves) from which `resume` continues
exactly: the data order, augmentation and dropout masks of epoch e depend only on (seed, e).
"""
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import backend, data, nn
from . import functional as F
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .models import build_model, get_config
from .models.configs import CvTConfig
from .optim import SGD, AdamW, clip_grad_norm, cosine_lr


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in every checkpoint."""
    model: str = "cvt-cifar-s"
    data: str = "cifar10"
    epochs: int = 24
    batch_size: int = 128
    optimizer: str = "adamw"         # 'adamw' (as the official recipe) or 'sgd' (momentum, Nesterov)
    lr: float = None                 # peak learning rate after warm-up (adamw 1e-3, sgd 0.1)
    min_lr: float = 0.0
    warmup_epochs: float = 1.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = None       # adamw 0.05 (decoupled), sgd 5e-4 (L2)
    label_smoothing: float = 0.1
    clip_grad: float = 0.0           # max global gradient norm; 0 = no clipping
    crop_padding: int = 4
    augment: bool = True
    val_size: int = 5000
    limit_train: int = 0             # use only this many training images (0 = all)
    seed: int = 0
    dtype: str = "float32"
    eval_batch_size: int = 500
    init_from: str = ""              # start from this checkpoint's (or model file's) weights
    # progressive resizing: "0.5:0.5,0.75:0.25" trains the first 50 % of the epochs on images
    # resized to half their side (16x16 for CIFAR-10), the next 25 % at three quarters (24x24),
    # and the rest (at least the last epoch) at their own size; a size may also be given in
    # pixels ("16:0.5,24:0.25"); "" = off
    resolutions: str = "0.5:0.5,0.75:0.25"
    eval_flip: bool = True           # validation averages the logits of each image and its mirror
    minutes: float = 0.0             # plan the number of epochs to end within this many minutes
                                     # (0: take `epochs` as given); see Trainer.plan_epochs

    # what a checkpoint written before a setting existed did, where that differs from its default
    BEFORE = {"resolutions": "", "eval_flip": False}

    @classmethod
    def from_saved(cls, saved):
        """The settings stored in a checkpoint; those it predates keep the behaviour it had."""
        return cls(**{**{k: v for k, v in cls.BEFORE.items() if k not in saved}, **saved})

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        # the two optimisers want very different step sizes and decays: default each its own
        if self.lr is None:
            self.lr = 1e-3 if self.optimizer == "adamw" else 0.1
        if self.weight_decay is None:
            self.weight_decay = 0.05 if self.optimizer == "adamw" else 5e-4
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("min_lr", "weight_decay", "warmup_epochs", "clip_grad", "crop_padding", "limit_train",
                     "minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        self.resolution_parts()                       # a malformed schedule fails here

    def resolution_parts(self):
        """[(size, fraction of the epochs)] of `resolutions`: size an int (pixels) or a float in
        (0, 1) (a fraction of the images' side)."""
        parts, total = [], 0.0
        for part in filter(None, self.resolutions.replace(" ", "").split(",")):
            try:
                size, fraction = part.split(":")
                size, fraction = (float(size) if "." in size else int(size)), float(fraction)
            except ValueError:
                raise ValueError(f"resolutions: {part!r} is not SIZE:FRACTION (e.g. '0.5:0.5,0.75:0.25' "
                                 f"trains 50 % of the epochs at half the image side, then 25 % at three "
                                 f"quarters; '16:0.5' gives the size in pixels)") from None
            if not (0 < size < 1 if isinstance(size, float) else size >= 4) or not 0 < fraction <= 1:
                raise ValueError(f"resolutions: {part!r} needs a size in pixels >= 4 or a fraction of "
                                 f"the side in (0, 1), and a fraction of the epochs in (0, 1]")
            total += fraction
            if total > 1 + 1e-9:
                raise ValueError(f"resolutions {self.resolutions!r}: the fractions add up to more than 1")
            parts.append((size, fraction))
        return parts

    def resolution_plan(self, native, epochs=None):
        """[(side in pixels, first epoch, end epoch)] of the progressive-resizing schedule for
        images of side `native`, 0-based, end exclusive. Segment k ends at round(its cumulative
        fraction × epochs) (Python's round: halves go to the even number), and never later
        than the last epoch, which is always at the images' own size: the model saved last
        has trained at the size it will be used at. epochs: another number of epochs than
        the run's (to plan one)."""
        epochs = self.epochs if epochs is None else epochs
        plan, start, total = [], 0, 0.0
        for size, fraction in self.resolution_parts():
            side = int(round(size * native)) if isinstance(size, float) else size
            if side > native:
                raise ValueError(f"resolutions: {side}x{side} is larger than the {native}x{native} "
                                 f"images; progressive resizing trains on smaller ones")
            total += fraction
            end = min(int(round(total * epochs)), epochs - 1)
            plan.append((max(side, 4), start, end))
            start = end
        return plan

    def train_size(self, epoch, native):
        """The side of the training images in (0-based) epoch `epoch`; `native` after the plan."""
        return next((side for side, start, end in self.resolution_plan(native) if start <= epoch < end),
                    native)


PLAN_RESERVE = 0.05           # of a --minutes budget, kept for what plan_epochs does not time
PLAN_WARMUP, PLAN_STEPS = 2, 3   # steps per image size that plan_epochs runs untimed, then times
MAX_PLANNED_EPOCHS = 100_000


class DivergedError(RuntimeError):
    """The loss became NaN or infinite."""


def make_optimizer(tc, model):
    params = list(model.named_parameters())
    if tc.optimizer == "sgd":
        return SGD(params, tc.lr, momentum=tc.momentum, nesterov=tc.nesterov, weight_decay=tc.weight_decay)
    return AdamW(params, tc.lr, weight_decay=tc.weight_decay)


def reseed_dropout(model, seed):
    """Give every module that draws random masks (dropout, drop path) one stream, shared,
    seeded from (run seed, epoch): the modules draw from it in the same order in every run,
    so a resumed epoch draws the same masks. One generator for the model, not one per module:
    on a GPU each is a cuRAND state of its own, made afresh every epoch."""
    rng = backend.BackendRNG(seed * 7919)
    for _, m in model.named_modules():
        if "rng" in m.__dict__:
            m.rng = rng


def read_back(*scalars):
    """Several 0-d device arrays as Python floats, in one device-to-host transfer (each
    float() of a CuPy array is a transfer, and a wait for the GPU, of its own)."""
    xp = backend.get_array_module(*scalars)
    return [float(v) for v in backend.to_numpy(xp.stack(scalars))]


def evaluate(model, loader, num_classes, progress=False, flip=False, size=None):
    """(mean loss, accuracy, per-class accuracy (K,)) over one pass, in eval mode, no caches.
    size: the images resized to size×size first (as the epoch's training images were).
    flip: the logits are the mean of the image's and its left-right mirror's (test-time
    augmentation; training flips too, so both are images the model has learnt to read).
    Every sum stays on the device until one read-back at the end."""
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
    correct, seen, (total_loss, bad) = host[:num_classes], host[num_classes:-2], host[-2:]
    if bad:
        raise ValueError(f"{int(bad)} labels lie outside [0, {num_classes}): the labels must be "
                         f"class indices of the model's {num_classes} classes")
    n = float(seen.sum())
    return float(total_loss) / n, float(correct.sum()) / n, correct / np.maximum(seen, 1)


class Trainer:
    """Holds the data, model, optimiser and output folder of one run."""

    def __init__(self, tc, out_dir, model_config=None, progress=True, log=print, cache_dir=None,
                 log_every=20, resuming=False):
        """resuming: the weights will come from resume(), so tc.init_from is not read again
        (it may have moved since the run began)."""
        began = time.perf_counter()           # a --minutes budget counts the data loading too
        self.tc, self.out, self.log_every = tc, Path(out_dir), log_every
        self.progress, self.log = progress, log
        self.dtype = np.dtype(tc.dtype)
        images, labels, classes = data.load_dataset(tc.data, cache_dir=cache_dir, progress=progress)
        self.classes, self.num_images = list(classes), len(labels)
        train_idx, val_idx = data.split_indices(len(labels), tc.val_size, tc.seed)
        if tc.limit_train:        # a random subset: the sorted indices run class by class
            pick = np.random.default_rng(tc.seed).permutation(len(train_idx))[:tc.limit_train]
            train_idx = np.sort(train_idx[pick])
        self.data_fingerprint = data.fingerprint(images, labels)     # eval knows its own data by it
        mean, std = data.channel_stats(images[train_idx])
        self.norm = {"mean": mean.tolist(), "std": std.tolist()}
        self.train_loader = data.Loader(images[train_idx], labels[train_idx], tc.batch_size, mean, std,
                                        shuffle=True, augment=tc.augment, crop_padding=tc.crop_padding,
                                        drop_last=True, seed=tc.seed, dtype=self.dtype)
        if len(self.train_loader) == 0:         # batches are full (drop_last): none would be drawn
            raise ValueError(f"--batch-size {tc.batch_size} is larger than the {len(train_idx)} "
                             f"training images of {tc.data}; give a smaller --batch-size")
        self.val_loader = data.Loader(images[val_idx], labels[val_idx], tc.eval_batch_size, mean, std,
                                      dtype=self.dtype) if len(val_idx) else None
        self.mc = model_config or get_config(tc.model, num_classes=len(classes),
                                             image_size=int(images.shape[-1]))
        if labels.min() < 0 or labels.max() >= self.mc.num_classes:     # once, on the host
            raise ValueError(f"{tc.data}: labels range over [{labels.min()}, {labels.max()}] but the "
                             f"model has {self.mc.num_classes} classes")
        tc.resolution_plan(self.mc.image_size)        # a size larger than the images fails here
        self.model = build_model(self.mc, seed=tc.seed, dtype=self.dtype)
        if tc.init_from and not resuming:
            self._init_from(tc.init_from)
        self.optimizer = make_optimizer(tc, self.model)
        # no label check that reads back every step: the loop counts bad labels on the device
        self.criterion = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing, check_labels=False)
        self.start_epoch, self.best_acc, self.history = 0, -1.0, []
        if tc.minutes and not resuming:       # a resumed run keeps the epochs its plan fixed
            self.tc = replace(tc, epochs=self.plan_epochs(tc.minutes * 60 - (time.perf_counter() - began)))

    def plan_epochs(self, seconds):
        """The most epochs that fit in `seconds` (--minutes). Each image size of the schedule
        is timed on a throwaway model of the same configuration: PLAN_WARMUP warm-up steps
        (the first steps at a new shape allocate their arrays), then the median of PLAN_STEPS
        training steps, and an evaluation forward of one real batch. An epoch's time is
        predicted as its steps plus its validation at its size; what is left of `seconds`
        after the timing, less PLAN_RESERVE for what is not timed (checkpoints, curves), is
        the budget. The run's own model and random streams are not touched, so the run then
        is exactly the one `--epochs N` would give, and N is saved in its settings, so that
        --resume continues the same plan."""
        began = time.perf_counter()        # the planning's own seconds come out of the budget too
        tc, native = self.tc, self.mc.image_size
        sizes = sorted({side for side, _, _ in tc.resolution_plan(native, epochs=10**6)} | {native})
        scratch = build_model(self.mc, seed=tc.seed + 1, dtype=self.dtype)
        optimizer, criterion = make_optimizer(tc, scratch), nn.CrossEntropyLoss(check_labels=False)
        x, y = next(iter(self.train_loader.epoch(0)))
        val_images = len(self.val_loader.labels) if self.val_loader is not None else 0
        epoch_s = {}
        for size in sizes:
            xs, times = data.resize(x, size), []
            for _ in range(PLAN_WARMUP + PLAN_STEPS):
                backend.synchronize()
                start = time.perf_counter()
                scratch.train().zero_grad()
                criterion.forward(scratch.forward(xs), y)
                scratch.backward(criterion.backward())
                optimizer.step()
                backend.synchronize()
                times.append(time.perf_counter() - start)
            with nn.no_grad():
                scratch.eval().forward(xs)                                   # warm-up
                backend.synchronize()
                start = time.perf_counter()
                scratch.forward(xs)
                backend.synchronize()
                forward_s = (time.perf_counter() - start) / len(y)          # per image
            step_s = float(np.median(times[PLAN_WARMUP:]))
            epoch_s[size] = (len(self.train_loader) * step_s
                             + val_images * forward_s * (2 if tc.eval_flip else 1))

        def predicted(n):              # seconds of n epochs under the schedule's plan for n
            plan = tc.resolution_plan(native, epochs=n)
            small = sum((end - start) * epoch_s[size] for size, start, end in plan)
            return small + (n - (plan[-1][2] if plan else 0)) * epoch_s[native]
        budget, n = (seconds - (time.perf_counter() - began)) * (1 - PLAN_RESERVE), 0
        while n < MAX_PLANNED_EPOCHS and predicted(n + 1) <= budget:
            n += 1
        timings = ", ".join(f"{epoch_s[size]:.0f} s at {size}x{size}" for size in sizes)
        if n == 0:
            raise ValueError(f"--minutes {tc.minutes:g}: not one epoch fits ({timings} an epoch here, "
                             f"after {tc.minutes * 60 - seconds:.0f} s of loading); give more minutes, "
                             f"or fewer images with --limit-train")
        self.log(f"--minutes {tc.minutes:g}: {n} epochs planned, predicted {predicted(n) / 60:.1f} minutes "
                 f"({timings} an epoch, with validation; {PLAN_RESERVE:.0%} kept in reserve)")
        return n

    def _init_from(self, path):
        """Start from the weights of a checkpoint or model file of the same architecture (a
        new run: its own optimiser state and schedule)."""
        from .models import load
        source = load(path)
        if source.config != self.mc:
            diff = {k: (v, getattr(self.mc, k)) for k, v in asdict(source.config).items()
                    if getattr(self.mc, k) != v}
            raise CheckpointError(f"--init-from {path}: its model differs from this run's "
                                  f"(file vs this run: {diff}); give the same --config and data")
        self.model.load_state_dict(source.state_dict())

    # -- checkpoints ---------------------------------------------------------------------------
    def _meta(self, epoch):
        return {"epoch": epoch, "train_config": asdict(self.tc), "model_config": json.loads(self.mc.to_json()),
                "classes": self.classes, "num_images": self.num_images, "normalization": self.norm,
                "data_fingerprint": self.data_fingerprint,
                "best_acc": self.best_acc,
                "history": self.history}

    def resume(self):
        """Continue from out/last.npz: weights, optimiser state, epoch counter, history."""
        path = self.out / "last.npz"
        model_state, optim_state, meta = load_checkpoint(path)
        saved = asdict(TrainConfig.from_saved(meta["train_config"]))
        if saved != asdict(self.tc):
            diff = {k: (saved.get(k), v) for k, v in asdict(self.tc).items() if saved.get(k) != v}
            raise CheckpointError(f"{path} was written by a run with other settings "
                                  f"(saved vs now: {diff}); use another --out or the same settings")
        saved_mc = CvTConfig.from_json(json.dumps(meta["model_config"]))
        if saved_mc != self.mc:
            diff = {k: (v, getattr(self.mc, k)) for k, v in asdict(saved_mc).items() if getattr(self.mc, k) != v}
            raise CheckpointError(f"{path} holds a different model configuration (saved vs now: {diff})")
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optim_state)
        self.start_epoch, self.best_acc, self.history = meta["epoch"] + 1, meta["best_acc"], meta["history"]
        self._write_metrics()
        self.log(f"resumed from {path} after epoch {meta['epoch'] + 1}")

    def _write_metrics(self):
        """metrics.jsonl is rewritten from the checkpoint's history, so it always agrees with it."""
        lines = "".join(json.dumps(h) + "\n" for h in self.history)
        tmp = self.out / ".metrics.jsonl.tmp"
        tmp.write_text(lines)
        tmp.replace(self.out / "metrics.jsonl")

    # -- the loop ------------------------------------------------------------------------------
    def _resize_to(self, size):
        """What the loaders and `evaluate` are asked to resize to for an epoch at `size`: only a
        smaller size, never the full one, so that images that are not square keep their shape."""
        return size if size != self.mc.image_size else None

    def train_epoch(self, epoch):
        tc, model, opt, crit = self.tc, self.model, self.optimizer, self.criterion
        model.train()
        reseed_dropout(model, tc.seed * 1000 + epoch)
        steps = len(self.train_loader)
        total_steps, warmup = tc.epochs * steps, int(round(tc.warmup_epochs * steps))
        xp = backend.xp()
        K = self.mc.num_classes
        # running sums stay on the device: reading one back waits for the GPU, so they are read
        # together once per logging interval, not every step
        loss_sum, correct, bad, seen = xp.zeros(()), xp.zeros(()), xp.zeros(()), 0
        size = tc.train_size(epoch, self.mc.image_size)
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{tc.epochs} at {size}x{size}",
                   disable=not self.progress, leave=False)
        start = time.perf_counter()
        for i, (x, y) in enumerate(self.train_loader.epoch(epoch, self._resize_to(size))):
            opt.lr = cosine_lr(epoch * steps + i, total_steps, tc.lr, warmup, tc.min_lr)
            model.zero_grad()
            logits = model.forward(x)
            loss = crit.forward(logits, y)
            model.backward(crit.backward())
            if tc.clip_grad:
                clip_grad_norm(model.parameters(), tc.clip_grad)
            opt.step()
            loss_sum += loss * len(y)
            correct += (logits.argmax(axis=1) == y).sum()
            bad += F.label_errors(y, K)
            seen += len(y)
            # the first step too: the bar shows the loss from its first update
            if i == 0 or i % self.log_every == self.log_every - 1 or i == steps - 1:
                host_loss, host_correct, host_bad = read_back(loss_sum, correct, bad)
                if host_bad:
                    raise ValueError(f"{int(host_bad)} training labels of epoch {epoch + 1} (up to step "
                                     f"{i + 1}) lie outside [0, {K}); the labels must be class indices")
                mean_loss = host_loss / seen
                if not math.isfinite(mean_loss):
                    raise DivergedError(f"loss became {mean_loss} in epoch {epoch + 1}, step {i + 1}; the last "
                                        f"good checkpoint is {self.out / 'last.npz'} (try a lower --lr)")
                bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{host_correct / seen:.3f}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}")
            bar.update(1)
        backend.synchronize()
        bar.close()
        seconds = time.perf_counter() - start
        return {"image_size": size, "train_loss": host_loss / seen, "train_acc": host_correct / seen,
                "seconds": seconds, "images_per_s": seen / seconds, "lr": opt.lr}

    def fit(self):
        self.out.mkdir(parents=True, exist_ok=True)
        for epoch in range(self.start_epoch, self.tc.epochs):
            record = {"epoch": epoch + 1, **self.train_epoch(epoch)}
            if self.val_loader is not None:
                # at the epoch's training size: a model half-way through the small epochs is
                # judged on images like the ones it is learning from
                val_loss, val_acc, _ = evaluate(self.model, self.val_loader, len(self.classes), self.progress,
                                                flip=self.tc.eval_flip, size=self._resize_to(record["image_size"]))
                record.update(val_loss=val_loss, val_acc=val_acc)
            self.history.append(record)
            # best.npz among the epochs at full size, where the validation score is the one
            # `minicvt eval` reproduces (a smaller epoch's is of smaller images)
            improved = (record["image_size"] == self.mc.image_size
                        and record.get("val_acc", -record["train_loss"]) > self.best_acc)
            if improved:
                self.best_acc = record.get("val_acc", -record["train_loss"])
            save_checkpoint(self.out / "last.npz", self.model, self.optimizer, self._meta(epoch))
            if improved:
                save_checkpoint(self.out / "best.npz", self.model, None, self._meta(epoch))
            self._write_metrics()
            plot_curves(self.history, self.out / "curves.png")
            self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        return self.history


def is_training_data(images, labels, meta):
    """Whether these are the images the run was trained on (its training images and held-out
    split both): by the fingerprint its checkpoint keeps, or for an older checkpoint without
    one, by their number."""
    if "data_fingerprint" in meta:
        return data.fingerprint(images, labels) == meta["data_fingerprint"]
    return len(labels) == meta["num_images"]


def held_out(images, labels, meta, data_path):
    """The run's validation images and labels, (V, 3, H, W) and (V,), re-created from the
    checkpoint metadata `meta` (the split's size and seed) on the data it was trained on."""
    if not is_training_data(images, labels, meta):
        raise ValueError(f"--split val needs the data the run was trained on ({meta['num_images']} images), "
                         f"but {data_path} holds other images ({len(labels)}); leave --split out (or "
                         f"give --split all) to score all of them")
    tc = meta["train_config"]
    _, idx = data.split_indices(len(labels), tc["val_size"], tc["seed"])
    return images[idx], labels[idx]


def evaluate_checkpoint(path, data_path, split=None, batch_size=500, cache_dir=None, progress=False, flip=None):
    """(loss, accuracy, per-class accuracy, class names, images evaluated, split) of the
    checkpoint at path on data_path. split 'val' re-creates the run's held-out split (the same
    data, seed and size it was trained with), 'all' uses every image, 'test' the official
    archive's test batch (other data has none: refused). None: 'val' on the run's own training
    data, 'all' on any other. flip: score each image with its mirror; None: as the run's
    validation did (TrainConfig.eval_flip)."""
    from .models import from_checkpoint
    model_state, _, meta = load_checkpoint(path)
    tc = TrainConfig.from_saved(meta["train_config"])
    if split == "test" and Path(data_path).exists() and not data.has_test_split(data_path):
        raise data.DataError(f"--split test: {data_path} has no test split (only 'cifar10' and the official "
                             f"archive cifar-10-python.tar.gz have one); --split all scores every image of it")
    images, labels, classes = data.load_dataset(data_path, split="test" if split == "test" else "train",
                                                cache_dir=cache_dir, progress=progress)
    if list(classes) != meta["classes"]:
        raise CheckpointError(f"{path} was trained on classes {meta['classes']}, but {data_path} has {list(classes)}")
    if split is None:
        split = "val" if is_training_data(images, labels, meta) else "all"
    if split == "val":
        images, labels = held_out(images, labels, meta, data_path)
    model = from_checkpoint(model_state, meta, path, np.dtype(tc.dtype))
    norm = meta["normalization"]
    loader = data.Loader(images, labels, batch_size, norm["mean"], norm["std"], dtype=np.dtype(tc.dtype))
    flip = tc.eval_flip if flip is None else flip          # by default as the run validated
    loss, acc, per_class = evaluate(model, loader, len(classes), progress, flip=flip)
    return loss, acc, per_class, list(classes), len(labels), split


def plot_curves(history, path):
    """Loss and accuracy per epoch (train and validation) to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    b.plot(ep, [h["train_acc"] for h in history], "o-", label="train")
    if "val_loss" in history[0]:
        a.plot(ep, [h["val_loss"] for h in history], "o-", label="validation")
        b.plot(ep, [h["val_acc"] for h in history], "o-", label="validation")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    b.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    sizes = [h.get("image_size") for h in history]
    # progressive resizing: where the image size changes, a dashed line and the new size
    starts = [i for i, size in enumerate(sizes) if size is not None and (i == 0 or size != sizes[i - 1])]
    for ax in (a, b):
        ax.grid(alpha=0.3)
        if len(starts) > 1:
            for i in starts:
                if i:
                    ax.axvline(ep[i] - 0.5, color="gray", linestyle="--", linewidth=0.8)
                ax.text(ep[i] - 0.4, 0.02, f"{sizes[i]}×{sizes[i]}", transform=ax.get_xaxis_transform(),
                        fontsize=8, color="gray")
        ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
