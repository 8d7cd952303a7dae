"""Per-layer forward and backward times at the sizes of the CIFAR model `cvt-cifar-s`.

    python3 benchmarks/layer_times.py [--batch 128] [--repeats 10] [--warmup 2] [--threads N]
                                      [--backend numpy|cupy] [--dtype float32|float64]

Sizes (batch N = 128, 32x32 images): stage dims 64/128/256 on 16x16/8x8/4x4 token grids, heads
1/2/4, depths 1/2/2, a class token in the last stage; embedding convolutions k3 s2 p1;
depthwise 3x3 projections (stride 1 for q, 2 for k and v) each followed by BatchNorm;
LayerNorm, Linear and the MLP (ratio 4) on tokens; attention with Tq/Tk = 256/64, 64/16, 17/5.

Every layer is timed through its pure functions in minicvt.functional: the forward as a whole
call, the backward on one cached forward (backward functions do not modify the cache, so it can
be reused). Each number is the median of `repeats` calls after `warmup` untimed ones, in ms,
with backend.synchronize() before and after each call so it is also right on a GPU.
A script, not a test: nothing here asserts a time. See benchmarks/README.md.
"""
import os
import platform
import statistics
import sys
import time
from typing import NamedTuple

from bench_args import THREAD_VARS, parse_args  # loads no NumPy

# parse the command line (and set the thread variables) before NumPy is imported
ARGS = parse_args(__doc__.split("\n\n")[0], json=False) if __name__ == "__main__" else None

import numpy as np  # noqa: E402

from minicvt import backend  # noqa: E402
from minicvt import functional as F  # noqa: E402

# cvt-cifar-s per stage: cin and side_in are the embedding convolution's input channels and map
# side; dim is the stage width (the convolution's output channels); cls: a class token.
STAGES = [
    dict(cin=3, side_in=32, dim=64, heads=1, depth=1, cls=False),
    dict(cin=64, side_in=16, dim=128, heads=2, depth=2, cls=False),
    dict(cin=128, side_in=8, dim=256, heads=4, depth=2, cls=True),
]
MLP_RATIO = 4
NUM_CLASSES = 10


class StageSizes(NamedTuple):
    side: int       # the token grid's side after the k3 s2 p1 embedding (half the map's)
    side_kv: int    # the side of the key/value grid after their k3 s2 p1 projection
    Tq: int         # query tokens, the class token included
    Tk: int         # key/value tokens, the class token included
    hidden: int     # the MLP's hidden width


def stage_sizes(st):
    """The token geometry of a stage of STAGES (kernel_times.py uses it too)."""
    side = st["side_in"] // 2
    side_kv = (side + 2 - 3) // 2 + 1
    extra = 1 if st["cls"] else 0                   # the class token joins q, k and v
    return StageSizes(side, side_kv, side * side + extra, side_kv * side_kv + extra, MLP_RATIO * st["dim"])


class Case:
    """One table row: forward() -> (out, cache); backward(dout, cache) -> gradients.
    uses: how often the layer runs in one training step of cvt-cifar-s (None: an alternative
    the model does not use by default); family: the layer kind, for the per-family summary."""

    def __init__(self, stage, layer, shape, forward, backward, uses, family, dout=None):
        self.stage, self.layer, self.shape = stage, layer, shape
        self.forward, self.backward, self.uses, self.dout = forward, backward, uses, dout
        self.family = family


def _fmt(shape):
    return "(" + ", ".join(str(s) for s in shape) + ")"


def build_cases(N, dtype, seed=0):
    """The rows of the table, with inputs drawn on the host and moved to the active backend.
    A generator, one stage at a time, so that only one stage's inputs are held in memory."""
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=1.0):
        return backend.to_device(rng.standard_normal(shape) * scale, dtype=dtype)

    def conv(stage, layer, cin, cout, side, uses):
        x, w, b = rand(N, cin, side, side), rand(cout, cin, 3, 3, scale=0.1), rand(cout)
        return Case(stage, layer, f"x {_fmt(x.shape)}, k3 s2 p1",
                    lambda: F.conv2d_forward(x, w, b, 2, 1), F.conv2d_backward, uses,
                    "Conv2d (embedding)")

    def depthwise(stage, layer, C, side, stride, uses):
        x, w = rand(N, C, side, side), rand(C, 1, 3, 3, scale=0.3)
        return Case(stage, layer, f"x {_fmt(x.shape)}, k3 s{stride} p1",
                    lambda: F.depthwise_conv2d_forward(x, w, None, stride, 1),
                    F.depthwise_conv2d_backward, uses, "depthwise conv")

    def batchnorm(stage, layer, C, side, uses):
        x = rand(N, C, side, side)
        gamma, beta, rm, rv = rand(C), rand(C), rand(C), backend.to_device(np.ones(C), dtype=dtype)
        return Case(stage, layer, f"x {_fmt(x.shape)}, train",
                    lambda: F.batchnorm2d_forward(x, gamma, beta, rm, rv, True)[:2],
                    F.batchnorm2d_backward, uses, "BatchNorm2d")

    def layernorm(stage, layer, lead, C, uses):
        x, gamma, beta = rand(*lead, C), rand(C), rand(C)
        return Case(stage, layer, f"x {_fmt(x.shape)}",
                    lambda: F.layernorm_forward(x, gamma, beta), F.layernorm_backward, uses,
                    "LayerNorm")

    def linear(stage, layer, T, cin, cout, uses):
        x, w, b = rand(N, T, cin), rand(cout, cin, scale=cin ** -0.5), rand(cout)
        return Case(stage, layer, f"x {_fmt(x.shape)} -> {cout}",
                    lambda: F.linear_forward(x, w, b), F.linear_backward, uses, "Linear")

    cases = []
    for s, st in enumerate(STAGES):
        C, heads, depth = st["dim"], st["heads"], st["depth"]
        side, side_kv, Tq, Tk, hidden = stage_sizes(st)
        cases += [
            conv(s, "ConvEmbed conv", st["cin"], C, st["side_in"], 1),
            layernorm(s, "ConvEmbed norm (LayerNorm)", (N, side * side), C, 1),
            layernorm(s, "norm1 / norm2 (LayerNorm)", (N, Tq), C, 2 * depth),
            depthwise(s, "conv_proj_q conv (depthwise)", C, side, 1, depth),
            batchnorm(s, "conv_proj_q bn (BatchNorm2d)", C, side, depth),
            depthwise(s, "conv_proj_k/v conv (depthwise)", C, side, 2, 2 * depth),
            batchnorm(s, "conv_proj_k/v bn (BatchNorm2d)", C, side_kv, 2 * depth),
            linear(s, "proj_q / proj (Linear)", Tq, C, C, 2 * depth),
            linear(s, "proj_k / proj_v (Linear)", Tk, C, C, 2 * depth),
        ]
        q, k, v = rand(N, Tq, C), rand(N, Tk, C), rand(N, Tk, C)
        cases.append(Case(s, f"attention, {heads} head{'s' if heads > 1 else ''}",
                          f"q {_fmt(q.shape)}, k/v {_fmt(k.shape)}",
                          lambda q=q, k=k, v=v, h=heads: F.attention_forward(q, k, v, h),
                          F.attention_backward, depth, "attention"))
        cases.append(linear(s, "mlp.fc1 (Linear)", Tq, C, hidden, depth))
        a = rand(N, Tq, hidden)
        cases += [
            Case(s, "GELU (erf)", f"x {_fmt(a.shape)}",
                 lambda a=a: F.gelu_forward(a), F.gelu_backward, None, "activation"),
            Case(s, "GELU (tanh)", f"x {_fmt(a.shape)}",
                 lambda a=a: F.gelu_forward(a, "tanh"), F.gelu_backward, None, "activation"),
            Case(s, "QuickGELU", f"x {_fmt(a.shape)}",
                 lambda a=a: F.quick_gelu_forward(a), F.quick_gelu_backward, depth, "activation"),
        ]
        cases.append(linear(s, "mlp.fc2 (Linear)", Tq, hidden, C, depth))
        p = rand(N, C, side, side)
        cases.append(Case(s, "avg projection (AvgPool2d)", f"x {_fmt(p.shape)}, k3 s2 p1 ceil",
                          lambda p=p: F.avg_pool2d_forward(p, 3, 2, 1, ceil_mode=True),
                          F.avg_pool2d_backward, None, "AvgPool2d"))
        yield from cases
        cases = []

    C = STAGES[-1]["dim"]
    cases.append(layernorm("head", "norm (LayerNorm, class token)", (N,), C, 1))
    z, w, b = rand(N, C), rand(NUM_CLASSES, C, scale=0.02), rand(NUM_CLASSES)
    cases.append(Case("head", "head (Linear)", f"x {_fmt(z.shape)} -> {NUM_CLASSES}",
                      lambda: F.linear_forward(z, w, b), F.linear_backward, 1, "Linear"))
    logits = rand(N, NUM_CLASSES)
    labels = backend.to_device(rng.integers(0, NUM_CLASSES, size=N))
    cases.append(Case("head", "cross-entropy (smoothing 0.1)", f"logits {_fmt(logits.shape)}",
                      lambda: F.cross_entropy_forward(logits, labels, 0.1),
                      F.cross_entropy_backward, 1, "cross-entropy", dout=1.0))
    yield from cases


def median_ms(fn, repeats, warmup):
    """Median wall time of fn() in ms; synchronize() so GPU work is inside the interval."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        backend.synchronize()
        t0 = time.perf_counter()
        fn()
        backend.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_case(case, repeats, warmup, rng):
    fwd = median_ms(case.forward, repeats, warmup)
    out, cache = case.forward()
    dout = case.dout
    if dout is None:      # a random upstream gradient of the output's shape and dtype
        dout = backend.to_device(rng.standard_normal(out.shape), dtype=out.dtype)
    bwd = median_ms(lambda: case.backward(dout, cache), repeats, warmup)
    return fwd, bwd


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas():
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        config = deps.get("openblas configuration", "").strip()      # OpenBLAS builds only
        return f"{deps.get('name')} {deps.get('version')}" + (f" ({config})" if config else "")
    except Exception:  # older NumPy without mode="dicts": say so rather than guess
        return "unknown (np.show_config() prints it)"


def _gpu():
    try:
        props = backend.xp().cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception as e:
        return f"unknown ({e})"


def header(args):
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    threads = ", ".join(f"{v}={os.environ.get(v, 'unset')}" for v in THREAD_VARS)
    lines = [
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores ({usable} usable by this process)",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, BLAS: {_blas()}",
        f"- threads: {threads}",
        f"- backend {args.backend}" + (f" on {_gpu()}" if args.backend == "cupy" else "")
        + f", dtype {args.dtype}, batch {args.batch}, median of {args.repeats} calls after "
          f"{args.warmup} warm-up calls, times in ms",
    ]
    return "\n".join(lines)


def main(args):
    backend.set_backend(args.backend)
    dtype = np.dtype(args.dtype)
    print(f"# minicvt per-layer times (cvt-cifar-s sizes)\n\n{header(args)}\n", flush=True)
    rows = ["| stage | layer | input | uses / step | forward ms | backward ms |",
            "|---|---|---|---:|---:|---:|"]
    rng = np.random.default_rng(1)
    per_family = {}                                 # family -> ms per training step
    for case in build_cases(args.batch, dtype):
        fwd, bwd = time_case(case, args.repeats, args.warmup, rng)
        uses = "alt." if case.uses is None else str(case.uses)
        per_family[case.family] = per_family.get(case.family, 0.0) + (case.uses or 0) * (fwd + bwd)
        rows.append(f"| {case.stage} | {case.layer} | {case.shape} | {uses} | {fwd:.2f} | {bwd:.2f} |")
        print(f"  timed {case.stage} {case.layer}", file=sys.stderr, flush=True)
    print("\n".join(rows))
    step = sum(per_family.values())
    print("\nPer training step, sum over the layers of uses x (forward + backward), by layer family "
          "(QuickGELU counted as the activation: the configs' default, as in the official code; "
          "'alt.' rows are options the model does not use by default; residual adds, token "
          "reshapes and the optimizer are not included):\n")
    print("| family | ms per step | share |\n|---|---:|---:|")
    for family, ms in sorted(per_family.items(), key=lambda kv: -kv[1]):
        if ms > 0:
            print(f"| {family} | {ms:.0f} | {100 * ms / step:.0f} % |")
    print(f"| **all listed layers** | **{step:.0f}** | 100 % |")


if __name__ == "__main__":
    try:
        main(ARGS)
    except backend.BackendError as e:      # e.g. --backend cupy without CuPy: one line, no traceback
        sys.exit(f"layer_times: error: {e}")
