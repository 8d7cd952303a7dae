"""Attention maps of a CvT: capture them, read one query's map or the class token's map, and
roll attention out across blocks and stages (Abnar & Zuidema, "Quantifying Attention Flow in
Transformers", 2020). Choices and pictures: docs/attention_maps.md.

Shapes: N images, h heads; a stage's maps are (N, h, [1+]Tq, [1+]Tk) with the class token (if
any) first on both axes, then the query grid (Hq, Wq) and the key grid (Hk, Wk) row-major.
T' = [1+]H*W is a stage's own token count. Maps are brought to the host once, by
`capture_attention`; everything after it is NumPy (pictures are drawn on the host anyway).
"""
from dataclasses import dataclass

import numpy as np

from .. import backend, nn
from .geometry import image_shape, share, stage_geometry, upsample_nearest


def capture_attention(model, x):
    """Forward x (N, 3, H, W) (an array on the model's backend) in eval mode without caches,
    keeping every block's attention. -> (logits (N, K), {'stage{i}.blocks.{j}.attn':
    (N, h, [1+]Tq, [1+]Tk)}), all host NumPy. The model is left as it was found: its mode
    restored and keep_attention off again (so later forwards keep nothing)."""
    was_training = model.training
    model.eval().keep_attention(True)
    try:
        with nn.no_grad():
            logits = model.forward(x)
        maps = {name: backend.to_numpy(p) for name, p in model.attention_maps().items()}
    finally:
        model.keep_attention(False)
        model.train(was_training)
    return backend.to_numpy(logits), maps


def _block_map(maps, geo, block):
    """The probabilities of `block` (negative counts from the end) of the stage `geo` describes,
    checked against the shape its geometry predicts."""
    j = range(geo.depth)[block]
    name = f"stage{geo.index}.blocks.{j}.attn"
    if name not in maps:
        raise ValueError(f"no attention for {name}: run capture_attention first")
    p = maps[name]
    if p.shape[1:] != geo.map_shape(p.shape[0])[1:]:
        raise ValueError(f"{name} has shape {p.shape}, but the config on this image size gives "
                         f"{geo.map_shape(p.shape[0])}: is image_size the one the maps came from?")
    return p


def query_attention(maps, config, image_size, stage, block, query_yx):
    """Each head's attention of the query at query_yx = (row, col) of stage `stage`'s query grid
    in block `block` (negative indices count from the end).
    -> grid (N, h, Hk, Wk), the weights on the key grid, and cls (N, h), the weight on the
    class token's key (None when the stage has no class token). grid sums plus cls are 1."""
    geo = stage_geometry(config, image_size)[stage]
    p = _block_map(maps, geo, block)                        # (N, h, [1+]Tq, [1+]Tk)
    (Hq, Wq), (Hk, Wk), c = geo.query_grid, geo.key_grid, int(geo.cls)
    r, col = query_yx
    if not (0 <= r < Hq and 0 <= col < Wq):
        raise ValueError(f"query {(r, col)} is outside stage {geo.index}'s {Hq}x{Wq} query grid")
    row = p[:, :, c + r * Wq + col]                         # (N, h, [1+]Tk)
    grid = row[:, :, c:].reshape(*row.shape[:2], Hk, Wk)    # (N, h, Tk) -> (N, h, Hk, Wk)
    return grid, (row[:, :, 0] if c else None)


def cls_attention(maps, config, image_size, block=-1, stage=-1):
    """The class token's attention per head in `block` of `stage` (default: the last block of
    the last stage, the one the head reads). -> grid (N, h, Hk, Wk) on the key grid and
    self (N, h), its weight on its own key; they sum to 1."""
    geo = stage_geometry(config, image_size)[stage]
    if not geo.cls:
        raise ValueError(f"stage {geo.index} has no class token (this model reads the mean of "
                         f"its tokens); look at a query's map or the rollout instead")
    p = _block_map(maps, geo, block)
    row = p[:, :, 0]                                        # (N, h, 1 + Tk): the class token's query
    grid = row[:, :, 1:].reshape(*row.shape[:2], *geo.key_grid)   # (N, h, Hk, Wk)
    return grid, row[:, :, 0]


# -- rollout ----------------------------------------------------------------------------------------
def block_matrix(p, geo):
    """One block's attention as a mixing of the stage's own tokens, p (N, h, [1+]Tq, [1+]Tk)
    -> M (N, T', T'), every row summing to one:

    1. heads averaged (Abnar & Zuidema's choice);
    2. keys moved onto the stage's grid by `share`: key j's weight is shared equally by the
       tokens of the block it covers when the key grid is laid evenly over the token grid
       (with stride 2, tokens 2j and 2j+1 along each axis), so queries and keys index the
       same T' tokens; the class token stays first;
    3. the residual: M = 0.5 A + 0.5 I (the block's output is its input plus the attention),
       then rows renormalised (a no-op up to rounding, as the rows already sum to one)."""
    if geo.query_grid != geo.grid:
        raise ValueError(f"stage {geo.index}: queries on a {geo.query_grid} grid cannot join the "
                         f"residual of a {geo.grid} grid (stride_q must be 1)")
    a = p.astype(np.float64).mean(axis=1)                   # (N, Tq', Tk')
    N, Tq1 = a.shape[:2]
    (H, W), c = geo.grid, int(geo.cls)
    keys = a[:, :, c:].reshape(N, Tq1, *geo.key_grid)       # (N, Tq', Tk) -> (N, Tq', Hk, Wk)
    on_grid = share(keys, geo.grid)                         # (N, Tq', H, W)
    A = np.concatenate([a[:, :, :c], on_grid.reshape(N, Tq1, H * W)], axis=2)   # (N, T', T')
    M = 0.5 * A + 0.5 * np.eye(Tq1)
    return M / M.sum(axis=-1, keepdims=True)


def stage_rollout(maps, config, image_size, stage):
    """The rollout through every block of one stage: M_{D-1} @ ... @ M_0, (N, T', T'); row t
    says how much each input token of the stage flows into output token t. Rows sum to one."""
    geo = stage_geometry(config, image_size)[stage]
    R = None
    for j in range(geo.depth):
        M = block_matrix(_block_map(maps, geo, j), geo)
        R = M if R is None else M @ R                       # later blocks act on the left
    return R


@dataclass
class Rollout:
    """The attention flow of the head's read-out back to every grid (see `rollout`).

    stages[i]: (N, H_i, W_i) flow on stage i's input tokens; cls[i]: (N,) flow that ends on
    stage i's class token (None without one); image: (N, H, W) flow on the image's pixels.
    For every image, image.sum() + the sum of all cls is 1."""
    stages: list
    cls: list
    image: np.ndarray
    geometry: list

    @property
    def last(self):
        """(N, H_L, W_L): the flow on the last stage's grid, its blocks rolled out."""
        return self.stages[-1]

    def last_upsampled(self):
        """`last` (N, H_L, W_L) copied up to (N, H, W) by `upsample_nearest` (for pictures)."""
        return upsample_nearest(self.last, self.image.shape[1:])


def rollout(maps, config, image_size):
    """Attention rollout from the head's read-out to the image, for every image.

    Start: the read-out row over the last stage's output tokens, the class token
    (config.pooling 'cls') or the mean of the grid tokens ('mean'). Within a stage, the row
    is multiplied through the blocks' `block_matrix` from last to first. Across stages, a
    stage's tokens were made from the previous, finer grid by the stride-2 ConvEmbed, so the
    flow on each token is shared equally by the block of finer cells under it (`share`), and
    stage 0's flow onto the image's pixels the same way. Flow that reaches a class token
    stops there (the token is a learned constant, read from no image cell) and is reported
    in `cls`. -> Rollout."""
    geos = stage_geometry(config, image_size)
    last = geos[-1]
    N = _block_map(maps, last, 0).shape[0]
    T, c = last.grid[0] * last.grid[1], int(last.cls)
    flow = np.zeros((N, c + T))                             # (N, T'): the read-out row
    if config.pooling == "cls":
        flow[:, 0] = 1.0
    else:
        flow[:, c:] = 1.0 / T
    stages, cls = [None] * len(geos), [None] * len(geos)
    for geo in reversed(geos):
        for j in reversed(range(geo.depth)):
            M = block_matrix(_block_map(maps, geo, j), geo)          # (N, T', T')
            flow = np.einsum("nt,nts->ns", flow, M)                  # (N, T')
        c = int(geo.cls)
        cls[geo.index] = flow[:, 0] if c else None
        grid = flow[:, c:].reshape(N, *geo.grid)                     # (N, T) -> (N, H_i, W_i)
        stages[geo.index] = grid
        # one grid finer: the previous stage's tokens, or the image's pixels under stage 0
        finer = geos[geo.index - 1].grid if geo.index else image_shape(image_size)
        grid = share(grid, finer)                                    # (N, *finer)
        if geo.index:
            # the previous stage's class token output is dropped by the model: no flow to it
            c_prev = int(geos[geo.index - 1].cls)
            flow = np.concatenate([np.zeros((N, c_prev)), grid.reshape(N, -1)], axis=1)
    return Rollout(stages, cls, grid, geos)
