"""Softmax cross-entropy from logits, with label smoothing, and its fused backward.

Shapes: N batch, K classes. logits (N, K), labels (N,) integers in [0, K).
Derivation: docs/loss.md.
"""
from typing import NamedTuple

from ..backend import get_array_module, to_numpy
from .checks import check_float, check_ndim


class CrossEntropyCache(NamedTuple):
    p: object               # (N, K), the softmax probabilities
    q: object               # (N, K), the target distribution


def cross_entropy_forward(logits, labels, label_smoothing=0.0, check_labels=True):
    """Mean over the batch of -sum_k q_k log softmax(logits)_k, with the target distribution
    q = (1 - eps) * onehot(label) + eps / K (PyTorch's label_smoothing convention).

    Returns loss (0-d array, logits' dtype) and cache: the softmax probabilities (N, K) and q.
    log-softmax is computed as z - max - log(sum exp(z - max)), which never takes the log of 0.

    check_labels: True refuses labels outside [0, K) at once, with a ValueError; on CuPy that
    reads the labels' range back from the GPU, a wait for every kernel queued before it.
    False reads nothing back: a label outside [0, K) makes its row of q NaN, so the loss and
    that row's gradient are NaN rather than silently aimed at another class (CuPy's indexing
    wraps an out-of-range index around); the caller counts them with `label_errors` and reads
    the count when it reads the loss (the trainer does, once per logging interval).
    """
    layer = "cross_entropy"
    check_ndim(layer, "logits", logits, 2, "(N, K)")
    check_float(layer, ("logits", logits))
    xp = get_array_module(logits)
    N, K = logits.shape
    if N == 0:
        raise ValueError("cross_entropy: empty batch (logits of shape (0, K)); the mean is undefined")
    if labels.shape != (N,) or labels.dtype.kind not in "iu":
        raise ValueError(f"cross_entropy: labels must be integers of shape ({N},), "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if check_labels:
        low, high = (int(v) for v in to_numpy(xp.stack((labels.min(), labels.max()))))  # one read-back
        if low < 0 or high >= K:
            raise ValueError(f"cross_entropy: labels must lie in [0, {K}), got range [{low}, {high}]")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    z = logits - logits.max(axis=1, keepdims=True)                # (N, K), max entry 0
    logsumexp = xp.log(xp.exp(z).sum(axis=1, keepdims=True))       # (N, 1)
    logp = z - logsumexp                                            # (N, K)
    q = xp.full((N, K), label_smoothing / K, dtype=logits.dtype)
    if check_labels:
        q[xp.arange(N), labels] += 1.0 - label_smoothing
    else:                               # a bad label indexes class 0, then its row becomes NaN
        ok = _in_range(labels, K)
        q[xp.arange(N), xp.where(ok, labels, 0)] += 1.0 - label_smoothing
        q *= xp.where(ok, 1.0, float("nan")).astype(q.dtype)[:, None]
    loss = -(q * logp).sum() / N
    return loss, CrossEntropyCache(xp.exp(logp), q)


def _in_range(labels, K):
    return (labels >= 0) & (labels < K)                             # (N,) bool


def label_errors(labels, num_classes):
    """How many labels lie outside [0, num_classes): a 0-d integer array where the labels are,
    computed there (no read-back)."""
    return (~_in_range(labels, num_classes)).sum()


def cross_entropy_backward(dloss, cache):
    """dloss (scalar) -> dlogits (N, K) = dloss * (softmax - q) / N. Fusing the softmax with the
    loss gives this simple form and avoids dividing by small probabilities."""
    p, q = cache
    xp = get_array_module(p)
    # dloss as an array of p's dtype: a float64 scalar would promote a float32 gradient
    return (p - q) * (xp.asarray(dloss, dtype=p.dtype) / p.shape[0])
