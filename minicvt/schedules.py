"""What changes over a run: the learning rate (per step) and the image size (per epoch).

    lr = cosine_lr(step, total_steps, base_lr, warmup_steps, min_lr)
    plan = resolution_plan("0.5:0.5,0.75:0.25", native=32, epochs=24)   # [(16, 0, 12), (24, 12, 18)]

Progressive resizing (`--resolutions`) is a list SIZE:FRACTION,... : the first FRACTION of the
epochs train on images of side SIZE, the next part at the next size, and the rest (always at
least the last epoch) at the images' own side. A SIZE below 1 is a fraction of the images'
side (0.5: half); a SIZE of 1 or more is in pixels and a whole number (16 or 16.0: 16x16).
"""
import math

MIN_SIDE = 4            # the smallest training image, in pixels


def cosine_lr(step, total_steps, base_lr, warmup_steps=0, min_lr=0.0):
    """Linear warm-up from base_lr / warmup_steps to base_lr over warmup_steps, then cosine
    decay to min_lr at total_steps. step counts from 0."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, t)))


def parse_resolutions(text):
    """[(size, fraction of the epochs)] of a `--resolutions` text: size an int (pixels) or a
    float in (0, 1) (a fraction of the images' side). ValueError, in one line, for anything
    else."""
    parts, total = [], 0.0
    for part in filter(None, text.replace(" ", "").split(",")):
        try:
            size, fraction = (float(v) for v in part.split(":"))
        except ValueError:
            raise ValueError(f"resolutions: {part!r} is not SIZE:FRACTION (e.g. '0.5:0.5,0.75:0.25' "
                             f"trains 50 % of the epochs at half the image side, then 25 % at three "
                             f"quarters; '16:0.5' gives the size in pixels)") from None
        if not 0 < size < 1:
            if not (size >= MIN_SIDE and size.is_integer()):
                raise ValueError(f"resolutions: {part!r}: SIZE is a fraction of the image side (above 0, "
                                 f"below 1) or, from 1 on, pixels: a whole number of at least {MIN_SIDE}")
            size = int(size)
        if not 0 < fraction <= 1:
            raise ValueError(f"resolutions: {part!r} needs a fraction of the epochs in (0, 1]")
        total += fraction
        if total > 1 + 1e-9:
            raise ValueError(f"resolutions {text!r}: the fractions add up to more than 1")
        parts.append((size, fraction))
    return parts


def resolution_plan(resolutions, native, epochs):
    """[(side in pixels, first epoch, end epoch)] of the schedule `resolutions` for `epochs`
    epochs on images of side `native`, 0-based, end exclusive. Segment k ends at round(its
    cumulative fraction × epochs) (Python's round: halves go to the even number), and never
    later than the last epoch, which is always at the images' own size: the model saved last
    has trained at the size it will be used at."""
    plan, start, total = [], 0, 0.0
    for size, fraction in parse_resolutions(resolutions):
        side = int(round(size * native)) if isinstance(size, float) else size
        if side > native:
            raise ValueError(f"resolutions: {side}x{side} is larger than the {native}x{native} "
                             f"images; progressive resizing trains on smaller ones")
        total += fraction
        end = min(int(round(total * epochs)), epochs - 1)
        plan.append((max(side, MIN_SIDE), start, end))
        start = end
    return plan


def train_size(resolutions, native, epochs, epoch):
    """The side of the training images in (0-based) epoch `epoch`; `native` after the plan."""
    return next((side for side, start, end in resolution_plan(resolutions, native, epochs)
                 if start <= epoch < end), native)
