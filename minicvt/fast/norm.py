"""Fast normalisation: the functions of minicvt.functional.norm, with the same signatures and
results (to rounding), made fast on the CPU.

What they do differently, and why (measured in docs/performance.md):
- every pass runs a block of images (BatchNorm) or tokens (LayerNorm) per CPU thread, and the
  per-channel sums of the whole batch are added up from the blocks' shares;
- each result is built in one output array with in-place passes (`out=`), each block walked in
  cache-sized pieces, so an array is read from memory once instead of once a pass;
- sums of products are one einsum (one pass, no product array; on CuPy, whose einsum would copy
  both operands, a product and a sum: backend.sum_of_products);
- BatchNorm caches the centred input instead of xhat (a pass fewer in the forward);
- LayerNorm's per-token means are a matrix-vector product, 2-3x faster than NumPy's reduction
  over rows as short as a token's 64 channels;
- layernorm_inference: the out alone, with xhat built in out itself (one array, a pass fewer).
"""
from typing import NamedTuple

from ..backend import get_array_module, sum_of_products
from ..functional.checks import check_cache
from ..functional.norm import NormCache, bn_axes, check_batchnorm, check_layernorm
from . import parallel


class BatchNormCache(NamedTuple):
    xc: object              # the centred input x - mean, x's shape: xhat = xc * rstd
    rstd: object            # (C,)
    gamma: object           # (C,)
    training: bool
    channels_last: bool


def batchnorm2d_forward(x, gamma, beta, running_mean, running_var, training,
                        momentum=0.1, eps=1e-5, channels_last=False):
    """Equals functional.batchnorm2d_forward. cache: the centred input xc rather than xhat: out
    is then xc * (gamma * rstd) + beta, a pass fewer, and the backward only ever needs xhat
    times a per-channel number, which takes rstd in (C,) instead of a pass over x."""
    axes, shape = check_batchnorm(x, gamma, beta, running_mean, running_var, channels_last)
    spec = "nhwc,nhwc->c" if channels_last else "nchw,nchw->c"
    C = gamma.shape[0]
    xp = get_array_module(x)
    M = x.size // C
    # the passes over x run a block of images per CPU thread (parallel.rows); the per-channel
    # sums over the whole batch are added up from the blocks' shares between them
    xc = xp.empty(x.shape, x.dtype)
    if training:
        if M < 2:
            raise ValueError(f"batchnorm2d: training needs more than one value per channel, got "
                             f"input shape {tuple(x.shape)}")
        mean = parallel.total(parallel.rows(lambda x: x.sum(axis=axes), (x,))) / M     # (C,)

        def centre(x, xc):                                          # xc = x - mean, its sum of squares
            xp.subtract(x, mean.reshape(shape), out=xc)
            return sum_of_products(spec, xc, xc)

        var = parallel.total(parallel.rows(centre, (x, xc), pieces=True)) / M                      # (C,) biased
        new_mean = (1.0 - momentum) * running_mean + momentum * mean
        new_var = (1.0 - momentum) * running_var + momentum * var * (M / (M - 1))
    else:
        mean, var = running_mean, running_var
        new_mean, new_var = running_mean, running_var
        parallel.rows(lambda x, xc: xp.subtract(x, mean.reshape(shape), out=xc), (x, xc))
    rstd = 1.0 / xp.sqrt(var + eps)                                 # (C,)
    g = (gamma * rstd).reshape(shape)
    out = xp.empty(x.shape, x.dtype)

    def scale(xc, out):                                             # gamma * xhat + beta
        xp.multiply(xc, g, out=out)
        out += beta.reshape(shape)

    parallel.rows(scale, (xc, out), pieces=True)
    return out, BatchNormCache(xc, rstd, gamma, training, channels_last), (new_mean, new_var)


def batchnorm2d_backward(dout, cache):
    """Equals functional.batchnorm2d_backward."""
    check_cache("batchnorm2d", cache, BatchNormCache)
    xc, rstd, gamma, training, channels_last = cache
    axes, shape = bn_axes(dout.shape, channels_last)
    spec = "nhwc,nhwc->c" if channels_last else "nchw,nchw->c"
    xp = get_array_module(dout)
    # dgamma = sum(dout * xhat) = rstd * sum(dout * xc), a block of images per CPU thread
    dgamma, dbeta = parallel.total(parallel.rows(
        lambda dout, xc: (sum_of_products(spec, dout, xc), dout.sum(axis=axes)), (dout, xc)))
    dgamma *= rstd
    g = (gamma * rstd).reshape(shape)
    dx = xp.empty(dout.shape, dout.dtype)
    if not training:
        parallel.rows(lambda dout, dx: xp.multiply(dout, g, out=dx), (dout, dx))
        return dx, dgamma, dbeta
    M = dout.size // dbeta.shape[0]
    # dx = gamma*rstd * (dout - mean(dout) - xhat * mean(dout * xhat)), means over (N, H, W);
    # the two subtracted terms are the paths through the batch mean and variance. With
    # xhat = xc * rstd, the last term is xc times the per-channel rstd * dgamma / M.
    dgamma_m, dbeta_m = (-dgamma * rstd / M).reshape(shape), (dbeta / M).reshape(shape)

    def grad(dout, xc, dx):
        xp.multiply(xc, dgamma_m, out=dx)
        dx += dout
        dx -= dbeta_m
        dx *= g

    parallel.rows(grad, (dout, xc, dx), pieces=True)
    return dx, dgamma, dbeta


def layernorm_forward(x, gamma, beta, eps=1e-5):
    """Equals functional.layernorm_forward: a block of tokens per thread, in cache-sized pieces."""
    xp, C = get_array_module(x), check_layernorm(x, gamma, beta)
    # two new arrays of x's size (xhat, out), made once: the token arrays are large
    xhat, out = xp.empty(x.shape, x.dtype), xp.empty(x.shape, x.dtype)
    rstd = xp.empty(x.shape[:-1] + (1,), x.dtype)
    rows = (x.reshape(-1, C), xhat.reshape(-1, C), rstd.reshape(-1, 1), out.reshape(-1, C))  # (M, C), M tokens
    parallel.rows(_layernorm_rows, rows, gamma, beta, eps, pieces=True)
    return out, NormCache(xhat, rstd, gamma)


def layernorm_inference(x, gamma, beta, eps=1e-5):
    """Equals functional.layernorm_forward's out alone, for `nn.no_grad()`: with nothing cached, xhat is built in
    out itself, so one array of x's size is made instead of two and each pass moves one array
    less (in the model, 2.2 -> 1.8 ms for a stage-0 LayerNorm at batch 128)."""
    xp, C = get_array_module(x), check_layernorm(x, gamma, beta)
    out, rstd = xp.empty(x.shape, x.dtype), xp.empty(x.shape[:-1] + (1,), x.dtype)
    rows = (x.reshape(-1, C), out.reshape(-1, C), rstd.reshape(-1, 1), out.reshape(-1, C))
    parallel.rows(_layernorm_rows, rows, gamma, beta, eps, pieces=True)
    return out


def _layernorm_rows(x, xhat, rstd, out, gamma, beta, eps):
    """A block of rows (M, C) of the forward, into xhat, rstd (M, 1) and out; xhat may be out
    itself (layernorm_inference): out = xhat * gamma is then a multiplication in place."""
    xp = get_array_module(x)
    xp.subtract(x, _row_means(x), out=xhat)                              # centred
    # the sum of squares is an einsum, which multiplies and adds in one pass with no product
    # array (CuPy's makes it a batched matrix product of contiguous rows: no temporaries either)
    rstd[:, 0] = xp.einsum("mc,mc->m", xhat, xhat)
    rstd /= x.shape[-1]                                                 # biased variance
    rstd += eps
    xp.sqrt(rstd, out=rstd)
    xp.reciprocal(rstd, out=rstd)
    xhat *= rstd
    xp.multiply(xhat, gamma, out=out)
    out += beta


def layernorm_backward(dout, cache):
    """Equals functional.layernorm_backward."""
    xhat, rstd, gamma = cache[:3]
    C = gamma.shape[0]
    xp = get_array_module(dout)
    dx = xp.empty(dout.shape, dout.dtype)
    rows = (dout.reshape(-1, C), xhat.reshape(-1, C), rstd.reshape(-1, 1), dx.reshape(-1, C))
    dgamma, dbeta = parallel.total(parallel.rows(_layernorm_grad_rows, rows, gamma, pieces=True))
    return dx, dgamma, dbeta


def _layernorm_grad_rows(dout, xhat, rstd, dx, gamma):
    """A block of rows (M, C) of the backward: dx into `dx`; returns this block's share of
    dgamma and dbeta (sums over its rows)."""
    xp = get_array_module(dout)
    C = gamma.shape[0]
    # a sum of products as einsum on NumPy: one pass, no product array
    dgamma = sum_of_products("mc,mc->c", dout, xhat)
    dbeta = dout.sum(axis=0)
    dxhat = dout * gamma                                            # (M, C)
    # same form as BatchNorm's, with means over the channel axis of each token:
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), built in place
    proj = xp.einsum("mc,mc->m", dxhat, xhat)[:, None] / C         # (M, 1)
    xp.multiply(xhat, -proj, out=dx)
    dx += dxhat
    dx -= _row_means(dxhat)
    dx *= rstd
    return dgamma, dbeta


def _row_means(a):
    """The mean of each row (M, C) -> (M, 1), as a matrix-vector product: BLAS does it 2-3x
    faster than NumPy's reduction over rows as short as a token's 64 channels."""
    C = a.shape[-1]
    return (a @ get_array_module(a).full(C, 1.0 / C, dtype=a.dtype))[:, None]
