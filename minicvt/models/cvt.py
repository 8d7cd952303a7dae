"""The stages and the whole model (official `VisionTransformer`, `ConvolutionalVisionTransformer`).

Shapes: N batch, K classes; stage i turns a map (N, C_{i-1}, H_{i-1}, W_{i-1}) into
(N, C_i, H_i, W_i) with T_i = H_i * W_i tokens, plus a class token (N, 1, C_i) where the config
asks for one. The head reads the last stage's class token, or the mean of its tokens.

    image (N, 3, H, W)
      stage0 .. stage{S-1}: ConvEmbed -> tokens [+ cls in front] -> pos_drop -> blocks
                            -> split cls off -> map           (no position embedding anywhere)
      norm (LayerNorm) on the class token (N, C)   or   on every token, then the mean (N, C)
      head (Linear C -> K)                          -> logits (N, K)
"""
import numpy as np

from .. import backend, nn
from .attention import Attention
from .block import Block
from .configs import CvTConfig, get_config
from .embed import ConvEmbed
from .init import init_trunc_normal, set_trunc_normal
from .tokens import cat_cls, map_to_tokens, split_cls, tokens_to_map


class VisionTransformer(nn.Module):
    """One stage: x (N, in_chans, H, W) -> (map (N, embed_dim, H', W'), cls (N, 1, embed_dim) or
    None). State: `patch_embed`, `blocks.0..depth-1`, and `cls_token` (1, 1, embed_dim) when
    with_cls_token. Drop-path rates grow linearly over the blocks, linspace(0, rate, depth)."""

    def __init__(self, patch_size, patch_stride, patch_padding, in_chans, embed_dim, depth,
                 num_heads, mlp_ratio=4.0, qkv_bias=False, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, with_cls_token=False, act="quick_gelu", eps=1e-5,
                 dtype=np.float32, rng=None, drop_rng=None, **attn_kwargs):
        super().__init__()
        rng = rng or backend.default_host_rng()
        self.patch_embed = ConvEmbed(patch_size, in_chans, embed_dim, patch_stride, patch_padding,
                                     eps=eps, dtype=dtype, rng=rng)
        self.with_cls_token = with_cls_token
        if with_cls_token:
            self.cls_token = nn.Parameter(backend.to_device(np.zeros((1, 1, embed_dim)), dtype=dtype))
            set_trunc_normal(self.cls_token, rng)
        self.pos_drop = nn.Dropout(drop_rate, rng=drop_rng)
        dpr = np.linspace(0.0, drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            Block(embed_dim, embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                  float(dpr[j]), act=act, eps=eps, dtype=dtype, rng=rng, drop_rng=drop_rng,
                  with_cls_token=with_cls_token, **attn_kwargs)
            for j in range(depth)])
        init_trunc_normal(self, rng)

    def forward(self, x):
        x = self.patch_embed(x)                             # (N, C, H, W)
        N, C, H, W = x.shape
        x = map_to_tokens(x)                                # (N, T, C)
        if self.with_cls_token:
            # the one class token is shared by every image: expand (1, 1, C) -> (N, 1, C)
            cls = backend.get_array_module(x).broadcast_to(self.cls_token.data, (N, 1, C))
            x = cat_cls(cls, x)                             # (N, 1 + T, C)
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x, H, W)
        cls = None
        if self.with_cls_token:
            cls, x = split_cls(x)                           # (N, 1, C), (N, T, C)
        return tokens_to_map(x, H, W), cls                  # (N, C, H, W)

    def backward(self, dmap, dcls=None):
        """dmap (N, C, H', W'), dcls (N, 1, C) or None (unused class token) -> dx (N, in_chans, H, W)."""
        xp = backend.get_array_module(dmap)
        N, C, H, W = dmap.shape
        d = map_to_tokens(dmap)                             # (N, T, C)
        if self.with_cls_token:
            dcls = xp.zeros((N, 1, C), dtype=dmap.dtype) if dcls is None else dcls
            d = cat_cls(dcls, d)                            # (N, 1 + T, C)
        for blk in reversed(list(self.blocks)):
            d = blk.backward(d)
        d = self.pos_drop.backward(d)
        if self.with_cls_token:
            dcls, d = split_cls(d)
            # the expand over the batch is undone by a sum over the batch
            self.cls_token.grad += dcls.sum(axis=0, keepdims=True)
        return self.patch_embed.backward(tokens_to_map(d, H, W))


class ConvolutionalVisionTransformer(nn.Module):
    """CvT: x (N, in_chans, H, W) -> logits (N, num_classes). State: `stage0..stage{S-1}`, `norm`,
    `head`; parameter names are the official state_dict keys.

    `drop_rng` (a backend.BackendRNG(seed, "dropout")) is the one source of randomness of the
    model: every dropout and drop-path module draws from it, in the same order each forward, so
    their masks are independent draws from one stream. The trainer moves it to each training
    step, `drop_rng.at(epoch, step)`, so a step's masks depend on (seed, epoch, step) alone.
    """

    def __init__(self, config=None, dtype=np.float32, seed=0):
        super().__init__()
        cfg = config or CvTConfig()
        if np.dtype(dtype).kind != "f":
            raise ValueError(f"CvT: dtype must be float32 or float64, got {dtype}")
        if cfg.num_classes < 1:
            raise ValueError(f"CvT: num_classes must be at least 1, got {cfg.num_classes}")
        self.config = cfg
        # what a loaded model knows of its data (minicvt.load sets them): names, how inputs were made
        self.classes = self.normalization = self.preprocessing = None
        rng = backend.host_rng(seed)                        # initial weights: same on every backend
        self.drop_rng = backend.BackendRNG(seed, "dropout")
        in_chans = cfg.in_chans
        for i in range(cfg.num_stages):
            stage = VisionTransformer(
                cfg.patch_size[i], cfg.patch_stride[i], cfg.patch_padding[i], in_chans,
                cfg.dim_embed[i], cfg.depth[i], cfg.num_heads[i], cfg.mlp_ratio[i], cfg.qkv_bias[i],
                cfg.drop_rate[i], cfg.attn_drop_rate[i], cfg.drop_path_rate[i], cfg.cls_token[i],
                act=cfg.act, eps=cfg.norm_eps, dtype=dtype, rng=rng, drop_rng=self.drop_rng,
                method=cfg.qkv_proj_method[i], kernel_size=cfg.kernel_qkv[i],
                padding_q=cfg.padding_q[i], padding_kv=cfg.padding_kv[i], stride_q=cfg.stride_q[i],
                stride_kv=cfg.stride_kv[i], scale=cfg.attn_scale)
            setattr(self, f"stage{i}", stage)
            in_chans = cfg.dim_embed[i]
        self.norm = nn.LayerNorm(in_chans, eps=cfg.norm_eps, dtype=dtype)
        # head.weight trunc_normal(.02); head.bias keeps PyTorch's default, as in the official code
        self.head = nn.Linear(in_chans, cfg.num_classes, dtype=dtype, rng=rng)
        set_trunc_normal(self.head.weight, rng)
        if cfg.pooling == "mean":
            self.token_mean = nn.TokenMean()

    def stages(self):
        return [getattr(self, f"stage{i}") for i in range(self.config.num_stages)]

    # values beyond this many standard deviations from the mean are no normalised pixels: the
    # normalised range of CIFAR-10 or ImageNet images is about [-2.5, 2.7] (a model that knows
    # its normalisation allows twice its own range, if that is more: _largest_input)
    LARGEST_INPUT = 20.0

    def __call__(self, x):
        """The raw forward: x (N, in_chans, H, W), float images already NORMALISED as the model
        was trained ((pixel / 255 - model.normalization['mean']) / ['std'], per channel) ->
        logits (N, num_classes). For image files or uint8 pixels use `model.predict(images)`.

        Checked at the door, in one line each: an array of N images of the model's channels; not
        uint8 or other integer pixels; not floats on a 0..255 scale (a check that reads the
        batch's largest value back, which the training loop, calling `forward`, does not pay).
        Pixels scaled to 0..1 but not normalised cannot be told from normalised input: they
        give wrong answers silently. A float batch of another dtype is cast to the model's: a
        float64 batch into a float32 model computes in float32 (PyTorch would refuse; the
        answer is the model's either way, so minicvt casts)."""
        x = self._check_input(x)
        xp = backend.get_array_module(x)
        largest = float(xp.abs(x).max()) if x.size else 0.0
        if largest > self._largest_input():
            raise ValueError(f"{self.config.name}: input holds values up to {largest:.4g}, which look like "
                             f"pixels on a 0..255 scale; the model takes normalised images: use "
                             f"model.predict(images) for image files or uint8 arrays")
        return super().__call__(x)

    def _largest_input(self):
        """The largest value a normalised pixel can take: with the model's own normalisation,
        twice what a pixel of 0 or 1 becomes (a channel of small std spreads far); else 20."""
        norm = self.normalization or self.preprocessing
        if not norm:
            return self.LARGEST_INPUT
        reach = max(max(m, 1 - m) / s for m, s in zip(norm["mean"], norm["std"]))
        return max(self.LARGEST_INPUT, 2 * reach)

    def forward(self, x):
        """x (N, in_chans, H, W) normalised images -> logits (N, num_classes)."""
        x = self._check_input(x)
        cls = None
        for stage in self.stages():
            x, cls = stage(x)                               # (N, C_i, H_i, W_i), (N, 1, C_i) or None
        if self.config.pooling == "cls":
            # (N, 1, C) -> (N, C); the official squeeze() would also drop the batch axis at N = 1
            feats = self.norm(cls)[:, 0]
        else:
            feats = self.token_mean(self.norm(map_to_tokens(x)))   # (N, T, C) -> (N, C)
        self._save(x.shape)
        return self.head(feats)                             # (N, K)

    def _check_input(self, x):
        """Refuse what is not a batch of float images of the model's channels, in the user's
        terms (the layers below see a channels-last layout the user never gave); -> x, cast to
        the model's dtype if it is another float."""
        C, name, shape = self.config.in_chans, self.config.name, tuple(getattr(x, "shape", ()))
        if not hasattr(x, "dtype"):
            raise ValueError(f"{name}: input must be an array of images (N, C, H, W), got a "
                             f"{type(x).__name__}; give np.asarray(x, dtype=np.float32)")
        if x.dtype.kind in "biu":
            raise ValueError(f"{name}: input is {x.dtype} pixels, but the model takes normalised float "
                             f"images; use model.predict(images) for image files or uint8 arrays")
        if x.dtype.kind != "f":
            raise ValueError(f"{name}: input must be float images (N, C, H, W), got dtype {x.dtype}")
        if len(shape) != 4:
            hint = "; a single image needs a batch axis: x[None]" if len(shape) == 3 else ""
            raise ValueError(f"{name}: input must be a batch of images (N, C, H, W), got a "
                             f"{len(shape)}-D array of shape {shape}{hint}")
        if shape[1] != C:
            hint = ("; images laid out (N, H, W, C) need x.transpose(0, 3, 1, 2)"
                    if shape[-1] == C else "")
            raise ValueError(f"{name}: input (N, C, H, W) must have C = {C} channels, got shape "
                             f"{shape} with {shape[1]}{hint}")
        dtype = self.head.weight.data.dtype
        return x if x.dtype == dtype else x.astype(dtype)

    def backward(self, dlogits):
        """dlogits (N, K) -> dx (N, in_chans, H, W); adds every parameter's gradient to .grad."""
        N, C, H, W = self._take()
        xp = backend.get_array_module(dlogits)
        dfeats = self.head.backward(dlogits)                # (N, C)
        if self.config.pooling == "cls":
            dcls = self.norm.backward(dfeats[:, None, :])   # (N, 1, C)
            dmap = xp.zeros((N, C, H, W), dtype=dlogits.dtype)      # the last map feeds nothing
        else:
            dcls = None
            dtok = self.norm.backward(self.token_mean.backward(dfeats))   # (N, T, C)
            dmap = tokens_to_map(dtok, H, W)
        for stage in reversed(self.stages()):
            dmap = stage.backward(dmap, dcls)
            dcls = None                                     # earlier stages' class tokens feed nothing
        return dmap

    # -- conveniences ------------------------------------------------------------------------------
    def predict(self, images, top=5):
        """The `top` most probable classes of each picture, exactly as `minicvt predict` prints
        them: images are image files (paths) or uint8 pictures (N, 3, H, W) of any size, each
        prepared as the model's own inputs were (`self.preprocessing`, which `minicvt.load`
        sets for a checkpoint of `minicvt train` and for a Hugging Face folder). -> one list
        per picture of (class name, probability), most probable first (models/inputs.py)."""
        from .inputs import predict
        return predict(self, images, top)

    def num_parameters(self):
        """Trainable entries (buffers such as BN running statistics are not counted)."""
        return sum(int(p.data.size) for p in self.parameters())

    def keep_attention(self, on=True):
        """Keep each block's attention probabilities (N, h, Tq, Tk) from the next forwards."""
        for _, m in self.named_modules():
            if isinstance(m, Attention):
                m.sdpa.keep_attention = on
                m.sdpa.attention = None
        return self

    def attention_maps(self):
        """{'stage2.blocks.0.attn': probabilities (N, h, Tq, Tk)} from the last forward."""
        return {name[:-1]: m.sdpa.attention for name, m in self.named_modules()
                if isinstance(m, Attention) and m.sdpa.attention is not None}


def build_model(name_or_config="cvt-13", num_classes=None, seed=0, dtype=np.float32, **overrides):
    """A CvT from a config name ('cvt-13', 'cvt-21', 'cvt-w24', 'cvt-cifar-s', 'cvt-cifar-m') or
    a CvTConfig; `num_classes` and any other CvTConfig field in `overrides` replace the config's.
    Weights are drawn on the host from `seed` and moved to the active backend, in `dtype`."""
    cfg = get_config(name_or_config, num_classes=num_classes, **overrides)
    return ConvolutionalVisionTransformer(cfg, dtype=dtype, seed=seed)
