"""What a model file must hold, from its config alone, so that a file is checked before it is read.

A reader (minicvt.npz for our .npz files, minicvt.models.pretrained for Hugging Face folders)
has each array's name, dtype and shape from the file's headers before it reads any array. It:
1. bounds the config by the file (`config_fits`): a config of more blocks than the file has
   arrays is refused before its expected state dict is even listed (and, for pytorch_model.bin,
   whose shapes are unknown until PyTorch loads it, one of more parameters than the file's bytes
   can hold at 2 bytes each);
2. compares every header with `state_shapes(cfg)`, the model's state dict computed from the
   config without building the model (`state_problems`): names missing, names extra, wrong
   shapes, integers or text where weights must be floats;
3. reads the arrays, and refuses NaN and infinity (`nonfinite_problem`): the weights of a run
   that diverged, which would otherwise answer every image with the same class.
Only then is the model built and the arrays loaded into it: with every shape equal to the
expected one, it is no larger than the file's arrays, whose sizes the reader has bounded.
"""
import numpy as np

from .summary import count_parameters

WEIGHT_DTYPES = ("float16", "float32", "float64")     # loading casts them to the model's dtype


def state_shapes(cfg):
    """{state dict name: (shape, kind)} of a ConvolutionalVisionTransformer of config `cfg`, kind
    'f' for a floating array and 'i' for an integer one (BatchNorm's num_batches_tracked).
    Nothing is allocated: tests/test_hostile_model_files.py checks it against built models."""
    shapes, cin = {}, cfg.in_chans
    for i in range(cfg.num_stages):
        C, k, kq = cfg.dim_embed[i], cfg.patch_size[i], cfg.kernel_qkv[i]
        hidden = int(C * cfg.mlp_ratio[i])
        s = f"stage{i}."
        if cfg.cls_token[i]:
            shapes[s + "cls_token"] = (1, 1, C)
        shapes.update({s + "patch_embed.proj.weight": (C, cin, k, k), s + "patch_embed.proj.bias": (C,),
                       s + "patch_embed.norm.weight": (C,), s + "patch_embed.norm.bias": (C,)})
        for b in range(cfg.depth[i]):
            p = f"{s}blocks.{b}."
            block = {"norm1.weight": (C,), "norm1.bias": (C,), "attn.proj.weight": (C, C),
                     "attn.proj.bias": (C,), "norm2.weight": (C,), "norm2.bias": (C,),
                     "mlp.fc1.weight": (hidden, C), "mlp.fc1.bias": (hidden,),
                     "mlp.fc2.weight": (C, hidden), "mlp.fc2.bias": (C,)}
            for x in "qkv":
                if cfg.qkv_proj_method[i] == "dw_bn":           # depthwise conv + BatchNorm
                    block[f"attn.conv_proj_{x}.conv.weight"] = (C, 1, kq, kq)
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        block[f"attn.conv_proj_{x}.bn.{name}"] = (C,)
                    block[f"attn.conv_proj_{x}.bn.num_batches_tracked"] = ()
                block[f"attn.proj_{x}.weight"] = (C, C)
                if cfg.qkv_bias[i]:
                    block[f"attn.proj_{x}.bias"] = (C,)
            shapes.update({p + name: shape for name, shape in block.items()})
        cin = C
    shapes.update({"norm.weight": (cin,), "norm.bias": (cin,), "head.weight": (cfg.num_classes, cin),
                   "head.bias": (cfg.num_classes,)})
    return {name: (shape, "i" if name.endswith("num_batches_tracked") else "f")
            for name, shape in shapes.items()}


def config_fits(cfg, num_arrays, num_bytes=None):
    """None if a file of `num_arrays` arrays (holding `num_bytes` bytes of numbers, where known)
    can hold a model of config `cfg`, else what is wrong. Arithmetic on the config only: nothing
    is built. The block count bounds the size of state_shapes(cfg); once every array's shape
    equals the expected one, the model is no larger than the file's checked arrays, so the byte
    bound is needed only where the shapes are not known before loading (pytorch_model.bin)."""
    blocks = sum(cfg.depth)
    if blocks > num_arrays:
        return f"its config describes {blocks:,} blocks but the file holds only {num_arrays:,} arrays"
    if num_bytes is None:
        return None
    try:
        params = count_parameters(cfg)
    except ValueError as e:                       # an image too small for the config's strides
        return f"its config is impossible: {e}"
    if 2 * params > num_bytes:
        return (f"its config describes a model of {params:,} parameters ({2 * params:,} bytes even at "
                f"16 bits) but the file's arrays hold {num_bytes:,} bytes")
    return None


def state_problems(found, expected, what="arrays"):
    """One line naming every missing, unexpected, mis-shaped and mis-typed array, or None.

    found: {name: (dtype, shape)} from a file's headers; expected: state_shapes' {name: (shape,
    kind)}; what: what the file calls them ('arrays', 'tensors')."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    shapes, types = [], []
    for k, (dtype, shape) in found.items():
        if k not in expected:
            continue
        want_shape, kind = expected[k]
        if tuple(shape) != tuple(want_shape):
            shapes.append(f"{k} {tuple(shape)} (expected {tuple(want_shape)})")
        elif kind == "f" and np.dtype(dtype).name not in WEIGHT_DTYPES:
            types.append(f"{k} ({np.dtype(dtype).name})")
        elif kind == "i" and np.dtype(dtype).kind not in "iu":
            types.append(f"{k} ({np.dtype(dtype).name}, expected whole numbers)")
    problems = [f"{problem}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                for problem, names in ((f"missing {what}", missing), (f"unexpected {what}", extra),
                                       (f"{what} of the wrong shape", shapes),
                                       ("weights that are not float16, float32 or float64", types)) if names]
    return "; ".join(problems) or None


def nonfinite_problem(name, array):
    """'array NAME holds NaN (...)' if a floating array holds NaN or infinity, else None."""
    if array.dtype.kind != "f" or np.isfinite(array).all():
        return None
    what = "NaN" if np.isnan(array).any() else "infinity"
    return f"array {name!r} holds {what} (the file of a diverged run?)"
