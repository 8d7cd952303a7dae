"""The layer math, plain: every forward returns (out, cache), every backward takes (dout, cache)
and returns the gradients. No state, no threads, no hidden allocation of parameters; each
function is written as its derivation in docs/ reads, on NumPy and CuPy alike.

This is the reference. minicvt.fast holds faster CPU kernels with the same signatures, each
equal to its function here (tests/test_fast_kernels.py); minicvt.kernels chooses between them
for the layers in minicvt.nn.
"""
from .activation import gelu_backward, gelu_forward, quick_gelu_backward, quick_gelu_forward, sigmoid
from .attention import (attention_backward, attention_forward, merge_heads, softmax_backward,
                        softmax_forward, split_heads)
from .checks import pair
from .conv import (col2im, conv2d_backward, conv2d_forward, conv_output_size,
                   depthwise_conv2d_backward, depthwise_conv2d_forward, im2col)
from .dropout import dropout_backward, dropout_forward, dropout_mask
from .linear import linear_backward, linear_forward
from .loss import cross_entropy_backward, cross_entropy_forward, label_errors
from .norm import (batchnorm2d_backward, batchnorm2d_forward, layernorm_backward, layernorm_forward,
                   sync_batchnorm2d_backward, sync_batchnorm2d_forward)
from .pool import (avg_pool2d_backward, avg_pool2d_forward, pool_output_size, token_mean_backward,
                   token_mean_forward)
