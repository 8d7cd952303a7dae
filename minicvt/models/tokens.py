"""Moving between feature maps and token sequences, and the class token's split and join.

Shapes: N batch, C channels, H, W the token grid, T = H*W tokens; with a class token the
sequence is (N, 1 + T, C), the class token first (as the official code concatenates it).
Each operation only rearranges or copies, so its backward is the inverse rearrangement
(a permutation's adjoint is its inverse) and needs no cache.
"""
from ..backend import get_array_module


def map_to_tokens(x):
    """(N, C, H, W) -> (N, H*W, C), rearrange 'b c h w -> b (h w) c'; row-major over (h, w).
    Copied into token order: every layer after it (LayerNorm, the Linear matmuls, residual
    adds) runs faster on contiguous tokens than on a transposed view, forward and backward."""
    N, C, H, W = x.shape
    xp = get_array_module(x)
    return xp.ascontiguousarray(x.reshape(N, C, H * W).transpose(0, 2, 1))   # (N, C, T) -> (N, T, C)


def tokens_to_map(x, H, W):
    """(N, H*W, C) -> (N, C, H, W), rearrange 'b (h w) c -> b c h w'."""
    N, T, C = x.shape
    if T != H * W:
        raise ValueError(f"tokens_to_map: {T} tokens do not fill a {H}x{W} grid")
    return x.transpose(0, 2, 1).reshape(N, C, H, W)         # (N, C, T) -> (N, C, H, W)


def tokens_to_grid(x, H, W):
    """(N, H*W, C) -> (N, H, W, C): the same numbers on the token grid, channels last. Only
    the token axis is split, so this is a view: no copy, and its inverse is the reshape back."""
    N, T, C = x.shape
    if T != H * W:
        raise ValueError(f"tokens_to_grid: {T} tokens do not fill a {H}x{W} grid")
    return x.reshape(N, H, W, C)


def grid_to_tokens(x):
    """(N, H, W, C) -> (N, H*W, C), the inverse of tokens_to_grid."""
    N, H, W, C = x.shape
    return x.reshape(N, H * W, C)


def cat_cls(cls, x):
    """cls (N, 1, C), x (N, T, C) -> (N, 1 + T, C), the class token in front."""
    return get_array_module(x).concatenate([cls, x], axis=1)


def split_cls(x):
    """(N, 1 + T, C) -> cls (N, 1, C), tokens (N, T, C): the inverse of cat_cls, and its
    backward (and cat_cls is split_cls's backward)."""
    return x[:, :1], x[:, 1:]
