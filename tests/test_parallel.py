"""The CPU thread pool (minicvt.fast.parallel) and every fast layer that splits its work with it.

The layers split only arrays above `min_elements`, which the tiny shapes of the gradient checks
never reach; here `parallel.settings(threads=3, min_elements=0)` sends every array through the
threaded path, with batch sizes that do not divide evenly (blocks of 1, 2 and 2 rows of a
batch of 5, and one block short of the thread count for a batch of 2). Each layer's forward
and backward must then equal the one-thread result (to rounding: partial sums over the blocks
are added in another order) and pass the float64 gradient check.
"""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from cvt_tiny import tiny_config
from minicvt import backend
from minicvt import fast as F
from minicvt.fast import parallel
from minicvt.gradcheck import check_function
from minicvt.models import build_model

TOL = 1e-7                  # as the layer gradient checks (smooth layers: about 1e-9)
SAME = dict(rtol=1e-12, atol=1e-13)


@pytest.fixture
def threaded():
    with parallel.settings(threads=3, min_elements=0):
        yield


TINY_PIECES = dict(threads=3, min_elements=0, piece_bytes=1)   # every piece one row


# -- the pool itself ----------------------------------------------------------------------------

def test_rows_covers_every_row_once_in_order(threaded):
    x = np.arange(10.0).reshape(5, 2)
    out = np.zeros_like(x)
    seen = parallel.rows(lambda x, out, k: (np.multiply(x, k, out=out), x[:, 0].tolist())[1], (x, out), 3.0)
    assert seen == [[0.0], [2.0, 4.0], [6.0, 8.0]]          # blocks of 1, 2, 2 rows, in row order
    np.testing.assert_array_equal(out, 3.0 * x)


def test_pieces_cover_every_row_once_in_order():
    x = np.arange(7.0).reshape(7, 1)
    with parallel.settings(**TINY_PIECES):
        seen = parallel.rows(lambda x: x[:, 0].tolist(), (x,), pieces=True)
    assert seen == [[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [6.0]]
    with parallel.settings(threads=2, min_elements=0, piece_bytes=16):    # 2 rows of 8 bytes a piece
        seen = parallel.rows(lambda x: x[:, 0].tolist(), (x,), pieces=True)
    assert seen == [[0.0, 1.0], [2.0], [3.0, 4.0], [5.0, 6.0]]             # blocks of 3 and 4 rows
    with parallel.settings(threads=1, piece_bytes=16):                     # one thread: pieces still
        assert len(parallel.rows(lambda x: None, (np.zeros((6, 1)),), pieces=True)) == 3


def test_rows_passes_none_and_runs_small_or_nested_calls_whole():
    x = np.ones((4, 3))
    with parallel.settings(threads=2, min_elements=0):
        shapes = parallel.rows(lambda x, m: (x.shape, m), (x, None))
        assert shapes == [((2, 3), None), ((2, 3), None)]
        # a call from inside a block is not split again
        inner = parallel.rows(lambda x: parallel.rows(lambda y: y.shape, (x,)), (x,))
        assert inner == [[(2, 3)], [(2, 3)]]
    with parallel.settings(threads=2, min_elements=100):   # 12 elements: below the size
        assert parallel.rows(lambda x: x.shape, (x,)) == [(4, 3)]
    with parallel.settings(threads=1, min_elements=0):
        assert parallel.rows(lambda x: x.shape, (x,)) == [(4, 3)]


def test_rows_reraises_a_blocks_error(threaded):
    def fail_on_last(x):
        if x[-1, 0] == 4:
            raise ArithmeticError("block with row 4")
    with pytest.raises(ArithmeticError, match="row 4"):
        parallel.rows(fail_on_last, (np.arange(5.0).reshape(5, 1),))
    finished = []

    def fail_first_after_the_others_finish(x):      # the calling thread's block fails
        if x[0, 0] == 0:
            raise ArithmeticError("block with row 0")
        time.sleep(0.05)
        finished.append(x[0, 0])
    with pytest.raises(ArithmeticError, match="row 0"):
        parallel.rows(fail_first_after_the_others_finish, (np.arange(5.0).reshape(5, 1),))
    assert sorted(finished) == [1.0, 3.0]               # the other blocks ran to the end first
    assert parallel.rows(lambda x: x.shape, (np.ones((5, 1)),)) == [(1, 1), (2, 1), (2, 1)]   # still works


def test_matmul_and_matmul_t(threaded, rand):
    a, b, d = rand(5, 4), rand(4, 3), rand(5, 3)
    np.testing.assert_allclose(parallel.matmul(a, b), a @ b, **SAME)
    np.testing.assert_allclose(parallel.matmul_t(d, a), d.T @ a, **SAME)
    s, t = rand(5, 2, 3, 4), rand(5, 2, 4, 6)                # stacks of matrices
    np.testing.assert_allclose(parallel.matmul(s, t), s @ t, **SAME)
    with pytest.raises(ValueError, match="same leading shape"):
        parallel.matmul(s, rand(1, 2, 4, 6))


def test_total_adds_partials():
    one, two = np.ones(3), 2 * np.ones(3)
    np.testing.assert_array_equal(parallel.total([one, two]), 3 * np.ones(3))
    dw, db = parallel.total([(one, None), (two, None)])
    assert db is None and np.array_equal(dw, 3 * np.ones(3))


def test_thread_count_settings_are_checked():
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="whole number >= 1"):
            parallel.set_num_threads(bad)
    code = "from minicvt.fast import parallel; parallel.num_threads()"
    env = dict(os.environ, MINICVT_NUM_THREADS="two")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "MINICVT_NUM_THREADS must be a whole number, got 'two'" in run.stderr
    env["MINICVT_NUM_THREADS"] = "3"
    run = subprocess.run([sys.executable, "-c", "from minicvt.fast import parallel; print(parallel.num_threads())"],
                         env=env, capture_output=True, text=True)
    assert run.stdout.strip() == "3"


def test_blas_runs_on_one_thread_while_the_pool_works():
    """The pool sets NumPy's OpenBLAS to one thread (its own threads would spin on the cores);
    going back to one thread of ours gives BLAS its threads back."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas = threadpoolctl.ThreadpoolController().select(internal_api="openblas")
    if not blas.lib_controllers:
        pytest.skip("NumPy is not linked against OpenBLAS here")
    def blas_threads():
        return threadpoolctl.ThreadpoolController().select(internal_api="openblas").lib_controllers[0].num_threads
    with parallel.settings(threads=1, piece_bytes=16):      # no pool: BLAS has its own threads,
        before = blas_threads()
        parallel.rows(lambda x: None, (np.zeros((6, 1)),), pieces=True)     # also when walking pieces
        assert blas_threads() == before
        with parallel.settings(threads=2, min_elements=0):
            parallel.matmul(np.ones((4, 3)), np.ones((3, 2)))
            assert blas_threads() == 1
        assert blas_threads() == before


# -- every threaded layer: same result as one thread, and a passing gradient check ----------------

def _layers(rand):
    """{name: (forward(**inputs) -> (out, cache), backward, inputs)} for each threaded layer."""
    def bn(training, channels_last):
        rm, rv = rand(3), rand(3) ** 2 + 0.5
        return lambda x, g, b: F.batchnorm2d_forward(x, g, b, rm, rv, training,
                                                     channels_last=channels_last)[:2]
    return {
        "quick_gelu": (F.quick_gelu_forward, F.quick_gelu_backward, {"x": rand(5, 3, 4)}),
        "gelu": (F.gelu_forward, F.gelu_backward, {"x": rand(5, 3, 4)}),
        "gelu_tanh": (lambda x: F.gelu_forward(x, "tanh"), F.gelu_backward, {"x": rand(5, 3, 4)}),
        "layernorm": (F.layernorm_forward, F.layernorm_backward,
         {"x": rand(5, 3, 4), "gamma": rand(4), "beta": rand(4)}),
        "linear": (F.linear_forward, F.linear_backward, {"x": rand(5, 3, 4), "w": rand(6, 4), "b": rand(6)}),
        "softmax": (lambda x: F.softmax_forward(x), F.softmax_backward, {"x": rand(5, 2, 3, 4)}),
        "attention": (lambda q, k, v: F.attention_forward(q, k, v, 2, 0.3), F.attention_backward,
         {"q": rand(5, 6, 4), "k": rand(5, 2, 4), "v": rand(5, 2, 4)}),
        "conv2d": (lambda x, w, b: F.conv2d_forward(x, w, b, stride=2, padding=1), F.conv2d_backward,
         {"x": rand(5, 2, 5, 4), "w": rand(3, 2, 3, 3), "b": rand(3)}),
        "conv2d_last": (lambda x, w, b: F.conv2d_forward(x, w, b, 2, 1, channels_last=True), F.conv2d_backward,
         {"x": rand(5, 5, 4, 2), "w": rand(3, 2, 3, 3), "b": rand(3)}),
        "depthwise_s1": (lambda x, w, b: F.depthwise_conv2d_forward(x, w, b, 1, 1), F.depthwise_conv2d_backward,
         {"x": rand(5, 3, 5, 4), "w": rand(3, 1, 3, 3), "b": rand(3)}),
        "depthwise_s2_last": (lambda x, w, b: F.depthwise_conv2d_forward(x, w, b, 2, 1, channels_last=True),
         F.depthwise_conv2d_backward, {"x": rand(5, 5, 4, 3), "w": rand(3, 1, 3, 3), "b": rand(3)}),
        "depthwise_s1_last": (lambda x, w, b: F.depthwise_conv2d_forward(x, w, b, 1, 1, channels_last=True),
         F.depthwise_conv2d_backward, {"x": rand(5, 5, 4, 3), "w": rand(3, 1, 3, 3), "b": rand(3)}),
        "batchnorm_train": (bn(True, False), F.batchnorm2d_backward,
         {"x": rand(5, 3, 2, 3), "g": rand(3), "b": rand(3)}),
        "batchnorm_eval_last": (bn(False, True), F.batchnorm2d_backward,
         {"x": rand(5, 2, 3, 3), "g": rand(3), "b": rand(3)}),
    }


def _run(forward, backward, inputs, dout_seed=7):
    out, cache = forward(**inputs)
    dout = np.random.default_rng(dout_seed).standard_normal(out.shape)
    grads = backward(backend.to_device(dout), cache)
    return [out] + [g for g in (grads if isinstance(grads, tuple) else (grads,)) if g is not None]


LAYERS = ["quick_gelu", "gelu", "gelu_tanh", "layernorm", "linear", "softmax", "attention", "conv2d", "conv2d_last",
          "depthwise_s1", "depthwise_s2_last", "depthwise_s1_last", "batchnorm_train", "batchnorm_eval_last"]


@pytest.mark.parametrize("name", LAYERS)
def test_threaded_layer_equals_one_thread_and_passes_gradcheck(rand, name):
    forward, backward, inputs = _layers(rand)[name]
    with parallel.settings(threads=1):
        serial = _run(forward, backward, inputs)
    for setting in (dict(threads=3, min_elements=0), TINY_PIECES):
        with parallel.settings(**setting):
            threaded = _run(forward, backward, inputs)
            report = check_function(forward, backward, inputs)
        assert len(serial) == len(threaded)
        for s, t in zip(serial, threaded):
            np.testing.assert_allclose(t, s, **SAME, err_msg=f"{name} {setting}")
        report.assert_ok(TOL)


INFERENCE = {   # the forwards that cache nothing (no_grad), against the forward's out
    "quick_gelu": (F.quick_gelu_inference, F.quick_gelu_forward),
    "gelu": (F.gelu_inference, F.gelu_forward),
    "gelu_tanh": (lambda x: F.gelu_inference(x, "tanh"), lambda x: F.gelu_forward(x, "tanh")),
    "layernorm": (F.layernorm_inference, F.layernorm_forward),
}


@pytest.mark.parametrize("name", list(INFERENCE))
def test_threaded_inference_equals_the_forward(rand, name):
    inference, forward = INFERENCE[name]
    inputs = _layers(rand)[name][2]
    inputs = {k: v * 20.0 if k == "x" else v for k, v in inputs.items()}   # exp overflows for some
    expected = forward(**inputs)[0]
    for setting in (dict(threads=1), dict(threads=3, min_elements=0), TINY_PIECES):
        with parallel.settings(**setting):
            # quick_gelu: x / (1 + e) against x * (1 / (1 + e)), one rounding apart
            np.testing.assert_allclose(inference(**inputs), expected, rtol=1e-15, atol=0, err_msg=f"{name} {setting}")


def test_layer_list_is_complete(rand):
    assert sorted(_layers(rand)) == sorted(LAYERS)


def test_whole_model_threaded_equals_one_thread():
    """Forward logits and every parameter gradient of a tiny CvT, float64, train mode."""
    def step():
        model = build_model(tiny_config(), seed=0, dtype=np.float64)
        x = np.random.default_rng(3).standard_normal((5, 3, 16, 16))
        logits = model.forward(x)
        model.backward(np.random.default_rng(4).standard_normal(logits.shape))
        return logits, {n: p.grad.copy() for n, p in model.named_parameters()}
    with parallel.settings(threads=1):
        logits1, grads1 = step()
    with parallel.settings(**TINY_PIECES):
        logits3, grads3 = step()
    np.testing.assert_allclose(logits3, logits1, **SAME)
    assert grads1.keys() == grads3.keys()
    for name in grads1:
        np.testing.assert_allclose(grads3[name], grads1[name], rtol=1e-10, atol=1e-12, err_msg=name)
