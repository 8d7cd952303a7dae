"""Fast CPU kernels: the layer functions of minicvt.functional, with the same signatures and the
same results to rounding (tests/test_fast_kernels.py holds each to its reference in float64),
made fast on a CPU: threads (minicvt.fast.parallel), channels-last im2col, key-major attention
scores, in-place passes over cache-sized pieces, inference forms that cache nothing, and
BatchNorm folded into the depthwise filters at inference. Each function's docstring names the
reference it equals and says what it does differently; docs/performance.md measures what each
gains (benchmarks/kernel_times.py). On CuPy they run as one call each (threads would not help a
GPU), with the forms that allocate least there (docs/backend.md).

Layers with no fast form here (pooling, the loss, dropout, the token mean) are the reference's.
minicvt.kernels chooses between the two sets.
"""
from .activation import (gelu_backward, gelu_forward, gelu_inference, quick_gelu_backward,
                         quick_gelu_forward, quick_gelu_inference)
from .attention import attention_backward, attention_forward, softmax_backward, softmax_forward
from .conv import (col2im, conv2d_backward, conv2d_forward, depthwise_bn_inference,
                   depthwise_conv2d_backward, depthwise_conv2d_forward, im2col)
from .linear import linear_backward, linear_forward
from .norm import (batchnorm2d_backward, batchnorm2d_forward, layernorm_backward, layernorm_forward,
                   layernorm_inference)

# the functions that have a fast form: minicvt.kernels takes these from here, the rest from
# minicvt.functional
FAST = ("gelu_forward", "gelu_backward", "gelu_inference", "quick_gelu_forward", "quick_gelu_backward",
        "quick_gelu_inference", "softmax_forward", "softmax_backward", "attention_forward",
        "attention_backward", "im2col", "col2im", "conv2d_forward", "conv2d_backward",
        "depthwise_conv2d_forward", "depthwise_conv2d_backward", "depthwise_bn_inference",
        "linear_forward", "linear_backward", "batchnorm2d_forward", "batchnorm2d_backward",
        "layernorm_forward", "layernorm_backward", "layernorm_inference")
