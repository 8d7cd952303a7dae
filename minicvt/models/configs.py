"""CvT configurations: one `@dataclass` with the official spec's per-stage lists, and the named
models.

Every per-stage field is a tuple with one entry per stage, named after the official YAML keys
(`MODEL.SPEC.DIM_EMBED` -> `dim_embed`, ...). Choices where sources differ are options with
the official behaviour as the default (see docs/architecture.md):

    act         'quick_gelu' (official: x * sigmoid(1.702 x)) or 'gelu' (exact, erf)
    attn_scale  'official' (dim_out ** -0.5, the full embedding dimension, as the official code)
                or 'head' (d ** -0.5, the per-head dimension of "Attention is all you need")
    pool        'auto' (official: class token when the last stage has one, else mean of tokens),
                'cls' or 'mean'
"""
import json
from dataclasses import asdict, dataclass, fields, replace

_PER_STAGE = ("patch_size", "patch_stride", "patch_padding", "dim_embed", "num_heads", "depth",
              "mlp_ratio", "qkv_bias", "drop_rate", "attn_drop_rate", "drop_path_rate", "cls_token",
              "qkv_proj_method", "kernel_qkv", "padding_kv", "stride_kv", "padding_q", "stride_q")
_METHODS = ("dw_bn", "avg", "linear")


@dataclass(frozen=True)
class CvTConfig:
    """A CvT architecture. Defaults are CvT-13 (the official `cvt-13-224x224.yaml`)."""
    name: str = "custom"
    in_chans: int = 3
    num_classes: int = 1000
    image_size: int = 224              # for the summary and docs; the model accepts any size
    patch_size: tuple = (7, 3, 3)      # ConvEmbed kernel
    patch_stride: tuple = (4, 2, 2)
    patch_padding: tuple = (2, 1, 1)
    dim_embed: tuple = (64, 192, 384)
    num_heads: tuple = (1, 3, 6)
    depth: tuple = (1, 2, 10)
    mlp_ratio: tuple = (4.0, 4.0, 4.0)
    qkv_bias: tuple = (True, True, True)
    drop_rate: tuple = (0.0, 0.0, 0.0)          # dropout after pos_drop, mlp and proj
    attn_drop_rate: tuple = (0.0, 0.0, 0.0)     # dropout on the attention probabilities
    drop_path_rate: tuple = (0.0, 0.0, 0.1)     # stochastic depth, linspace(0, rate, depth)
    cls_token: tuple = (False, False, True)
    qkv_proj_method: tuple = ("dw_bn", "dw_bn", "dw_bn")
    kernel_qkv: tuple = (3, 3, 3)
    padding_kv: tuple = (1, 1, 1)
    stride_kv: tuple = (2, 2, 2)       # keys/values "squeezed": 4x fewer tokens
    padding_q: tuple = (1, 1, 1)
    stride_q: tuple = (1, 1, 1)
    act: str = "quick_gelu"
    attn_scale: str = "official"
    pool: str = "auto"
    norm_eps: float = 1e-5             # every LayerNorm (official: partial(LayerNorm, eps=1e-5))

    def __post_init__(self):
        S = len(self.depth)
        for f in _PER_STAGE:
            v = getattr(self, f)
            if not isinstance(v, (tuple, list)) or len(v) != S:
                raise ValueError(f"CvTConfig.{f} must list one value per stage ({S}), got {v!r}")
            object.__setattr__(self, f, tuple(v))       # lists (from JSON) become tuples
        for i in range(S):
            if self.dim_embed[i] % self.num_heads[i]:
                raise ValueError(f"stage {i}: dim_embed {self.dim_embed[i]} does not split into "
                                 f"{self.num_heads[i]} heads")
            if self.qkv_proj_method[i] not in _METHODS:
                raise ValueError(f"stage {i}: qkv_proj_method must be one of {_METHODS}, "
                                 f"got {self.qkv_proj_method[i]!r}")
        if self.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"act must be 'quick_gelu' or 'gelu', got {self.act!r}")
        if self.attn_scale not in ("official", "head"):
            raise ValueError(f"attn_scale must be 'official' or 'head', got {self.attn_scale!r}")
        if self.pool not in ("auto", "cls", "mean"):
            raise ValueError(f"pool must be 'auto', 'cls' or 'mean', got {self.pool!r}")
        if self.pool == "cls" and not self.cls_token[-1]:
            raise ValueError("pool='cls' needs a class token in the last stage")

    @property
    def num_stages(self):
        return len(self.depth)

    @property
    def pooling(self):
        """'cls' or 'mean': how the head reads the last stage ('auto' resolved)."""
        if self.pool == "auto":
            return "cls" if self.cls_token[-1] else "mean"
        return self.pool

    def to_json(self):
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text):
        d = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"CvTConfig: unknown fields {unknown}")
        return cls(**d)


# The paper's ImageNet models (official experiments/imagenet/cvt/*.yaml).
CVT_13 = CvTConfig(name="cvt-13")
CVT_21 = replace(CVT_13, name="cvt-21", depth=(1, 4, 16))
CVT_W24 = replace(CVT_13, name="cvt-w24", dim_embed=(192, 768, 1024), num_heads=(3, 12, 16),
                  depth=(2, 2, 20), drop_path_rate=(0.0, 0.0, 0.3))

# CIFAR-10 (32x32): stride-2 embeddings give 16x16, 8x8, 4x4 token grids.
CVT_CIFAR_S = replace(
    CVT_13, name="cvt-cifar-s", num_classes=10, image_size=32,
    patch_size=(3, 3, 3), patch_stride=(2, 2, 2), patch_padding=(1, 1, 1),
    dim_embed=(64, 128, 256), num_heads=(1, 2, 4), depth=(1, 2, 2))
# A wider, deeper CIFAR model meant for a GPU. It has not been trained on this machine (no GPU
# here); the widths follow CvT-13's 1:3:6 ratio scaled to 96/192/384 and the depths give the
# 8x8 and 4x4 stages most of the blocks, as CvT-13 does at 28x28 and 14x14.
CVT_CIFAR_M = replace(
    CVT_CIFAR_S, name="cvt-cifar-m", dim_embed=(96, 192, 384), num_heads=(1, 3, 6),
    depth=(1, 2, 4), drop_path_rate=(0.0, 0.0, 0.1))

CONFIGS = {c.name: c for c in (CVT_13, CVT_21, CVT_W24, CVT_CIFAR_S, CVT_CIFAR_M)}


def get_config(name_or_config, **overrides):
    """A named config (or a CvTConfig passed through), with fields replaced by `overrides`."""
    if isinstance(name_or_config, CvTConfig):
        cfg = name_or_config
    elif name_or_config in CONFIGS:
        cfg = CONFIGS[name_or_config]
    else:
        raise ValueError(f"unknown config {name_or_config!r}: expected one of {sorted(CONFIGS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(cfg, **overrides) if overrides else cfg
