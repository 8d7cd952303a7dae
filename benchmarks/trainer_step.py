"""Median time of one `minicvt train` step of cvt-cifar-s, alone in its process (no PyTorch).

    python3 benchmarks/trainer_step.py [--batch-size 128] [--steps 9] [--image-size 16 24 32]

The step the trainer runs: zero_grad, forward, cross-entropy with label smoothing 0.1,
backward, AdamW. Random images and labels; float32; NumPy. Prints the median and the minimum
of --steps steps (the first included: it is no slower once the arrays are allocated).
"""
import argparse
import time

import numpy as np

import minicvt
from minicvt import nn
from minicvt.models import build_model
from minicvt.optim import AdamW


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--image-size", type=int, nargs="+", default=[32],
                   help="one or more image sides, timed in turn (progressive resizing trains at 16 and 24)")
    args = p.parse_args()
    model = build_model("cvt-cifar-s")
    opt = AdamW(model.named_parameters(), 1e-3)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    y = np.random.default_rng(2).integers(0, 10, args.batch_size)
    for size in args.image_size:
        x = np.random.default_rng(1).standard_normal((args.batch_size, 3, size, size)).astype(np.float32)
        time_steps(model, opt, crit, x, y, args.steps, size)


def time_steps(model, opt, crit, x, y, steps, size):
    """Time `steps` trainer steps on the batch x (B, 3, size, size), y (B,); print the median."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.zero_grad()
        crit.forward(model.forward(x), y)
        model.backward(crit.backward())
        opt.step()
        times.append((time.perf_counter() - start) * 1e3)
    print(f"minicvt {minicvt.__file__}: trainer step at batch {len(y)}, {size}x{size}: "
          f"median {np.median(times):.1f} ms, min {min(times):.1f} ms over {steps} steps")


if __name__ == "__main__":
    main()
