"""A CvT-13 forward at 224x224: minicvt (NumPy) against transformers' CvtForImageClassification
(PyTorch CPU), the same weights, in one run.

    python3 benchmarks/pretrained_vs_transformers.py [--batch-size 1 8] [--repeats 5] [--warmup 2]
        [--folder PATH] [--json OUT]

Without --folder, transformers builds CvT-13 with random weights (the time does not depend on
the values) and writes it with save_pretrained; minicvt reads that folder with from_pretrained.
Both run in eval mode with no gradients (torch.inference_mode, minicvt's nn.no_grad), float32,
the same inputs, alternated after warm-up; medians and the ratio are printed. A script, not a
test: nothing asserts a time.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MINICVT_NUM_THREADS")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="CPU threads for both sides (default: usable cores)")
    p.add_argument("--folder", help="a Hugging Face CvT folder (default: random CvT-13 weights)")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    for v in THREAD_VARS:                         # read by the libraries when they load
        os.environ[v] = str(threads)

    import numpy as np
    import torch
    import transformers
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import minicvt
    from minicvt import nn
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            torch.manual_seed(0)
            transformers.CvtForImageClassification(transformers.CvtConfig(num_labels=1000)).save_pretrained(tmp)
            folder = tmp
        ours = minicvt.from_pretrained(folder)
        theirs = transformers.CvtForImageClassification.from_pretrained(folder).eval()
    print(f"# CvT-13 forward at 224x224, minicvt {minicvt.__version__} (NumPy {np.__version__}) against "
          f"transformers {transformers.__version__} (PyTorch {torch.__version__}), {threads} threads each, "
          f"float32, median of {args.repeats} alternated calls after {args.warmup} warm-up calls\n")
    print("| batch | minicvt ms | transformers ms | minicvt / transformers | max logit difference |")
    print("|---:|---:|---:|---:|---:|")
    runs = []
    for n in args.batch_size:
        x = np.random.default_rng(0).standard_normal((n, 3, 224, 224)).astype(np.float32)
        xt = torch.from_numpy(x)
        times = {"minicvt": [], "transformers": []}

        def run_ours():
            with nn.no_grad():
                return ours(x)

        def run_theirs():
            with torch.inference_mode():
                return theirs(xt).logits.numpy()
        for i in range(args.warmup + args.repeats):
            for side, fn in (("minicvt", run_ours), ("transformers", run_theirs)):
                t0 = time.perf_counter()
                out = fn()
                if i >= args.warmup:
                    times[side].append(1e3 * (time.perf_counter() - t0))
                if side == "minicvt":
                    a = out
                else:
                    diff = float(np.abs(a - out).max())
        med = {s: statistics.median(t) for s, t in times.items()}
        runs.append({"batch": n, "ms": times, "median_ms": med, "max_logit_diff": diff})
        print(f"| {n} | {med['minicvt']:.0f} | {med['transformers']:.0f} | "
              f"**{med['minicvt'] / med['transformers']:.2f}** | {diff:.1e} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": threads, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
