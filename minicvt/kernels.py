"""The one switch between the two sets of layer functions that minicvt.nn calls:

- 'reference': minicvt.functional, the math written as the derivations in docs/ read;
- 'fast': minicvt.fast, the same functions made fast on a CPU (threads, channels-last im2col,
  key-major attention scores, in-place passes, inference forms), equal to the reference to
  rounding (tests/test_fast_kernels.py); where fast has no form of its own, the reference's.

    from minicvt import kernels
    kernels.use("reference")              # from now on
    with kernels.use("reference"):        # for a block, then back
        ...
    kernels.chosen()                      # 'fast' or 'reference'
    kernels.ops.conv2d_forward(...)       # the chosen set's function (what minicvt.nn calls)

The default is MINICVT_KERNELS, else 'fast', on NumPy and on CuPy alike. On CuPy the fast
forms run as one call each (no threads) and were chosen by the emulated CuPy's memory ledger:
they allocate less than the reference's new array per operation and make no transfer either
(docs/backend.md). Switch between steps, never between a forward and its backward: a cache is
read by the backward of the set that made it.
"""
import contextlib
import os

from . import fast, functional

NAMES = ("fast", "reference")
_state = {"name": None}


def chosen():
    """'fast' or 'reference'; on first use read from MINICVT_KERNELS (default 'fast')."""
    if _state["name"] is None:
        name = os.environ.get("MINICVT_KERNELS", "fast").strip().lower() or "fast"
        if name not in NAMES:
            raise ValueError(f"MINICVT_KERNELS={name!r} is not a set of kernels: set it to one of {NAMES}")
        _state["name"] = name
    return _state["name"]


def use(name):
    """Call the `name` set from now on; as a context manager, only inside the block."""
    if name not in NAMES:
        raise ValueError(f"unknown kernels {name!r}: expected one of {NAMES}")
    previous = chosen()
    _state["name"] = name

    @contextlib.contextmanager
    def restore():
        try:
            yield
        finally:
            _state["name"] = previous

    return restore()


# The reference has no inference forms and no fused residual add: there, inference is the
# forward with its cache dropped, and the folded depthwise + BatchNorm the two layers in turn.

def _layernorm_inference(x, gamma, beta, eps=1e-5):
    return functional.layernorm_forward(x, gamma, beta, eps)[0]


def _gelu_inference(x, approximate="none"):
    return functional.gelu_forward(x, approximate)[0]


def _quick_gelu_inference(x):
    return functional.quick_gelu_forward(x)[0]


def _depthwise_bn_inference(x, w, gamma, beta, running_mean, running_var, eps=1e-5, stride=1, padding=0,
                            channels_last=False):
    y, _ = functional.depthwise_conv2d_forward(x, w, None, stride, padding, channels_last)
    return functional.batchnorm2d_forward(y, gamma, beta, running_mean, running_var, False, eps=eps,
                                          channels_last=channels_last)[0]


_REFERENCE_EXTRAS = {"layernorm_inference": _layernorm_inference, "gelu_inference": _gelu_inference,
                     "quick_gelu_inference": _quick_gelu_inference,
                     "depthwise_bn_inference": _depthwise_bn_inference}


def function(name, kernels=None):
    """The function `name` of the set `kernels` (default: the chosen one)."""
    if (kernels or chosen()) == "fast" and name in fast.FAST:
        return getattr(fast, name)
    if name in _REFERENCE_EXTRAS:
        return _REFERENCE_EXTRAS[name]
    return getattr(functional, name)


class _Ops:
    """`ops.name` is function(name): the chosen set's, looked up at each call."""

    def __getattr__(self, name):
        return function(name)


ops = _Ops()
