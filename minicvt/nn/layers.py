"""Stateful layers: each wraps one pair of pure functions, those of minicvt.functional or their
fast twins in minicvt.fast, as minicvt.kernels chooses (`ops.conv2d_forward` is the chosen set's).

Parameter names and layouts follow PyTorch (`weight`, `bias`, `running_mean`, ...), so a
state_dict moves between the two unchanged. Initial weights are drawn on the host from a
seeded NumPy generator (`rng`, default: backend.default_host_rng()) and then moved to the
active backend, so NumPy and CuPy runs start from the same numbers.
"""
import math

import numpy as np

from .. import backend
from ..functional import pair
from ..kernels import ops
from .module import Module, Parameter, grad_enabled


def _uniform(rng, shape, bound, dtype):
    """U(-bound, bound) drawn on the host, moved to the active backend."""
    return backend.to_device(rng.uniform(-bound, bound, size=shape), dtype=dtype)


def _pytorch_default(rng, w_shape, fan_in, bias, dtype):
    """PyTorch's default for Conv2d and Linear: kaiming_uniform(a=sqrt 5) is U(+-1/sqrt(fan_in))
    for the weight, and the bias is U(+-1/sqrt(fan_in)) too."""
    rng = rng or backend.default_host_rng()
    bound = 1.0 / math.sqrt(fan_in)
    w = Parameter(_uniform(rng, w_shape, bound, dtype))
    b = Parameter(_uniform(rng, (w_shape[0],), bound, dtype)) if bias else None
    return w, b


class _WeightBias(Module):
    """Shared by the layers with a `weight` and an optional `bias`."""

    def _bias(self):
        return self._params["bias"].data if "bias" in self._params else None

    def _add_grads(self, dw, db):
        self.weight.grad += dw
        if db is not None:
            self.bias.grad += db


class Conv2d(_WeightBias):
    """x (N, C, H, W) -> (N, F, OH, OW), or (N, H, W, C) -> (N, OH, OW, F) with channels_last;
    weight (F, C, kh, kw) as PyTorch's in both layouts, bias (F,)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 dtype=np.float32, rng=None, channels_last=False):
        super().__init__()
        kh, kw = pair(kernel_size, "kernel_size")
        self.stride, self.padding, self.channels_last = stride, padding, channels_last
        self.weight, b = _pytorch_default(rng, (out_channels, in_channels, kh, kw), in_channels * kh * kw,
                                          bias, dtype)
        if b is not None:
            self.bias = b

    def forward(self, x):
        out, cache = ops.conv2d_forward(x, self.weight.data, self._bias(), self.stride, self.padding,
                                      self.channels_last)
        self._save(cache)
        return out

    def backward(self, dout):
        dx, dw, db = ops.conv2d_backward(dout, self._take())
        self._add_grads(dw, db)
        return dx


class DepthwiseConv2d(_WeightBias):
    """x (N, C, H, W) -> (N, C, OH, OW), or (N, H, W, C) -> (N, OH, OW, C) with channels_last;
    weight (C, 1, kh, kw) as PyTorch's Conv2d(groups=C) in both layouts."""

    def __init__(self, channels, kernel_size, stride=1, padding=0, bias=False, dtype=np.float32, rng=None,
                 channels_last=False):
        super().__init__()
        kh, kw = pair(kernel_size, "kernel_size")
        self.stride, self.padding, self.channels_last = stride, padding, channels_last
        self.weight, b = _pytorch_default(rng, (channels, 1, kh, kw), kh * kw, bias, dtype)
        if b is not None:
            self.bias = b

    def forward(self, x):
        out, cache = ops.depthwise_conv2d_forward(x, self.weight.data, self._bias(), self.stride, self.padding,
                                                self.channels_last)
        self._save(cache)
        return out

    def backward(self, dout):
        dx, dw, db = ops.depthwise_conv2d_backward(dout, self._take())
        self._add_grads(dw, db)
        return dx


class Linear(_WeightBias):
    """x (..., Cin) -> (..., Cout); weight (Cout, Cin), bias (Cout,)."""

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32, rng=None):
        super().__init__()
        self.weight, b = _pytorch_default(rng, (out_features, in_features), in_features, bias, dtype)
        if b is not None:
            self.bias = b

    def forward(self, x):
        out, cache = ops.linear_forward(x, self.weight.data, self._bias())
        self._save(cache)
        return out

    def backward(self, dout):
        dx, dw, db = ops.linear_backward(dout, self._take())
        self._add_grads(dw, db)
        return dx


class BatchNorm2d(Module):
    """x (N, C, H, W) -> same, or (N, H, W, C) with channels_last. weight/bias (C,) trained;
    running_mean/running_var (C,) and num_batches_tracked () are buffers, updated in training
    mode (momentum 0.1, unbiased running variance, as PyTorch)."""

    def __init__(self, channels, eps=1e-5, momentum=0.1, dtype=np.float32, channels_last=False):
        super().__init__()
        self.eps, self.momentum, self.channels_last = eps, momentum, channels_last
        self.weight = Parameter(backend.to_device(np.ones(channels, dtype)))
        self.bias = Parameter(backend.to_device(np.zeros(channels, dtype)))
        self.register_buffer("running_mean", backend.to_device(np.zeros(channels, dtype)))
        self.register_buffer("running_var", backend.to_device(np.ones(channels, dtype)))
        self.register_buffer("num_batches_tracked", backend.to_device(np.zeros((), np.int64)))

    def forward(self, x):
        out, cache, (mean, var) = self._normalise(x)
        if self.training:
            self.running_mean, self.running_var = mean, var
            self.num_batches_tracked = self.num_batches_tracked + 1
        self._save(cache)
        return out

    def backward(self, dout):
        dx, dgamma, dbeta = self._normalise_backward(dout, self._take())
        self.weight.grad += dgamma
        self.bias.grad += dbeta
        return dx

    # the layer math: SyncBatchNorm2d swaps these two for the forms that join the ranks' batches
    def _normalise(self, x):
        return ops.batchnorm2d_forward(x, self.weight.data, self.bias.data, self.running_mean, self.running_var,
                                       self.training, self.momentum, self.eps, self.channels_last)

    def _normalise_backward(self, dout, cache):
        return ops.batchnorm2d_backward(dout, cache)


class SyncBatchNorm2d(BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole batch across ranks: each rank
    holds a shard x of it and `comm` (minicvt.collectives: rank, size, allreduce) joins them.
    Parameters, buffers and state_dict keys are BatchNorm2d's, so checkpoints move between the
    two. Training makes one all-reduce in forward and one in backward, so every rank must run
    them in step; eval makes none. weight.grad and bias.grad receive this rank's share: the
    trainer's all-reduce (sum) of the gradients completes them, as for every other parameter."""

    def __init__(self, channels, comm, eps=1e-5, momentum=0.1, dtype=np.float32, channels_last=False):
        super().__init__(channels, eps, momentum, dtype, channels_last)
        self.comm = comm

    def _normalise(self, x):
        return ops.sync_batchnorm2d_forward(x, self.weight.data, self.bias.data, self.running_mean,
                                            self.running_var, self.training, self.comm, self.momentum,
                                            self.eps, self.channels_last)

    def _normalise_backward(self, dout, cache):
        return ops.sync_batchnorm2d_backward(dout, cache, self.comm)


def convert_sync_batchnorm(module, comm):
    """Replace every BatchNorm2d in `module` by a SyncBatchNorm2d on `comm` that keeps its
    Parameter objects (an optimiser built before still updates them), buffers, settings and
    mode; returns the module (a new one if `module` itself is a BatchNorm2d), as PyTorch's
    nn.SyncBatchNorm.convert_sync_batchnorm. Already synchronised layers are left alone."""
    def converted(bn):
        sync = SyncBatchNorm2d(bn.weight.shape[0], comm, bn.eps, bn.momentum, bn.weight.data.dtype,
                               bn.channels_last)
        sync.weight, sync.bias = bn.weight, bn.bias                     # the same Parameters
        for name, array in bn._buffers.items():
            sync._buffers[name] = array
        return sync.train(bn.training)

    if type(module) is BatchNorm2d:
        return converted(module)
    for _, m in list(module.named_modules()):
        for name, child in list(m._modules.items()):
            if type(child) is BatchNorm2d:
                m._modules[name] = converted(child)
    return module


class LayerNorm(Module):
    """x (..., C) -> same, normalised over the last axis; weight/bias (C,)."""

    def __init__(self, channels, eps=1e-5, dtype=np.float32):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(backend.to_device(np.ones(channels, dtype)))
        self.bias = Parameter(backend.to_device(np.zeros(channels, dtype)))

    def forward(self, x):
        if not grad_enabled():           # no backward to come: nothing cached, one array fewer
            return ops.layernorm_inference(x, self.weight.data, self.bias.data, self.eps)
        out, cache = ops.layernorm_forward(x, self.weight.data, self.bias.data, self.eps)
        self._save(cache)
        return out

    def backward(self, dout):
        dx, dgamma, dbeta = ops.layernorm_backward(dout, self._take())
        self.weight.grad += dgamma
        self.bias.grad += dbeta
        return dx


class GELU(Module):
    """Elementwise GELU; approximate='none' (erf) or 'tanh', as PyTorch's nn.GELU."""

    def __init__(self, approximate="none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        if not grad_enabled():           # as LayerNorm: nothing cached, one array fewer
            return ops.gelu_inference(x, self.approximate)
        out, cache = ops.gelu_forward(x, self.approximate)
        self._save(cache)
        return out

    def backward(self, dout):
        return ops.gelu_backward(dout, self._take())


class QuickGELU(Module):
    """Elementwise x * sigmoid(1.702 x), the official CvT code's activation."""

    def forward(self, x):
        if not grad_enabled():
            return ops.quick_gelu_inference(x)
        out, cache = ops.quick_gelu_forward(x)
        self._save(cache)
        return out

    def backward(self, dout):
        return ops.quick_gelu_backward(dout, self._take())


class Dropout(Module):
    """Inverted dropout in training mode, identity in eval mode or when p == 0.
    Masks come from `rng`, a backend.BackendRNG: in a model, the model's one stream
    (CvT.drop_rng), which the trainer moves to each step; alone, a stream of its own seeded from
    backend.default_host_rng(), so backend.manual_seed makes its masks reproducible."""

    def __init__(self, p=0.0, rng=None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p
        # without an rng of its own, a stream seeded from the host default generator, so two
        # modules built one after the other never draw identical masks
        self.rng = rng if rng is not None else backend.BackendRNG(int(backend.default_host_rng().integers(2**31)))

    def mask_shape(self, x_shape):
        """One draw per entry."""
        return x_shape

    def mask(self, x_shape, dtype):
        """A mask (0 or 1/(1-p)) for an input of x_shape, or None when this module is the
        identity (eval mode or p == 0)."""
        if not self.training or self.p == 0.0:
            return None
        return ops.dropout_mask(self.rng, self.mask_shape(x_shape), self.p, dtype)

    def forward(self, x):
        mask = self.mask(x.shape, x.dtype)
        if mask is None:
            self._save("identity")
            return x
        out, cache = ops.dropout_forward(x, mask)
        self._save(cache)
        return out

    def backward(self, dout):
        mask = self._take()
        return dout if isinstance(mask, str) else ops.dropout_backward(dout, mask)


class DropPath(Dropout):
    """Stochastic depth (timm's DropPath, on the official CvT blocks' residual branches): in
    training each sample's whole branch is dropped with probability p and a kept one is scaled
    by 1/(1-p); identity in eval mode or when p == 0.
    x (N, ...) -> same; the mask has shape (N, 1, ..., 1) and broadcasts over the rest."""

    def mask_shape(self, x_shape):
        return (x_shape[0],) + (1,) * (len(x_shape) - 1)            # one draw per sample


class AvgPool2d(Module):
    """x (N, C, H, W) -> (N, C, OH, OW), PyTorch's nn.AvgPool2d (ceil_mode, count_include_pad)."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
        super().__init__()
        self.args = (kernel_size, stride, padding, ceil_mode, count_include_pad)

    def forward(self, x):
        out, cache = ops.avg_pool2d_forward(x, *self.args)
        self._save(cache)
        return out

    def backward(self, dout):
        return ops.avg_pool2d_backward(dout, self._take())


class TokenMean(Module):
    """x (N, T, C) -> (N, C), the mean over tokens."""

    def forward(self, x):
        out, cache = ops.token_mean_forward(x)
        self._save(cache)
        return out

    def backward(self, dout):
        return ops.token_mean_backward(dout, self._take())


class ScaledDotProductAttention(Module):
    """Multi-head attention core: (q (N, Tq, C), k (N, Tk, C), v (N, Tk, C)) -> (N, Tq, C), with
    an optional dropout mask (N, h, Tq, Tk) on the probabilities; backward returns (dq, dk, dv).
    With keep_attention=True the last forward's probabilities (N, h, Tq, Tk) stay in
    .attention (for attention maps); off, nothing is kept."""

    def __init__(self, num_heads, scale=None):
        super().__init__()
        self.num_heads, self.scale = num_heads, scale
        self.keep_attention = False
        self.attention = None

    def forward(self, q, k, v, drop_mask=None):
        out, cache = ops.attention_forward(q, k, v, self.num_heads, self.scale, drop_mask)
        self.attention = cache.p if self.keep_attention else None
        self._save(cache)
        return out

    def backward(self, dout):
        return ops.attention_backward(dout, self._take())


class CrossEntropyLoss(Module):
    """forward(logits (N, K), labels (N,)) -> scalar loss; backward(dloss=1.0) -> dlogits (N, K).
    check_labels=False reads nothing back from the GPU: out-of-range labels give a NaN loss,
    and the caller counts them with functional.label_errors (its cross_entropy_forward says more)."""

    def __init__(self, label_smoothing=0.0, check_labels=True):
        super().__init__()
        self.label_smoothing, self.check_labels = label_smoothing, check_labels

    def forward(self, logits, labels):
        loss, cache = ops.cross_entropy_forward(logits, labels, self.label_smoothing, self.check_labels)
        self._save(cache)
        return loss

    def backward(self, dout=1.0):
        return ops.cross_entropy_backward(dout, self._take())
