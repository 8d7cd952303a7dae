"""Gradient checking: analytic gradients against centered finite differences, in float64.

For an output y = f(x) and a random upstream gradient g (same shape as y), the analytic
backward gives the vector-Jacobian product  dx = J^T g,  and each entry of it is the
derivative of the scalar  s(x) = <g, f(x)>,  estimated by
    (-s(x + 2h e_i) + 8 s(x + h e_i) - 8 s(x - h e_i) + s(x - 2h e_i)) / (12 h),
the five-point centered difference (error O(h^4); h = 1e-3 by default).
Each input and each parameter is compared separately, with the relative error
    rel_error = max_i |a_i - n_i| / max(1e-8, |a_i| + |n_i|)      (a analytic, n numeric).
Expected sizes in float64: about 1e-9 or smaller for a smooth layer, looser at kinks;
see docs/gradcheck.md.

    report = check_function(lambda x, w: F.linear_forward(x, w), F.linear_backward,
                            {"x": x, "w": w})
    report.assert_ok(1e-7)        # raises, naming the worst entry, if any error is larger

`run_checks()` is `minicvt check`: one representative configuration of every layer
(`layer_cases`) checked on the active backend.
"""
from dataclasses import dataclass

import numpy as np

from . import backend, nn
from .backend import get_array_module, to_numpy

TOL = 1e-7          # what `minicvt check` asks of every layer in float64


@dataclass
class GradResult:
    name: str
    rel_error: float
    index: tuple        # the worst entry
    analytic: float     # its analytic value
    numeric: float      # its finite-difference value
    checked: int        # how many entries were compared


class GradReport:
    """The per-array results of one check; printable, and assert_ok(tol) to test it."""

    def __init__(self, results):
        self.results = list(results)

    @property
    def max_error(self):
        return max((r.rel_error for r in self.results), default=0.0)

    def worst(self):
        return max(self.results, key=lambda r: r.rel_error)

    def __getitem__(self, name):
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)

    def __str__(self):
        lines = [f"{'array':<48} {'entries':>8} {'rel_error':>10}  worst entry (analytic vs numeric)"]
        for r in self.results:
            lines.append(f"{r.name:<48} {r.checked:>8} {r.rel_error:>10.2e}  {r.index}: "
                         f"{r.analytic:+.10e} vs {r.numeric:+.10e}")
        return "\n".join(lines)

    def assert_ok(self, tol):
        """Raise AssertionError naming the worst array and entry if any error exceeds tol."""
        if not self.results:
            raise AssertionError("gradient check compared nothing")
        bad = [r for r in self.results if not r.rel_error <= tol]   # NaN counts as bad
        if bad:
            w = max(bad, key=lambda r: r.rel_error if r.rel_error == r.rel_error else np.inf)
            raise AssertionError(
                f"gradient check failed for {w.name}: rel_error {w.rel_error:.3e} > {tol:.1e} at "
                f"index {w.index} (analytic {w.analytic:+.12e}, numeric {w.numeric:+.12e})\n{self}")
        return self


def _entries(a, max_entries, rng):
    """All flat indices of a, or a random sample of max_entries of them."""
    if max_entries is None or a.size <= max_entries:
        return np.arange(a.size)
    return np.sort(rng.choice(a.size, size=max_entries, replace=False))


def _compare(a, evaluate, flat_indices, h):
    """Numerically differentiate evaluate() (the scalar <g, f>) w.r.t. entries of a, which is
    perturbed in place and restored; returns the numeric gradient at flat_indices.

    The five-point centered stencil  (-s(+2h) + 8 s(+h) - 8 s(-h) + s(-2h)) / 12h  has error
    O(h^4), so h can be large enough (1e-3) that float64 rounding in s, about 1e-16 |s| / h,
    stays near 1e-12: the two-point formula would need h ~ 1e-6 and lose 1e-9 to rounding."""
    numeric = np.zeros(len(flat_indices))
    for n, i in enumerate(flat_indices):
        idx = np.unravel_index(i, a.shape)
        old = a[idx].item()
        s = {}
        for k in (-2, -1, 1, 2):
            a[idx] = old + k * h
            s[k] = evaluate()
        a[idx] = old
        # differences first: equal evaluations then give exactly 0, not rounding noise
        numeric[n] = (8.0 * (s[1] - s[-1]) - (s[2] - s[-2])) / (12.0 * h)
    return numeric


def _result(name, shape, analytic, numeric, flat_indices):
    a = to_numpy(analytic).reshape(-1)[flat_indices].astype(np.float64)
    err = np.abs(a - numeric) / np.maximum(1e-8, np.abs(a) + np.abs(numeric))
    k = int(np.nanargmax(err)) if np.isfinite(err).any() else 0
    rel = float(np.max(err)) if not np.isnan(err).any() else float("nan")
    return GradResult(name, rel, tuple(int(v) for v in np.unravel_index(flat_indices[k], shape)),
                      float(a[k]), float(numeric[k]), len(flat_indices))


def _require_float64(name, a):
    if a.dtype != np.float64:
        raise ValueError(f"gradcheck: {name} is {a.dtype}; finite differences need float64")


def check_function(forward, backward, inputs, seed=0, h=1e-3, max_entries=None):
    """Check a pure (forward, backward) pair.

    forward(*inputs.values()) -> (out, cache); backward(dout, cache) -> one gradient per input,
    in the order of `inputs` (a dict name -> float64 array); a None gradient is skipped.
    Non-differentiable arguments (labels, masks, strides) belong in a closure.
    """
    rng = np.random.default_rng(seed)
    names, arrays = list(inputs), list(inputs.values())
    for n, a in inputs.items():
        _require_float64(n, a)
    out, cache = forward(*arrays)
    xp = get_array_module(out)
    g = xp.asarray(rng.standard_normal(np.shape(out)))      # the random upstream gradient
    grads = backward(g, cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    if len(grads) != len(arrays):
        raise ValueError(f"gradcheck: backward returned {len(grads)} gradients for {len(arrays)} inputs")

    def evaluate():
        return float((forward(*arrays)[0] * g).sum())

    results = []
    for name, a, grad in zip(names, arrays, grads):
        if grad is None:
            continue
        idx = _entries(a, max_entries, rng)
        results.append(_result(name, a.shape, grad, _compare(a, evaluate, idx, h), idx))
    return GradReport(results)


def check_module(module, *inputs, seed=0, h=1e-3, max_entries=None, reset=None, input_names=None):
    """Check a module's backward: every input and every named parameter.

    module.forward(*inputs) -> out; module.backward(dout) -> dx (or a tuple, one per array
    input). Inputs that are not arrays (a block's grid size H, W) are passed through unchecked;
    the array inputs and the module must be float64. Buffers (BatchNorm's running statistics) are restored
    afterwards, so the check leaves the module as it found it. `reset()`, if given, runs before
    every forward (e.g. to reseed a dropout RNG so every evaluation uses the same mask).
    """
    rng = np.random.default_rng(seed)
    arrays = [a for a in inputs if hasattr(a, "dtype")]        # the differentiable inputs
    for n, a in enumerate(arrays):
        _require_float64(f"input {n}", a)
    params = list(module.named_parameters())
    for name, p in params:
        _require_float64(name, p.data)
    saved = {n: b.copy() for n, b in module.named_buffers()}

    def run():
        if reset is not None:
            reset()
        return module.forward(*inputs)

    out = run()
    xp = get_array_module(out)
    g = xp.asarray(rng.standard_normal(np.shape(out)))
    module.zero_grad()
    dx = module.backward(g)
    dx = dx if isinstance(dx, tuple) else (dx,)

    def evaluate():
        return float((run() * g).sum())

    names = input_names or ([f"input{n}" for n in range(len(arrays))] if len(arrays) > 1 else ["input"])
    if len(dx) != len(arrays):
        raise ValueError(f"gradcheck: backward returned {len(dx)} gradients for {len(arrays)} array inputs")
    results = []
    for name, a, grad in zip(names, arrays, dx):
        idx = _entries(a, max_entries, rng)
        results.append(_result(name, a.shape, grad, _compare(a, evaluate, idx, h), idx))
    for name, p in params:
        analytic = p.grad.copy()
        idx = _entries(p.data, max_entries, rng)
        results.append(_result(name, p.data.shape, analytic, _compare(p.data, evaluate, idx, h), idx))
    module.load_state_dict(saved, strict=False)
    return GradReport(results)


# -- minicvt check: every layer, once --------------------------------------------------------

def layer_cases(rand):
    """(name, module, inputs, reset) for one representative configuration of every layer;
    rand(*shape) gives a float64 input on the active backend."""
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


def run_checks(seed=0, tol=TOL, log=print):
    """Check every layer of `layer_cases`, and the cross-entropy loss, in float64 on the active
    backend; log one line per layer (ok or FAIL, its largest rel_error and where); return how
    many failed. The same call can be repeated, e.g. once per backend."""
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return backend.to_device(rng.standard_normal(shape), dtype=np.float64)

    def verdict(name, report, where=""):
        ok = report.max_error <= tol
        log(f"  {'ok  ' if ok else 'FAIL'} {name:<28} max rel_error {report.max_error:.1e}{where}")
        return not ok

    failed = 0
    for name, module, inputs, reset in layer_cases(rand):
        module.to(dtype=np.float64)
        report = check_module(module, *inputs, reset=reset)
        failed += verdict(name, report, f"  (worst: {report.worst().name})")
    labels = backend.xp().asarray(rng.integers(0, 5, size=3))
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    report = check_function(lambda z: (loss.forward(z, labels), None), lambda d, _: loss.backward(d),
                            {"logits": rand(3, 5)})
    failed += verdict("CrossEntropy (smoothing 0.1)", report)
    return failed
