"""Pictures of attention, drawn with matplotlib (Agg) and written as PNGs atomically
(minicvt/atomic.py, as `curves.plot_curves` does).

Images are uint8 (3, H, W) (the datasets' layout); `maps` come from `capture_attention` for a
batch and `index` picks the image in it. Every map is copied up to the image's size by
`upsample_nearest` (each coarse cell drawn as an even block: see docs/attention_maps.md) and
drawn over the image with its own colour scale, from 0 to its largest value: colours compare
places within one panel, not across panels, and the colour bar at the right says so. Every
figure is a grid of square panels of PANEL_INCHES at DPI plus a strip of BAR_INCHES at the
right for the colour bar, so a figure of r rows and c columns is exactly
(c * PANEL_PX + BAR_PX) x (r * PANEL_PX) pixels: one image's figure has as readable a colour
bar as twelve images'.
"""
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from .geometry import stage_geometry, upsample_nearest
from .maps import cls_attention, query_attention

PANEL_INCHES = 1.8
BAR_INCHES = 0.6                       # the colour bar, its ticks and its label
DPI = 100
PANEL_PX = round(PANEL_INCHES * DPI)
BAR_PX = round(BAR_INCHES * DPI)
CMAP, ALPHA = "inferno", 0.6


def _figure(rows, cols):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL_INCHES + BAR_INCHES, rows * PANEL_INCHES),
                             squeeze=False, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.01, h_pad=0.01, wspace=0.01, hspace=0.01)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def _colour_bar(fig, axes):
    """The overlay's colour scale, once for the figure: 0 to each panel's own largest value."""
    from matplotlib import cm, colors

    # a bar 0.08 inch wide whatever the number of columns (fraction is of the panels' width)
    fraction = 0.08 / (axes.shape[1] * PANEL_INCHES)
    bar = fig.colorbar(cm.ScalarMappable(colors.Normalize(0.0, 1.0), CMAP), ax=axes, ticks=[0, 1],
                       fraction=fraction, pad=0.01, aspect=40)
    bar.ax.set_yticklabels(["0", "panel\nmax"], fontsize=6)
    bar.set_label("attention: each panel\nfrom 0 to its own largest", fontsize=6)


def _row_label(ax, text):
    """A label at the left of a row of panels (the axes stay without ticks or frame)."""
    ax.set_axis_on()
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_ylabel(text, fontsize=7)


def _save(fig, path):
    """Write the figure to path atomically (minicvt/atomic.py); -> path."""
    import matplotlib.pyplot as plt

    try:
        # no bbox_inches: the size stays exact
        atomic_write(path, lambda f: fig.savefig(f, dpi=DPI, format="png"))
    finally:
        plt.close(fig)
    return Path(path)


def _show(ax, image, heat=None, title=None):
    """image uint8 (3, H, W), heat (H, W) or None, drawn over it from 0 to its maximum."""
    ax.imshow(image.transpose(1, 2, 0), interpolation="nearest")   # (3, H, W) -> (H, W, 3)
    if heat is not None:
        top = float(heat.max())
        ax.imshow(heat, cmap=CMAP, alpha=ALPHA, vmin=0.0, vmax=top if top > 0 else 1.0,
                  interpolation="nearest")
    if title:
        ax.set_title(title, fontsize=7)


def query_cell(query_px, image_hw, grid):
    """The cell (row, col) of a grid (Hq, Wq) that pixel query_px = (row, col) of an image
    (H, W) falls in, by the pictures' even-block rule."""
    return tuple(int(q * g // n) for q, g, n in zip(query_px, grid, image_hw))


def _mark(ax, query_px, cell, grid, image_hw):
    """A cross on the query pixel and a box round the query cell's block."""
    from matplotlib.patches import Rectangle

    (H, W), (Hq, Wq) = image_hw, grid
    y0, y1 = cell[0] * H / Hq, (cell[0] + 1) * H / Hq
    x0, x1 = cell[1] * W / Wq, (cell[1] + 1) * W / Wq
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="cyan", lw=1))
    ax.plot([query_px[1]], [query_px[0]], "+", color="cyan", ms=8, mew=1.5)


def plot_query_attention(image, maps, config, query_px, path, index=0, title=None):
    """(a) One row per (stage, block): the image with the query marked, then each head's
    attention over the key grid for the query cell under pixel query_px = (row, col).
    -> path. Rows: the total depth; columns: 1 + the most heads of any stage."""
    H, W = image.shape[1:]
    geos = stage_geometry(config, (H, W))
    fig, axes = _figure(sum(g.depth for g in geos), 1 + max(g.num_heads for g in geos))
    r = 0
    for g in geos:
        cell = query_cell(query_px, (H, W), g.query_grid)
        for j in range(g.depth):
            grid, cls = query_attention(maps, config, (H, W), g.index, j, cell)   # (N, h, Hk, Wk)
            label = (f"stage{g.index} block{j}\nquery {cell} of {g.query_grid[0]}x{g.query_grid[1]}"
                     f"\nkeys {g.key_grid[0]}x{g.key_grid[1]}")
            _show(axes[r, 0], image, None, label)
            _mark(axes[r, 0], query_px, cell, g.query_grid, (H, W))
            for k in range(g.num_heads):
                extra = f", cls {cls[index, k]:.2f}" if cls is not None else ""
                _show(axes[r, 1 + k], image, upsample_nearest(grid[index, k], (H, W)), f"head {k}{extra}")
                _mark(axes[r, 1 + k], query_px, cell, g.query_grid, (H, W))
            r += 1
    _colour_bar(fig, axes)
    if title:
        fig.suptitle(title, fontsize=8)
    return _save(fig, path)


def plot_cls_attention(image, maps, config, path, index=0, title=None):
    """(b) The last stage's class token: one row per block, the image then each head's
    attention over the key grid (its weight on itself in the title). -> path."""
    H, W = image.shape[1:]
    g = stage_geometry(config, (H, W))[-1]
    fig, axes = _figure(g.depth, 1 + g.num_heads)
    for j in range(g.depth):
        grid, self_w = cls_attention(maps, config, (H, W), block=j)   # (N, h, Hk, Wk), (N, h)
        _show(axes[j, 0], image, None, f"stage{g.index} block{j}\nclass token\n"
                                       f"keys {g.key_grid[0]}x{g.key_grid[1]}")
        for k in range(g.num_heads):
            _show(axes[j, 1 + k], image, upsample_nearest(grid[index, k], (H, W)),
                  f"head {k}, self {self_w[index, k]:.2f}")
    _colour_bar(fig, axes)
    if title:
        fig.suptitle(title, fontsize=8)
    return _save(fig, path)


def plot_rollout(images, ro, path, titles=None):
    """(c) One column per image: the image, the rollout on the last stage's grid, and the
    rollout carried through every stage onto the pixels (ro: a Rollout for these images;
    the flow left on class tokens is in the titles). -> path."""
    n = len(images)
    fig, axes = _figure(3, n)
    g = ro.geometry[-1]
    on_last = ro.last_upsampled()                          # (N, H, W)
    for i in range(n):
        cls = sum(float(c[i]) for c in ro.cls if c is not None)
        _show(axes[0, i], images[i], None, titles[i] if titles else f"image {i}")
        _show(axes[1, i], images[i], on_last[i], f"last stage {g.grid[0]}x{g.grid[1]}")
        _show(axes[2, i], images[i], ro.image[i], f"all stages, cls {cls:.2f}")
    _row_label(axes[0, 0], "image")
    _row_label(axes[1, 0], "rollout, last stage")
    _row_label(axes[2, 0], "rollout onto pixels")
    _colour_bar(fig, axes)
    return _save(fig, path)


def plot_grid(images, heat, path, titles, correct=None, per_row=6):
    """(d) Several images, each an image panel (title: `titles[i]`, e.g. predicted and true
    labels; green/red when `correct[i]` is given) above its map heat[i] (H, W) overlaid.
    -> path. Rows: 2 per row of up to `per_row` images."""
    n = len(images)
    cols = min(n, per_row)
    rows = -(-n // cols)
    fig, axes = _figure(2 * rows, cols)
    for i in range(n):
        r, c = divmod(i, cols)
        _show(axes[2 * r, c], images[i], None, None)
        color = "black" if correct is None else ("tab:green" if correct[i] else "tab:red")
        axes[2 * r, c].set_title(titles[i], fontsize=7, color=color)
        _show(axes[2 * r + 1, c], images[i], np.asarray(heat[i]), None)
    for r in range(rows):
        _row_label(axes[2 * r + 1, 0], "attention rollout")
    _colour_bar(fig, axes)
    return _save(fig, path)
