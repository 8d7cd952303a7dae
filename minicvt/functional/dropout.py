"""Inverted dropout: in training keep each entry with probability 1-p and scale it by
1/(1-p), so evaluation needs no rescaling (PyTorch's convention).

The mask is an input, not drawn inside, so the function stays pure and a gradient check can
hold it fixed; `dropout_mask` draws one from a backend RNG (on the GPU when data is there).
"""


def dropout_mask(rng, shape, p, dtype):
    """(shape) mask with entries 0 (dropped) or 1/(1-p) (kept), in dtype; rng is a BackendRNG."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    keep = rng.random(shape, dtype=dtype) >= p              # bool, P(keep) = 1 - p
    # cast before scaling: bool * python float would become float64
    return keep.astype(dtype) * (1.0 / (1.0 - p))


def dropout_forward(x, mask):
    """x (any), mask (same shape as x, or broadcastable) -> out = x * mask. cache: the mask."""
    if mask.dtype != x.dtype:
        raise ValueError(f"dropout: mask dtype {mask.dtype} differs from x dtype {x.dtype}")
    return x * mask, mask


def dropout_backward(dout, cache):
    """dout -> dx = dout * mask (the same linear map; dropout is its own adjoint)."""
    return dout * cache
