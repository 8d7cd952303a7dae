"""The MLP and the pre-norm transformer block (official `Mlp`, `Block`).

Shapes: N batch, T tokens (1 + H*W with a class token), C channels.

    x = x + drop_path(attn(norm1(x), H, W))
    x = x + drop_path(mlp(norm2(x)))          mlp: fc1 (C -> C*mlp_ratio) -> act -> drop -> fc2 -> drop

The official code calls one `drop_path` module (and one Mlp `drop`) twice; a module here keeps
one cache, so each call site has its own (`drop_path1`/`drop_path2`, `drop1`/`drop2`, as later
timm). They hold no parameters, so the state_dict keys are unchanged, and sharing the model's
random generator they draw independent masks, as the official calls do.
"""
import numpy as np

from .. import nn
from .attention import Attention


def make_activation(name):
    """'quick_gelu' (official: x * sigmoid(1.702 x)) or 'gelu' (exact, erf)."""
    if name == "quick_gelu":
        return nn.QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}: expected 'quick_gelu' or 'gelu'")


class Mlp(nn.Module):
    """x (N, T, C) -> (N, T, out_features); hidden width `hidden_features`."""

    def __init__(self, in_features, hidden_features, out_features=None, act="quick_gelu", drop=0.0,
                 dtype=np.float32, rng=None, drop_rng=None):
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, dtype=dtype, rng=rng)
        self.act = make_activation(act)
        self.drop1 = nn.Dropout(drop, rng=drop_rng)
        self.fc2 = nn.Linear(hidden_features, out_features, dtype=dtype, rng=rng)
        self.drop2 = nn.Dropout(drop, rng=drop_rng)

    def forward(self, x):
        x = self.drop1(self.act(self.fc1(x)))               # (N, T, hidden)
        return self.drop2(self.fc2(x))                      # (N, T, out)

    def backward(self, dout):
        d = self.fc2.backward(self.drop2.backward(dout))    # (N, T, hidden)
        return self.fc1.backward(self.act.backward(self.drop1.backward(d)))


class Block(nn.Module):
    """x (N, T, dim_in), H, W -> (N, T, dim_out). The residual needs dim_in == dim_out, which is
    how every official stage builds its blocks. `attn_kwargs` go to Attention (method, strides,
    paddings, kernel_size, with_cls_token, scale)."""

    def __init__(self, dim_in, dim_out, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=0.0,
                 attn_drop=0.0, drop_path=0.0, act="quick_gelu", eps=1e-5, dtype=np.float32,
                 rng=None, drop_rng=None, **attn_kwargs):
        super().__init__()
        if dim_in != dim_out:
            raise ValueError(f"Block: the residual needs dim_in == dim_out, got {dim_in}, {dim_out}")
        self.norm1 = nn.LayerNorm(dim_in, eps=eps, dtype=dtype)
        self.attn = Attention(dim_in, dim_out, num_heads, qkv_bias, attn_drop, drop, dtype=dtype,
                              rng=rng, drop_rng=drop_rng, **attn_kwargs)
        self.drop_path1 = nn.DropPath(drop_path, rng=drop_rng)
        self.drop_path2 = nn.DropPath(drop_path, rng=drop_rng)
        self.norm2 = nn.LayerNorm(dim_out, eps=eps, dtype=dtype)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio), act=act, drop=drop, dtype=dtype, rng=rng,
                       drop_rng=drop_rng)

    def forward(self, x, H, W):
        x = x + self.drop_path1(self.attn(self.norm1(x), H, W))       # (N, T, C)
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def backward(self, dout):
        """dout (N, T, C) -> dx (N, T, C): the forward read bottom-up; each residual adds the
        gradient through its branch to the gradient that skips it."""
        dx = dout + self.norm2.backward(self.mlp.backward(self.drop_path2.backward(dout)))
        return dx + self.norm1.backward(self.attn.backward(self.drop_path1.backward(dx)))
