"""Normalisation layers: BatchNorm2d over (N, H, W) per channel, LayerNorm over channels.

Shapes: N batch, C channels, H, W map size; tokens (N, T, C) for LayerNorm (any leading axes).
Both normalise xhat = (x - mean) / sqrt(var + eps) with the biased variance, then apply
gamma * xhat + beta (PyTorch's weight and bias). Derivations: docs/norm.md.
"""
from ..backend import get_array_module
from ._checks import check_float, check_ndim, check_shape


def batchnorm2d_forward(x, gamma, beta, running_mean, running_var, training,
                        momentum=0.1, eps=1e-5):
    """BatchNorm2d, PyTorch's convention.

    x (N, C, H, W); gamma, beta, running_mean, running_var (C,).
    Training: normalise with the batch statistics over (N, H, W); return running statistics
    updated as  r <- (1 - momentum) * r + momentum * s,  where the variance s is the
    *unbiased* batch variance (M / (M - 1) times the biased one, M = N*H*W).
    Eval: normalise with the running statistics (then BN is a per-channel affine map).
    Returns out (N, C, H, W), cache, (new_running_mean, new_running_var); the inputs are not
    modified (the module stores the new statistics).
    cache: xhat (N, C, H, W) and rstd (C,) = 1/sqrt(var + eps), gamma, and the mode, which
    decides the backward (in training the statistics depend on x).
    """
    layer = "batchnorm2d"
    check_ndim(layer, "x", x, 4, "(N, C, H, W)")
    check_float(layer, ("x", x), ("gamma", gamma), ("beta", beta),
                ("running_mean", running_mean), ("running_var", running_var))
    C = x.shape[1]
    for name, a in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if tuple(a.shape) != (C,):       # usually x is the culprit: name its shape too
            raise ValueError(f"batchnorm2d: {name} must have shape ({C},), got {tuple(a.shape)} "
                             f"(x has shape {tuple(x.shape)})")
    xp = get_array_module(x)
    if training:
        M = x.shape[0] * x.shape[2] * x.shape[3]
        if M < 2:
            raise ValueError(f"batchnorm2d: training needs more than one value per channel, got "
                             f"input shape {tuple(x.shape)}")
        mean = x.mean(axis=(0, 2, 3))                               # (C,)
        var = x.var(axis=(0, 2, 3))                                 # (C,) biased
        new_mean = (1.0 - momentum) * running_mean + momentum * mean
        new_var = (1.0 - momentum) * running_var + momentum * var * (M / (M - 1))
    else:
        mean, var = running_mean, running_var
        new_mean, new_var = running_mean, running_var
    rstd = 1.0 / xp.sqrt(var + eps)                                 # (C,)
    xhat = (x - mean[:, None, None]) * rstd[:, None, None]          # (N, C, H, W)
    out = gamma[:, None, None] * xhat + beta[:, None, None]
    return out, (xhat, rstd, gamma, training), (new_mean, new_var)


def batchnorm2d_backward(dout, cache):
    """dout (N, C, H, W) -> dx (N, C, H, W), dgamma (C,), dbeta (C,)."""
    xhat, rstd, gamma, training = cache
    dbeta = dout.sum(axis=(0, 2, 3))
    dgamma = (dout * xhat).sum(axis=(0, 2, 3))
    g = (gamma * rstd)[:, None, None]                               # (C, 1, 1)
    if not training:
        return dout * g, dgamma, dbeta
    M = dout.shape[0] * dout.shape[2] * dout.shape[3]
    # dx = gamma*rstd * (dout - mean(dout) - xhat * mean(dout * xhat)), means over (N, H, W);
    # the two subtracted terms are the paths through the batch mean and variance.
    dx = g * (dout - (dbeta / M)[:, None, None] - xhat * (dgamma / M)[:, None, None])
    return dx, dgamma, dbeta


def layernorm_forward(x, gamma, beta, eps=1e-5):
    """LayerNorm over the last (channel) axis.

    x (..., C), gamma, beta (C,) -> out (..., C).
    cache: xhat (..., C), rstd (..., 1), gamma.
    """
    layer = "layernorm"
    check_float(layer, ("x", x), ("gamma", gamma), ("beta", beta))
    check_ndim(layer, "gamma", gamma, 1, "(C,)")
    C = gamma.shape[0]
    if x.ndim < 1 or x.shape[-1] != C:
        raise ValueError(f"layernorm: x must have shape (..., {C}), got {tuple(x.shape)}")
    check_shape(layer, "beta", beta, (C,))
    xp = get_array_module(x)
    mean = x.mean(axis=-1, keepdims=True)                           # (..., 1)
    var = x.var(axis=-1, keepdims=True)                             # (..., 1) biased
    rstd = 1.0 / xp.sqrt(var + eps)
    xhat = (x - mean) * rstd
    return gamma * xhat + beta, (xhat, rstd, gamma)


def layernorm_backward(dout, cache):
    """dout (..., C) -> dx (..., C), dgamma (C,), dbeta (C,)."""
    xhat, rstd, gamma = cache
    C = gamma.shape[0]
    lead = tuple(range(dout.ndim - 1))
    dgamma = (dout * xhat).sum(axis=lead)
    dbeta = dout.sum(axis=lead)
    dxhat = dout * gamma                                            # (..., C)
    # same form as BatchNorm's, with means over the channel axis of each token
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).sum(axis=-1, keepdims=True) / C)
    return dx, dgamma, dbeta
