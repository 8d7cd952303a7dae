"""`minicvt train --minutes M`: how many epochs fit in M minutes on this machine.

Each image size of the run's resizing schedule is timed on a throwaway model of the same
configuration, an epoch's time is predicted from those timings, and the largest number of
epochs whose predicted time fits is the plan. The run's own model and random streams are not
touched, so a planned run then is exactly the run `--epochs N` would give (docs/training.md).
"""
import time

import numpy as np

from . import backend, data, nn
from .models import build_model
from .optim import make_optimizer
from .schedules import resolution_plan

PLAN_RESERVE = 0.05              # of a --minutes budget, kept for what plan_epochs does not time
PLAN_WARMUP, PLAN_STEPS = 2, 3   # steps per image size that plan_epochs runs untimed, then times
MAX_PLANNED_EPOCHS = 100_000


def plan_epochs(seconds, tc, model_config, train_loader, val_loader, dtype, log=print, clock=time.perf_counter):
    """The most epochs of the run `tc` (a TrainConfig) that fit in `seconds`. Each image size of
    the schedule is timed on a throwaway model of `model_config`: PLAN_WARMUP warm-up steps (the
    first steps at a new shape allocate their arrays), then the median of PLAN_STEPS training
    steps on the first batch of `train_loader`, and an evaluation forward of it. An epoch's
    time is predicted as its steps plus its validation (`val_loader`, or None) at its size;
    what is left of `seconds` after the timing, less PLAN_RESERVE for what is not timed
    (checkpoints, curves), is the budget. clock: seconds, as time.perf_counter."""
    began = clock()                     # the planning's own seconds come out of the budget too
    native = model_config.image_size
    sizes = sorted({side for side, _, _ in resolution_plan(tc.resolutions, native, epochs=10**6)} | {native})
    scratch = build_model(model_config, seed=tc.seed + 1, dtype=dtype)
    optimizer, criterion = make_optimizer(tc, scratch), nn.CrossEntropyLoss(check_labels=False)
    x, y = next(iter(train_loader.epoch(0)))
    val_images = len(val_loader.index) if val_loader is not None else 0
    epoch_s = {}
    for size in sizes:
        xs, times = data.resize(x, size), []
        for _ in range(PLAN_WARMUP + PLAN_STEPS):
            backend.synchronize()
            start = clock()
            scratch.train().zero_grad()
            criterion.forward(scratch.forward(xs), y)
            scratch.backward(criterion.backward())
            optimizer.step()
            backend.synchronize()
            times.append(clock() - start)
        with nn.no_grad():
            scratch.eval().forward(xs)                                   # warm-up
            backend.synchronize()
            start = clock()
            scratch.forward(xs)
            backend.synchronize()
            forward_s = (clock() - start) / len(y)                       # per image
        step_s = float(np.median(times[PLAN_WARMUP:]))
        epoch_s[size] = len(train_loader) * step_s + val_images * forward_s * (2 if tc.eval_flip else 1)

    def predicted(n):                  # seconds of n epochs under the schedule's plan for n
        plan = resolution_plan(tc.resolutions, native, epochs=n)
        small = sum((end - start) * epoch_s[size] for size, start, end in plan)
        return small + (n - (plan[-1][2] if plan else 0)) * epoch_s[native]
    budget, n = (seconds - (clock() - began)) * (1 - PLAN_RESERVE), 0
    while n < MAX_PLANNED_EPOCHS and predicted(n + 1) <= budget:
        n += 1
    timings = ", ".join(f"{epoch_s[size]:.0f} s at {size}x{size}" for size in sizes)
    if n == 0:
        raise ValueError(f"--minutes {tc.minutes:g}: not one epoch fits ({timings} an epoch here, "
                         f"after {tc.minutes * 60 - seconds:.0f} s of loading); give more minutes, "
                         f"or fewer images with --limit-train")
    log(f"--minutes {tc.minutes:g}: {n} epochs planned, predicted {predicted(n) / 60:.1f} minutes "
        f"({timings} an epoch, with validation; {PLAN_RESERVE:.0%} kept in reserve)")
    return n
