"""Convolutional token embedding (the paper's Section 3.1, official `ConvEmbed`).

A strided convolution turns the previous stage's map (or the image) into a coarser grid of
wider tokens, then LayerNorm normalises each token over its channels:

    x (N, Cin, H, W) --as a grid--> (N, H, W, Cin) --proj--> (N, H', W', C) = tokens (N, H'W', C)
      --norm--> back to (N, C, H', W')
    H' = (H + 2 * padding - patch_size) // stride + 1   (W' likewise)

The convolution runs channels last (on the previous stage's tokens as they lie), so nothing
between it and its LayerNorm copies the tokens.
"""
import numpy as np

from .. import nn
from .tokens import map_to_tokens, tokens_to_map


class ConvEmbed(nn.Module):
    """x (N, in_chans, H, W) -> (N, embed_dim, H', W'). State: `proj` (Conv2d with bias,
    weight (embed_dim, in_chans, k, k)) and `norm` (LayerNorm over embed_dim)."""

    def __init__(self, patch_size=7, in_chans=3, embed_dim=64, stride=4, padding=2, eps=1e-5,
                 dtype=np.float32, rng=None):
        super().__init__()
        # channels last: the convolution reads the previous stage's tokens as they lie and writes
        # tokens (its im2col moves whole channel vectors, docs/performance.md)
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=padding,
                              bias=True, dtype=dtype, rng=rng, channels_last=True)
        self.norm = nn.LayerNorm(embed_dim, eps=eps, dtype=dtype)

    def forward(self, x):
        x = self.proj(x.transpose(0, 2, 3, 1))              # (N, H, W, Cin) -> (N, H', W', C)
        N, H, W, C = x.shape
        x = self.norm(x.reshape(N, H * W, C))               # (N, H'W', C), normalised per token
        return tokens_to_map(x, H, W)                       # (N, C, H', W')

    def backward(self, dout):
        """dout (N, C, H', W') -> dx (N, in_chans, H, W)."""
        N, C, H, W = dout.shape
        d = self.norm.backward(map_to_tokens(dout))         # (N, H'W', C)
        dx = self.proj.backward(d.reshape(N, H, W, C))      # (N, H, W, in_chans)
        return dx.transpose(0, 3, 1, 2)                     # (N, in_chans, H, W)
