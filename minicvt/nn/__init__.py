"""Thin stateful modules over minicvt.functional."""
from .layers import (GELU, AvgPool2d, BatchNorm2d, Conv2d, CrossEntropyLoss, DepthwiseConv2d, DropPath,
                     Dropout, LayerNorm, Linear, QuickGELU, ScaledDotProductAttention, SyncBatchNorm2d,
                     TokenMean, convert_sync_batchnorm)
from .module import Module, ModuleList, Parameter, Sequential, grad_enabled, no_grad
