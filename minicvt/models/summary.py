"""Model summary from a config alone: per stage the token grid, the squeezed key/value grid,
channels, parameters and multiply-accumulates (MACs) for one image. `stage_grids` is the one
place the grids are computed; the attention pictures (minicvt.viz) take theirs from it too.

Nothing is allocated, so even CvT-W24 (277M parameters) is summarised instantly; the tests
check these numbers against the built model and against PyTorch.

Parameters are trainable entries only: BatchNorm's running statistics and num_batches_tracked
are buffers and are not counted (the convention that gives the paper's 20.0M for CvT-13).
MACs count the convolutions, the linear layers and the two attention products
(q k^T and p v, Tq * Tk * C each); norms, softmax, activations and pooling are not counted.
"""
import numpy as np

from ..functional import conv_output_size, pool_output_size
from .configs import get_config


def image_shape(image_size):
    """(H, W) from an int (a square image) or a pair."""
    H, W = (image_size, image_size) if np.isscalar(image_size) else image_size
    return int(H), int(W)


def _projected(method, kernel, stride, padding, size):
    """Cells along a `size`-cell axis after one q/k/v projection. 'linear' is no projection;
    'avg' pools with PyTorch's ceil_mode rule (so an even grid keeps a last, partly padded
    window: 8 -> 5 with kernel 3, stride 2, padding 1); 'dw_bn' is a convolution (8 -> 4)."""
    if method == "linear":
        return size
    if method == "avg":
        return pool_output_size(size, kernel, stride, padding, ceil_mode=True)
    return conv_output_size(size, kernel, stride, padding)


def stage_grids(cfg, image_size=None):
    """[(grid, query_grid, key_grid)] for every stage of `cfg` on an image of `image_size` (an
    int for a square image, or (H, W); default cfg.image_size), each grid (rows, cols): grid
    the stage's tokens, made from the previous grid (or the image) by its ConvEmbed, and the
    grids of q and of k, v made from it by the projections (class tokens not counted). Under
    'avg' the queries are not pooled (the official code builds them 'linear'), so their grid
    is the stage's grid. The two axes are computed separately."""
    image = size = image_shape(image_size or cfg.image_size)
    grids = []
    for i in range(cfg.num_stages):
        size = tuple(conv_output_size(n, cfg.patch_size[i], cfg.patch_stride[i], cfg.patch_padding[i])
                     for n in size)
        method, k = cfg.qkv_proj_method[i], cfg.kernel_qkv[i]
        q = tuple(_projected("linear" if method == "avg" else method, k, cfg.stride_q[i], cfg.padding_q[i], n)
                  for n in size)
        kv = tuple(_projected(method, k, cfg.stride_kv[i], cfg.padding_kv[i], n) for n in size)
        if min(size + q + kv) < 1:
            raise ValueError(f"stage {i}: a {image} image leaves no tokens")
        grids.append((size, q, kv))
    return grids


def stage_rows(cfg, image_size=None):
    """One dict per stage, then one for the head: name, grid, kv_grid, channels, depth, heads,
    params, macs. image_size: as for stage_grids."""
    cin, rows = cfg.in_chans, []
    for i, ((H, W), (Hq, Wq), (Hk, Wk)) in enumerate(stage_grids(cfg, image_size)):
        C, k = cfg.dim_embed[i], cfg.patch_size[i]
        params = cin * C * k * k + C + 2 * C + (C if cfg.cls_token[i] else 0)
        macs = H * W * C * cin * k * k
        method, kq = cfg.qkv_proj_method[i], cfg.kernel_qkv[i]
        extra = 1 if cfg.cls_token[i] else 0
        T, Tq, Tk = H * W + extra, Hq * Wq + extra, Hk * Wk + extra
        hidden = int(C * cfg.mlp_ratio[i])
        block_params = 2 * C + 3 * (C * C + (C if cfg.qkv_bias[i] else 0)) + C * C + C + 2 * C \
            + C * hidden + hidden + hidden * C + C
        # proj_q, proj_k and proj_v, q k^T and p v, proj, fc1 and fc2
        block_macs = Tq * C * C + 2 * Tk * C * C + 2 * Tq * Tk * C + Tq * C * C + 2 * T * C * hidden
        if method == "dw_bn":
            block_params += 3 * (C * kq * kq + 2 * C)               # depthwise conv + BN, q k v
            block_macs += (Hq * Wq + 2 * Hk * Wk) * C * kq * kq
        params += cfg.depth[i] * block_params
        macs += cfg.depth[i] * block_macs
        rows.append(dict(name=f"stage{i}", grid=(H, W), kv_grid=(Hk, Wk), cls=bool(extra), channels=C,
                         depth=cfg.depth[i], heads=cfg.num_heads[i], params=params, macs=macs))
        cin = C
    K = cfg.num_classes
    rows.append(dict(name="head", grid=None, kv_grid=None, cls=cfg.pooling == "cls", channels=cin,
                     depth=0, heads=0, params=2 * cin + cin * K + K, macs=cin * K))
    return rows


def format_summary(name_or_config, num_classes=None, image_size=None):
    """The text `minicvt summary` prints; the last line is the total parameter count."""
    cfg = get_config(name_or_config, num_classes=num_classes, image_size=image_size)
    rows = stage_rows(cfg)
    pool = "class token" if cfg.pooling == "cls" else "mean of tokens"
    lines = [f"{cfg.name}: {cfg.image_size}x{cfg.image_size}x{cfg.in_chans} input, "
             f"{cfg.num_classes} classes, head on the {pool}",
             f"{'':<7}{'tokens':<13}{'k/v tokens':<13}{'channels':>9}{'depth':>6}{'heads':>6}"
             f"{'parameters':>14}{'MACs':>16}"]
    for r in rows:
        if r["name"] == "head":
            grid, kv, ch = "cls" if r["cls"] else "mean", "", f"{r['channels']}->{cfg.num_classes}"
            lines.append(f"{'head':<7}{grid:<13}{kv:<13}{ch:>9}{'':>6}{'':>6}"
                         f"{r['params']:>14,}{r['macs']:>16,}")
            continue
        cls = " + cls" if r["cls"] else ""
        grid = f"{r['grid'][0]}x{r['grid'][1]}{cls}"
        kv = f"{r['kv_grid'][0]}x{r['kv_grid'][1]}{cls}"
        lines.append(f"{r['name']:<7}{grid:<13}{kv:<13}{r['channels']:>9}{r['depth']:>6}{r['heads']:>6}"
                     f"{r['params']:>14,}{r['macs']:>16,}")
    total_params = sum(r["params"] for r in rows)
    total_macs = sum(r["macs"] for r in rows)
    lines.append(f"multiply-accumulates per image: {total_macs:,} ({total_macs / 1e9:.2f} G)")
    lines.append(f"total parameters: {total_params:,}")
    return "\n".join(lines)


def count_parameters(name_or_config, num_classes=None):
    """Trainable parameters of a config, without building it."""
    return sum(r["params"] for r in stage_rows(get_config(name_or_config, num_classes=num_classes)))
