"""Every fast kernel against its reference, at the sizes of the CIFAR model `cvt-cifar-s`.

    python3 benchmarks/kernel_times.py [--batch 128] [--repeats 10] [--warmup 2] [--threads N]
                                       [--backend numpy|cupy] [--dtype float32|float64] [--json OUT]

For every name in minicvt.fast.FAST, and for the residual add (a threaded add on minicvt's pool
against x + y), times both sets' function, kernels.function(name, 'reference' | 'fast'), with the
arguments cvt-cifar-s gives it (the model's sizes are layer_times.py's; its layouts: the
convolutions channels last, the stage-0 image as a transposed view, the softmax on attention's
key-major scores as the fast attention calls it). A row's time is its calls per pass times the
median of `repeats` calls after `warmup` untimed ones, in ms, with backend.synchronize() before
and after each call. Three Markdown tables: per function and shape; per function; and the totals
of one training step and one inference forward, each the sum of the rows that pass calls.

Before timing, each row's two results are compared once; a WARNING line names a row whose fast
and reference results differ by more than rounding (a benchmark timing the wrong call).
A script, not a test: nothing here asserts a time. See benchmarks/README.md.
"""
import json
import sys

from bench_args import parse_args  # loads no NumPy

SETS = ("reference", "fast")

# parse the command line (and set the thread variables) before NumPy is imported
ARGS = parse_args(__doc__.split("\n\n")[0], json=True) if __name__ == "__main__" else None

import numpy as np  # noqa: E402

from layer_times import NUM_CLASSES, STAGES, _fmt, header, median_ms, stage_sizes  # noqa: E402
from minicvt import backend, kernels  # noqa: E402
from minicvt.fast import FAST, parallel  # noqa: E402



def threaded_add(a, b):
    """a + b, a block of rows per thread of minicvt's pool: the residual add the model made
    before it wrote a plain `x + y` (parallel.add, removed when this row measured no gain:
    docs/performance.md). Kept here so that the measurement can be made again."""
    if backend.get_array_module(a) is not np:       # CuPy: one call (threads would not help a GPU)
        return a + b
    out = np.empty(a.shape, np.result_type(a, b))
    parallel.rows(lambda a, b, out: np.add(a, b, out=out), (a, b, out))
    return out


# the residual add of the blocks: not in FAST (the model writes x + y), timed to see if it would pay
ADD = {"reference": lambda a, b: a + b, "fast": threaded_add}


class Case:
    """One row: the same call in both sets, call[kernels]() for kernels in SETS.
    calls: how often the model makes this call per pass (a training step, or an inference forward
    for the inference forms); passes: the totals it joins, ('step',), ('step', 'forward') or ()
    with `note` saying why none (inside another row's function, or an alternative the model does
    not use by default). outputs(result, kernels): the arrays to compare, in the reference's
    layout. backward: the name of the backward function fed by this forward's caches, or None."""

    def __init__(self, label, shape, calls, passes, call, outputs, note="", backward=None):
        self.label, self.shape, self.calls, self.passes, self.note = label, shape, calls, passes, note
        self.call, self.outputs, self.backward = call, outputs, backward


def _out(result, kernels):            # a forward: out (and BatchNorm's new running statistics)
    return [result[0], *result[2]] if len(result) > 2 else [result[0]]


def _grads(result, kernels):          # a backward: its gradients (None where there is no bias)
    return [g for g in (result if isinstance(result, tuple) else (result,)) if g is not None]


def _same(result, kernels):           # a function that returns one array
    return [result]


def _fns(name):
    return {k: kernels.function(name, k) for k in SETS}


def layer(name, shape, args, calls, inference, label=None, outputs=_out, note="", backward=True):
    """name_forward on args, in a training step (and in an inference forward when `inference`:
    the forms without an _inference twin), followed by its backward row."""
    fns = _fns(f"{name}_forward")
    passes = () if note else ("step", "forward") if inference else ("step",)
    call = {k: (lambda f=fns[k]: f(*args)) for k in SETS}
    return Case(label or f"{name}_forward", shape, calls, passes, call, outputs, note,
                f"{name}_backward" if backward else None)


def plain(name, shape, args, calls, passes, note="", fns=None, outputs=_same):
    """`name` on args[kernels] (each set's arguments), a function without a backward."""
    fns = fns or _fns(name)
    return Case(name, shape, calls, passes, {k: (lambda f=fns[k], a=args[k]: f(*a)) for k in SETS}, outputs, note)


def build_cases(N, dtype, seed=0):
    """The rows, with inputs drawn on the host and moved to the active backend; a generator, one
    stage at a time, so that only one stage's inputs are held in memory."""
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=1.0):
        return backend.to_device(rng.standard_normal(shape) * scale, dtype=dtype)

    def positive(C):                  # running variances
        return backend.to_device(1 + 0.1 * np.abs(rng.standard_normal(C)), dtype=dtype)

    def both(*a):
        return {k: a for k in SETS}

    for s, st in enumerate(STAGES):
        C, cin, h, depth, side_in = st["dim"], st["cin"], st["heads"], st["depth"], st["side_in"]
        side, side_kv, Tq, Tk, hidden = stage_sizes(st)
        # the embedding convolution, k3 s2 p1 channels last; stage 0 reads the image (N, 3, H, W)
        # through a transposed view, as ConvEmbed does; later stages read tokens as they lie
        x = rand(N, cin, side_in, side_in).transpose(0, 2, 3, 1) if s == 0 else rand(N, side_in, side_in, cin)
        w, b = rand(C, cin, 3, 3, scale=0.1), rand(C)
        conv = f"ConvEmbed proj: x {_fmt(x.shape)} NHWC, k3 s2 p1 -> {C}"
        yield layer("conv2d", conv, (x, w, b, 2, 1, True), 1, inference=True)
        # im2col and col2im inside it: the reference folds NCHW (a view) into (C, kh, kw) columns,
        # the fast one NHWC into (kh, kw, C) columns; outputs compared in the reference's order
        M, nchw = N * side * side, x.transpose(0, 3, 1, 2)

        def cols_as_reference(cols, kernels):   # (M, kh*kw*C) in (i, j, c) order -> (c, i, j) order
            return [cols if kernels == "reference" else
                    cols.reshape(M, 3, 3, cin).transpose(0, 3, 1, 2).reshape(M, -1)]

        yield plain("im2col", conv.replace(f" -> {C}", ""), {"reference": (nchw, (3, 3), 2, 1),
                                                             "fast": (x, (3, 3), 2, 1, True)},
                    1, (), "in conv2d_forward", outputs=cols_as_reference)
        dcols = rand(M, cin * 9)
        dcols_fast = dcols.reshape(M, cin, 3, 3).transpose(0, 2, 3, 1).reshape(M, -1)
        yield plain("col2im", f"ConvEmbed proj: cols {_fmt(dcols.shape)} -> x NHWC", {
            "reference": (dcols, nchw.shape, (3, 3), 2, 1), "fast": (dcols_fast, x.shape, (3, 3), 2, 1, True)},
            1, (), "in conv2d_backward",
            outputs=lambda r, k: [r if k == "reference" else r.transpose(0, 3, 1, 2)])

        for where, lead, calls in (("ConvEmbed norm", (N, side * side), 1), ("norm1, norm2", (N, Tq), 2 * depth)):
            t, gamma, beta = rand(*lead, C), rand(C), rand(C)
            shape = f"{where}: x {_fmt(t.shape)}"
            yield layer("layernorm", shape, (t, gamma, beta), calls, inference=False)
            yield plain("layernorm_inference", shape, both(t, gamma, beta), calls, ("forward",))

        # conv_proj_q (stride 1) and conv_proj_k/v (stride 2): depthwise 3x3, then BatchNorm
        for where, stride, side_out, calls in (("q", 1, side, depth), ("k, v", 2, side_kv, 2 * depth)):
            g = rand(N, side, side, C)
            wd, gamma, beta, mean, var = rand(C, 1, 3, 3, scale=0.3), rand(C), rand(C), rand(C), positive(C)
            shape = f"conv_proj_{where}: x {_fmt(g.shape)} NHWC, k3 s{stride} p1"
            yield layer("depthwise_conv2d", shape, (g, wd, None, stride, 1, True), calls, inference=False)
            y = rand(N, side_out, side_out, C)
            bn = f"conv_proj_{where}: x {_fmt(y.shape)} NHWC"
            yield layer("batchnorm2d", bn + ", train", (y, gamma, beta, mean, var, True, 0.1, 1e-5, True), calls,
                        inference=False, label="batchnorm2d_forward (train)")
            yield layer("batchnorm2d", bn + ", eval", (y, gamma, beta, mean, var, False, 0.1, 1e-5, True), calls,
                        inference=False, label="batchnorm2d_forward (eval)", note="alternative", backward=False)
            yield plain("depthwise_bn_inference", shape, both(g, wd, gamma, beta, mean, var, 1e-5, stride, 1, True),
                        calls, ("forward",))

        for where, T, c_in, c_out, calls in (("proj_q, proj", Tq, C, C, 2 * depth),
                                             ("proj_k, proj_v", Tk, C, C, 2 * depth),
                                             ("mlp.fc1", Tq, C, hidden, depth), ("mlp.fc2", Tq, hidden, C, depth)):
            t, wl, bl = rand(N, T, c_in), rand(c_out, c_in, scale=c_in ** -0.5), rand(c_out)
            yield layer("linear", f"{where}: x {_fmt(t.shape)} -> {c_out}", (t, wl, bl), calls, inference=True)

        q, k, v = rand(N, Tq, C), rand(N, Tk, C), rand(N, Tk, C)
        yield layer("attention", f"q {_fmt(q.shape)}, k/v {_fmt(k.shape)}, {h} head{'s' * (h > 1)}",
                    (q, k, v, h), depth, inference=True)
        scores = rand(N, h, Tk, Tq)         # key-major k q^T, the softmax over the keys (axis -2)
        yield layer("softmax", f"scores {_fmt(scores.shape)} key-major, axis -2",
                    (scores, -2, (C // h) ** -0.5), depth, inference=False, note="in attention")

        a = rand(N, Tq, hidden)             # the MLP's hidden activations
        yield layer("quick_gelu", f"x {_fmt(a.shape)}", (a,), depth, inference=False)
        yield plain("quick_gelu_inference", f"x {_fmt(a.shape)}", both(a), depth, ("forward",))
        yield layer("gelu", f"x {_fmt(a.shape)}, erf", (a,), depth, inference=False, note="alternative")
        yield plain("gelu_inference", f"x {_fmt(a.shape)}, erf", both(a), depth, (), note="alternative")

        # the blocks' residuals: x + attn(...) and x + mlp(...) forward, dout + norm*.backward(...) back
        r, u = rand(N, Tq, C), rand(N, Tq, C)
        for direction, passes in (("forward", ("step", "forward")), ("backward", ("step",))):
            yield plain(f"residual add ({direction})", f"x {_fmt(r.shape)} + y", both(r, u), 2 * depth, passes,
                        fns=ADD)

    C = STAGES[-1]["dim"]                   # the head: LayerNorm on the class token, then Linear
    z, gamma, beta = rand(N, C), rand(C), rand(C)
    yield layer("layernorm", f"norm: x {_fmt(z.shape)}", (z, gamma, beta), 1, inference=False)
    yield plain("layernorm_inference", f"norm: x {_fmt(z.shape)}", both(z, gamma, beta), 1, ("forward",))
    wl, bl = rand(NUM_CLASSES, C, scale=0.02), rand(NUM_CLASSES)
    yield layer("linear", f"head: x {_fmt(z.shape)} -> {NUM_CLASSES}", (z, wl, bl), 1, inference=True)


def backward_case(case, results, rng, dtype):
    """The backward row fed by a forward row's results: one random dout for both sets, each
    set's backward on its own forward's cache."""
    out = results["reference"][0]
    dout = backend.to_device(rng.standard_normal(out.shape), dtype=dtype)
    fns = _fns(case.backward)
    call = {k: (lambda f=fns[k], cache=results[k][1]: f(dout, cache)) for k in SETS}
    return Case(case.backward, case.shape, case.calls, case.passes and ("step",), call, _grads, case.note)


def blas_as_in(kernels):
    """The reference is timed with BLAS on its own threads, as in a process that never calls the
    fast set; the fast set's pool, at its first threaded call, puts OpenBLAS on one thread
    (minicvt/fast/parallel.py). Stopping the pool gives BLAS its threads back; the next fast call
    starts it again (an untimed call: the comparison's, or a warm-up)."""
    if kernels == "reference":
        parallel.set_num_threads(parallel.num_threads())


def disagreement(case, results, tol):
    """None when every output of the fast call equals the reference's to `tol` relative to the
    reference's largest value; else a line saying where they differ."""
    ref, fast = (case.outputs(results[k], k) for k in SETS)
    if len(ref) != len(fast):
        return f"{len(fast)} outputs from fast, {len(ref)} from the reference"
    for i, (r, f) in enumerate(zip(ref, fast)):
        r, f = backend.to_numpy(r).astype(np.float64), backend.to_numpy(f).astype(np.float64)
        if r.shape != f.shape:
            return f"output {i}: shape {f.shape} from fast, {r.shape} from the reference"
        err, size = float(np.abs(r - f).max(initial=0)), float(np.abs(r).max(initial=0))
        if not err <= tol * max(size, 1e-30):
            return f"output {i}: max |fast - reference| = {err:.3g}, max |reference| = {size:.3g}"
    return None


def time_case(case, args, tol):
    """One row: each set's call once (their results compared), then timed, fast first while its
    pool is up. -> (the row as a dict, both results, a warning line or None)."""
    blas_as_in("reference")
    results = {k: case.call[k]() for k in SETS}         # the reference first: BLAS as it times it
    bad = disagreement(case, results, tol)
    warning = None if bad is None else (f"WARNING: {case.label}, {case.shape}: fast and reference differ "
                                        f"({bad}); is this row timing the right call?")
    ms = {"fast": median_ms(case.call["fast"], args.repeats, args.warmup)}
    blas_as_in("reference")
    ms["reference"] = median_ms(case.call["reference"], args.repeats, args.warmup)
    row = dict(function=case.label, shape=case.shape, calls=case.calls, passes=list(case.passes), note=case.note,
               agree=bad is None, **{f"{k}_ms_per_call": ms[k] for k in SETS},
               **{f"{k}_ms": case.calls * ms[k] for k in SETS})
    return row, results, warning


def time_cases(args, dtype):
    """Every row, timed: a list of dicts (ms per call and per pass), and the warning lines."""
    rng, tol = np.random.default_rng(1), 1e-4 if dtype == np.float32 else 1e-9
    rows, warnings = [], []
    for case in build_cases(args.batch, dtype):
        while case is not None:             # a forward row, then the backward row its results feed
            row, results, warning = time_case(case, args, tol)
            rows.append(row)
            if warning:
                warnings.append(warning)
                print(warning, file=sys.stderr, flush=True)
            print(f"  timed {case.label}, {case.shape}", file=sys.stderr, flush=True)
            case = backward_case(case, results, rng, dtype) if case.backward else None
    timed = {r["function"].split(" (")[0] for r in rows}
    warnings += [f"WARNING: no row times {name}" for name in FAST if name not in timed]
    return rows, warnings


def _gain(ref, fast):
    return f"{ref / fast:.2f}x" if fast > 0 else "-"


def _where(row):
    return ", ".join(row["passes"]) or row["note"]


def per_function(rows):
    """The rows of each function added up, in the order the functions first appear."""
    out = {}
    for r in rows:
        f = out.setdefault(r["function"], dict(function=r["function"], shapes=0, calls=0, passes=r["passes"],
                                                note=r["note"], reference_ms=0.0, fast_ms=0.0))
        f["shapes"] += 1
        f["calls"] += r["calls"]
        f["reference_ms"] += r["reference_ms"]
        f["fast_ms"] += r["fast_ms"]
    return list(out.values())


def totals(rows):
    """One training step and one inference forward: the sums of the rows each pass calls."""
    return {p: {k: sum(r[f"{k}_ms"] for r in rows if p in r["passes"]) for k in SETS} for p in ("step", "forward")}


def _threads(args):
    if args.backend == "cupy":
        return "the fast set runs one call per function on CuPy (no threads)"
    n = parallel.num_threads()
    if n == 1:
        return "minicvt.fast.parallel: 1 thread (no pool): BLAS keeps its own threads in both sets"
    return (f"minicvt.fast.parallel: {n} threads; the reference timed with BLAS on its own threads, "
            f"the fast set with its pool (which keeps OpenBLAS on one thread)")


def report(rows, warnings, args):
    print(f"# minicvt fast kernels against the reference (cvt-cifar-s sizes)\n\n{header(args)}\n"
          f"- {_threads(args)}\n")
    print("\n".join(warnings + [""]) if warnings else "Every row's fast and reference results agree.\n")
    order = {f["function"]: i for i, f in enumerate(per_function(rows))}
    print("Per function and shape: ms per pass (calls x the median of one call; a training step for "
          "the forward and backward forms, an inference forward for the inference forms); 'in ...' "
          "rows run inside another row's function, 'alternative' rows are forms the model does not "
          "use by default; neither counts in the totals.\n")
    print("| function | shape | calls | counted in | reference ms | fast ms | gain |")
    print("|---|---|---:|---|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: order[r["function"]]):
        print(f"| {r['function']} | {r['shape']} | {r['calls']} | {_where(r)} | {r['reference_ms']:.2f} | "
              f"{r['fast_ms']:.2f} | {_gain(r['reference_ms'], r['fast_ms'])} |")
    print("\nPer function, all its shapes:\n")
    print("| function | shapes | calls | counted in | reference ms | fast ms | gain |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for f in per_function(rows):
        print(f"| {f['function']} | {f['shapes']} | {f['calls']} | {_where(f)} | {f['reference_ms']:.1f} | "
              f"{f['fast_ms']:.1f} | {_gain(f['reference_ms'], f['fast_ms'])} |")
    names = {"step": "one training step (forward and backward forms, residual adds)",
             "forward": "one inference forward (inference forms, residual adds)"}
    print("\nTotals: the sums of the rows each pass calls (the layers with no fast form, token "
          "reshapes and the optimiser are not included):\n")
    print("| pass | reference ms | fast ms | gain |\n|---|---:|---:|---:|")
    for p, t in totals(rows).items():
        print(f"| {names[p]} | {t['reference']:.1f} | {t['fast']:.1f} | {_gain(t['reference'], t['fast'])} |")


def main(args):
    backend.set_backend(args.backend)
    dtype = np.dtype(args.dtype)
    rows, warnings = time_cases(args, dtype)
    report(rows, warnings, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), header=header(args).splitlines() + [_threads(args)], warnings=warnings,
                           rows=rows, functions=per_function(rows), totals=totals(rows)), f, indent=1)


if __name__ == "__main__":
    try:
        main(ARGS)
    except backend.BackendError as e:      # e.g. --backend cupy without CuPy: one line, no traceback
        sys.exit(f"kernel_times: error: {e}")
