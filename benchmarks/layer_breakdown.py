"""Where a minicvt training step spends its time, per layer type, forward and backward apart.

    from layer_breakdown import breakdown, format_breakdown
    step_ms, rows = breakdown(model, criterion, optimizer, x, y, repeats=5, warmup=2)
    print(format_breakdown(step_ms, rows))

Every minicvt Module class (nn.Linear, nn.LayerNorm, ..., models.Block, models.Attention) gets
its forward and backward wrapped with a timer for the duration of the measurement; the classes
are restored afterwards. Used by step_vs_torch.py --breakdown; see benchmarks/README.md.
"""
import functools
import statistics
import time

from minicvt import backend, nn


class LayerTimer:
    """Times forward and backward of every minicvt Module class as *self* time: a call's time
    less that of the wrapped calls inside it, so a composite module (Block, Attention, ...) is
    charged only its own work (residual adds, reshapes, the attention core) and the rows add up
    to the step. totals: {(class name, 'forward' / 'backward'): seconds}."""

    def __init__(self, sync):
        self.sync, self.totals, self.stack, self.saved = sync, {}, [], []

    def timed(self, key, fn, *args, **kwargs):
        # On CuPy every call is bracketed by synchronize(), so a row holds that layer's GPU work;
        # but the CPU can no longer queue kernels ahead of the GPU, so the instrumented step is
        # slower than an ordinary one (compare its total with an uninstrumented step).
        self.sync()
        self.stack.append(0.0)                              # time spent in wrapped children
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.sync()
            elapsed = time.perf_counter() - t0
            self.totals[key] = self.totals.get(key, 0.0) + elapsed - self.stack.pop()
            if self.stack:
                self.stack[-1] += elapsed

    def install(self):
        """Wrap every forward/backward that a Module subclass (at any depth) defines itself."""
        classes, todo = set(), [nn.Module]
        while todo:
            subs = todo.pop().__subclasses__()
            classes.update(subs)
            todo += subs
        for cls in classes:
            for method in ("forward", "backward"):
                if method in cls.__dict__:
                    f = cls.__dict__[method]
                    # the row is named after the instance's class (DropPath, not Dropout)
                    timed = functools.wraps(f)(lambda mod, *a, _f=f, _m=method, **k:
                                               self.timed((type(mod).__name__, _m), _f, mod, *a, **k))
                    setattr(cls, method, timed)
                    self.saved.append((cls, method, f))

    def uninstall(self):
        for cls, method, f in self.saved:
            setattr(cls, method, f)
        self.saved = []


def breakdown(model, criterion, optimizer, x, y, repeats, warmup):
    """Training steps (zero_grad, forward, loss, backward, optimiser step) in train mode.
    Returns (median step ms, {(layer type, 'forward' / 'backward' / ''): median self ms});
    zero_grad and the optimiser step are rows of their own with phase ''."""
    timer, steps, records = LayerTimer(backend.synchronize), [], []
    model.train()
    timer.install()
    try:
        for i in range(warmup + repeats):
            timer.totals = {}
            backend.synchronize()
            t0 = time.perf_counter()
            timer.timed(("zero_grad", ""), model.zero_grad)
            criterion.forward(model.forward(x), y)          # the module calls time themselves
            model.backward(criterion.backward())
            timer.timed((f"{type(optimizer).__name__}.step", ""), optimizer.step)
            backend.synchronize()
            if i >= warmup:
                steps.append(1e3 * (time.perf_counter() - t0))
                records.append(timer.totals)
    finally:
        timer.uninstall()
    keys = {k for r in records for k in r}
    return statistics.median(steps), {k: 1e3 * statistics.median(r.get(k, 0.0) for r in records)
                                      for k in keys}


def format_breakdown(step, rows):
    """A Markdown table, largest total first, with what the rows leave unexplained at the end."""
    table = sorted(((sum(v for (n, _), v in rows.items() if n == name), name)
                    for name in {n for n, _ in rows}), reverse=True)
    out = [f"minicvt per layer type: self time (wrapped children excluded), the median of each row "
           f"over the repeats; the instrumented step took {step:.1f} ms\n",
           "| layer type | forward ms | backward ms | total ms | share of step |",
           "|---|---:|---:|---:|---:|"]
    for total, name in table:
        fwd, bwd = (f"{rows[name, p]:.2f}" if (name, p) in rows else "" for p in ("forward", "backward"))
        out.append(f"| {name} | {fwd} | {bwd} | {total:.2f} | {100 * total / step:.1f} % |")
    rest = step - sum(t for t, _ in table)
    out.append(f"| (unattributed: the loop, timer overhead) | | | {rest:.2f} | {100 * rest / step:.1f} % |")
    return "\n".join(out)
