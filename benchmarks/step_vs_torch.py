"""A training step and an inference forward of `cvt-cifar-s`: minicvt against PyTorch, in one run.

    python3 benchmarks/step_vs_torch.py [--batch-size 128 [512 ...]] [--repeats 10] [--warmup 3]
        [--threads N] [--backend numpy|cupy] [--tf32] [--breakdown] [--no-memory] [--json OUT]
        [--dry-run]

Both sides get the same weights (copied by name into the independent PyTorch twin of
tests/torch_cvt.py), the same batch (float32 3x32x32 random images, random labels) and the
trainer's SGD settings. A training step is zero_grad, forward, loss, backward, optimiser step in
train mode; an inference forward runs in eval mode with no caches (nn.no_grad / torch.no_grad).
After warm-up the sides are timed alternately, one call each per repeat, so a change in the
machine's load hits both; medians, minima and the ratio of medians minicvt / PyTorch are printed.
CPU: NumPy against PyTorch CPU with the same thread count. GPU (--backend cupy): CuPy against
PyTorch CUDA eager, TF32 off for both; --tf32 runs off, then on for both, each in a fresh process
(CuPy reads CUPY_TF32 once). Peak memory is measured per side in a fresh process (the script runs
itself with --_memory-side). A script, not a test: nothing asserts a time. See benchmarks/README.md.
--dry-run runs every part of the script on batch 2 with one call per side and PyTorch on the CPU
where it has no CUDA: the test suite runs it with --backend cupy under the emulated CuPy, which
checks that the GPU path of this script works; its times are not measurements.
"""
import argparse
import ctypes
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MINICVT_NUM_THREADS")
MB = 2.0 ** 20
# The trainer's SGD recipe except the learning rate: its 0.1 on one batch seen over and over makes
# the loss jump about (2 -> 8 within a few steps at batch 8); 0.01 lets it settle. The learning rate
# does not change the work a step does, only whether the numbers stay finite over many repeats.
LR = 0.01


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, nargs="+", default=[128], help="one or more (default 128)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per side (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per side first (default 3)")
    p.add_argument("--threads", type=int, help="CPU threads for both sides (default: usable cores)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--tf32", action="store_true", help="GPU: TF32 off for both sides, then on for both")
    p.add_argument("--breakdown", action="store_true", help="minicvt's time per layer type")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--dry-run", action="store_true",
                   help="every part on batch 2, one call per side: checks the script runs, measures nothing")
    # internal: the script runs itself for the memory measurement and for each TF32 mode
    p.add_argument("--_memory-side", dest="memory_side", choices=["minicvt", "torch"],
                   help=argparse.SUPPRESS)
    p.add_argument("--_tf32-mode", dest="tf32_mode", choices=["off", "on"], default="off",
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.batch_size) < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("need --batch-size >= 1, --repeats >= 1, --warmup >= 0")
    if args.dry_run:
        args.batch_size, args.repeats, args.warmup = [2], 1, 0
    if args.tf32 and args.backend != "cupy":
        p.error("--tf32 needs --backend cupy (TF32 is a GPU matmul mode)")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    args.threads = args.threads or usable
    return args


# OpenBLAS (NumPy) and OpenMP/MKL (PyTorch) read their thread counts when they load, and CuPy reads
# CUPY_TF32 at its first float32 matmul: set them before anything is imported.
ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    for _var in THREAD_VARS:
        os.environ[_var] = str(ARGS.threads)
    if ARGS.backend == "cupy":
        os.environ["CUPY_TF32"] = "1" if ARGS.tf32_mode == "on" else "0"
        if ARGS.tf32_mode == "off":      # cuBLAS and cuDNN then refuse TF32 whoever asks for it
            os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
        else:
            os.environ.pop("NVIDIA_TF32_OVERRIDE", None)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as tF  # noqa: E402

from minicvt import backend, kernels, nn  # noqa: E402
from minicvt.fast import parallel  # noqa: E402
from minicvt.models import build_model  # noqa: E402  (also defines all the model's Module classes)
from minicvt.optim import SGD, decays  # noqa: E402
from minicvt.train import TrainConfig  # noqa: E402

# The PyTorch twin lives with the tests, where tests/test_model_parity.py shows that it computes
# what minicvt computes (to 1e-9 in float64): import it from there rather than keep a second copy.
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE)]
from layer_breakdown import breakdown, format_breakdown  # noqa: E402
from layer_times import _blas, _cpu_model, _gpu  # noqa: E402
from torch_cvt import TorchCvT, spec_from_config  # noqa: E402


class Pair:
    """cvt-cifar-s in minicvt and its PyTorch twin: same weights, batch and optimiser settings."""

    def __init__(self, N, device, seed=0):
        tc = self.tc = TrainConfig(optimizer="sgd", lr=LR)
        self.model = build_model("cvt-cifar-s", seed=seed, dtype=np.float32)
        cfg = self.model.config
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((N, cfg.in_chans, cfg.image_size, cfg.image_size)).astype(np.float32)
        y = rng.integers(0, cfg.num_classes, size=N)
        self.x, self.y = backend.to_device(x), backend.to_device(y)
        self.criterion = nn.CrossEntropyLoss(tc.label_smoothing)
        self.opt = SGD(self.model.named_parameters(), tc.lr, momentum=tc.momentum,
                       nesterov=tc.nesterov, weight_decay=tc.weight_decay)
        twin = TorchCvT(spec_from_config(cfg), cfg.num_classes, cfg.in_chans, cfg.act, cfg.attn_scale)
        state = {k: torch.from_numpy(backend.to_numpy(v).copy())
                 for k, v in self.model.state_dict().items()}
        twin.load_state_dict(state, strict=True)           # raises if any name or shape differs
        self.twin = twin.to(device)
        # minicvt decays weight matrices and kernels only (optim.decays): two parameter groups
        decayed = {n for n, p in self.model.named_parameters() if decays(n, p)}
        groups = [{"params": [p for n, p in self.twin.named_parameters() if (n in decayed) == d],
                   "weight_decay": tc.weight_decay if d else 0.0} for d in (True, False)]
        self.topt = torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, nesterov=tc.nesterov)
        self.xt, self.yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        self.param_mb = sum(p.data.nbytes for p in self.model.parameters()) / MB

    def train(self, mode):
        self.model.train(mode)
        self.twin.train(mode)

    def minicvt_step(self):
        self.model.zero_grad()
        loss = self.criterion.forward(self.model.forward(self.x), self.y)
        self.model.backward(self.criterion.backward())
        self.opt.step()
        return loss

    def torch_step(self):
        self.topt.zero_grad()        # PyTorch's default: set_to_none, backward makes new gradients
        loss = tF.cross_entropy(self.twin(self.xt), self.yt, label_smoothing=self.tc.label_smoothing)
        loss.backward()
        self.topt.step()
        return loss.detach()

    def minicvt_forward(self):
        with nn.no_grad():
            return self.model.forward(self.x)

    def torch_forward(self):
        with torch.no_grad():
            return self.twin(self.xt)


def alternate(fns, syncs, repeats, warmup):
    """({side: [ms per call]}, {side: last result}): `warmup` untimed calls of each side, then one
    timed call of each side per repeat, synchronized so that GPU work is inside the interval."""
    times, last = {side: [] for side in fns}, {}
    for i in range(warmup + repeats):
        for side, fn in fns.items():
            syncs[side]()
            t0 = time.perf_counter()
            last[side] = fn()
            syncs[side]()
            if i >= warmup:
                times[side].append(1e3 * (time.perf_counter() - t0))
    return times, last


# -- peak memory: one side per fresh process --------------------------------------------------------
def _status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_rise_mb(fn):
    """How far resident memory rises above its level before fn() while fn() runs. On Linux the
    peak counter VmHWM is reset first (by writing 5 to /proc/self/clear_refs); where that fails,
    the growth of ru_maxrss (kB on Linux), a lower bound: 0 if fn peaks below an earlier peak."""
    try:
        before, exact = _status_kb("VmRSS"), True
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        before, exact = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False
    fn()
    after = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024


def device_rise_mb(fn, side):
    """How far device memory in use rises above its level before fn() while fn() runs."""
    if side == "torch" and not torch.cuda.is_available():      # a dry run: PyTorch on the CPU
        return rss_rise_mb(fn)
    if side == "torch":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / MB
    pool = backend.xp().get_default_memory_pool()

    class PeakHook(backend.xp().cuda.MemoryHook):   # CuPy's pool keeps no peak: watch every malloc
        name = "PeakHook"

        def malloc_postprocess(self, **kwargs):     # called once the block counts as used
            self.peak = max(self.peak, pool.used_bytes())

    backend.synchronize()
    hook = PeakHook()
    base = hook.peak = pool.used_bytes()
    with hook:
        fn()
        backend.synchronize()
    return (hook.peak - base) / MB


def memory_child(args):
    """In a fresh process, one side's memory as one JSON line: the rise during the first training
    step (the optimiser's momentum, PyTorch's gradients, one-time library set-up) and during two
    steady-state steps (activations, caches, gradient temporaries)."""
    gpu = args.backend == "cupy"
    pair = Pair(args.batch_size[0], torch_device(args))
    pair.train(True)
    step = pair.minicvt_step if args.memory_side == "minicvt" else pair.torch_step
    rise = functools.partial(device_rise_mb, side=args.memory_side) if gpu else rss_rise_mb
    out = {"param_mb": pair.param_mb, "first_step_mb": rise(step)}
    if not gpu:   # glibc keeps freed memory resident; hand it back so the level before is honest
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except AttributeError:
            pass
    out["steady_mb"] = rise(lambda: (step(), step()))
    if args.memory_side == "minicvt" and not gpu:
        # NumPy reports its buffers to tracemalloc (PyTorch does not): the most that one step
        # holds at once of what it allocates itself, without the RSS view's allocator slack.
        tracemalloc.start()
        step()
        out["tracemalloc_mb"] = tracemalloc.get_traced_memory()[1] / MB
        tracemalloc.stop()
    print(json.dumps(out))


def child_argv(args, sizes, mode):
    return [sys.executable, str(Path(__file__).resolve()), "--batch-size", *map(str, sizes),
            "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads),
            "--backend", args.backend, "--_tf32-mode", mode] + (["--dry-run"] if args.dry_run else [])


def torch_device(args):
    """PyTorch's side: CUDA against CuPy, the CPU against NumPy, and in a dry run without CUDA
    the CPU as a stand-in (the emulated CuPy runs on the CPU too)."""
    if args.backend != "cupy":
        return "cpu"
    return "cpu" if args.dry_run and not torch.cuda.is_available() else "cuda"


def measure_memory(args, N):
    mem = {}
    for side in ("minicvt", "torch"):
        proc = subprocess.run(child_argv(args, [N], args.tf32_mode) + ["--_memory-side", side],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"memory measurement of {side} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        else:
            mem[side] = json.loads(proc.stdout.splitlines()[-1])
    what = ("device memory in use (CuPy pool used bytes; torch.cuda.max_memory_allocated)"
            if args.backend == "cupy" else "resident memory (RSS)")
    param_mb = next(iter(mem.values()), {}).get("param_mb", 0.0)
    print(f"\nPeak memory of training steps, each side in a fresh process: how far {what} rises "
          "above its level before the steps. minicvt's gradients exist from the start and are "
          "zeroed; PyTorch's are set to None by zero_grad and remade in backward, so they count in "
          f"its steady state too (the parameters take {param_mb:.1f} MB).\n")
    print("| | first step MB | steady state (2 steps) MB | tracemalloc peak MB (NumPy buffers) |")
    print("|---|---:|---:|---:|")
    for side, m in mem.items():
        traced = f"{m['tracemalloc_mb']:.0f}" if "tracemalloc_mb" in m else ""
        print(f"| {side} | {m['first_step_mb']:.0f} | {m['steady_mb']:.0f} | {traced} |")
    if len(mem) == 2 and min(mem["torch"]["first_step_mb"], mem["torch"]["steady_mb"]) > 0:
        first, steady = (mem["minicvt"][k] / mem["torch"][k] for k in ("first_step_mb", "steady_mb"))
        print(f"| **minicvt / PyTorch** | **{first:.2f}** | **{steady:.2f}** | |")
    return mem


# -- the run ----------------------------------------------------------------------------------------
def header(args, gpu):
    tblas = next((w for w in torch.__config__.show().split() if w.startswith("BLAS_INFO=")), "=?")
    try:
        from threadpoolctl import threadpool_info
        pools = ", ".join(f"{i['internal_api']} {i['num_threads']}" for i in threadpool_info())
    except ImportError:
        pools = "threadpoolctl not installed, so set through the variables before loading"
    tc = TrainConfig(optimizer="sgd", lr=LR)
    lines = [f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores",
             f"- NumPy {np.__version__} (BLAS: {_blas()}), PyTorch {torch.__version__} "
             f"(BLAS: {tblas.split('=')[1].rstrip(',')})",
             f"- threads: {', '.join(f'{v}={os.environ.get(v)}' for v in THREAD_VARS)}, "
             f"torch.get_num_threads()={torch.get_num_threads()}; thread pools: {pools}; minicvt's "
             f"own pool (minicvt.fast.parallel): " + (f"{parallel.num_threads()} threads, OpenBLAS on one "
             f"thread inside it" if parallel.num_threads() > 1 else "off, OpenBLAS keeps its threads")
             + f"; kernels: {kernels.chosen()} (minicvt.kernels)",
             f"- float32, 32x32 inputs; SGD lr {tc.lr}, momentum {tc.momentum}, Nesterov {tc.nesterov}, "
             f"weight decay {tc.weight_decay}, label smoothing {tc.label_smoothing}; median of "
             f"{args.repeats} alternated calls per side after {args.warmup} warm-up calls, ms"]
    if gpu:
        lines.append(f"- GPU: {_gpu()}; CuPy {backend.xp().__version__}, PyTorch CUDA "
                     f"{torch.version.cuda}; TF32 {args.tf32_mode} for both (CUPY_TF32="
                     f"{os.environ['CUPY_TF32']}, NVIDIA_TF32_OVERRIDE="
                     f"{os.environ.get('NVIDIA_TF32_OVERRIDE', 'unset')})")
    return "\n".join(lines)


def run_batch(args, N, device):
    syncs = {"minicvt": backend.synchronize,
             "torch": torch.cuda.synchronize if device == "cuda" else (lambda: None)}
    pair = Pair(N, device)
    pair.train(False)            # one check that both sides compute the same function
    ours, ref = backend.to_numpy(pair.minicvt_forward()), pair.torch_forward().cpu().numpy()
    res = {"batch": N, "tf32": args.tf32_mode,
           "logits_rel_diff": float(np.abs(ours - ref).max() / np.abs(ref).max())}
    pair.train(True)
    res["step_ms"], last = alternate({"minicvt": pair.minicvt_step, "torch": pair.torch_step},
                                     syncs, args.repeats, args.warmup)
    res["last_loss"] = {side: float(loss) for side, loss in last.items()}
    pair.train(False)
    res["forward_ms"], _ = alternate({"minicvt": pair.minicvt_forward, "torch": pair.torch_forward},
                                     syncs, args.repeats, args.warmup)
    print(f"\n## batch {N}" + (f", TF32 {args.tf32_mode}" if args.backend == "cupy" else ""))
    print(f"\nEval logits of the two sides differ by {res['logits_rel_diff']:.1e} (max relative). "
          f"Loss after the last step: minicvt {res['last_loss']['minicvt']:.4f}, PyTorch "
          f"{res['last_loss']['torch']:.4f} (close, not equal: the drop-path masks differ).\n")
    print("| | minicvt median ms | min | PyTorch median ms | min | minicvt / PyTorch |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, key in (("training step", "step_ms"), ("inference forward", "forward_ms")):
        ours, ref = res[key]["minicvt"], res[key]["torch"]
        print(f"| {label} | {statistics.median(ours):.1f} | {min(ours):.1f} | {statistics.median(ref):.1f} "
              f"| {min(ref):.1f} | **{statistics.median(ours) / statistics.median(ref):.2f}** |")
    if args.breakdown:
        step, rows = breakdown(pair.model, pair.criterion, pair.opt, pair.x, pair.y,
                               args.repeats, args.warmup)
        print("\n" + format_breakdown(step, rows))
        res["breakdown"] = {"step_ms": step,
                            "rows": [{"layer": n, "phase": p, "ms": v} for (n, p), v in rows.items()]}
    del pair                     # free its memory before the memory measurement's processes start
    if not args.no_memory:
        res["memory"] = measure_memory(args, N)
    sys.stdout.flush()
    return res


def set_tf32(on):
    """PyTorch's TF32 switch for matmuls and cuDNN convolutions (CuPy's is CUPY_TF32, set above)."""
    if hasattr(torch.backends, "fp32_precision"):      # torch >= 2.9; mixing in the old flags is an error
        torch.backends.fp32_precision = "tf32" if on else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on


def main(args):
    if args.tf32:       # each TF32 mode in its own process (CuPy reads CUPY_TF32 once)
        backend.set_backend(args.backend)     # fails here, in one line, where CuPy is missing
        flags = [f for f, on in (("--breakdown", args.breakdown), ("--no-memory", args.no_memory)) if on]
        runs = []
        for mode in ("off", "on"):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp, "runs.json")
                # memory does not depend on the matmul mode: measured once, with TF32 off
                more = ["--no-memory"] if mode == "on" and "--no-memory" not in flags else []
                cmd = child_argv(args, args.batch_size, mode) + flags + more + ["--json", str(out)]
                if subprocess.run(cmd).returncode:
                    sys.exit(f"step_vs_torch: the TF32 {mode} run failed (its error is above)")
                runs += json.loads(out.read_text())["runs"]
        results = {"runs": runs}
    else:
        backend.set_backend(args.backend)
        torch.set_num_threads(args.threads)
        device = torch_device(args)
        if device == "cuda":
            set_tf32(args.tf32_mode == "on")
        if args.memory_side:
            return memory_child(args)
        info = header(args, args.backend == "cupy")
        dry = " (DRY RUN: batch 2, one call per side; not a measurement)" if args.dry_run else ""
        print(f"# cvt-cifar-s: minicvt ({args.backend}) against PyTorch ({device}){dry}\n\n{info}", flush=True)
        results = {"header": info, "runs": [run_batch(args, N, device) for N in args.batch_size]}
    results["dry_run"] = args.dry_run
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    try:
        main(ARGS)
    except backend.BackendError as e:      # e.g. --backend cupy without CuPy: one line, no traceback
        sys.exit(f"step_vs_torch: error: {e}")
