"""The `minicvt` command (also `python -m minicvt`).

    minicvt check [--backend numpy|cupy]     prove every layer's gradients on this machine
    minicvt summary --config NAME            per-stage tokens, channels, parameters, MACs
    minicvt train --data PATH [options]      train a CvT; --resume continues an interrupted run
    minicvt eval --checkpoint CKPT --data PATH   accuracy and a per-class table
    minicvt attention --checkpoint CKPT (--data PATH | --images FILE ...) --out FIG.png
                                             attention maps (docs/attention_maps.md)

Errors print one line on stderr and exit non-zero.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from . import backend, gradcheck
from . import nn


def _layer_cases(rand):
    """(name, module, inputs, reset) for one representative configuration of every layer."""
    dropout, drop_path = nn.Dropout(0.3), nn.DropPath(0.3)
    cases = [
        ("Conv2d k3 s2 p1", nn.Conv2d(3, 4, 3, stride=2, padding=1), (rand(2, 3, 5, 6),), None),
        ("Conv2d k1", nn.Conv2d(3, 4, 1), (rand(2, 3, 4, 3),), None),
        ("DepthwiseConv2d k3 s2 p1", nn.DepthwiseConv2d(3, 3, stride=2, padding=1, bias=True),
         (rand(2, 3, 5, 6),), None),
        ("Linear on tokens", nn.Linear(6, 5), (rand(2, 4, 6),), None),
        ("BatchNorm2d train", nn.BatchNorm2d(3), (rand(2, 3, 3, 4),), None),
        ("BatchNorm2d eval", nn.BatchNorm2d(3).eval(), (rand(2, 3, 3, 4),), None),
        ("LayerNorm", nn.LayerNorm(6), (rand(2, 4, 6),), None),
        ("GELU (erf)", nn.GELU(), (rand(3, 5),), None),
        ("GELU (tanh)", nn.GELU("tanh"), (rand(3, 5),), None),
        ("QuickGELU", nn.QuickGELU(), (rand(3, 5),), None),
        ("Dropout p=0.3", dropout, (rand(3, 5),), lambda: dropout.rng.seed(7)),
        ("DropPath p=0.3", drop_path, (rand(6, 4, 5),), lambda: drop_path.rng.seed(7)),
        ("AvgPool2d k3 s2 p1 ceil", nn.AvgPool2d(3, 2, 1, ceil_mode=True), (rand(2, 3, 5, 6),), None),
        ("TokenMean", nn.TokenMean(), (rand(2, 4, 6),), None),
        ("Attention Tq=9 Tk=4 h=2", nn.ScaledDotProductAttention(2),
         (rand(2, 9, 8), rand(2, 4, 8), rand(2, 4, 8)), None),
    ]
    dropout.rng, drop_path.rng = backend.BackendRNG(7), backend.BackendRNG(7)
    return cases


def cmd_check(args):
    """Run a float64 gradient check of every layer on the chosen backend and print the errors."""
    xp = backend.set_backend(args.backend)
    rng = np.random.default_rng(args.seed)

    def rand(*shape):
        return backend.to_device(rng.standard_normal(shape), dtype=np.float64)

    tol = 1e-7
    failed = 0
    print(f"float64 gradient checks on backend {args.backend!r} (five-point differences; pass below {tol:g})")
    for name, module, inputs, reset in _layer_cases(rand):
        module.to(dtype=np.float64)
        report = gradcheck.check_module(module, *inputs, reset=reset)
        worst = report.worst()
        ok = report.max_error <= tol
        failed += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {name:<28} max rel_error {report.max_error:.1e}  (worst: {worst.name})")
    labels = xp.asarray(rng.integers(0, 5, size=3))
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    report = gradcheck.check_function(
        lambda z: (loss.forward(z, labels), None), lambda d, _: loss.backward(d), {"logits": rand(3, 5)})
    ok = report.max_error <= tol
    failed += not ok
    print(f"  {'ok  ' if ok else 'FAIL'} {'CrossEntropy (smoothing 0.1)':<28} max rel_error {report.max_error:.1e}")
    print("all gradients agree" if not failed else f"{failed} layer(s) FAILED")
    return 1 if failed else 0


def cmd_summary(args):
    """Print a config's per-stage token grid, channels, parameters and multiply-accumulates."""
    from .models.summary import format_summary
    print(format_summary(args.config, num_classes=args.num_classes, image_size=args.image_size))
    return 0


def cmd_train(args):
    """Train (or, with --resume, continue) a run in --out."""
    from dataclasses import asdict, fields

    from .checkpoint import CheckpointError, load_checkpoint
    from .models import get_config
    from .train import TrainConfig, Trainer

    backend.set_backend(args.backend)
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if args.resume:
        # the run's settings come from its checkpoint; a flag given now must agree with them
        last = Path(args.out) / "last.npz"
        _, optim_state, meta = load_checkpoint(last)
        if not optim_state:
            raise CheckpointError(f"{last} holds no optimiser state (best.npz and inference copies are "
                                  f"saved without it); --resume needs the last.npz its run wrote")
        saved = meta["train_config"]
        clash = {k: (saved[k], v) for k, v in given.items() if saved.get(k) != v}
        if clash:
            raise ValueError(f"--resume: these flags differ from the run in {args.out} "
                             f"(saved, given): {clash}")
        tc = TrainConfig(**saved)
    else:
        tc = TrainConfig(**given)
    get_config(tc.model)      # an unknown name fails now, not after loading (or downloading) the data
    trainer = Trainer(tc, args.out, progress=not args.quiet, cache_dir=args.cache_dir)
    if args.resume:
        trainer.resume()
    print(f"training {tc.model} on {tc.data} with {args.backend}: "
          f"{len(trainer.train_loader) * tc.batch_size} images/epoch, {tc.epochs} epochs -> {args.out}")
    print(json.dumps(asdict(tc)))
    trainer.fit()
    print(f"done: best validation accuracy {trainer.best_acc:.4f}; checkpoints in {args.out}")
    return 0


def cmd_eval(args):
    """Accuracy of a checkpoint on a dataset, with a per-class table."""
    from .train import evaluate_checkpoint

    backend.set_backend(args.backend)
    loss, acc, per_class, classes, n = evaluate_checkpoint(args.checkpoint, args.data, args.split,
                                                          args.batch_size, cache_dir=args.cache_dir)
    print(f"{args.checkpoint} on {args.data} ({args.split} split, {n} images): "
          f"accuracy {acc:.4f}, loss {loss:.4f}")
    print(f"{'class':<14}accuracy")
    for name, a in zip(classes, per_class):
        print(f"{name:<14}{a:.4f}")
    return 0


def cmd_attention(args):
    """Attention figures of a checkpoint on dataset images or the user's own files."""
    from .viz import attention_figures

    backend.set_backend(args.backend)
    paths = attention_figures(args.checkpoint, args.out, args.kind, data_path=args.data,
                              split=args.split, image_files=args.images, index=args.index,
                              query=args.query, cache_dir=args.cache_dir)
    for p in paths:
        print(f"wrote {p}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="minicvt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="prove every layer's gradients against finite differences")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                   help="array backend (default: MINICVT_BACKEND or numpy)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("summary", help="per-stage shapes, parameters and MACs of a named config")
    p.add_argument("--config", required=True,
                   help="cvt-13, cvt-21, cvt-w24, cvt-cifar-s or cvt-cifar-m")
    p.add_argument("--num-classes", type=int, default=None, help="default: the config's")
    p.add_argument("--image-size", type=int, default=None, help="square input side; default: the config's")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("train", help="train a CvT (defaults: see docs/training.md)")
    p.add_argument("--config", dest="model", help="model config (default cvt-cifar-s)")
    p.add_argument("--data", help="'cifar10' (download), the official archive, or an image folder / its tar")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None)
    p.add_argument("--epochs", type=int, help="default 30")
    p.add_argument("--batch-size", type=int, help="default 128")
    p.add_argument("--lr", type=float, help="peak learning rate (default: adamw 1e-3, sgd 0.1)")
    p.add_argument("--min-lr", type=float, help="where the cosine ends (default 0)")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up (default 1)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help="default adamw")
    p.add_argument("--weight-decay", type=float, help="default: adamw 0.05, sgd 5e-4")
    p.add_argument("--label-smoothing", type=float, help="default 0.1")
    p.add_argument("--clip-grad", type=float, help="max gradient norm (0: off)")
    p.add_argument("--val-size", type=int, help="images held out for validation (default 5000)")
    p.add_argument("--limit-train", type=int, help="train on only this many images (quick runs)")
    p.add_argument("--crop-padding", type=int, help="random-crop padding in pixels (default 4)")
    p.add_argument("--no-augment", dest="augment", action="store_const", const=False,
                   help="no random crops or flips")
    p.add_argument("--seed", type=int, help="data split, order, augmentation, weights (default 0)")
    p.add_argument("--dtype", choices=["float32", "float64"], help="default float32")
    p.add_argument("--out", default="runs/cvt", help="output folder (checkpoints, metrics, curves)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.npz")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--cache-dir", help="where 'cifar10' is downloaded and decoded images are cached "
                   "(default: $MINICVT_CACHE, else the user cache folder)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy of a checkpoint, with a per-class table")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", choices=["val", "all", "test"], default="val",
                   help="val: the run's held-out images of --data; all: every image; "
                        "test: the official archive's test batch")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None)
    p.add_argument("--cache-dir", help="where 'cifar10' is downloaded and decoded images are cached "
                   "(default: $MINICVT_CACHE, else the user cache folder)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("attention", help="attention maps of a checkpoint (docs/attention_maps.md)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", help="a dataset, as for train: images are taken from it by --index")
    p.add_argument("--split", choices=["train", "test", "val"], default="test",
                   help="train/test: that part of the official CIFAR-10 archive (an image folder has "
                        "one part); val: the run's held-out images, from the data it was trained on")
    p.add_argument("--index", type=int, nargs="+", metavar="I",
                   help="dataset images to show (default: the first 8 for grid/rollout, 0 for query/cls)")
    p.add_argument("--images", nargs="+", metavar="FILE",
                   help="your own image files instead of --data (central square, resized bicubic)")
    p.add_argument("--kind", choices=["grid", "query", "cls", "rollout"], default="grid",
                   help="grid: rollout over several images with labels; query: every head of every "
                        "block for one query; cls: the class token per head; rollout: per image")
    p.add_argument("--query", type=int, nargs=2, metavar=("ROW", "COL"),
                   help="query pixel in the model's input image (default: the centre)")
    p.add_argument("--out", required=True, help="figure path (.png); query/cls with several "
                   "images write FIG-<image>.png")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None)
    p.add_argument("--cache-dir", help="where 'cifar10' is downloaded and decoded images are cached "
                   "(default: $MINICVT_CACHE, else the user cache folder)")
    p.set_defaults(func=cmd_attention)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "backend", "x") is None:
        args.backend = backend.get_backend()
    from .checkpoint import CheckpointError
    from .data import DataError
    from .train import DivergedError
    try:
        return args.func(args)
    except (backend.BackendError, ValueError, OSError, DataError, CheckpointError,
            DivergedError) as e:     # OSError: a file that cannot be read or written (permissions, full disk)
        # one line, even where a library's message has several (tarfile lists each method it tried)
        message = " ".join(line.strip() for line in str(e).strip().splitlines())
        print(f"minicvt {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = f"; continue with: minicvt train --resume --out {args.out}" if args.command == "train" else ""
        print(f"minicvt {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
