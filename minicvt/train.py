"""Training a CvT on an image dataset (CIFAR-10 by default).

The loop itself is the five lines every trainer has (`Trainer.train_epoch`):

    model.zero_grad()
    logits = model.forward(x)                    # (B, K)
    loss = criterion.forward(logits, y)          # scalar
    model.backward(criterion.backward())         # fills every param.grad
    optimizer.step()

Around it, what a real run needs: the learning rate set every step and the image size every
epoch (schedules.py: cosine with warm-up, progressive resizing), running sums of the loss read
back from the device every 2 seconds for the progress bar, a stop on a NaN loss or a bad label, and after
every epoch an evaluation (evaluation.py), metrics appended to metrics.jsonl, curves drawn to
curves.png (viz/curves.py), and atomic checkpoints (checkpoint.py): best.npz when validation
accuracy improves, then last.npz. last.npz is also written inside an epoch, every few minutes
(`save_every`), and when SIGINT or SIGTERM asks the run to stop (stopping.py). `resume`
continues from it exactly, from the middle of an epoch too: the data order of epoch e depends
only on (seed, e), the augmentation and dropout masks of its step i only on (seed, e, i)
(backend.BackendRNG's keyed streams), and the checkpoint holds the step and the epoch's running
sums. A run folder is never overwritten by a new run (run_folder.py). `--minutes` plans the
number of epochs first (planner.py).

Under `mpiexec -n N` the same loop runs as N ranks (docs/distributed.md): each takes its slice of
every global batch (data.Loader's shard), draws its masks for the whole batch (BackendRNG.share),
normalises with the global batch's BatchNorm statistics (nn.SyncBatchNorm2d), and all-reduces
its gradients (one flat buffer, distributed.flatten_grads) between backward and the clipping,
so that every rank takes the step one process would take. The running sums, a stop asked for
by a signal on any rank, and a save due on rank 0's clock travel together in one small
all-reduce per logging interval (`_read_progress`). Rank 0 alone writes and prints.
"""
import json
import math
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import backend, data, distributed, nn, run_folder, schedules
from . import functional as F
from .checkpoint import (CheckpointError, atomic_write, load_checkpoint, read_meta, remove_temporaries,
                         save_checkpoint)
from .evaluation import evaluate
from .models import CvTConfig, build_model, get_config, load
from .optim import clip_grad_norm, make_optimizer
from .planner import plan_epochs
from .stopping import Interrupted, StopSignals
from .train_config import TrainConfig
from .viz import plot_curves


class DivergedError(RuntimeError):
    """The loss became NaN or infinite."""


class EpochSums:
    """An epoch's running sums of the training loss, correct answers and bad labels, kept on
    the device: reading one back waits for the GPU, so they are read together, once per
    logging interval, not every step. Also the images seen and the seconds spent. A checkpoint
    inside the epoch stores them (`state`) and a resumed epoch starts from them (`saved`):
    float64 both ways, so one process's mean loss is bit for bit the uninterrupted run's.
    Under several ranks each holds the sums of its own slices (rank 0 also the saved ones) and
    `totals`, set by the trainer's reduction, are the global ones; `seen` counts whole batches."""

    def __init__(self, saved=None, rank=0, size=1):
        saved, xp = saved or {}, backend.xp()
        mine = saved if rank == 0 else {}                  # saved sums are global: added in once
        self.loss_sum = xp.asarray(mine.get("loss_sum", 0.0), dtype=xp.float64)
        self.correct = xp.asarray(mine.get("correct", 0.0), dtype=xp.float64)
        self.bad = xp.asarray(mine.get("bad", 0.0), dtype=xp.float64)
        self.seen, self.size = saved.get("seen", 0), size
        self.totals = None                                 # (loss sum, correct, bad) of all ranks
        self.earlier = saved.get("seconds", 0.0)          # spent before the run was stopped
        self.start = time.perf_counter()

    def add(self, loss, logits, y, num_classes):
        """One step's loss (scalar), logits (b, K) and labels (b,) of this rank's slice."""
        self.loss_sum += loss * len(y)
        self.correct += (logits.argmax(axis=1) == y).sum()
        self.bad += F.label_errors(y, num_classes)
        self.seen += len(y) * self.size                    # the global batch

    def seconds(self):
        return self.earlier + time.perf_counter() - self.start

    def read(self):
        """(loss sum, correct, bad labels) of this rank as host floats, in one read-back."""
        return backend.read_back(self.loss_sum, self.correct, self.bad)

    def state(self):
        """The global sums of the last reduction, for a checkpoint (saves follow a reduction)."""
        loss_sum, correct, bad = self.totals
        return {"loss_sum": loss_sum, "correct": correct, "bad": bad, "seen": self.seen, "seconds": self.seconds()}


def _quiet(*args, **kwargs):
    """The log of ranks other than 0: one rank speaks for all."""


def check_ranks(batch_size, ranks):
    """Refuse a global batch that the ranks cannot share equally (equal slices: the mean of their
    gradients is then the batch's gradient)."""
    if batch_size < ranks:
        raise ValueError(f"--batch-size {batch_size} is smaller than the {ranks} ranks: each rank takes an "
                         f"equal slice of every batch and needs at least one image; give --batch-size {ranks} "
                         f"or a multiple of it")
    if batch_size % ranks:
        raise ValueError(f"--batch-size {batch_size} does not divide among {ranks} ranks: each rank takes "
                         f"an equal slice of every batch; give a multiple of {ranks}, such as "
                         f"{batch_size - batch_size % ranks}")


class Trainer:
    """Holds the data, model, optimiser and output folder of one run."""

    def __init__(self, tc, out_dir, model_config=None, progress=True, log=print, cache_dir=None,
                 log_seconds=2.0, resuming=False, overwrite=False, save_every=run_folder.DEFAULT_SAVE_EVERY,
                 world=None):
        """resuming: the weights will come from resume(), so tc.init_from is not read again
        (it may have moved since the run began). Otherwise out_dir must not hold a run, unless
        overwrite (fit() then deletes it first). save_every: how often last.npz is written
        inside an epoch, '5m', '90s' or a number of steps (run_folder.parse_save_every).
        world: this process's rank among several (distributed.init; default distributed.world())."""
        began = time.perf_counter()           # a --minutes budget counts the data loading too
        self.world = world = world or distributed.world()
        rank, size = world.rank, world.size
        self.tc, self.out, self.log_seconds = tc, Path(out_dir), log_seconds
        self.progress, self.log = progress and rank == 0, (log if rank == 0 else _quiet)
        self.save_steps, self.save_seconds = run_folder.parse_save_every(save_every)
        self.overwrite = overwrite and not resuming
        check_ranks(tc.batch_size, size)
        if not resuming and rank == 0:        # before the data loads: a mistake costs nothing
            run_folder.check_new(self.out, overwrite)
        self.dtype = np.dtype(tc.dtype)
        images, labels, classes = data.load_dataset(tc.data, cache_dir=cache_dir, progress=self.progress)
        self.classes, self.num_images = list(classes), len(labels)
        if len(classes) < 2:
            raise data.DataError(f"--data {tc.data}: it has one class ({classes[0]!r}); a classifier needs "
                                 f"two or more (one folder per class)")
        if tc.val_size >= len(labels):
            raise ValueError(f"--val-size {tc.val_size} holds out every one of the {len(labels)} images "
                             f"of {tc.data}; give a smaller --val-size")
        train_idx, val_idx = data.run_split(len(labels), tc.val_size, tc.seed, tc.limit_train)
        self.val_idx = val_idx
        self.data_fingerprint = data.fingerprint(images, labels)     # eval knows its own data by it
        mean, std = data.channel_stats(images, train_idx)     # in chunks: the set is never copied
        self.norm = {"mean": mean.tolist(), "std": std.tolist()}
        # every rank draws the same order and takes its slice of each batch (shard)
        self.train_loader = data.Loader(images, labels, tc.batch_size, mean, std, indices=train_idx,
                                        shuffle=True, augment=tc.augment, crop_padding=tc.crop_padding,
                                        drop_last=True, seed=tc.seed, dtype=self.dtype, shard=(rank, size))
        if len(self.train_loader) == 0:         # batches are full (drop_last): none would be drawn
            raise ValueError(f"--batch-size {tc.batch_size} is larger than the {len(train_idx)} "
                             f"training images of {tc.data}; give a smaller --batch-size")
        # validation: each rank scores its share of the held-out images; evaluate adds the sums
        self.val_loader = data.Loader(images, labels, tc.eval_batch_size, mean, std, dtype=self.dtype,
                                      indices=np.array_split(val_idx, size)[rank]) if len(val_idx) else None
        self.mc = model_config or get_config(tc.model, num_classes=len(classes),
                                             image_size=int(images.shape[-1]))
        if labels.min() < 0 or labels.max() >= self.mc.num_classes:     # once, on the host
            raise ValueError(f"{tc.data}: labels range over [{labels.min()}, {labels.max()}] but the "
                             f"model has {self.mc.num_classes} classes")
        tc.resolution_plan(self.mc.image_size)        # a size larger than the images fails here
        self.model = build_model(self.mc, seed=tc.seed, dtype=self.dtype)   # the same on every rank
        self.model.drop_rng.share(rank, size)     # dropout and drop-path masks: the global batch's
        # an MPI or NCCL World makes its collectives even alone (the GPU report's one-rank NCCL run)
        self.joined = not isinstance(world, distributed.SingleProcess)
        if self.joined and tc.sync_bn:
            nn.convert_sync_batchnorm(self.model, world)
        self.flat = None              # the gradients' flat buffer (joined ranks): made by train_epoch
        if tc.init_from and not resuming:
            self._init_from(tc.init_from)
        self.optimizer = make_optimizer(tc, self.model)
        # no label check that reads back every step: the loop counts bad labels on the device
        self.criterion = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing, check_labels=False)
        self.start_epoch, self.best_acc, self.history = 0, -1.0, []
        self.position = None          # where resume() found a run stopped inside an epoch
        self.last_saved = None        # "DIR/last.npz (after epoch 3 of 24)": named when a run fails
        self._saved_at = time.monotonic()                  # --save-every's clock
        if tc.minutes and not resuming:       # a resumed run keeps the epochs its plan fixed
            # every rank times its own slices at once (they share the machine), rank 0's plan holds
            seconds = tc.minutes * 60 - (time.perf_counter() - began)
            try:
                epochs = plan_epochs(seconds, tc, self.mc, self.train_loader, self.val_loader, self.dtype,
                                     self.log, clock=time.perf_counter)
            except ValueError:            # (not one epoch fits: rank 0's verdict is the one said)
                if rank == 0:
                    raise
                epochs = 0
            self.tc = replace(tc, epochs=int(world.broadcast(np.array([epochs]))[0]))

    def _init_from(self, path):
        """Start from the weights of a checkpoint or model file of the same architecture (a
        new run: its own optimiser state and schedule)."""
        source = load(path)
        if source.config != self.mc:
            diff = {k: (v, getattr(self.mc, k)) for k, v in asdict(source.config).items()
                    if getattr(self.mc, k) != v}
            raise CheckpointError(f"--init-from {path}: its model differs from this run's "
                                  f"(file vs this run: {diff}); give the same --config and data")
        self.model.load_state_dict(source.state_dict())
        self._warn_if_validation_was_trained_on(path)

    def _warn_if_validation_was_trained_on(self, path):
        """A checkpoint of a run on these same images, held out with another seed or size:
        some of this run's validation images taught the starting weights, so its validation
        accuracy would read high. Said in one line, with the settings that avoid it."""
        try:
            meta, _ = read_meta(path)
        except CheckpointError:               # a models.save file: nothing known of its data
            return
        saved = meta.get("train_config", {})
        if meta.get("data_fingerprint") != self.data_fingerprint or "val_size" not in saved:
            return
        seed, val_size = saved.get("seed", 0), saved["val_size"]
        trained_on, _ = data.run_split(self.num_images, val_size, seed, saved.get("limit_train", 0))
        seen = np.intersect1d(self.val_idx, trained_on).size
        if seen:
            self.log(f"warning: {seen} of this run's {len(self.val_idx)} validation images are among those "
                     f"the starting weights ({path}) trained on, so its validation accuracy will read high; "
                     f"give --seed {seed} --val-size {val_size} to hold out the images that run held out")

    # -- checkpoints ---------------------------------------------------------------------------
    def _meta(self, epoch, position=None):
        """The checkpoint's metadata after (0-based) epoch `epoch` has finished; `position`:
        where a save inside epoch + 1 stands (its next step and the running sums)."""
        return {"epoch": epoch, "train_config": asdict(self.tc), "model_config": json.loads(self.mc.to_json()),
                "classes": self.classes, "num_images": self.num_images, "normalization": self.norm,
                "data_fingerprint": self.data_fingerprint,
                "best_acc": self.best_acc,
                "history": self.history,
                "position": position}

    def _save(self, epoch, improved=False, position=None):
        """best.npz first (when improved), then last.npz: a kill between the two leaves the
        new best and the old last, whose resume runs the epoch again and saves both once more.
        (The other order would lose this best model for good.) Nothing is saved from weights
        that are not finite: the run stops instead, naming the last good checkpoint. Every
        rank holds the same weights; rank 0 writes them."""
        self._check_finite(epoch, position)
        meta = self._meta(epoch, position)
        if self.world.rank == 0:
            if improved:
                save_checkpoint(self.out / "best.npz", self.model, None, self._meta(epoch))
            save_checkpoint(self.out / "last.npz", self.model, self.optimizer, meta)
        where = run_folder.describe(meta, self.tc.epochs, len(self.train_loader))
        self.last_saved = f"{self.out / 'last.npz'} ({where})"         # named if the run fails later
        self._saved_at = time.monotonic()

    def _check_finite(self, epoch, position):
        xp = backend.xp()
        arrays = [p.data for p in self.model.parameters()] + list(self.optimizer.state.values())
        (finite,) = backend.read_back(xp.stack([xp.isfinite(a).all() for a in arrays]).all())
        if not finite:
            where = (f"epoch {position['epoch'] + 1}, step {position['step']}" if position
                     else f"epoch {epoch + 1}")
            raise DivergedError(f"the weights became NaN or infinite in {where}; {self._last_good()}")

    def _last_good(self):
        if self.last_saved is None:
            return "no checkpoint was saved yet; try a lower --lr"
        return f"the last good checkpoint is {self.last_saved}; try a lower --lr"

    def resume(self):
        """Continue from out/last.npz: weights, optimiser state, history, and where it stopped
        (after an epoch, or inside one: its step and running sums)."""
        path = run_folder.last_checkpoint(self.out)
        model_state, optim_state, meta = load_checkpoint(path)
        saved = asdict(TrainConfig.from_saved(meta["train_config"]))
        if saved != asdict(self.tc):
            diff = {k: (saved.get(k), v) for k, v in asdict(self.tc).items() if saved.get(k) != v}
            raise CheckpointError(f"{path} was written by a run with other settings "
                                  f"(saved vs now: {diff}); use another --out or the same settings")
        if meta.get("data_fingerprint", self.data_fingerprint) != self.data_fingerprint:
            # other images would give other batches: the run would not continue, it would change
            raise CheckpointError(f"{path} was written by a run on other images than --data {self.tc.data} "
                                  f"holds now (a folder that gained or lost images?); resume it on the "
                                  f"same data, or start a new run with --init-from {path}")
        saved_mc = CvTConfig.from_json(json.dumps(meta["model_config"]))
        if saved_mc != self.mc:
            diff = {k: (v, getattr(self.mc, k)) for k, v in asdict(saved_mc).items() if getattr(self.mc, k) != v}
            raise CheckpointError(f"{path} holds a different model configuration (saved vs now: {diff})")
        run_folder.check_resumable(self.out, meta, self.tc.epochs)
        position = meta.get("position")
        if position and (position["epoch"] != meta["epoch"] + 1 or position["step"] >= len(self.train_loader)):
            raise CheckpointError(f"{path}: its position (epoch {position['epoch'] + 1}, step {position['step']}) "
                                  f"is not inside epoch {meta['epoch'] + 2} of {len(self.train_loader)} steps")
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optim_state)
        self._use_normalisation(meta.get("normalization"))
        self.best_acc, self.history, self.position = meta["best_acc"], meta["history"], position
        self.start_epoch, _ = run_folder.position(meta)
        self._write_metrics()
        where = run_folder.describe(meta, self.tc.epochs, len(self.train_loader))
        self.last_saved = f"{path} ({where})"
        self.log(f"resumed from {path} {where}")

    def _use_normalisation(self, saved):
        """A resumed run normalises with the statistics its checkpoint keeps: those of the images
        it began on, as computed then (a later minicvt may add them up in another order)."""
        if saved is None:
            return
        self.norm = {"mean": list(saved["mean"]), "std": list(saved["std"])}
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                loader.mean = backend.to_device(np.asarray(saved["mean"]), dtype=self.dtype)
                loader.std = backend.to_device(np.asarray(saved["std"]), dtype=self.dtype)

    def _write_metrics(self):
        """metrics.jsonl is rewritten from the checkpoint's history, so it always agrees with it."""
        if self.world.rank != 0:
            return
        lines = "".join(json.dumps(h) + "\n" for h in self.history)
        atomic_write(self.out / "metrics.jsonl", lambda f: f.write(lines.encode()))

    # -- the loop ------------------------------------------------------------------------------
    def _resize_to(self, size):
        """What the loaders and `evaluate` are asked to resize to for an epoch at `size`: only a
        smaller size, never the full one, so that images that are not square keep their shape."""
        return size if size != self.mc.image_size else None

    def _save_due(self, global_step):
        """Whether to save after step `global_step` (0-based, counted over the whole run)."""
        if self.save_steps:
            return (global_step + 1) % self.save_steps == 0
        return time.monotonic() - self._saved_at >= self.save_seconds

    def train_epoch(self, epoch, stop=None):
        """One pass over the training images (from where a resumed run stopped inside it); ->
        the epoch's record (its image size, mean training loss and accuracy, seconds, images
        per second, last learning rate). stop: a StopSignals, looked at after every step (under
        several ranks, at every reduction: `_read_progress`)."""
        tc, model, optimizer, criterion = self.tc, self.model, self.optimizer, self.criterion
        stop, single = stop or StopSignals(), self.world.size == 1    # (one never entered is never requested)
        model.train()
        steps = len(self.train_loader)
        total_steps, warmup = tc.epochs * steps, int(round(tc.warmup_epochs * steps))
        size = tc.train_size(epoch, self.mc.image_size)
        resumed = self.position if self.position and self.position["epoch"] == epoch else None
        self.position = None
        first, sums = (resumed["step"] if resumed else 0), EpochSums(resumed, self.world.rank, self.world.size)
        if self.joined and self.flat is None:
            # made here, after resume's and --init-from's load_state_dict (they give the
            # gradients new arrays; FlatGrads.allreduce checks that none has had one since)
            self.flat = distributed.flatten_grads(self.model.parameters())
        batches, read_at = self.train_loader.epoch(epoch, self._resize_to(size), start=first), time.monotonic()
        next_read = first
        # `with`: the bar is closed (its line cleared) however the epoch ends, so that an error
        # or the resume command is printed on a line of its own
        with tqdm(total=steps, initial=first, desc=f"epoch {epoch + 1}/{tc.epochs} at {size}x{size}",
                  disable=not self.progress, leave=False) as bar:
            for i, (x, y) in enumerate(batches, start=first):
                optimizer.lr = schedules.cosine_lr(epoch * steps + i, total_steps, tc.lr, warmup, tc.min_lr)
                model.drop_rng.at(epoch, i)              # this step's dropout masks: keyed (seed, epoch, i)
                model.zero_grad()
                logits = model.forward(x)                # (b, K): this rank's slice of the batch
                loss = criterion.forward(logits, y)      # scalar
                model.backward(criterion.backward())     # fills every param.grad
                if self.flat is not None:
                    self.flat.allreduce(self.world, "mean")   # every rank: the global batch's gradient
                if tc.clip_grad:
                    clip_grad_norm(model.parameters(), tc.clip_grad)    # the global norm on every rank
                optimizer.step()

                sums.add(loss, logits, y, self.mc.num_classes)
                # every log_seconds, and at the first step (the bar shows the loss from its first
                # update) and the last: one read-back each, never one a step. One process goes by
                # its clock; ranks must meet at the same steps, so rank 0 names the next one
                agreed = None
                if i in (first, steps - 1) or (time.monotonic() - read_at >= self.log_seconds if single
                                               else i >= next_read):
                    read_at = time.monotonic()
                    train_loss, train_acc, agreed = self._read_progress(epoch, i, sums, stop, i - first + 1)
                    next_read = i + agreed["gap"]
                    bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{train_acc:.3f}",
                                    img_s=f"{sums.seen / sums.seconds():.0f}")
                bar.update(1)
                if i == steps - 1:       # saved with the epoch, after its validation
                    self._stop_agreed = agreed["stop"]
                    continue
                stopping, saving = self._stop_or_save(agreed, stop, epoch * steps + i)
                if stopping or saving:
                    if agreed is None:   # the sums of a save, read (and a NaN loss stops the run, unsaved)
                        self._read_progress(epoch, i, sums, stop, i - first + 1)
                    self._save(epoch - 1, position={"epoch": epoch, "step": i + 1, **sums.state()})
                    if stopping:
                        self.world.barrier()      # no rank leaves while rank 0 still writes
                        raise self._interrupted(stop, f"in epoch {epoch + 1} after step {i + 1} of {steps}")
        backend.synchronize()
        seconds = sums.seconds()
        return {"image_size": size, "train_loss": train_loss, "train_acc": train_acc,
                "seconds": seconds, "images_per_s": sums.seen / seconds, "lr": optimizer.lr}

    def _stop_or_save(self, agreed, stop, global_step):
        """(stop, save) after step `global_step`. One process decides alone, after every step: a
        signal, or a save due by its clock or its count of steps. Ranks decide only where they
        met (`agreed`, None elsewhere), except for a save every N steps, which each counts alike."""
        if self.world.size == 1:
            return stop.requested, self._save_due(global_step)
        every_n = bool(self.save_steps) and self._save_due(global_step)
        if agreed is None:
            return False, every_n
        return agreed["stop"], agreed["save"] or every_n

    def _interrupted(self, stop, where):
        """The Interrupted a stop raises: this rank's own signal, or the one the ranks agreed on."""
        number = int(stop.signal_number or self._agreed_signal)
        by = signal.Signals(number).name + ("" if stop.requested else " (to another rank)")
        return Interrupted(f"stopped by {by} {where}; saved {self.out / 'last.npz'}", number)

    def _read_progress(self, epoch, step, sums, stop=None, steps_done=1):
        """(mean loss, accuracy, agreed) of the epoch's images so far, from the device's running
        sums in one read-back; a label outside the classes or a loss that is not finite stops
        the run here. Under several ranks this is where they meet, once per logging interval:
        one all-reduce of a few host numbers carries every rank's sums, whether a signal asked
        any of them to stop, and rank 0's word on a timed save and on the step of the next
        meeting (from its clock: about log_seconds ahead). agreed: {"stop", "save", "gap"}."""
        rank0 = self.world.rank == 0
        signalled = stop.signal_number if stop is not None and stop.requested else None
        per_step = max(sums.seconds() - sums.earlier, 1e-9) / steps_done
        # summed over the ranks: the sums add up, a count > 0 means some rank raised its flag, and
        # what only rank 0 says (the others add 0) stays rank 0's
        mine = dict(zip(("loss_sum", "correct", "bad"), sums.read()),
                    sigint=signalled == signal.SIGINT, sigterm=signalled == signal.SIGTERM,
                    save=rank0 and not self.save_steps and time.monotonic() - self._saved_at >= self.save_seconds,
                    gap=max(1, int(self.log_seconds / per_step)) if rank0 else 0)
        shared = dict(zip(mine, map(float, self.world.allreduce(np.array(list(mine.values()), dtype=np.float64)))))
        loss_sum, correct, bad = sums.totals = (shared["loss_sum"], shared["correct"], shared["bad"])
        agreed = {"stop": shared["sigint"] + shared["sigterm"] > 0, "save": shared["save"] > 0,
                  "gap": int(shared["gap"])}
        # the signal a rank that saw none names: SIGTERM if any rank had it (a scheduler's), else SIGINT
        self._agreed_signal = signal.SIGTERM if shared["sigterm"] else signal.SIGINT
        K = self.mc.num_classes
        if bad:
            raise ValueError(f"{int(bad)} training labels of epoch {epoch + 1} (up to step "
                             f"{step + 1}) lie outside [0, {K}); the labels must be class indices")
        mean_loss = loss_sum / sums.seen
        if not math.isfinite(mean_loss):
            raise DivergedError(f"loss became {mean_loss} in epoch {epoch + 1}, step {step + 1}; "
                                f"{self._last_good()}")
        return float(mean_loss), float(correct / sums.seen), agreed

    def fit(self):
        """Train from start_epoch to the end; -> the history. SIGINT or SIGTERM stops it after
        the step it is in, saved: Interrupted."""
        world = self.world
        if world.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.overwrite:
                run_folder.clear(self.out)
            remove_temporaries(self.out, run_folder.OUTPUTS)   # left by a save that was killed: never read
        self.overwrite = False
        self._saved_at = time.monotonic()
        with StopSignals() as stop:
            for epoch in range(self.start_epoch, self.tc.epochs):
                record = {"epoch": epoch + 1, **self.train_epoch(epoch, stop)}
                self._share_running_stats()
                if self.val_loader is not None:
                    # at the epoch's training size: a model half-way through the small epochs is
                    # judged on images like the ones it is learning from
                    val_loss, val_acc, _ = evaluate(self.model, self.val_loader, len(self.classes), self.progress,
                                                    flip=self.tc.eval_flip, size=self._resize_to(record["image_size"]),
                                                    world=world)
                    record.update(val_loss=val_loss, val_acc=val_acc)
                self.history.append(record)
                # best.npz among the epochs at full size, where the validation score is the one
                # `minicvt eval` reproduces (a smaller epoch's is of smaller images)
                improved = (record["image_size"] == self.mc.image_size
                            and record.get("val_acc", -record["train_loss"]) > self.best_acc)
                if improved:
                    self.best_acc = record.get("val_acc", -record["train_loss"])
                self._save(epoch, improved)
                self._write_metrics()
                if world.rank == 0:
                    plot_curves(self.history, self.out / "curves.png")
                self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in record.items()))
                # one process: a signal up to now, validation included; ranks: as agreed at the last step
                stopping = stop.requested if world.size == 1 else self._stop_agreed
                if stopping and epoch + 1 < self.tc.epochs:
                    world.barrier()               # rank 0 has written before any rank exits
                    raise self._interrupted(stop, f"after epoch {epoch + 1} of {self.tc.epochs}")
        return self.history

    def _share_running_stats(self):
        """With --no-sync-bn each rank's BatchNorm running statistics are of its own slices: rank
        0's are given to all (as PyTorch's DDP broadcasts its buffers), so that validation and the
        checkpoint use one model. (SyncBatchNorm keeps them identical by itself.)"""
        if self.world.size > 1 and not self.tc.sync_bn:
            for _, buffer in self.model.named_buffers():
                self.world.broadcast(buffer)
