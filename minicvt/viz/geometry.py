"""Where every token of every stage sits: grid sizes, and the two maps between grids that the
attention pictures need. Derivations and pictures: docs/attention_maps.md.

Shapes: S stages; stage i has a token grid (H_i, W_i), a query grid (Hq, Wq) and a key grid
(Hk, Wk) (keys and values "squeezed" by a strided projection, so about 2x coarser per side),
plus a class token in front of queries and keys when the config asks for one.

The grids come from window ops (the ConvEmbed convolution, the q/k/v projections) whose
windows overlap (kernel 3, stride 2). To move numbers between two grids, the coarse grid is
laid evenly over the fine one, and each fine cell belongs to the coarse cell it falls in:
fine cell Y of H belongs to coarse cell floor(Y h / H) of h (PyTorch's interpolate(mode=
'nearest') index). With stride 2 that is the 2x2 block under each coarse cell.

- `share` (the rollout's rule): a coarse cell's weight is shared equally by its block, so no
  attention mass is lost or made (each row of `box_matrix` sums to one).
- `upsample_nearest` (the pictures' rule): each fine cell shows its coarse cell's value.

It is an approximation both ways: a kernel-3, stride-2, padding-1 cell reads the input cells
2i-1..2i+1, a window centred on 2i, not exactly its block {2i, 2i+1}. Sharing over the real,
overlapping windows would count every odd cell twice and paint a checkerboard over every map
(docs/attention_maps.md).

The grids themselves are computed in one place, `models.stage_grids` (the model summary uses
them too). Grids are square in every config (one kernel, stride and padding per stage), but the
two axes are computed separately, so non-square images work too. Everything is host NumPy.
"""
from dataclasses import dataclass

import numpy as np

from ..models.summary import image_shape, stage_grids


@dataclass(frozen=True)
class StageGeometry:
    """Stage `index`'s grids, each (rows, cols). grid: the stage's tokens, made from the
    previous grid (or the image) by its ConvEmbed; query_grid / key_grid: the grids of q and
    of k, v, made from `grid` by the projections; cls: whether q and k carry a class token
    first."""
    index: int
    cls: bool
    num_heads: int
    depth: int
    grid: tuple
    query_grid: tuple
    key_grid: tuple

    def map_shape(self, n):
        """The attention probabilities' shape (N, h, [1+]Tq, [1+]Tk) for n images."""
        c = int(self.cls)
        return (n, self.num_heads, c + self.query_grid[0] * self.query_grid[1],
                c + self.key_grid[0] * self.key_grid[1])


def stage_geometry(config, image_size):
    """[StageGeometry] for every stage of `config` (a CvTConfig) on an image of `image_size`
    (an int for a square image, or (H, W)); the grids are models.stage_grids'."""
    return [StageGeometry(i, bool(config.cls_token[i]), config.num_heads[i], config.depth[i], grid, q, kv)
            for i, (grid, q, kv) in enumerate(stage_grids(config, image_size))]


def box_index(n_fine, n_coarse):
    """(n_fine,) the coarse cell each fine cell falls in: floor(Y n_coarse / n_fine)."""
    return np.arange(n_fine) * n_coarse // n_fine


def box_matrix(n_coarse, n_fine):
    """(n_coarse, n_fine): row i shares 1 equally over the fine cells in coarse cell i's block.
    A coarse cell with no fine cell (a coarse grid finer than the fine one) is an error."""
    idx = box_index(n_fine, n_coarse)
    M = (idx[None, :] == np.arange(n_coarse)[:, None]).astype(np.float64)   # (n_coarse, n_fine)
    counts = M.sum(axis=1, keepdims=True)
    if (counts == 0).any():
        raise ValueError(f"a {n_coarse}-cell grid cannot be shared over {n_fine} cells")
    return M / counts


def share(x, fine):
    """x (..., h, w) on a coarse grid -> (..., H, W) on the grid `fine` = (H, W) under it:
    each coarse value shared equally by its block, one axis at a time (the Kronecker product
    of the two box matrices is never formed). The total of x is kept."""
    h, w = x.shape[-2:]
    return box_matrix(h, fine[0]).T @ x @ box_matrix(w, fine[1])   # (H, h) @ (..., h, w) @ (w, W)


def upsample_nearest(x, size):
    """x (..., h, w) -> (..., H, W), size = (H, W): fine cell Y shows coarse cell
    floor(Y h / H) (PyTorch's interpolate(mode='nearest')). Values are copied, not shared."""
    H, W = image_shape(size)
    h, w = x.shape[-2:]
    return x[..., box_index(H, h)[:, None], box_index(W, w)[None, :]]    # (..., H, W)
