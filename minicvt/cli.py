"""The `minicvt` command (also `python -m minicvt`).

    minicvt check [--backend numpy|cupy]     prove every layer's gradients on this machine

Errors print one line on stderr and exit non-zero.
"""
import argparse
import sys

import numpy as np

from . import backend, gradcheck
from . import nn


def _layer_cases(rand):
    """(name, module, inputs, reset) for one representative configuration of every layer."""
    dropout = nn.Dropout(0.3)
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
        ("AvgPool2d k3 s2 p1 ceil", nn.AvgPool2d(3, 2, 1, ceil_mode=True), (rand(2, 3, 5, 6),), None),
        ("TokenMean", nn.TokenMean(), (rand(2, 4, 6),), None),
        ("Attention Tq=9 Tk=4 h=2", nn.ScaledDotProductAttention(2),
         (rand(2, 9, 8), rand(2, 4, 8), rand(2, 4, 8)), None),
    ]
    dropout.rng = backend.BackendRNG(7)
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


def build_parser():
    parser = argparse.ArgumentParser(prog="minicvt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="prove every layer's gradients against finite differences")
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                   help="array backend (default: MINICVT_BACKEND or numpy)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_check)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "backend", "x") is None:
        args.backend = backend.get_backend()
    try:
        return args.func(args)
    except (backend.BackendError, ValueError, FileNotFoundError) as e:
        print(f"minicvt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
