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
import math
import reprlib
from dataclasses import asdict, dataclass, fields, replace

_PER_STAGE = ("patch_size", "patch_stride", "patch_padding", "dim_embed", "num_heads", "depth",
              "mlp_ratio", "qkv_bias", "drop_rate", "attn_drop_rate", "drop_path_rate", "cls_token",
              "qkv_proj_method", "kernel_qkv", "padding_kv", "stride_kv", "padding_q", "stride_q")
_METHODS = ("dw_bn", "avg", "linear")

# What a config may hold, so that a file's config is refused in one line instead of failing deep
# in the model (or allocating what it claims). The bounds are far beyond any CvT yet built; the
# parameter count a file's config implies is also checked against the file's size when it is
# read (minicvt.models.expect).
MAX_STAGES = 16


def _whole(lo, hi):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
            f"a whole number from {lo} to {hi}")


def _real(lo, hi, what):
    return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and lo <= v < hi, what)


_FLAG = (lambda v: isinstance(v, bool), "true or false")
_RATE = _real(0.0, 1.0, "a rate from 0 up to (not including) 1")
_STAGE_RULES = {
    "patch_size": _whole(1, 128), "patch_stride": _whole(1, 128), "patch_padding": _whole(0, 127),
    "dim_embed": _whole(1, 65536), "num_heads": _whole(1, 65536), "depth": _whole(1, 1024),
    "mlp_ratio": _real(1 / 1024, 64.0, "a number above 0 and below 64"), "qkv_bias": _FLAG,
    "drop_rate": _RATE, "attn_drop_rate": _RATE, "drop_path_rate": _RATE, "cls_token": _FLAG,
    "qkv_proj_method": (lambda v: isinstance(v, str) and v in _METHODS, f"one of {', '.join(_METHODS)}"),
    "kernel_qkv": _whole(1, 128), "padding_kv": _whole(0, 127), "stride_kv": _whole(1, 128),
    "padding_q": _whole(0, 127), "stride_q": _whole(1, 128)}
_SCALARS = {
    "name": (lambda v: isinstance(v, str) and len(v) <= 200, "a name of at most 200 characters"),
    "in_chans": _whole(1, 64), "num_classes": _whole(1, 1_000_000), "image_size": _whole(1, 8192),
    "norm_eps": _real(1e-12, 1.0, "a small number above 0")}


def stage_problem(field, values):
    """What is wrong with a per-stage field's values (a list, one per stage), or None."""
    ok, what = _STAGE_RULES[field]
    if all(ok(v) for v in values):
        return None
    return f"must list {what} per stage, got {reprlib.repr(list(values))}"


def stage_geometry_problem(cfg, i):
    """What makes stage i of a config (its per-stage values each valid) impossible, or None."""
    C, heads = cfg.dim_embed[i], cfg.num_heads[i]
    if C % heads:
        return f"dim_embed {C} does not split into {heads} heads"
    if cfg.patch_padding[i] >= cfg.patch_size[i]:
        return f"patch_padding {cfg.patch_padding[i]} must be smaller than patch_size {cfg.patch_size[i]}"
    for pad in ("padding_kv", "padding_q"):
        if getattr(cfg, pad)[i] >= cfg.kernel_qkv[i]:
            return f"{pad} {getattr(cfg, pad)[i]} must be smaller than kernel_qkv {cfg.kernel_qkv[i]}"
    if int(C * cfg.mlp_ratio[i]) < 1:
        return f"mlp_ratio {cfg.mlp_ratio[i]} leaves the MLP of {C} channels no hidden units"
    return None


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
        depth = self.depth
        if not isinstance(depth, (tuple, list)) or not 1 <= len(depth) <= MAX_STAGES:
            raise ValueError(f"depth must list one whole number per stage (1 to {MAX_STAGES} stages), "
                             f"got {reprlib.repr(depth)}")
        S = len(depth)
        for f in _PER_STAGE:
            v = getattr(self, f)
            if not isinstance(v, (tuple, list)) or len(v) != S:
                raise ValueError(f"CvTConfig.{f} must list one value per stage ({S}), got {reprlib.repr(v)}")
            problem = stage_problem(f, v)
            if problem:
                raise ValueError(f"{f} {problem}")
            object.__setattr__(self, f, tuple(v))       # lists (from JSON) become tuples
        for f, (ok, what) in _SCALARS.items():
            if not ok(getattr(self, f)):
                raise ValueError(f"{f} must be {what}, got {reprlib.repr(getattr(self, f))}")
        for i in range(S):
            problem = stage_geometry_problem(self, i)
            if problem:
                raise ValueError(f"stage {i}: {problem}")
        if self.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"act must be 'quick_gelu' or 'gelu', got {reprlib.repr(self.act)}")
        if self.attn_scale not in ("official", "head"):
            raise ValueError(f"attn_scale must be 'official' or 'head', got {reprlib.repr(self.attn_scale)}")
        if self.pool not in ("auto", "cls", "mean"):
            raise ValueError(f"pool must be 'auto', 'cls' or 'mean', got {reprlib.repr(self.pool)}")
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
        """The config in a JSON object; ValueError (one line) for anything else."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"CvTConfig: not readable JSON ({type(e).__name__})") from None
        if not isinstance(d, dict):
            raise ValueError(f"CvTConfig: expected a JSON object of fields, got {type(d).__name__}")
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
