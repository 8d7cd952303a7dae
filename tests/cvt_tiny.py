"""Tiny CvT configurations shared by the model tests (fast enough for finite differences)."""
from minicvt.models import CvTConfig


def tiny_config(method="dw_bn", cls_token=True, **overrides):
    """Two stages on a 16x16 image: 8x8 grid of 4 channels (1 head), then 4x4 of 8 channels
    (2 heads); the class token (if any) in the last stage; 3 classes. Stage 0 has no qkv bias
    and stage 1 has one, so both forms are exercised."""
    fields = dict(
        name="tiny", num_classes=3, image_size=16,
        patch_size=(3, 3), patch_stride=(2, 2), patch_padding=(1, 1),
        dim_embed=(4, 8), num_heads=(1, 2), depth=(1, 1), mlp_ratio=(4.0, 2.0),
        qkv_bias=(False, True), drop_rate=(0.0, 0.0), attn_drop_rate=(0.0, 0.0),
        drop_path_rate=(0.0, 0.0), cls_token=(False, cls_token), qkv_proj_method=(method, method),
        kernel_qkv=(3, 3), padding_kv=(1, 1), stride_kv=(2, 2), padding_q=(1, 1), stride_q=(1, 1))
    fields.update(overrides)
    return CvTConfig(**fields)
