"""Whole-model float64 gradient checks: model.backward against five-point finite differences.

A tiny two-stage CvT (tests/cvt_tiny.py) on a 16x16 batch of 2, for every projection method,
with and without a class token, BatchNorm in train and eval mode. Sampled entries of every
parameter and of the input are compared (gradcheck.check_module); the issue asks for a relative
error below 1e-5 on a whole model. In practice it is far smaller (see the printed report),
except for gradients that are exactly 0 in exact arithmetic (a key bias: softmax ignores a
shift shared by every key), where both values are rounding noise of ~1e-13 and the
relative error can approach the 1e-5 floor set by gradcheck's 1e-8 denominator.
"""
import numpy as np
import pytest

from cvt_tiny import tiny_config
from minicvt import backend, gradcheck, nn
from minicvt.models import build_model

pytestmark = pytest.mark.usefixtures("both_kernels")      # the reference and the fast kernels
TOL = 1e-5
MAX_ENTRIES = 4          # sampled entries per array: every array is visited, the test stays fast


def _model_and_input(cfg, seed=0):
    """The model at a generic point: at the official init (std 0.02) the scores are nearly 0,
    softmax nearly uniform and the q/k gradients ~1e-10, below what finite differences resolve
    against an O(1) loss; every parameter is redrawn from N(0, 0.5^2) instead."""
    model = build_model(cfg, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    for _, p in model.named_parameters():
        p.data = backend.to_device(rng.standard_normal(p.data.shape) * 0.5)
    x = backend.to_device(rng.standard_normal((2, 3, 16, 16)))
    return model, x


def _randomise_bn(model, rng):
    for _, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            C = m.running_mean.shape[0]
            m.running_mean = backend.to_device(rng.standard_normal(C) * 0.3, dtype=np.float64)
            m.running_var = backend.to_device(rng.uniform(0.5, 2.0, C), dtype=np.float64)


def shifts_keys_only(name, cfg):
    """Parameters that add one vector to every key of a query's scores, which softmax ignores,
    so their gradient is exactly 0: proj_k.bias, and the key projection's BatchNorm bias where
    no class token joins the keys (the class token's key is not shifted by it)."""
    if name.endswith("attn.proj_k.bias"):
        return True
    if not name.endswith("attn.conv_proj_k.bn.bias"):
        return False
    return not cfg.cls_token[int(name.split(".")[0][len("stage"):])]   # 'stage1.blocks...' -> 1


def _check(model, x, reset=None):
    report = gradcheck.check_module(model, x, max_entries=MAX_ENTRIES, reset=reset)
    names = {r.name for r in report.results}
    expected = {name for name, _ in model.named_parameters()} | {"input"}
    assert names == expected, f"not every parameter was checked: missing {sorted(expected - names)}"
    # exactly-zero gradients: a relative error of noise against noise means nothing, so the
    # analytic gradient must be 0 to rounding and the numeric one at the noise level of the
    # differences (~1e-16 |s| / h with |s| ~ 10 and h = 1e-3)
    params = dict(model.named_parameters())
    zero = [r for r in report.results if shifts_keys_only(r.name, model.config)]
    for r in zero:
        assert float(np.abs(backend.to_numpy(params[r.name].grad)).max()) < 1e-14, r.name
        assert abs(r.numeric) < 1e-10, (r.name, r.numeric)
    gradcheck.GradReport([r for r in report.results if r not in zero]).assert_ok(TOL)
    return report


CASES = [("dw_bn", True, "train"), ("dw_bn", False, "train"), ("dw_bn", True, "eval"),
         ("dw_bn", False, "eval"), ("avg", True, "train"), ("avg", False, "train"),
         ("linear", True, "train"), ("linear", False, "train")]


@pytest.mark.parametrize("method,cls_token,mode", CASES,
                         ids=[f"{m}-{'cls' if c else 'mean'}-{b}" for m, c, b in CASES])
def test_whole_model_gradients(xp, method, cls_token, mode):
    model, x = _model_and_input(tiny_config(method, cls_token))
    if mode == "eval":
        _randomise_bn(model, np.random.default_rng(3))
        model.eval()
    _check(model, x)


def test_gradients_with_dropout_and_drop_path_held_fixed(xp):
    """Dropout (tokens, MLP, projection, attention probabilities) and drop path switched on;
    reseeding the model's generator before every forward makes each evaluation draw the same
    masks, so the function being differentiated is fixed."""
    cfg = tiny_config("dw_bn", True, depth=(1, 2), drop_rate=(0.2, 0.2), attn_drop_rate=(0.1, 0.1),
                      drop_path_rate=(0.0, 0.5))
    model, x = _model_and_input(cfg, seed=5)
    _check(model, x, reset=lambda: model.drop_rng.seed(11))


def test_gradients_with_options(xp):
    """Exact GELU, the per-head attention scale and mean pooling beside a class token."""
    model, x = _model_and_input(tiny_config("dw_bn", True, act="gelu", attn_scale="head", pool="mean"))
    _check(model, x)
