"""An independent PyTorch CvT, written from the paper and the official code's semantics
(microsoft/CvT `lib/models/cls_cvt.py`) for the parity tests. It never imports minicvt: its
module and parameter names are the official ones, so a state_dict moves between the two by name,
and autograd supplies the reference gradients.

`spec` is a plain dict with the official YAML keys (PATCH_SIZE, DIM_EMBED, ...), per stage.
Drop path: each DropPath draws a fresh per-sample mask per call, as timm's; a test can instead
queue masks in `.masks` (consumed in call order) to replay another implementation's draws.
"""
from collections import OrderedDict

import torch
import torch.nn as tnn
import torch.nn.functional as tF


class QuickGELU(tnn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class DropPath(tnn.Module):
    def __init__(self, p):
        super().__init__()
        self.p, self.masks = p, []

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        if self.masks:
            return x * self.masks.pop(0)
        keep = 1.0 - self.p
        mask = torch.floor(keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype,
                                              device=x.device))
        return x / keep * mask


def to_tokens(x):
    """(b, c, h, w) -> (b, h*w, c)"""
    return x.flatten(2).transpose(1, 2)


def to_map(x, h, w):
    """(b, h*w, c) -> (b, c, h, w)"""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


class Mlp(tnn.Module):
    def __init__(self, dim, hidden, act, drop):
        super().__init__()
        self.fc1, self.act, self.fc2 = tnn.Linear(dim, hidden), act(), tnn.Linear(hidden, dim)
        self.drop = tnn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ToTokens(tnn.Module):
    def forward(self, x):
        return to_tokens(x)


def projection(dim, k, padding, stride, method):
    if method == "dw_bn":
        conv = tnn.Conv2d(dim, dim, k, stride, padding, groups=dim, bias=False)
        return tnn.Sequential(OrderedDict(conv=conv, bn=tnn.BatchNorm2d(dim), rearrange=ToTokens()))
    if method == "avg":
        return tnn.Sequential(OrderedDict(avg=tnn.AvgPool2d(k, stride, padding, ceil_mode=True),
                                          rearrange=ToTokens()))
    return None


class Attention(tnn.Module):
    def __init__(self, dim_in, dim_out, heads, qkv_bias, attn_drop, proj_drop, method, kernel_size,
                 stride_kv, stride_q, padding_kv, padding_q, with_cls_token, scale_mode):
        super().__init__()
        self.heads, self.with_cls_token = heads, with_cls_token
        self.scale = dim_out ** -0.5 if scale_mode == "official" else (dim_out // heads) ** -0.5
        self.conv_proj_q = projection(dim_in, kernel_size, padding_q, stride_q,
                                      "linear" if method == "avg" else method)
        self.conv_proj_k = projection(dim_in, kernel_size, padding_kv, stride_kv, method)
        self.conv_proj_v = projection(dim_in, kernel_size, padding_kv, stride_kv, method)
        self.proj_q = tnn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.proj_k = tnn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.proj_v = tnn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.attn_drop = tnn.Dropout(attn_drop)
        self.proj = tnn.Linear(dim_out, dim_out)
        self.proj_drop = tnn.Dropout(proj_drop)

    def forward_conv(self, x, h, w):
        if self.with_cls_token:
            cls, x = torch.split(x, [1, h * w], 1)
        m = to_map(x, h, w)
        q, k, v = (to_tokens(m) if p is None else p(m)
                   for p in (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v))
        if self.with_cls_token:
            q, k, v = (torch.cat((cls, t), dim=1) for t in (q, k, v))
        return q, k, v

    def forward(self, x, h, w):
        if self.conv_proj_q is not None or self.conv_proj_k is not None or self.conv_proj_v is not None:
            q, k, v = self.forward_conv(x, h, w)
        else:
            q = k = v = x

        def heads(t):  # b t (h d) -> b h t d
            b, n, c = t.shape
            return t.reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)

        q, k, v = heads(self.proj_q(q)), heads(self.proj_k(k)), heads(self.proj_v(v))
        attn = self.attn_drop(tF.softmax(torch.einsum("bhlk,bhtk->bhlt", q, k) * self.scale, dim=-1))
        x = torch.einsum("bhlt,bhtv->bhlv", attn, v)
        x = x.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)   # b h t d -> b t (h d)
        return self.proj_drop(self.proj(x))


class Block(tnn.Module):
    def __init__(self, dim, heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path, act, **kw):
        super().__init__()
        self.norm1 = tnn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, dim, heads, qkv_bias, attn_drop, drop, **kw)
        self.drop_path = DropPath(drop_path)
        self.norm2 = tnn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act, drop)

    def forward(self, x, h, w):
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvEmbed(tnn.Module):
    def __init__(self, k, cin, dim, stride, padding):
        super().__init__()
        self.proj = tnn.Conv2d(cin, dim, k, stride, padding)
        self.norm = tnn.LayerNorm(dim, eps=1e-5)

    def forward(self, x):
        x = self.proj(x)
        _, _, h, w = x.shape
        return to_map(self.norm(to_tokens(x)), h, w)


class Stage(tnn.Module):
    def __init__(self, s, i, cin, act, scale_mode):
        super().__init__()
        dim = s["DIM_EMBED"][i]
        self.patch_embed = ConvEmbed(s["PATCH_SIZE"][i], cin, dim, s["PATCH_STRIDE"][i],
                                     s["PATCH_PADDING"][i])
        self.cls_token = tnn.Parameter(torch.zeros(1, 1, dim)) if s["CLS_TOKEN"][i] else None
        self.pos_drop = tnn.Dropout(s["DROP_RATE"][i])
        depth = s["DEPTH"][i]
        dpr = [s["DROP_PATH_RATE"][i] * j / (depth - 1) if depth > 1 else 0.0 for j in range(depth)]
        self.blocks = tnn.ModuleList(Block(
            dim, s["NUM_HEADS"][i], s["MLP_RATIO"][i], s["QKV_BIAS"][i], s["DROP_RATE"][i],
            s["ATTN_DROP_RATE"][i], dpr[j], act, method=s["QKV_PROJ_METHOD"][i],
            kernel_size=s["KERNEL_QKV"][i], stride_kv=s["STRIDE_KV"][i], stride_q=s["STRIDE_Q"][i],
            padding_kv=s["PADDING_KV"][i], padding_q=s["PADDING_Q"][i],
            with_cls_token=s["CLS_TOKEN"][i], scale_mode=scale_mode) for j in range(depth))

    def forward(self, x):
        x = self.patch_embed(x)
        b, c, h, w = x.shape
        x = to_tokens(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x, h, w)
        cls = None
        if self.cls_token is not None:
            cls, x = torch.split(x, [1, h * w], 1)
        return to_map(x, h, w), cls


class TorchCvT(tnn.Module):
    def __init__(self, spec, num_classes, in_chans=3, act="quick_gelu", scale_mode="official"):
        super().__init__()
        act_layer = QuickGELU if act == "quick_gelu" else tnn.GELU
        self.num_stages = len(spec["DEPTH"])
        for i in range(self.num_stages):
            setattr(self, f"stage{i}", Stage(spec, i, in_chans, act_layer, scale_mode))
            in_chans = spec["DIM_EMBED"][i]
        self.norm = tnn.LayerNorm(in_chans, eps=1e-5)
        self.use_cls = spec["CLS_TOKEN"][-1]
        self.head = tnn.Linear(in_chans, num_classes)

    def forward(self, x):
        for i in range(self.num_stages):
            x, cls = getattr(self, f"stage{i}")(x)
        if self.use_cls:
            return self.head(self.norm(cls)[:, 0])
        return self.head(self.norm(to_tokens(x)).mean(dim=1))


def spec_from_config(cfg):
    """Our CvTConfig -> the official spec dict (the one place the tests translate field names)."""
    keys = ["patch_size", "patch_stride", "patch_padding", "dim_embed", "num_heads", "depth",
            "mlp_ratio", "qkv_bias", "drop_rate", "attn_drop_rate", "drop_path_rate", "cls_token",
            "qkv_proj_method", "kernel_qkv", "padding_kv", "stride_kv", "padding_q", "stride_q"]
    return {k.upper(): list(getattr(cfg, k)) for k in keys}

