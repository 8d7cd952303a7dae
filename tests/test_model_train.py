"""Model sanity: the loss at initialisation is about ln(K), and a tiny batch can be overfitted
with a hand-written SGD loop."""
import math

import numpy as np

from cvt_tiny import tiny_config
from minicvt import backend, nn
from minicvt.models import build_model


def test_initial_loss_is_about_ln_k(xp):
    """With head.weight ~ N(0, 0.02^2) on LayerNorm-ed features (norm sqrt(C) = 16 for C = 256)
    the logits have std about 0.02 * 16 = 0.32 (plus a head bias below 1/16), so the expected
    loss is ln K + sigma^2 / 2 * (1 - 1/K), about ln K + 0.05; 32 images average the spread, and
    0.15 leaves room for it."""
    model = build_model("cvt-cifar-s", seed=0, dtype=np.float32).eval()
    rng = np.random.default_rng(0)
    x = backend.to_device(rng.standard_normal((32, 3, 32, 32)), dtype=np.float32)
    labels = backend.to_device(rng.integers(0, 10, size=32))
    with nn.no_grad():
        loss = float(nn.CrossEntropyLoss().forward(model.forward(x), labels))
    assert abs(loss - math.log(10)) < 0.15, loss


def test_overfits_a_tiny_batch(xp):
    """8 random images with random labels, a tiny CvT, plain SGD: the loss falls from ln 3 to
    near 0 (memorisation, so the whole forward and backward pass work together)."""
    cfg = tiny_config("dw_bn", True, dim_embed=(8, 16), num_heads=(1, 2))
    model = build_model(cfg, seed=0, dtype=np.float64)
    rng = np.random.default_rng(1)
    x = backend.to_device(rng.standard_normal((8, 3, 16, 16)))
    labels = backend.to_device(rng.integers(0, cfg.num_classes, size=8))
    loss_fn = nn.CrossEntropyLoss()
    lr, losses = 0.5, []
    for step in range(150):
        model.zero_grad()
        loss = loss_fn.forward(model.forward(x), labels)
        model.backward(loss_fn.backward(1.0))
        for p in model.parameters():
            p.data -= lr * p.grad
        losses.append(float(loss))
    assert abs(losses[0] - math.log(3)) < 0.1
    assert losses[-1] < 0.02, losses[::15]
    model.eval()
    with nn.no_grad():
        pred = backend.to_numpy(model.forward(x)).argmax(axis=1)
    assert np.array_equal(pred, backend.to_numpy(labels))
