"""Data parallelism, measured and on paper: what the ranks' collectives cost in a training step.

    mpiexec -n 2 python benchmarks/data_parallel.py --collectives [--config cvt-cifar-s]
        [--batch-size 128] [--steps 10] [--warmup 2] [--threads T] [--bn-barrier] [--json OUT]
    python benchmarks/data_parallel.py --paper [--tflops 30] [--fixed-ms 0] [--latency-us US]
        [--global-batch NAME=B ...] [--step-ms NAME=MS ...] [--json OUT]
    python benchmarks/data_parallel.py --ranks-vs-threads [--data PATH] [--mpiexec PATH]
        [--limit-train N] [--train-args "..."] [--rounds R] [--timeout S]

Three parts, chosen by flag (several may be given; --collectives runs on every rank, the others
on rank 0 only):

--collectives  each rank runs training steps on its slice of a global batch of random images
               and times, per step: forward + backward, the wait at a barrier before the
               gradient all-reduce (how long the faster rank waits for the slower), the
               FlatGrads all-reduce itself, the optimiser step, and, inside forward and
               backward, the time spent in SyncBatchNorm's collectives (two per BatchNorm layer
               per step). One process (no mpiexec) is a world of one: every collective a no-op.
--paper        a model on paper of a step at N GPUs for cvt-cifar-s and CvT-13: compute from an
               analytic count of multiply-adds at a stated throughput, the ring all-reduce of
               the gradients and SyncBatchNorm's small collectives over NVLink, PCIe and
               InfiniBand, and the N at which each becomes bound by communication.
--ranks-vs-threads  one epoch of the README's main command (`minicvt train --data ... --epochs 1`)
               as `mpiexec -n 2` ranks of one thread each, then as one process of two threads,
               back to back; prints each epoch's seconds and images per second.

A script, not a test: nothing asserts a time. See benchmarks/README.md.
"""
import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MINICVT_NUM_THREADS")
FLOAT32 = 4                          # bytes per gradient value
README_DATA = "../shared/data/cifar10-jpeg-train.tar.xz"   # the README's training images


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parts = p.add_argument_group("parts (at least one)")
    parts.add_argument("--collectives", action="store_true", help="time a step's collectives (under mpiexec)")
    parts.add_argument("--paper", action="store_true", help="the step at N GPUs, on paper")
    parts.add_argument("--ranks-vs-threads", action="store_true",
                       help="one epoch: mpiexec -n 2 ranks of 1 thread against 1 process of 2 threads")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings that check the script runs (measure nothing): --collectives at "
                        "batch 8, 1 warm-up and 2 timed steps; --ranks-vs-threads on 1024 images, 512 held out")
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    a = p.add_argument_group("--collectives")
    a.add_argument("--config", default="cvt-cifar-s", help="model config (default cvt-cifar-s)")
    a.add_argument("--image-size", type=int, help="image side (default: the config's)")
    a.add_argument("--batch-size", type=int, default=128, help="the GLOBAL batch, split over the ranks (default 128)")
    a.add_argument("--steps", type=int, default=10, help="timed steps (default 10; medians reported)")
    a.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    a.add_argument("--threads", type=int,
                   help="threads per rank, for minicvt's pool and BLAS (default: cores // ranks on this machine)")
    a.add_argument("--bn-barrier", action="store_true",
                   help="a barrier before each SyncBatchNorm collective, timed apart, so that the "
                        "collective's time holds no waiting for the slower rank (adds 2 x layers barriers)")
    a.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    b = p.add_argument_group("--paper")
    b.add_argument("--tflops", type=float, default=30.0,
                   help="sustained throughput of one GPU, TFLOP/s (default 30: about 45%% of an H200's "
                        "67 TFLOP/s dense FP32)")
    b.add_argument("--fixed-ms", type=float, default=0.0,
                   help="a per-step time that does not shrink with the batch (kernel launches), ms (default 0)")
    b.add_argument("--latency-us", type=float, help="one ring step's latency on every link (default: per link)")
    b.add_argument("--global-batch", action="append", default=[], metavar="NAME=B",
                   help="the fixed global batch of a model (default cvt-cifar-s=128, cvt-13=256)")
    b.add_argument("--step-ms", action="append", default=[], metavar="NAME=MS",
                   help="a measured one-GPU step at the global batch, in place of the FLOP count")
    c = p.add_argument_group("--ranks-vs-threads")
    c.add_argument("--data", default=README_DATA, help=f"training images (default {README_DATA}, the README's)")
    c.add_argument("--mpiexec", help="the launcher (default: the one beside this Python, else on PATH)")
    c.add_argument("--limit-train", type=int, help="train on only this many images (passed to minicvt train)")
    c.add_argument("--train-args", default="", help="more flags for minicvt train, one string")
    c.add_argument("--rounds", type=int, default=1, help="ranks then threads, this many times (default 1)")
    c.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed (default 1800)")
    c.add_argument("--keep", action="store_true", help="keep the runs' temporary folders")
    args = p.parse_args(argv)
    if not (args.collectives or args.paper or args.ranks_vs_threads):
        p.error("choose at least one part: --collectives, --paper, --ranks-vs-threads")
    if args.quick:
        args.batch_size, args.steps, args.warmup = 8, 2, 1
        args.limit_train = args.limit_train or 1024
        args.train_args = (args.train_args + " --val-size 512").strip()
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("need --batch-size >= 1, --steps >= 1, --warmup >= 0, --rounds >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    try:
        args.global_batch = {**PAPER_BATCH, **pairs(args.global_batch, int)}
        args.step_ms = pairs(args.step_ms, float)
    except ValueError as e:
        p.error(str(e))
    return args


def pairs(items, kind):
    """["cvt-13=256", ...] -> {"cvt-13": 256, ...}"""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            out[name] = kind(value)
        except ValueError:
            raise ValueError(f"expected NAME={kind.__name__}, got {item!r}") from None
    return out


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def table(header, rows):
    """A Markdown table: header (names), rows (lists of already formatted cells)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


# == (a) --collectives: a step's collectives, measured ============================================

class TimedComm:
    """A World that SyncBatchNorm talks to: forwards rank, size and allreduce to the real World
    and adds up the seconds spent inside allreduce, and the calls. With barrier=True each call
    first waits at a barrier, timed apart (`wait`), so `seconds` holds the collective alone."""

    def __init__(self, world, synchronize, barrier=False):
        self.world, self.synchronize, self.barrier = world, synchronize, barrier
        self.rank, self.size = world.rank, world.size
        self.reset()

    def reset(self):
        self.seconds = self.wait = 0.0
        self.calls = 0

    def allreduce(self, array, op="sum"):
        self.synchronize()                 # on a GPU: the work queued before is not the collective's
        start = time.perf_counter()
        if self.barrier:
            self.world.barrier()
            self.synchronize()
            self.wait += time.perf_counter() - start
            start = time.perf_counter()
        out = self.world.allreduce(array, op)
        self.synchronize()                 # NCCL only queues the collective: wait for it
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def threads_per_rank(world, asked):
    """asked, else this machine's cores shared among its ranks. A rank the launcher has bound
    to some cores (its affinity smaller than the machine) gets all of those."""
    if asked:
        return asked
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, usable if usable < (os.cpu_count() or usable) else usable // world.local_size)


def collectives(args):
    """Time args.steps training steps on each rank; rank 0 prints the table. -> results (rank 0)."""
    from threadpoolctl import threadpool_limits

    from minicvt import backend, distributed, nn
    from minicvt.fast import parallel
    from minicvt.models import build_model
    from minicvt.optim import AdamW

    backend.set_backend(args.backend)
    world = distributed.init()
    if args.batch_size % world.size:
        message = f"--batch-size {args.batch_size} does not split evenly over {world.size} ranks"
        raise SystemExit(message if world.rank == 0 else 1)          # said once, every rank stops
    threads = threads_per_rank(world, args.threads)
    parallel.set_num_threads(threads)                  # minicvt's pool (which puts OpenBLAS on 1 thread)
    threadpool_limits(limits=threads, user_api="blas")  # BLAS, for a pool of 1 (where it keeps its own)

    overrides = {"image_size": args.image_size} if args.image_size else {}
    model = build_model(args.config, seed=0, **overrides)   # the same seed: the same weights everywhere
    comm = TimedComm(world, backend.synchronize, barrier=args.bn_barrier)
    nn.convert_sync_batchnorm(model, comm)
    bn_layers = sum(isinstance(m, nn.SyncBatchNorm2d) for _, m in model.named_modules())
    flat = distributed.flatten_grads(model.parameters())
    grad_bytes = sum(int(b.nbytes) for b in flat.buffers)
    opt = AdamW(model.named_parameters(), 1e-3)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)

    # the same random global batch on every rank, of which rank r takes its slice
    size = args.image_size or model.config.image_size
    rng = np.random.default_rng(1)
    images = rng.standard_normal((args.batch_size, 3, size, size)).astype(np.float32)
    labels = rng.integers(0, model.config.num_classes, args.batch_size)
    b = args.batch_size // world.size
    x = backend.to_device(images[world.rank * b:(world.rank + 1) * b])
    y = backend.to_device(labels[world.rank * b:(world.rank + 1) * b])

    sync = backend.synchronize
    names = ("step", "forward_backward", "wait", "allreduce", "optimizer", "syncbn", "syncbn_wait", "syncbn_calls")
    timed = {n: [] for n in names}
    world.barrier()                                    # start together
    for i in range(args.warmup + args.steps):
        comm.reset()
        t0 = time.perf_counter()
        model.zero_grad()
        crit.forward(model.forward(x), y)
        model.backward(crit.backward())
        sync()
        t1 = time.perf_counter()
        world.barrier()                  # the slower rank's lag, kept out of the all-reduce's time
        t2 = time.perf_counter()
        flat.allreduce(world, op="mean")
        sync()
        t3 = time.perf_counter()
        opt.step()
        sync()
        t4 = time.perf_counter()
        if i >= args.warmup:
            for n, v in zip(names, (t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3, comm.seconds, comm.wait, comm.calls)):
                timed[n].append(v)

    # every rank's medians to every rank: an all-gather by summation (row r from rank r)
    rows = np.zeros((world.size, len(names)))
    rows[world.rank] = [median(timed[n]) for n in names]
    rows = world.allreduce(rows)
    if world.rank != 0:
        return None
    per_rank = [dict(zip(names, map(float, r))) for r in rows]
    result = {"world": repr(world), "size": world.size, "threads_per_rank": threads, "config": args.config,
              "image_size": size, "global_batch": args.batch_size, "batch_per_rank": b,
              "steps": args.steps, "warmup": args.warmup, "gradient_bytes": grad_bytes,
              "parameters": sum(p.data.size for p in model.parameters()), "bn_layers": bn_layers,
              "bn_barrier": args.bn_barrier, "per_rank": per_rank}
    print_collectives(result)
    return result


def print_collectives(r):
    ms = lambda s: f"{s * 1e3:.1f}"                       # noqa: E731
    share = lambda s, total: f"{100 * s / total:.1f} %"   # noqa: E731
    print(f"\n## --collectives: {r['config']} at {r['image_size']}x{r['image_size']}, global batch "
          f"{r['global_batch']} ({r['batch_per_rank']} per rank), {r['size']} rank(s) x "
          f"{r['threads_per_rank']} thread(s)\n")
    print(f"{r['parameters']:,} parameters: {r['gradient_bytes']:,} gradient bytes in one all-reduce; "
          f"{r['bn_layers']} BatchNorm layers. Medians of {r['steps']} steps after {r['warmup']} warm-up.\n")
    rows = []
    for rank, t in enumerate(r["per_rank"]):
        rows.append([rank, ms(t["step"]), ms(t["forward_backward"]), ms(t["wait"]), ms(t["allreduce"]),
                     share(t["allreduce"], t["step"]), ms(t["syncbn"]), share(t["syncbn"], t["step"]),
                     ms(t["syncbn_wait"]) if r["bn_barrier"] else "-", f"{t['syncbn_calls']:.0f}", ms(t["optimizer"])])
    print(table(["rank", "step ms", "fwd+bwd ms", "barrier wait ms", "all-reduce ms", "all-reduce share",
                 "SyncBN ms", "SyncBN share", "SyncBN barrier ms", "SyncBN calls", "optimiser ms"], rows))
    calls = {t["syncbn_calls"] for t in r["per_rank"]}
    expected = 2 * r["bn_layers"]
    verdict = "as expected" if calls == {expected} else f"EXPECTED {expected}"
    print(f"\nSyncBN collectives per step: {sorted(calls)} = 2 x {r['bn_layers']} BatchNorm layers "
          f"(one in forward, one in backward): {verdict}.")
    print("step = fwd+bwd + barrier wait + all-reduce + optimiser. The all-reduce is timed after a "
          "barrier, so it measures the collective, not the wait for the slower rank (that is the "
          "barrier column). SyncBN's time is inside fwd+bwd" +
          (" and, with --bn-barrier, holds the collectives alone." if r["bn_barrier"] else
           ": each of its collectives also waits there for the slower rank (--bn-barrier splits that out)."))


# == (b) --paper: the step at N GPUs, on paper ===================================================

PAPER_MODELS = ("cvt-cifar-s", "cvt-13")
# Strong scaling: a fixed global batch split N ways. cvt-cifar-s: the trainer's 128. CvT-13: 256,
# a global batch a single H200 holds at 224x224 (the paper trains with 2048 over many GPUs; 256
# keeps at least 4 images per GPU at N = 64).
PAPER_BATCH = {"cvt-cifar-s": 128, "cvt-13": 256}
PAPER_NS = (1, 2, 4, 8, 16, 32, 64)
# (name, bandwidth per direction in GB/s, one ring step's latency in microseconds, note)
LINKS = (
    ("NVLink 4 (NVSwitch)", 450.0, 5.0,
     "H100/H200 SXM: 18 links, 900 GB/s both directions = 450 GB/s each way (NVIDIA's H200 datasheet); "
     "one HGX board holds 8 GPUs, beyond 8 an NVLink Switch System"),
    ("PCIe 5 x16", 50.0, 5.0, "64 GB/s per direction raw, ~50 GB/s achieved"),
    ("InfiniBand 200 Gb/s (HDR)", 25.0, 10.0, "line rate, one NIC per GPU"),
    ("InfiniBand 400 Gb/s (NDR)", 50.0, 10.0, "line rate, one NIC per GPU (DGX H200: 8 x ConnectX-7)"),
)


def conv_out(n, kernel, stride, padding):
    return (n + 2 * padding - kernel) // stride + 1


def macs_per_image(cfg, image_size=None):
    """Multiply-adds of one forward of one image, counted from the config: the embedding
    convolutions, the depthwise convolutions of the dw_bn projections, the q/k/v/out linear
    layers, the attention products (QK^T and AV), the MLP and the head. Elementwise work
    (norms, activations, softmax, residuals) is left out: a few percent of the total. CvT-13 at
    224x224 gives 4.56 G, the paper's 4.5 G."""
    side = image_size or cfg.image_size
    channels, total = cfg.in_chans, 0
    for i in range(cfg.num_stages):
        side = conv_out(side, cfg.patch_size[i], cfg.patch_stride[i], cfg.patch_padding[i])
        C, cls = cfg.dim_embed[i], int(cfg.cls_token[i])
        total += side * side * C * channels * cfg.patch_size[i] ** 2                # embedding conv
        k = cfg.kernel_qkv[i]
        q_side = conv_out(side, k, cfg.stride_q[i], cfg.padding_q[i])
        kv_side = conv_out(side, k, cfg.stride_kv[i], cfg.padding_kv[i])
        if cfg.qkv_proj_method[i] == "linear":                                    # no convolution
            q_side = kv_side = side
        Tq, Tk = q_side ** 2 + cls, kv_side ** 2 + cls
        T = side * side + cls
        per_block = 0
        if cfg.qkv_proj_method[i] == "dw_bn":                                     # depthwise k x k
            per_block += (q_side ** 2 + 2 * kv_side ** 2) * C * k * k
        per_block += (Tq + 2 * Tk) * C * C                                        # q, k, v linear
        per_block += 2 * Tq * Tk * C                                              # QK^T and AV
        per_block += Tq * C * C                                                   # out projection
        per_block += 2 * T * C * int(C * cfg.mlp_ratio[i])                        # MLP
        total += cfg.depth[i] * per_block
        channels = C
    return total + channels * cfg.num_classes                                     # head


def ring_seconds(nbytes, n, bandwidth, latency):
    """A ring all-reduce of nbytes over n ranks: 2(n-1) steps (reduce-scatter, then all-gather),
    each moving nbytes/n over one link: 2(n-1)/n x nbytes / bandwidth + 2(n-1) x latency."""
    if n == 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency


def tree_seconds(nbytes, n, bandwidth, latency):
    """A tree all-reduce (reduce up a binary tree, broadcast down it, pipelined): 2 log2(n)
    steps of latency, and each message crosses a link about twice. NCCL picks a tree for small
    messages at large n, where the ring's 2(n-1) latencies dominate."""
    if n == 1:
        return 0.0
    return 2 * math.ceil(math.log2(n)) * latency + 2 * nbytes / bandwidth


def syncbn_seconds(bn_channels, n, bandwidth, latency, collective=ring_seconds):
    """SyncBatchNorm's collectives in one step: per layer of C channels, a forward all-reduce of
    an (n, 1 + 3C) float32 array (an all-gather by summation, so it grows with n) and a
    backward one of (2, C). Each is on the critical path: the layer cannot go on without it."""
    return sum(collective(n * (1 + 3 * C) * FLOAT32, n, bandwidth, latency) +
               collective(2 * C * FLOAT32, n, bandwidth, latency) for C in bn_channels)


def paper_model(name, args):
    """Parameters, BatchNorm channels, multiply-adds and the one-GPU step of one model."""
    from minicvt import nn
    from minicvt.models import build_model, get_config
    cfg = get_config(name)
    model = build_model(name)            # built once (under a second): exact counts, no second formula
    params = sum(p.data.size for p in model.parameters())
    bn_channels = [m.weight.shape[0] for _, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    macs = macs_per_image(cfg)
    batch = args.global_batch[name]
    # training = forward + backward ~ 3 forwards; a multiply-add is 2 FLOPs
    flops = 6 * macs * batch
    if name in args.step_ms:
        compute1, source = args.step_ms[name] / 1e3, f"measured {args.step_ms[name]} ms (--step-ms)"
    else:
        compute1 = flops / (args.tflops * 1e12)
        source = f"6 x {macs / 1e9:.3f} GMAC x {batch} images at {args.tflops:g} TFLOP/s"
    return {"name": name, "image_size": cfg.image_size, "parameters": int(params),
            "gradient_bytes": int(params) * FLOAT32, "bn_layers": len(bn_channels), "bn_channels": bn_channels,
            "macs_per_image": int(macs), "global_batch": batch, "step_flops": flops,
            "compute_1gpu_s": compute1, "compute_source": source}


def paper(args):
    """Print the step at N GPUs per model and link; -> the results."""
    fixed = args.fixed_ms / 1e3
    print("\n## --paper: a step at N GPUs, strong scaling (a fixed global batch split N ways)\n")
    print(f"Compute per GPU at N = fixed + (one-GPU step - fixed) / N, fixed = {args.fixed_ms:g} ms. "
          f"Throughput assumed: {args.tflops:g} TFLOP/s sustained (an H200 SXM: 67 TFLOP/s dense FP32, "
          "495 dense TF32 on the tensor cores; minicvt trains in float32 with TF32 off by default). Gradients float32, "
          "one ring all-reduce: 2(N-1)/N x bytes / bandwidth + 2(N-1) x latency. SyncBN: two "
          "collectives per BatchNorm layer per step, (N, 1 + 3C) floats forward and (2, C) backward, "
          "each 2(N-1) ring steps (or 2 log2 N tree steps, NCCL's choice for small messages), on the "
          "critical path. The FLOP count ignores kernel launches, which bound a small model's step on "
          "a GPU: give a measured one-GPU step with --step-ms NAME=MS and its launch-bound part with "
          "--fixed-ms.\n")
    for link, bw, lat, note in LINKS:
        print(f"- {link}: {bw:g} GB/s, {args.latency_us or lat:g} us a ring step ({note})")
    results = {"tflops": args.tflops, "fixed_ms": args.fixed_ms, "ns": list(PAPER_NS), "models": []}
    for name in PAPER_MODELS:
        m = paper_model(name, args)
        print(f"\n### {name} at {m['image_size']}x{m['image_size']}: {m['parameters']:,} parameters "
              f"({m['gradient_bytes'] / 2**20:.1f} MiB of gradients), {m['macs_per_image'] / 1e9:.3f} GMAC "
              f"per image, {m['bn_layers']} BatchNorm layers; global batch {m['global_batch']}; one-GPU "
              f"step {m['compute_1gpu_s'] * 1e3:.2f} ms ({m['compute_source']})")
        m["links"] = []
        for link, bw, lat, _ in LINKS:
            lat = (args.latency_us or lat) * 1e-6
            rows, entries = [], []
            bound = {"allreduce": None, "ring": None, "tree": None}     # the first N bound by each
            base = m["compute_1gpu_s"]
            for n in PAPER_NS:
                if m["global_batch"] < n:
                    continue
                compute = min(fixed, base) + (base - min(fixed, base)) / n
                ar = ring_seconds(m["gradient_bytes"], n, bw * 1e9, lat)
                bn = syncbn_seconds(m["bn_channels"], n, bw * 1e9, lat)
                bn_tree = syncbn_seconds(m["bn_channels"], n, bw * 1e9, lat, tree_seconds)
                serial, overlap = compute + ar + bn, max(compute, ar) + bn
                for key, comm in (("allreduce", ar), ("ring", ar + bn), ("tree", ar + bn_tree)):
                    if bound[key] is None and n > 1 and comm >= compute:
                        bound[key] = n
                entries.append({"n": n, "compute_s": compute, "allreduce_s": ar, "syncbn_ring_s": bn,
                                "syncbn_tree_s": bn_tree, "step_no_overlap_s": serial, "step_overlap_s": overlap})
                rows.append([n, m["global_batch"] // n, f"{compute * 1e3:.3f}", f"{ar * 1e3:.3f}",
                             f"{bn * 1e3:.3f}", f"{bn_tree * 1e3:.3f}", "yes" if n > 1 and ar >= compute else "no",
                             f"{base / serial:.1f}", f"{base / overlap:.1f}"])
            print(f"\n{link}:\n")
            print(table(["N", "images/GPU", "compute ms", "all-reduce ms", "SyncBN ms (ring)", "SyncBN ms (tree)",
                         "all-reduce >= compute", "speed-up, no overlap", "speed-up, all-reduce overlapped"], rows))
            say = lambda n: f"N = {n}" if n else f"none up to N = {entries[-1]['n']}"   # noqa: E731
            print(f"\n{name} on {link}: communication >= compute from: all-reduce alone {say(bound['allreduce'])}; "
                  f"all-reduce + SyncBN {say(bound['ring'])} (ring), {say(bound['tree'])} (tree).")
            m["links"].append({"link": link, "bandwidth_GBps": bw, "latency_us": lat * 1e6,
                               "bound_from": bound, "rows": entries})
        results["models"].append(m)
    print("\nNo overlap: step = compute + all-reduce + SyncBN (the all-reduce after the backward, as "
          "minicvt does it). Overlapped: step = max(compute, all-reduce) + SyncBN, the best a "
          "bucketed all-reduce during the backward could do; SyncBN's collectives cannot overlap. "
          "Speed-ups use the ring SyncBN; N = 1 makes no collective.")
    return results


# == (c) --ranks-vs-threads: one epoch of `minicvt train`, two ways ===============================

def train_once(label, launcher, threads, args, folder):
    """Run one epoch of `minicvt train` with `threads` per process; -> a dict, or None (with a
    printed reason) when it failed."""
    out = folder / label
    command = launcher + [sys.executable, "-m", "minicvt", "train", "--data", args.data, "--epochs", "1",
                          "--out", str(out), "--quiet"]
    if args.limit_train:
        command += ["--limit-train", str(args.limit_train)]
    command += shlex.split(args.train_args)
    env = dict(os.environ, **{var: str(threads) for var in THREAD_VARS})
    print(f"[{label}] {' '.join(shlex.quote(c) for c in command)}  ({threads} thread(s) each)", file=sys.stderr)
    start = time.perf_counter()
    try:
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"[{label}] skipped: still running after {args.timeout:g} s (--timeout)")
        return None
    wall = time.perf_counter() - start
    metrics = out / "metrics.jsonl"
    if run.returncode != 0 or not metrics.exists():
        last = (run.stderr.strip().splitlines() or run.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"[{label}] skipped: minicvt train exited with {run.returncode}: {last}")
        return None
    headers = re.findall(r"(\d+) images/epoch", run.stdout)
    if len(headers) > 1:                 # every rank announced a run of its own: not data parallel
        print(f"[{label}] skipped: {len(headers)} processes each announced a run of their own "
              "(the trainer is not data parallel)")
        return None
    epoch = json.loads(metrics.read_text().splitlines()[0])
    images = int(headers[0]) if headers else None
    return {"label": label, "threads_per_process": threads, "command": command, "wall_s": wall,
            "epoch_s": epoch["seconds"], "image_size": epoch.get("image_size"), "images_per_epoch": images,
            # the images of the whole epoch over its seconds: the same figure however a
            # data-parallel trainer counts its ranks' images in images_per_s
            "images_per_s": images / epoch["seconds"] if images else epoch["images_per_s"],
            "trainer_images_per_s": epoch["images_per_s"], "val_acc": epoch.get("val_acc")}


def ranks_vs_threads(args):
    """-> the runs' results, or None where the ranks run could not be made."""
    print("\n## --ranks-vs-threads: one epoch of `minicvt train`, 2 ranks x 1 thread against 1 process x 2 threads\n")
    if args.data != "cifar10" and not Path(args.data).exists():
        print(f"skipped: no training images at {args.data} (run from the repository root, or give --data)")
        return None
    from minicvt import distributed
    mpiexec = args.mpiexec or distributed.find_mpiexec()
    if not mpiexec:
        print("skipped: no mpiexec beside this Python or on PATH (pip install -e \".[mpi]\", or --mpiexec)")
        return None
    folder = Path(tempfile.mkdtemp(prefix="minicvt-dp-"))
    runs = []
    try:
        for r in range(args.rounds):
            for label, launcher, threads in ((f"ranks-{r}", [mpiexec, "-n", "2"], 1), (f"threads-{r}", [], 2)):
                result = train_once(label, launcher, threads, args, folder)
                if result is None:
                    return None
                runs.append(result)
    finally:
        if args.keep:
            print(f"(runs kept in {folder})", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    rows = [[x["label"], f"{x['threads_per_process']}", x["image_size"], x["images_per_epoch"],
             f"{x['epoch_s']:.1f}", f"{x['images_per_s']:.1f}", f"{x['trainer_images_per_s']:.1f}",
             f"{x['wall_s']:.1f}", x["val_acc"]] for x in runs]
    print(table(["run", "threads/process", "image size", "images/epoch", "epoch s", "images/s",
                 "trainer's images_per_s", "process wall s", "val acc"], rows))
    for kind in ("ranks", "threads"):
        own = [x["epoch_s"] for x in runs if x["label"].startswith(kind)]
        print(f"{kind}: median epoch {median(own):.1f} s over {len(own)} run(s)")
    print("epoch s: the trainer's training time of the epoch (metrics.jsonl), without start-up and "
          "validation; process wall s includes both.")
    return {"runs": runs}


def main():
    args = parse_args()
    results = {}
    rank0 = True
    if args.collectives:
        results["collectives"] = collectives(args)
        from minicvt import distributed
        rank0 = distributed.world().rank == 0
    if rank0 and args.paper:
        results["paper"] = paper(args)
    if rank0 and args.ranks_vs_threads:
        results["ranks_vs_threads"] = ranks_vs_threads(args)
    if rank0 and args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
