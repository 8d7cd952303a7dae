"""The emulated CuPy (tests/emulated_cupy) and what it proves about minicvt's GPU path.

First, that the emulation behaves as CuPy 14.2 does where NumPy code breaks on a GPU (names,
signatures, host conversions, wrapped indices, read-backs). Then the GPU-path findings, each a
test that failed on the code before its fix: transfers inside the depthwise convolution and
`evaluate`, the label check, what CuPy's einsum allocates, one random generator per module.
Last, a whole cvt-cifar-s training step and an inference forward with no device-to-host
transfer at all, and the trainer reading back once per logging interval.
"""
import json

import time
from types import SimpleNamespace

import numpy as np
import pytest

import cupy_emulation
from minicvt import backend, fast, kernels, nn
from minicvt import functional as F
from minicvt.models import build_model, get_config
from minicvt.optim import AdamW, clip_grad_norm


def dev(a, dtype=None):
    return backend.to_device(np.asarray(a), dtype=dtype)


# -- the emulation itself -----------------------------------------------------------------------

def test_manifest_is_recorded_from_cupy_14_2():
    m = json.loads((cupy_emulation.DIR / "manifest.json").read_text())
    assert m["cupy"] == "14.2.0"
    assert len(m["namespaces"]["cupy"]) > 400 and "einsum" in m["namespaces"]["cupy"]
    get = m["classes"]["cupy.ndarray"]["get"]["signature"]
    assert [p[0] for p in get] == ["self", "stream", "order", "out", "blocking"]


def test_only_cupys_names_and_signatures(emulated_cupy):
    cp = backend.xp()
    a = dev(np.ones((2, 3)))
    for name in ("geomspace", "insert", "nanpercentile", "vecdot"):      # NumPy has them, CuPy not
        assert hasattr(np, name)
        with pytest.raises(AttributeError, match=f"no attribute '{name}'"):
            getattr(cp, name)
    with pytest.raises(TypeError, match="out"):                         # CuPy's einsum has no out=
        cp.einsum("ij->i", a, out=cp.empty(2))
    with pytest.raises(TypeError, match="like"):                        # NumPy's zeros has like=
        cp.zeros((2,), like=a)
    with pytest.raises(TypeError, match="where"):                       # CuPy's ufuncs: no where=
        cp.add(a, a, where=a > 0)
    with pytest.raises(AttributeError, match="itemset"):                # an ndarray method NumPy 1 had
        a.itemset(0, 1.0)


def test_host_conversions_and_host_operands_raise(emulated_cupy):
    cp = backend.xp()
    a = dev(np.arange(6.0).reshape(2, 3))
    assert not isinstance(a, np.ndarray) and backend.is_cupy_array(a)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(a)
    with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
        a + np.ones(3)
    with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
        np.ones(3) * a
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for fill"):
        a[0] = np.ones(3)
    with pytest.raises(TypeError, match="NumPy array on the host"):
        cp.concatenate([a, np.ones((1, 3))])
    a[0] = np.float64(2.0)                                  # NumPy scalars are fine, as in CuPy
    assert type(np.exp(a)).__module__ == "cupy"             # NumPy's functions dispatch to CuPy's


def test_host_data_is_copied_to_the_device(emulated_cupy):
    cp = backend.xp()
    host = np.zeros(3)
    for make in (cp.asarray, cp.array, cp.asanyarray, backend.to_device):
        d = make(host)
        d += 1
        assert host.tolist() == [0.0, 0.0, 0.0]              # separate memory, as on a GPU
    same = cp.asarray(d)
    same += 1
    assert backend.to_numpy(d).tolist() == [2.0, 2.0, 2.0]     # a device array is not copied again


def test_indices_wrap_and_reductions_stay_on_the_device(emulated_cupy):
    cp = backend.xp()
    a = dev(np.array([10.0, 20.0, 30.0]))
    assert backend.to_numpy(a[dev(np.array([3, -4]))]).tolist() == [10.0, 30.0]      # wrapped
    assert backend.to_numpy(cp.take(a, dev(np.array([4])))).tolist() == [20.0]
    a[dev(np.array([5]))] = 0.0
    assert backend.to_numpy(a).tolist() == [10.0, 20.0, 0.0]
    s = a.sum()
    assert backend.is_cupy_array(s) and s.shape == ()                 # a 0-d device array
    with pytest.raises(IndexError):
        a[3]                                                          # a plain int still checks


def test_transfers_are_counted_by_line_and_refused_in_no_sync(emulated_cupy):
    a = dev(np.arange(4.0))
    with emulated_cupy.counting() as made:
        float(a.sum()); a.get(); a.tolist(); bool(a[0] > 1); str(a)   # noqa: E702  (one line)
    kinds = sorted(kind for (_, kind) in made)
    assert kinds == [".get()", ".tolist()", "bool()", "float()", "str()"]
    line = test_transfers_are_counted_by_line_and_refused_in_no_sync.__code__.co_firstlineno + 3
    assert {site.split(" ")[0].rsplit("/", 1)[-1] for (site, _) in made} == {f"test_cupy_emulation.py:{line}"}
    with emulated_cupy.no_sync():
        b = a * 2 + 1                                   # device work is fine
        with pytest.raises(emulated_cupy.TransferError, match=r"\(float\(\)\) at .*test_cupy_emulation.py:\d+"):
            float(b.sum())


@pytest.mark.parametrize("call, reads", [
    ("bincount", 2), ("sliding_window_view", 2), ("nonzero", 1), ("mask", 1), ("where1", 1)])
def test_functions_that_read_back_inside(emulated_cupy, call, reads):
    cp = backend.xp()
    i, x = dev(np.array([0, 2, 2])), dev(np.ones((5, 5)))
    run = {"bincount": lambda: cp.bincount(i, minlength=4),
           "sliding_window_view": lambda: cp.lib.stride_tricks.sliding_window_view(x, (3, 3)),
           "nonzero": lambda: cp.nonzero(i), "mask": lambda: x[x > 0], "where1": lambda: cp.where(i)}[call]
    with emulated_cupy.counting() as made:
        run()
    assert sum(made.values()) == reads


def test_einsum_model_counts_cupys_temporaries(emulated_cupy):
    """The copies CuPy's einsum makes (cupy/linalg/_einsum.py: the later operand is laid out
    (batch, kept, contracted), the earlier one (batch, contracted, kept), and matmul copies
    whichever is not C-contiguous then)."""
    cp = backend.xp()
    a = dev(np.ones((64, 8)), dtype=np.float32)
    b, c = dev(np.ones((8, 5)), dtype=np.float32), dev(np.ones((3, 8)), dtype=np.float32)
    cases = (("mc,mc->m", (a, a), 0), ("mc,mc->c", (a, a), 2 * a.nbytes), ("mc->c", (a,), 0),
             ("ij,jk->ik", (a, b), a.nbytes + b.nbytes),        # both transposed: both copied
             ("ik,jk->ij", (a, c), a.nbytes))                  # c already (kept, contracted)
    for spec, operands, temporaries in cases:
        with emulated_cupy.allocations() as st:
            r = cp.einsum(spec, *operands)
        assert st["allocated"] - r.nbytes == temporaries, spec


def test_the_emulation_shows_a_set_number_of_gpus(emulated_cupy, monkeypatch):
    """MINICVT_EMULATED_DEVICES (default 1) GPUs; using one past them fails as in CUDA."""
    cp = backend.xp()
    monkeypatch.delenv("MINICVT_EMULATED_DEVICES", raising=False)
    assert cp.cuda.runtime.getDeviceCount() == 1
    with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="invalid device ordinal"):
        cp.cuda.Device(1).use()
    monkeypatch.setenv("MINICVT_EMULATED_DEVICES", "2")
    try:
        assert cp.cuda.runtime.getDeviceCount() == 2
        cp.cuda.Device(1).use()
        assert cp.cuda.runtime.getDevice() == cp.cuda.Device().id == dev([1.0]).device.id == 1
        with cp.cuda.Device(0):
            assert cp.cuda.runtime.getDevice() == 0
        assert cp.cuda.runtime.getDevice() == 1
        with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="invalid device ordinal"):
            cp.cuda.Device(2).use()
    finally:
        cp.cuda.Device(0).use()                             # the current device is per thread
    monkeypatch.setenv("MINICVT_EMULATED_DEVICES", "0")
    with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="no CUDA-capable device"):
        cp.cuda.runtime.getDeviceCount()


def test_nccl_has_cupys_names_and_signatures(emulated_cupy):
    from cupy.cuda import nccl
    m = json.loads((cupy_emulation.DIR / "manifest.json").read_text())
    assert sorted(dir(nccl)) == sorted(m["namespaces"]["cupy.cuda.nccl"]) and "NcclCommunicator" in dir(nccl)
    assert (nccl.NCCL_SUM, nccl.NCCL_AVG, nccl.NCCL_INT64, nccl.NCCL_FLOAT32, nccl.NCCL_FLOAT64) == (0, 4, 4, 7, 8)
    uid = nccl.get_unique_id()
    assert isinstance(uid, bytes) and len(uid) == 128 and nccl.get_unique_id() != uid
    with pytest.raises(AttributeError, match="no attribute 'ncclAllReduce'"):
        nccl.ncclAllReduce
    with pytest.raises(TypeError, match="expected bytes, got tuple"):       # CuPy 13's id form
        nccl.NcclCommunicator(1, tuple(uid), 0)
    with pytest.raises(ValueError, match="commId length 64 != 128"):
        nccl.NcclCommunicator(1, uid[:64], 0)


def test_nccl_in_a_world_of_one_rank(emulated_cupy, monkeypatch):
    """Without mpi4py the emulated NCCL is a world of one rank. Buffers are device addresses
    (the memory behind emulated arrays, offsets included); collectives are counted apart from
    transfers and allowed inside no_sync(); what NCCL refuses, the emulation refuses."""
    monkeypatch.setitem(__import__("sys").modules, "mpi4py", None)
    cp = backend.xp()
    from cupy.cuda import nccl
    comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
    assert (comm.device_id(), comm.rank_id(), comm.size()) == (0, 0, 1)
    f32, stream = nccl.NCCL_FLOAT32, cp.cuda.get_current_stream().ptr
    a = dev(np.arange(1.0, 4.0), dtype=np.float32)
    out = cp.zeros(6, dtype=cp.float32)
    with emulated_cupy.no_sync(), emulated_cupy.collectives() as made:
        comm.allReduce(a.data.ptr, out[3:].data.ptr, 3, f32, nccl.NCCL_SUM, stream)   # into out's end
        comm.allReduce(a.data.ptr, a.data.ptr, 3, f32, nccl.NCCL_AVG, stream)
        comm.bcast(out.data.ptr, 6, f32, 0, stream)
        comm.allGather(a.data.ptr, out.data.ptr, 3, f32, stream)
    assert backend.to_numpy(out).tolist() == [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
    by_kind = {kind: sum(n for (_, k), n in made.items() if k == kind) for _, kind in made}
    assert by_kind == {"allReduce": 2, "bcast": 1, "allGather": 1}
    assert all("test_cupy_emulation.py" in site for site, _ in made)

    host = np.zeros(3, np.float32)
    refused = [
        (nccl.NcclError, "not in the memory of a live emulated device array",
         lambda: comm.allReduce(host.ctypes.data, host.ctypes.data, 3, f32, nccl.NCCL_SUM, stream)),
        (nccl.NcclError, "not in the memory", lambda: comm.bcast(a.data.ptr, 4, f32, 0, stream)),  # past the end
        (TypeError, "sendbuf must be an integer", lambda: comm.allReduce(a.data, a.data.ptr, 3, f32, 0, stream)),
        (TypeError, "stream must be an integer", lambda: comm.bcast(a.data.ptr, 3, f32, 0, cp.cuda.get_current_stream())),
        (TypeError, "missing a required argument: 'stream'", lambda: comm.bcast(a.data.ptr, 3, f32, 0)),
        (nccl.NcclError, "root 1 in a communicator of 1", lambda: comm.bcast(a.data.ptr, 3, f32, 1, stream)),
        (nccl.NcclError, "MPI's COMM_WORLD", lambda: nccl.NcclCommunicator(2, nccl.get_unique_id(), 0)),
    ]
    with emulated_cupy.collectives() as made:
        for error, match, call in refused:
            with pytest.raises(error, match=match):
                call()
    assert not made                                        # a refused call is not a collective
    comm.destroy()
    with pytest.raises(nccl.NcclError, match="destroyed"):
        comm.allReduce(a.data.ptr, a.data.ptr, 3, f32, nccl.NCCL_SUM, stream)


# -- the GPU path's findings, each failing on the code before its fix ----------------------------

@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_convolution_makes_no_transfer(emulated_cupy, rand, channels_last, stride, both_kernels):
    """CuPy's sliding_window_view read its window shape back twice a call (70 waits a step)."""
    x = rand(2, 6, 6, 4) if channels_last else rand(2, 4, 6, 6)
    w = rand(4, 1, 3, 3)
    with emulated_cupy.no_sync():
        out, cache = kernels.ops.depthwise_conv2d_forward(x, w, rand(4), stride, 1, channels_last)
        kernels.ops.depthwise_conv2d_backward(out * 1.0, cache)


def test_depthwise_and_norms_allocate_little_on_cupy(emulated_cupy, rand):
    """The fast kernels' CuPy forms (minicvt.fast). CuPy's einsum copies the 3x3 windows out before its batched matmul (a peak of 11.6x the
    output's bytes in the depthwise forward, before the fix) and copies both operands of a
    per-channel sum of products (one x more in BatchNorm and in LayerNorm's backward). The
    peaks below are each call's most live bytes at once, in units of x (4, 8, 8, 16)."""
    x, w = rand(4, 8, 8, 16, dtype=np.float32), rand(16, 1, 3, 3, dtype=np.float32)
    gamma, beta = rand(16, dtype=np.float32), rand(16, dtype=np.float32)
    mean, var = backend.xp().zeros(16, np.float32), backend.xp().ones(16, np.float32)
    peaks = {}

    def peak(name, call):
        with emulated_cupy.allocations() as st:
            result = call()
        peaks[name] = st["peak"] / x.nbytes
        return result

    out, cache = peak("depthwise", lambda: fast.depthwise_conv2d_forward(x, w, None, 1, 1, channels_last=True))
    padded = cache.xpad.nbytes / x.nbytes                                 # 1.56: (10, 10) of (8, 8)
    peak("depthwise backward", lambda: fast.depthwise_conv2d_backward(out, cache))
    y, bn_cache, _ = peak("batchnorm", lambda: fast.batchnorm2d_forward(x, gamma, beta, mean, var, True,
                                                                     channels_last=True))
    peak("batchnorm backward", lambda: fast.batchnorm2d_backward(y, bn_cache))
    y, ln_cache = peak("layernorm", lambda: fast.layernorm_forward(x, gamma, beta))
    peak("layernorm backward", lambda: fast.layernorm_backward(y, ln_cache))
    limits = {"depthwise": padded + 2.05,            # the padded x, out, one temporary
              "depthwise backward": 3.7,             # padded dout, dx, one temporary for dw
              "batchnorm": 2.05, "batchnorm backward": 1.05,      # xc and out; dx
              "layernorm": 2.2, "layernorm backward": 2.2}        # xhat and out; dx and dxhat
    assert {k: v for k, v in peaks.items() if v > limits[k]} == {}, peaks


def test_cross_entropy_label_check_without_read_back(emulated_cupy, rand):
    """check_labels=False reads nothing back; an out-of-range label gives NaN, never another
    class (CuPy would wrap label 5 of 5 classes to class 0 and train towards it silently)."""
    logits, labels = rand(3, 5), dev(np.array([0, 5, 2]))
    with emulated_cupy.no_sync():
        loss, cache = F.cross_entropy_forward(logits, labels, 0.1, check_labels=False)
        dlogits = F.cross_entropy_backward(1.0, cache)
        bad = F.label_errors(labels, 5)
    assert np.isnan(float(loss)) and int(bad) == 1
    assert np.isnan(backend.to_numpy(dlogits)[1]).all() and np.isfinite(backend.to_numpy(dlogits)[[0, 2]]).all()
    good = dev(np.array([0, 4, 2]))
    with emulated_cupy.no_sync():
        loss_deferred, _ = F.cross_entropy_forward(logits, good, 0.1, check_labels=False)
    loss_checked, _ = F.cross_entropy_forward(logits, good, 0.1)
    assert float(loss_deferred) == float(loss_checked)


# -- a whole step --------------------------------------------------------------------------------

@pytest.fixture
def cifar_s(emulated_cupy):
    model = build_model(get_config("cvt-cifar-s"), seed=0)
    rng = np.random.default_rng(0)
    x = dev(rng.standard_normal((4, 3, 32, 32)), dtype=np.float32)
    y = dev(rng.integers(0, 10, 4))
    return model, x, y


def test_a_training_step_makes_no_transfer(emulated_cupy, cifar_s, both_kernels):
    """Forward, loss with label smoothing, backward, gradient clipping and AdamW on cvt-cifar-s,
    with every device-to-host transfer an error, with either set of kernels."""
    model, x, y = cifar_s
    model.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1, check_labels=False)
    opt = AdamW(list(model.named_parameters()), lr=1e-3)
    before = backend.to_numpy(model.head.weight.data).copy()
    with emulated_cupy.counting() as made, emulated_cupy.no_sync():
        model.zero_grad()
        logits = model.forward(x)
        loss = criterion.forward(logits, y)
        model.backward(criterion.backward())
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        bad = F.label_errors(y, 10)
    assert not made
    assert np.isfinite(float(loss)) and int(bad) == 0
    assert not np.array_equal(backend.to_numpy(model.head.weight.data), before)


def test_an_inference_forward_makes_no_transfer(emulated_cupy, cifar_s, both_kernels):
    model, x, _ = cifar_s
    model.eval()
    with emulated_cupy.no_sync(), nn.no_grad():
        logits = model.forward(x)
    assert logits.shape == (4, 10)


def test_the_fast_kernels_allocate_less_on_cupy(emulated_cupy, cifar_s):
    """Why minicvt.kernels chooses 'fast' on CuPy too: under the emulation's memory ledger a
    training step of cvt-cifar-s (batch 4) and an inference forward allocate fewer bytes in all
    with the fast set, at a peak within 1 % of the reference's (docs/backend.md has the figures: at batch 8 the step
    allocates 143 MB against the reference's 275 MB, at the same 39 MB peak; the inference
    forward 42 MB against 119 MB, peak 5.8 MB against 10.0 MB)."""
    _, x, y = cifar_s
    used = {}
    for kernel_set in kernels.NAMES:
        with kernels.use(kernel_set):
            model = build_model(get_config("cvt-cifar-s"), seed=0).train()
            criterion = nn.CrossEntropyLoss(label_smoothing=0.1, check_labels=False)
            for _ in range(2):                  # the second step: nothing is made for the first time
                with emulated_cupy.allocations() as step:
                    model.zero_grad()
                    criterion.forward(model.forward(x), y)
                    model.backward(criterion.backward())
            with emulated_cupy.allocations() as inference, nn.no_grad():
                model.eval().forward(x)
        used[kernel_set] = (step["allocated"], step["peak"], inference["allocated"], inference["peak"])
    fast_used, reference_used = used["fast"], used["reference"]
    assert fast_used[0] < reference_used[0] and fast_used[2] < reference_used[2], used
    assert fast_used[1] <= 1.01 * reference_used[1] and fast_used[3] <= reference_used[3], used


def test_one_random_generator_per_step(emulated_cupy):
    """Every dropout and drop-path module draws from the model's one stream, made at its first
    draw of a step (before the shared stream: a generator per module, 34 in cvt-cifar-s)."""
    model = build_model(get_config("cvt-cifar-s"), seed=0)          # drop path 0.1 in stage 2
    x = dev(np.zeros((2, 3, 32, 32)), dtype=np.float32)
    made = emulated_cupy.generators_made
    model.train()
    with nn.no_grad():
        model.drop_rng.at(1, 0)
        model.forward(x)
        model.forward(x)                                             # the same step: no new one
        model.drop_rng.at(1, 1)
        model.forward(x)
    assert emulated_cupy.generators_made - made == 2


def test_the_trainer_reads_back_once_per_logging_interval(emulated_cupy, tmp_path, monkeypatch):
    """An epoch of 4 steps of 1 s each, logging every 2 s, reads the device 3 times: at steps 1,
    3 and 4 (loss, accuracy and the bad-label count in one transfer each time); evaluation once
    at the end, however many batches."""
    from test_train import make_trainer, tiny_run, write_image_folder
    from minicvt.evaluation import evaluate
    folder = write_image_folder(tmp_path / "images")
    trainer = make_trainer(tiny_run(folder, epochs=1, eval_batch_size=4), tmp_path / "run", log_seconds=2.0)
    now, real_step = [0.0], trainer.optimizer.step

    def one_second_step():
        real_step()
        now[0] += 1.0
    monkeypatch.setattr(trainer.optimizer, "step", one_second_step)
    # the trainer's clock only (time.monotonic itself stays: others read it too)
    monkeypatch.setattr("minicvt.train.time", SimpleNamespace(monotonic=lambda: now[0], perf_counter=time.perf_counter))
    with emulated_cupy.counting() as made:
        record = trainer.train_epoch(0)
    assert sum(made.values()) == 3 and all("minicvt/train.py" in site for site, _ in made)
    assert np.isfinite(record["train_loss"])
    with emulated_cupy.counting() as made:
        evaluate(trainer.model, trainer.val_loader, 3)          # 12 images: 3 batches
    assert sum(made.values()) == 1
