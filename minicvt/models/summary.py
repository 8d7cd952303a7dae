"""Model summary from a config alone: per stage the token grid, the squeezed key/value grid,
channels, parameters and multiply-accumulates (MACs) for one image.

Nothing is allocated, so even CvT-W24 (277M parameters) is summarised instantly; the tests
check these numbers against the built model and against PyTorch.

Parameters are trainable entries only: BatchNorm's running statistics and num_batches_tracked
are buffers and are not counted (the convention that gives the paper's 20.0M for CvT-13).
MACs count the convolutions, the linear layers and the two attention products
(q k^T and p v, Tq * Tk * C each); norms, softmax, activations and pooling are not counted.
"""
from .configs import get_config


def _conv_out(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


def _pool_out(size, kernel, stride, padding):
    """AvgPool2d with ceil_mode=True (the 'avg' projection), PyTorch's rule."""
    out = -(-(size + 2 * padding - kernel) // stride) + 1
    return out - 1 if (out - 1) * stride >= size + padding else out


def _projected(size, kernel, stride, padding, method, role):
    """Grid side after the q (role 'q') or k/v projection."""
    if method == "linear" or (method == "avg" and role == "q"):
        return size
    if method == "avg":
        return _pool_out(size, kernel, stride, padding)
    return _conv_out(size, kernel, stride, padding)


def stage_rows(cfg, image_size=None):
    """One dict per stage, then one for the head: name, grid, kv_grid, channels, depth, heads,
    params, macs. image_size defaults to cfg.image_size (square images)."""
    H = W = image_size or cfg.image_size
    cin, rows = cfg.in_chans, []
    for i in range(cfg.num_stages):
        C, k, s, p = cfg.dim_embed[i], cfg.patch_size[i], cfg.patch_stride[i], cfg.patch_padding[i]
        H, W = _conv_out(H, k, s, p), _conv_out(W, k, s, p)
        if H < 1 or W < 1:
            raise ValueError(f"stage {i}: the {k}x{k} embedding does not fit the input")
        params = cin * C * k * k + C + 2 * C + (C if cfg.cls_token[i] else 0)
        macs = H * W * C * cin * k * k
        method, kq = cfg.qkv_proj_method[i], cfg.kernel_qkv[i]
        Hq = _projected(H, kq, cfg.stride_q[i], cfg.padding_q[i], method, "q")
        Wq = _projected(W, kq, cfg.stride_q[i], cfg.padding_q[i], method, "q")
        Hk = _projected(H, kq, cfg.stride_kv[i], cfg.padding_kv[i], method, "kv")
        Wk = _projected(W, kq, cfg.stride_kv[i], cfg.padding_kv[i], method, "kv")
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
