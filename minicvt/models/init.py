"""The official initialisation ('trunc_norm'), drawn on the host and then moved.

The official code applies, to every module of a stage:
    Linear                  weight ~ trunc_normal(std=0.02), bias = 0
    LayerNorm, BatchNorm2d  weight = 1, bias = 0   (our layers are built that way already)
and trunc_normal(std=0.02) to the class token and to head.weight; convolutions keep PyTorch's
default (our Conv2d / DepthwiseConv2d already draw it), and head.bias too.
timm's trunc_normal_ truncates at *absolute* values [a, b] = [-2, 2], i.e. at +-100 standard
deviations for std=0.02: the truncation never bites in practice, it is a plain normal.
"""
from .. import backend
from .. import nn


def trunc_normal(rng, shape, std=0.02, a=-2.0, b=2.0):
    """Normal(0, std^2) restricted to [a, b] (absolute bounds, as timm), as a host float64 array.
    Drawn by rejection: values outside [a, b] are redrawn until none is left."""
    out = rng.standard_normal(shape) * std
    bad = (out < a) | (out > b)
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum())) * std
        bad = (out < a) | (out > b)
    return out


def set_trunc_normal(param, rng, std=0.02):
    """Overwrite a Parameter's data with trunc_normal values, on its device and dtype."""
    param.data = backend.to_device(trunc_normal(rng, param.data.shape, std), dtype=param.data.dtype)


def init_trunc_normal(module, rng):
    """The official `_init_weights_trunc_normal`, applied to every Linear under `module`
    (norms already start at weight 1, bias 0)."""
    for _, m in module.named_modules():
        if isinstance(m, nn.Linear):
            set_trunc_normal(m.weight, rng)
            if "bias" in m._params:
                m.bias.data = backend.get_array_module(m.bias.data).zeros_like(m.bias.data)
