"""The command line that layer_times.py and kernel_times.py share, parsed before NumPy loads.

The thread variables are read once, when the BLAS library loads, so a script parses its
arguments and sets them first (`parse_args(...)` does both), then imports NumPy. This module
imports nothing that loads NumPy.
"""
import argparse
import os

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MINICVT_NUM_THREADS")


def parse_args(description, argv=None, json=False):
    """--batch, --repeats, --warmup, --threads, --backend, --dtype (and --json OUT); with
    --threads, every variable of THREAD_VARS is set to it."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--batch", type=int, default=128, help="batch size N (default 128)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per number (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="set OMP/OPENBLAS/MKL/MINICVT_NUM_THREADS before NumPy is imported "
                        "(default: leave the environment as it is)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    if json:
        p.add_argument("--json", metavar="OUT", default=None, help="also write every number to OUT")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("need --batch >= 1, --repeats >= 1, --warmup >= 0")
    if args.threads is not None:
        for var in THREAD_VARS:
            os.environ[var] = str(args.threads)
    return args
