"""Normalisation layers: BatchNorm2d over (N, H, W) per channel, LayerNorm over channels, and
SyncBatchNorm2d: BatchNorm2d over the (N, H, W) of all ranks' shards together.

Shapes: N batch, C channels, H, W map size; tokens (N, T, C) for LayerNorm (any leading axes).
All normalise xhat = (x - mean) / sqrt(var + eps) with the biased variance, then apply
gamma * xhat + beta (PyTorch's weight and bias). Derivations: docs/norm.md.
"""
from typing import NamedTuple

from ..backend import get_array_module
from .checks import check_cache, check_float, check_ndim, check_shape


class NormCache(NamedTuple):
    xhat: object            # the normalised input, x's shape
    rstd: object            # 1 / sqrt(var + eps): (C,) for BatchNorm, (..., 1) for LayerNorm
    gamma: object           # (C,)
    training: bool = True   # BatchNorm: whether the statistics came from the batch (and so depend on x)
    channels_last: bool = False


def batchnorm2d_forward(x, gamma, beta, running_mean, running_var, training,
                        momentum=0.1, eps=1e-5, channels_last=False):
    """BatchNorm2d, PyTorch's convention.

    x (N, C, H, W), or (N, H, W, C) with channels_last; gamma, beta, running_mean,
    running_var (C,).
    Training: normalise with the batch statistics over (N, H, W); return running statistics
    updated as  r <- (1 - momentum) * r + momentum * s,  where the variance s is the
    *unbiased* batch variance (M / (M - 1) times the biased one, M = N*H*W).
    Eval: normalise with the running statistics (then BN is a per-channel affine map).
    Returns out (x's shape), cache, (new_running_mean, new_running_var); the inputs are not
    modified (the module stores the new statistics).
    """
    axes, shape = check_batchnorm(x, gamma, beta, running_mean, running_var, channels_last)
    xp = get_array_module(x)
    M = x.size // gamma.shape[0]                                    # values per channel
    if training:
        if M < 2:
            raise ValueError(f"batchnorm2d: training needs more than one value per channel, got "
                             f"input shape {tuple(x.shape)}")
        mean = x.mean(axis=axes)                                    # (C,)
        xc = x - mean.reshape(shape)                                # centred
        var = (xc * xc).mean(axis=axes)                             # (C,), biased
        new_mean = (1.0 - momentum) * running_mean + momentum * mean
        new_var = (1.0 - momentum) * running_var + momentum * var * (M / (M - 1))
    else:
        mean, var = running_mean, running_var
        xc = x - mean.reshape(shape)
        new_mean, new_var = running_mean, running_var
    rstd = 1.0 / xp.sqrt(var + eps)                                 # (C,)
    xhat = xc * rstd.reshape(shape)
    out = gamma.reshape(shape) * xhat + beta.reshape(shape)
    return out, NormCache(xhat, rstd, gamma, training, channels_last), (new_mean, new_var)


def batchnorm2d_backward(dout, cache):
    """dout (x's shape) -> dx (x's shape), dgamma (C,), dbeta (C,)."""
    check_cache("batchnorm2d", cache, NormCache)
    xhat, rstd, gamma, training, channels_last = cache
    axes, shape = bn_axes(dout.shape, channels_last)
    dbeta = dout.sum(axis=axes)                         # forward was: out = gamma * xhat + beta
    dgamma = (dout * xhat).sum(axis=axes)
    dxhat = dout * gamma.reshape(shape)
    if not training:                                    # fixed statistics: xhat = (x - mean) * rstd
        return dxhat * rstd.reshape(shape), dgamma, dbeta
    # the two subtracted means are the paths through the batch mean and the batch variance
    dx = rstd.reshape(shape) * (dxhat - dxhat.mean(axis=axes).reshape(shape)
                                - xhat * (dxhat * xhat).mean(axis=axes).reshape(shape))
    return dx, dgamma, dbeta


class SyncNormCache(NamedTuple):
    """sync_batchnorm2d's cache: NormCache's fields and the count of the whole batch."""
    xhat: object            # this rank's normalised input, x's shape
    rstd: object            # (C,), from the statistics of the whole batch
    gamma: object           # (C,)
    training: bool
    channels_last: bool
    count: object           # M, the values per channel over all ranks: a 0-d array (None in eval)


def sync_batchnorm2d_forward(x, gamma, beta, running_mean, running_var, training, comm,
                             momentum=0.1, eps=1e-5, channels_last=False):
    """BatchNorm2d over the batch of all ranks together: each rank holds a shard x of it.

    Arguments and returns as batchnorm2d_forward; `comm` is a communicator (minicvt.collectives:
    rank, size, allreduce). Training makes ONE all-reduce, of a (size, 1 + 3C) array in which
    each rank fills its own row with [m_r, S_r, M2_r, D_r] of its shard: count, sum, and the sums
    of squared and of plain deviations from its own mean c_r = S_r / m_r, and leaves the others
    zero: an all-gather done by summation. Every rank then combines the rows as Chan et al.'s
    parallel variance, no cancellation (docs/norm.md):
        M = sum_r m_r,  mean = sum_r S_r / M,
        var = sum_r (M2_r + 2 (c_r - mean) D_r + m_r (c_r - mean)^2) / M
    (D_r is zero but for the rounding of c_r; keeping it keeps that rounding out of var),
    and normalises its shard by them. The running statistics are those of the whole batch
    (unbiased variance with M - 1), the same on every rank. Eval: no collective; the same as
    batchnorm2d_forward. A world of one gives batchnorm2d_forward's numbers exactly.
    """
    if not training:                       # the running statistics: every rank has them already
        out, cache, stats = batchnorm2d_forward(x, gamma, beta, running_mean, running_var, False, momentum,
                                                eps, channels_last)
        return out, SyncNormCache(*cache, count=None), stats
    axes, shape = check_batchnorm(x, gamma, beta, running_mean, running_var, channels_last)
    xp = get_array_module(x)
    C = gamma.shape[0]
    m = x.size // C                                                 # this rank's values per channel
    if m < 2 and comm.size == 1:           # as PyTorch: several ranks may hold one value each
        raise ValueError(f"batchnorm2d: training needs more than one value per channel, got "
                         f"input shape {tuple(x.shape)}")
    local_sum = x.sum(axis=axes)                                    # (C,)
    local_xc = x - (local_sum / max(m, 1)).reshape(shape)           # centred on this rank's mean c_r
    rows = xp.zeros((comm.size, 1 + 3 * C), dtype=x.dtype)          # rank r writes row r only
    rows[comm.rank, 0] = m
    rows[comm.rank, 1:1 + C] = local_sum                                         # S_r
    rows[comm.rank, 1 + C:1 + 2 * C] = (local_xc * local_xc).sum(axis=axes)     # M2_r
    rows[comm.rank, 1 + 2 * C:] = local_xc.sum(axis=axes)           # D_r: 0 but for c_r's rounding
    rows = comm.allreduce(rows)                                     # (size, 1 + 3C): every rank's row
    counts, sums = rows[:, :1], rows[:, 1:1 + C]                    # (size, 1), (size, C)
    m2s, ds = rows[:, 1 + C:1 + 2 * C], rows[:, 1 + 2 * C:]         # (size, C), (size, C)
    M = counts.sum()                                                # 0-d: values per channel, all ranks
    mean = sums.sum(axis=0) / M                                     # (C,)
    shift = sums / xp.maximum(counts, 1) - mean                     # (size, C): c_r - mean; 0 for an empty rank
    var = (m2s + shift * (2 * ds + counts * shift)).sum(axis=0) / M     # (C,), biased
    xc = x - mean.reshape(shape)
    rstd = 1.0 / xp.sqrt(var + eps)                                 # (C,)
    xhat = xc * rstd.reshape(shape)
    out = gamma.reshape(shape) * xhat + beta.reshape(shape)
    new_mean = (1.0 - momentum) * running_mean + momentum * mean
    new_var = (1.0 - momentum) * running_var + momentum * var * (M / (M - 1))
    return out, SyncNormCache(xhat, rstd, gamma, True, channels_last, M), (new_mean, new_var)


def sync_batchnorm2d_backward(dout, cache, comm):
    """dout (this rank's shard, x's shape) -> dx (x's shape), dgamma (C,), dbeta (C,).

    dgamma and dbeta are this rank's contributions: their sum over ranks is the gradient of the
    whole batch, which the trainer's all-reduce of parameter gradients forms, as for every other
    parameter. dx needs the whole batch's sums now, so training makes ONE all-reduce, of the
    (2, C) array [dbeta, dgamma]:  dx = gamma rstd (dout - dbeta_all / M - xhat dgamma_all / M).
    """
    check_cache("sync_batchnorm2d", cache, SyncNormCache)
    xhat, rstd, gamma, training, channels_last, M = cache
    axes, shape = bn_axes(dout.shape, channels_last)
    xp = get_array_module(dout)
    dbeta = dout.sum(axis=axes)                         # (C,), this rank's share
    dgamma = (dout * xhat).sum(axis=axes)               # (C,)
    if not training:                                    # fixed statistics, as batchnorm2d_backward
        return dout * gamma.reshape(shape) * rstd.reshape(shape), dgamma, dbeta
    total = comm.allreduce(xp.stack([dbeta, dgamma]))   # (2, C): the sums over the whole batch
    dbeta_all, dgamma_all = total[0], total[1]
    dx = (gamma * rstd).reshape(shape) * (dout - (dbeta_all / M).reshape(shape)
                                          - xhat * (dgamma_all / M).reshape(shape))
    return dx, dgamma, dbeta


def bn_axes(x_shape, channels_last):
    """The axes BatchNorm reduces over (all but the channels), and the shape that broadcasts a
    per-channel (C,) vector against x: (C, 1, 1) for (N, C, H, W), (C,) for (N, H, W, C)."""
    if channels_last:
        return (0, 1, 2), (x_shape[-1],)
    return (0, 2, 3), (x_shape[1], 1, 1)


def check_batchnorm(x, gamma, beta, running_mean, running_var, channels_last):
    layer = "batchnorm2d"
    check_ndim(layer, "x", x, 4, "(N, H, W, C)" if channels_last else "(N, C, H, W)")
    check_float(layer, ("x", x), ("gamma", gamma), ("beta", beta),
                ("running_mean", running_mean), ("running_var", running_var))
    C = x.shape[-1] if channels_last else x.shape[1]
    for name, a in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if tuple(a.shape) != (C,):       # usually x is the culprit: name its shape too
            raise ValueError(f"batchnorm2d: {name} must have shape ({C},), got {tuple(a.shape)} "
                             f"(x has shape {tuple(x.shape)})")
    return bn_axes(x.shape, channels_last)


def layernorm_forward(x, gamma, beta, eps=1e-5):
    """LayerNorm over the last (channel) axis: each token normalised over its own C values.

    x (..., C), gamma, beta (C,) -> out (..., C).
    cache: xhat (..., C), rstd (..., 1), gamma.
    """
    check_layernorm(x, gamma, beta)
    xp = get_array_module(x)
    xc = x - x.mean(axis=-1, keepdims=True)                         # (..., C), centred per token
    var = (xc * xc).mean(axis=-1, keepdims=True)                    # (..., 1), biased
    rstd = 1.0 / xp.sqrt(var + eps)                                 # (..., 1)
    xhat = xc * rstd
    return xhat * gamma + beta, NormCache(xhat, rstd, gamma)


def layernorm_backward(dout, cache):
    """dout (..., C) -> dx (..., C), dgamma (C,), dbeta (C,)."""
    xhat, rstd, gamma = cache[:3]
    C = gamma.shape[0]
    dbeta = dout.reshape(-1, C).sum(axis=0)             # forward was: out = xhat * gamma + beta
    dgamma = (dout * xhat).reshape(-1, C).sum(axis=0)
    dxhat = dout * gamma                                # (..., C)
    # BatchNorm's form, with the means taken over each token's channels
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dgamma, dbeta


def check_layernorm(x, gamma, beta):
    """Refuse mismatched inputs with a message naming the shapes; returns C."""
    layer = "layernorm"
    check_float(layer, ("x", x), ("gamma", gamma), ("beta", beta))
    check_ndim(layer, "gamma", gamma, 1, "(C,)")
    C = gamma.shape[0]
    if x.ndim < 1 or x.shape[-1] != C:
        raise ValueError(f"layernorm: x must have shape (..., {C}), got {tuple(x.shape)}")
    check_shape(layer, "beta", beta, (C,))
    return C
