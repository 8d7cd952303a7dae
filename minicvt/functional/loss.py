"""Softmax cross-entropy from logits, with label smoothing, and its fused backward.

Shapes: N batch, K classes. logits (N, K), labels (N,) integers in [0, K).
Derivation: docs/loss.md.
"""
from ..backend import get_array_module, is_cupy_array
from ._checks import check_float, check_ndim


def cross_entropy_forward(logits, labels, label_smoothing=0.0):
    """Mean over the batch of -sum_k q_k log softmax(logits)_k, with the target distribution
    q = (1 - eps) * onehot(label) + eps / K (PyTorch's label_smoothing convention).

    Returns loss (0-d array, logits' dtype) and cache: the softmax probabilities (N, K) and q.
    log-softmax is computed as z - max - log(sum exp(z - max)), which never takes the log of 0.
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
    # checked on the host only: on a GPU reading the range back would stall the queue of kernels
    # every step, so the trainer checks the labels once where it loads them
    if not is_cupy_array(labels) and (int(labels.min()) < 0 or int(labels.max()) >= K):
        raise ValueError(f"cross_entropy: labels must lie in [0, {K}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    z = logits - logits.max(axis=1, keepdims=True)                # (N, K), max entry 0
    logsumexp = xp.log(xp.exp(z).sum(axis=1, keepdims=True))       # (N, 1)
    logp = z - logsumexp                                            # (N, K)
    q = xp.full((N, K), label_smoothing / K, dtype=logits.dtype)
    q[xp.arange(N), labels] += 1.0 - label_smoothing
    loss = -(q * logp).sum() / N
    return loss, (xp.exp(logp), q)


def cross_entropy_backward(dloss, cache):
    """dloss (scalar) -> dlogits (N, K) = dloss * (softmax - q) / N. Fusing the softmax with the
    loss gives this simple form and avoids dividing by small probabilities."""
    p, q = cache
    xp = get_array_module(p)
    # dloss as an array of p's dtype: a float64 scalar would promote a float32 gradient
    return (p - q) * (xp.asarray(dloss, dtype=p.dtype) / p.shape[0])
