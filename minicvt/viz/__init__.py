"""Pictures of a run: the attention maps of a trained CvT, what each block attends to and where
the prediction's attention flows from (docs/attention_maps.md), and the training curves.

    from minicvt import viz
    logits, maps = viz.capture_attention(model, x)          # maps: {'stage2.blocks.0.attn': (N, h, Tq, Tk)}
    grid, cls = viz.query_attention(maps, config, 32, stage=1, block=0, query_yx=(3, 4))   # (N, h, Hk, Wk)
    grid, self_w = viz.cls_attention(maps, config, 32)      # the last stage's class token, per head
    ro = viz.rollout(maps, config, 32)                       # ro.last (N, H_L, W_L), ro.image (N, 32, 32)
    viz.plot_query_attention(images[0], maps, config, (16, 16), "query.png")

Modules: geometry (the stages' grids and the maps between grids), maps (capture, per-query and
class-token maps, rollout), figures (matplotlib), command (`minicvt attention`), curves (the
trainer's curves.png).
"""
from .command import KINDS, attention_figures, load_model, predict, read_image_files
from .curves import plot_curves
from .figures import (BAR_PX, DPI, PANEL_INCHES, PANEL_PX, plot_cls_attention, plot_grid,
                      plot_query_attention, plot_rollout)
from .geometry import StageGeometry, box_index, box_matrix, share, stage_geometry, upsample_nearest
from .maps import (Rollout, block_matrix, capture_attention, cls_attention, query_attention,
                   rollout, stage_rollout)
