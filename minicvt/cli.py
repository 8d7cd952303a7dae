"""The `minicvt` command (also `python -m minicvt`).

    minicvt check [--backend numpy|cupy]     prove every layer's gradients on this machine
    minicvt summary [--config NAME | --checkpoint FILE]   per-stage tokens, channels, parameters, MACs
    minicvt train --data PATH [options]      train a CvT; --resume continues an interrupted run
    minicvt eval --checkpoint CKPT --data PATH   accuracy and a per-class table
    minicvt predict (--pretrained FOLDER | --checkpoint CKPT) --images FILE ...   the top 5 classes
    minicvt attention --checkpoint CKPT (--data PATH | --images FILE ...) --out FIG.png
    minicvt attention --pretrained FOLDER --images FILE ... --out FIG.png
                                             attention maps (docs/attention_maps.md)

Errors print one line on stderr and exit non-zero.
"""
import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from . import backend, gradcheck, kernels
from .distributed import abort_every_rank, position     # (no MPI import: that waits for init)

# Each command imports what only it uses inside its function, so that the others start without
# loading it (no import cycle requires this).


def cmd_check(args):
    """Run a float64 gradient check of every layer on the chosen backend, with each set of
    kernels asked for (minicvt.kernels), and print the errors."""
    backend.set_backend(args.backend)
    failed = 0
    for kernel_set in kernels.NAMES if args.kernels == "both" else (args.kernels,):
        print(f"float64 gradient checks on backend {args.backend!r}, kernels {kernel_set!r} "
              f"(five-point differences; pass below {gradcheck.TOL:g})")
        with kernels.use(kernel_set):
            failed += gradcheck.run_checks(seed=args.seed)
    print("all gradients agree" if not failed else f"{failed} layer(s) FAILED")
    return 1 if failed else 0


def cmd_summary(args):
    """Print a config's (or a model file's) per-stage token grid, channels, parameters and
    multiply-accumulates; without either, the list of configs."""
    from .models import CONFIGS, count_parameters, load
    from .models.summary import format_summary
    if args.name and args.config and args.name != args.config:
        raise ValueError(f"summary {args.name} --config {args.config}: give one config")
    args.config = args.config or args.name
    if args.config and args.checkpoint:
        raise ValueError("give --config (a named config) or --checkpoint (a model file), not both")
    if args.checkpoint:
        config = load(args.checkpoint).config
    elif args.config:
        config = args.config
    else:
        print("configs (minicvt summary --config NAME for one; --checkpoint FILE for a model file):")
        for name, cfg in CONFIGS.items():
            print(f"  {name:<12} {cfg.image_size}x{cfg.image_size} input, {cfg.num_classes} classes, "
                  f"{count_parameters(cfg) / 1e6:.1f} M parameters")
        return 0
    print(format_summary(config, num_classes=args.num_classes, image_size=args.image_size))
    return 0


def cmd_train(args):
    """Train (or, with --resume, continue) a run in --out."""
    from dataclasses import asdict, fields

    from . import distributed, run_folder
    from .checkpoint import CheckpointError, read_meta
    from .models import get_config
    from .train import TrainConfig, Trainer

    if args.ranks != 1:
        return _start_ranks(args)
    backend.set_backend(args.backend)
    # one process: a World of one; under mpiexec, this rank of several (docs/distributed.md)
    world = distributed.init(args.backend)
    distributed.share_cores(world)
    say = print if world.rank == 0 else (lambda *a, **k: None)      # rank 0 speaks for all
    run_folder.parse_save_every(args.save_every)          # a malformed value fails before any work
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if args.resume:
        if args.overwrite:
            raise ValueError("give --resume (continue the run in --out) or --overwrite (delete it and "
                             "start over), not both")
        # the run's settings come from its checkpoint; a flag given now must agree with them
        last = run_folder.last_checkpoint(args.out)
        meta, has_optimiser = read_meta(last)               # the weights are the Trainer's to load
        if not has_optimiser:
            raise CheckpointError(f"{last} holds no optimiser state (best.npz and inference copies are "
                                  f"saved without it); --resume needs the last.npz its run wrote")
        saved = asdict(TrainConfig.from_saved(meta["train_config"]))   # as the run ran, settings it predates included
        clash = {k: (saved.get(k), v) for k, v in given.items() if saved.get(k) != v}
        if clash:
            raise ValueError(f"--resume: these flags differ from the run in {args.out} "
                             f"(saved, given): {clash}. --resume continues a run with its own settings; "
                             f"to change them, start a new run from its weights: minicvt train "
                             f"--init-from {last} --out NEW_FOLDER (with --data, --epochs and any other "
                             f"settings), or start it over with --overwrite")
        tc = TrainConfig.from_saved(saved)
        run_folder.check_resumable(args.out, meta, tc.epochs)
    else:
        if given.get("minutes") and "epochs" in given:
            raise ValueError("give --epochs or --minutes, not both: --minutes plans the number of epochs")
        tc = TrainConfig(**given)
    get_config(tc.model)      # an unknown name fails now, not after loading (or downloading) the data
    trainer = Trainer(tc, args.out, progress=not args.quiet, cache_dir=args.cache_dir, resuming=args.resume,
                      overwrite=args.overwrite, save_every=args.save_every, world=world)
    if args.resume:
        trainer.resume()
    tc = trainer.tc                 # with --minutes, the number of epochs it planned
    ranks = f" as {world.size} ranks ({tc.batch_size // world.size} images of each batch per rank)" \
        if world.size > 1 else ""
    say(f"training {tc.model} on {tc.data} with {args.backend}{ranks}: "
        f"{len(trainer.train_loader) * tc.batch_size} images/epoch, {tc.epochs} epochs -> {args.out}")
    say(json.dumps(asdict(tc)))
    trainer.fit()
    say(_done_line(trainer, args.out))
    return 0


def _start_ranks(args):
    """`minicvt train --ranks N ...` is `mpiexec -n N minicvt train ...`: this process becomes
    MPI's launcher (exec: a signal to it reaches the launcher, which passes it on to the ranks)."""
    from .distributed import find_mpiexec, launched_ranks
    if args.ranks < 1:
        raise ValueError(f"--ranks must be >= 1, got {args.ranks}")
    if launched_ranks() is not None:
        raise ValueError("--ranks starts the ranks itself: under mpiexec or srun, leave it out")
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise ValueError(f"--ranks {args.ranks}: no mpiexec beside {sys.executable} or on PATH; "
                         f"pip install -e \".[mpi]\" brings one")
    sys.stdout.flush()
    # the same command on each rank; the last --ranks given is the one argparse keeps
    os.execv(mpiexec, [mpiexec, "-n", str(args.ranks), sys.executable, "-m", "minicvt", *args.argv, "--ranks", "1"])


def _done_line(trainer, out):
    """The run's last line: where its best model is, and what 'best' counted (only epochs at
    full size, whose validation accuracy is the one `minicvt eval` reproduces)."""
    full = trainer.mc.image_size
    # (a run from before progressive resizing has no image_size in its records: all at full size)
    best = [h for h in trainer.history if h.get("image_size", full) == full and "val_acc" in h
            and h["val_acc"] == trainer.best_acc]
    if not best:          # --val-size 0: best.npz is the full-size epoch of lowest training loss
        return f"done: no validation images (--val-size 0); checkpoints in {out}"
    smaller = any(h.get("image_size", full) != full for h in trainer.history)
    note = (" (the epochs at smaller sizes validated on smaller images and are not counted)"
            if smaller else "")
    return (f"done: best validation accuracy {trainer.best_acc:.4f} at full size ({full}x{full}), "
            f"epoch {best[0]['epoch']}, in {Path(out) / 'best.npz'}{note}; checkpoints in {out}")


def cmd_eval(args):
    """Accuracy of a checkpoint on a dataset, with a per-class table."""
    from .evaluation import evaluate_checkpoint

    backend.set_backend(args.backend)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    loss, acc, per_class, classes, n, split = evaluate_checkpoint(
        args.checkpoint, args.data, args.split, args.batch_size, cache_dir=args.cache_dir, progress=True,
        flip=False if args.no_flip else None)
    print(f"{args.checkpoint} on {args.data} ({split} split, {n} images): "
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
                              query=args.query, cache_dir=args.cache_dir, pretrained=args.pretrained)
    for p in paths:
        print(f"wrote {p}")
    return 0


BACKEND_HELP = "array backend (default: MINICVT_BACKEND, else numpy)"
CACHE_HELP = ("where 'cifar10' is downloaded and decoded images are cached "
              "(default: $MINICVT_CACHE, else the user cache folder)")


def cmd_predict(args):
    """The top classes of each image file, with their probabilities (model.predict)."""
    from .models import from_pretrained, load

    backend.set_backend(args.backend)
    if (args.checkpoint is None) == (args.pretrained is None):
        raise ValueError("give either --checkpoint (a model minicvt trained) or --pretrained (a Hugging "
                         "Face CvT folder)")
    if args.top < 1:
        raise ValueError(f"--top {args.top}: show at least one class")
    model = from_pretrained(args.pretrained) if args.pretrained is not None else load(args.checkpoint)
    if model.preprocessing is None:
        raise ValueError(f"--checkpoint {args.checkpoint}: a bare model file has no input "
                         f"normalisation; give a checkpoint of `minicvt train`")
    width = max(len(c) for c in model.classes)
    for path, ranked in zip(args.images, model.predict(args.images, top=args.top)):
        print(f"{path}:")
        for name, p in ranked:
            print(f"  {name:<{width}}  {p:.4f}")
    return 0


def build_parser():
    from . import __version__
    from .models import CONFIGS
    configs = ", ".join(CONFIGS)
    parser = argparse.ArgumentParser(prog="minicvt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"minicvt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="prove every layer's gradients against finite differences")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None, help=BACKEND_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the random test inputs (default 0)")
    p.add_argument("--kernels", choices=["both", *kernels.NAMES], default="both",
                   help="check the reference layer functions (minicvt.functional), the fast ones "
                        "(minicvt.fast), or both in turn (default)")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("summary", help="per-stage shapes, parameters and MACs of a named config or a "
                       "model file (without either: the list of configs)")
    p.add_argument("name", nargs="?", metavar="CONFIG", help="a config's name, as --config")
    p.add_argument("--config", help=f"one of: {configs}")
    p.add_argument("--checkpoint", help="or a model file: a checkpoint of `minicvt train`, or a models.save file")
    p.add_argument("--num-classes", type=int, default=None, help="default: the config's")
    p.add_argument("--image-size", type=int, default=None, help="square input side; default: the config's")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("train", help="train a CvT (defaults: see docs/training.md)")
    p.add_argument("--config", dest="model", help=f"model config (default cvt-cifar-s): one of {configs}")
    p.add_argument("--data", help="'cifar10' (the default: downloaded into the cache), the official archive, "
                   "or an image folder ROOT/<class>/*.jpg / its tar")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None, help=BACKEND_HELP)
    p.add_argument("--epochs", type=int, help="default 24 (under an hour on 2 CPU cores)")
    p.add_argument("--minutes", type=float, help="instead of --epochs: as many epochs as fit in this many "
                   "minutes on this machine, loading included (timed at the start, then fixed)")
    p.add_argument("--batch-size", type=int, help="default 128")
    p.add_argument("--lr", type=float, help="peak learning rate (default: adamw 1e-3, sgd 0.1)")
    p.add_argument("--min-lr", type=float, help="where the cosine ends (default 0)")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up (default 1)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help="default adamw")
    p.add_argument("--weight-decay", type=float, help="default: adamw 0.05, sgd 5e-4")
    p.add_argument("--label-smoothing", type=float, help="default 0.1")
    p.add_argument("--clip-grad", type=float, help="max gradient norm (0: off)")
    p.add_argument("--val-size", type=int, help="images held out for validation (default 5000; with "
                   "--limit-train, a fifth of it, from 500 to 5000)")
    p.add_argument("--limit-train", type=int, help="train on only this many images (quick runs)")
    p.add_argument("--crop-padding", type=int, help="random-crop padding in pixels (default 4)")
    p.add_argument("--no-augment", dest="augment", action="store_const", const=False,
                   help="no random crops or flips")
    p.add_argument("--resolutions", metavar="SIZE:FRACTION,...", help="progressive resizing: the default "
                   "'0.5:0.5,0.75:0.25' trains the first 50 %% of the epochs on images resized to half their "
                   "side (16x16 for CIFAR-10), the next 25 %% at three quarters (24x24), the rest at full "
                   "size. A SIZE below 1 is a fraction of the image side; a SIZE of 1 or more is in pixels, "
                   "a whole number of at least 4 ('16:0.5' and '16.0:0.5' are both 16x16); '' trains at full "
                   "size throughout")
    p.add_argument("--no-eval-flip", dest="eval_flip", action="store_const", const=False,
                   help="validate on the images alone (default: the mean of each image's and its "
                   "mirror's logits)")
    p.add_argument("--no-sync-bn", dest="sync_bn", action="store_const", const=False,
                   help="under several ranks (mpiexec), BatchNorm takes each rank's own batch statistics "
                   "(as PyTorch's DDP; the result then depends on the number of ranks). Default: the "
                   "global batch's, so N ranks compute what one process computes")
    p.add_argument("--seed", type=int, help="data split, order, augmentation, weights (default 0)")
    p.add_argument("--dtype", choices=["float32", "float64"], help="default float32")
    p.add_argument("--out", default="runs/cvt", help="output folder (checkpoints, metrics, curves; default runs/cvt)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out from "
                   "its last.npz, with its own settings")
    p.add_argument("--init-from", metavar="CKPT", help="start this new run from the weights of a "
                   "checkpoint or model file (e.g. a finished run's last.npz): fine-tuning, or training "
                   "a finished run further with a schedule of its own")
    p.add_argument("--overwrite", action="store_true", help="delete the run --out holds and start over "
                   "(without it, train refuses a folder that holds a run)")
    p.add_argument("--save-every", default="5m", metavar="EVERY", help="how often last.npz is saved inside "
                   "an epoch: minutes ('5m', the default), seconds ('90s') or a number of steps ('200'); "
                   "it is also saved after every epoch, and on SIGINT or SIGTERM")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--ranks", type=int, default=1, metavar="N", help="train as N processes on this machine: "
                   "starts `mpiexec -n N minicvt train ...` (the same run, split; pip install -e \".[mpi]\"; "
                   "docs/distributed.md)")
    p.add_argument("--cache-dir", help=CACHE_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy of a checkpoint, with a per-class table")
    p.add_argument("--checkpoint", required=True, help="a checkpoint of `minicvt train` (best.npz, last.npz)")
    p.add_argument("--data", required=True, help="'cifar10', the official archive, or an image folder / its tar")
    p.add_argument("--split", choices=["val", "all", "test"], default=None,
                   help="val: the run's held-out images of --data (the default on the data it was "
                        "trained on); all: every image (the default on other data); test: the "
                        "official archive's test batch")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default 500)")
    p.add_argument("--no-flip", action="store_true", help="score the images alone (default: as the run "
                   "validated, with each image's mirror unless it was trained with --no-eval-flip)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None, help=BACKEND_HELP)
    p.add_argument("--cache-dir", help=CACHE_HELP)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="the top classes of image files, with their probabilities")
    p.add_argument("--pretrained", metavar="FOLDER", help="a Hugging Face CvT folder (config.json and "
                   "model.safetensors), e.g. from `hf download microsoft/cvt-13`")
    p.add_argument("--checkpoint", help="or a model minicvt trained (a `minicvt train` checkpoint)")
    p.add_argument("--images", nargs="+", required=True, metavar="FILE", help="image files")
    p.add_argument("--top", type=int, default=5, help="how many classes to show (default 5)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None, help=BACKEND_HELP)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("attention", help="attention maps of a checkpoint (docs/attention_maps.md)")
    p.add_argument("--checkpoint", help="a checkpoint of `minicvt train` (best.npz, or the shipped "
                   "checkpoints/cvt-cifar-s.npz)")
    p.add_argument("--pretrained", metavar="FOLDER", help="or a Hugging Face CvT folder, with --images, "
                   "at its own resolution (224 for microsoft/cvt-13)")
    p.add_argument("--data", help="a dataset, as for train: images are taken from it by --index")
    p.add_argument("--split", choices=["train", "test", "val"], default=None,
                   help="test: the official CIFAR-10 archive's test batch (the default where --data has "
                        "one); val: the run's held-out images, from the data it was trained on (the "
                        "default on that data); train: the training images (all of an image folder's)")
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
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None, help=BACKEND_HELP)
    p.add_argument("--cache-dir", help=CACHE_HELP)
    p.set_defaults(func=cmd_attention)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)          # --ranks passes it on
    args.started = time.time()              # what this command wrote is newer than this
    from .checkpoint import CheckpointError
    from .data import DataError
    from .distributed import DistributedError
    from .stopping import Interrupted
    from .train import DivergedError
    try:
        if getattr(args, "backend", "x") is None:       # MINICVT_BACKEND, checked like --backend
            args.backend = backend.get_backend()
        return args.func(args)
    except BrokenPipeError:          # `minicvt eval ... | head`: the reader is gone; end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # (no error at exit's flush)
        return 1
    except (backend.BackendError, ValueError, OSError, DataError, CheckpointError,
            DivergedError, DistributedError) as e:     # OSError: a file that cannot be read or written
        # one line, even where a library's message has several (tarfile lists each method it tried)
        message = " ".join(line.strip() for line in str(e).strip().splitlines())
        return _fail(args, f"error: {message}", 2)
    except Interrupted as e:         # SIGINT or SIGTERM during training: the run saved its state
        # the command on a line of its own, to copy (the progress bar is closed by now)
        if position()[0] == 0:       # every rank stopped at the same step; one says so
            print(f"minicvt {args.command}: {e}; continue with:\n{_resume_command(args)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return _fail(args, f"interrupted{_resume_hint(args)}", 130)
    except Exception:                # a bug: its traceback; under several ranks, no rank left waiting
        if position()[1] == 1:
            raise
        import traceback
        return _fail(args, "error: the exception above stopped this rank", 1, before=traceback.print_exc)


def _fail(args, what, exit_code, before=None):
    """Print `minicvt CMD: what` on stderr (after calling `before`, if given); -> exit_code.
    Under several ranks the failing rank also ends the others (MPI_Abort): they may be waiting
    for it in a collective, which would never return. A rank other than 0 waits a moment first,
    so that an error every rank meets (a wrong flag) is printed once, by rank 0, whose abort
    ends the rest."""
    rank, size = position()
    if size != 1 and rank != 0:
        time.sleep(ABORT_GRACE_S)
    if before is not None:
        before()
    who = "" if size == 1 else f" (rank {rank} of {size or 'several'})"
    print(f"minicvt {args.command}{who}: {what}", file=sys.stderr, flush=True)
    if size != 1:
        # MPICH's launcher passes a rank's output on from a pipe, in its own time; an abort at
        # once could end it before it has, and the message would be lost
        time.sleep(ABORT_FLUSH_S)
    abort_every_rank(exit_code)
    return exit_code


ABORT_GRACE_S = 2.0       # how long a rank other than 0 lets rank 0 report an error they share
ABORT_FLUSH_S = 0.5       # how long a failing rank lets the launcher pass its message on


def _resume_command(args):
    """`minicvt train --resume` for this run, with the flags a checkpoint does not store."""
    command = f"minicvt train --resume --out {shlex.quote(str(args.out))}"    # quoted: ready to paste
    ranks = position()[1]
    if ranks != 1:                   # (any number of ranks continues it; the same number, bit for bit)
        command = f"mpiexec -n {ranks or 'N'} {command}"
    if args.backend != "numpy":
        command += f" --backend {args.backend}"
    if args.cache_dir:
        command += f" --cache-dir {shlex.quote(str(args.cache_dir))}"
    return command


def _resume_hint(args):
    """What a command interrupted outside the training steps (loading the data, a second
    Ctrl-C) can be continued with: a training run that has saved resumes from its last save."""
    if args.command != "train":
        return ""
    last = Path(args.out) / "last.npz"
    if args.overwrite and last.is_file() and last.stat().st_mtime < args.started:
        return (f"; {args.out} still holds the run --overwrite was to replace (it is deleted when "
                f"training starts)")
    if last.is_file():
        return f"; continue with:\n{_resume_command(args)}"
    return (f"; nothing to resume: {args.out} holds no checkpoint yet "
            f"(run the same command again to start over)")


if __name__ == "__main__":
    sys.exit(main())
