"""minicvt.distributed: the single-process world, the refusal when a launcher started several
ranks without mpi4py, gradients in one flat buffer, and (where mpi4py and its mpiexec are
installed: pip install -e ".[mpi]") two real ranks under mpiexec (tests/mpi_ranks.py)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cupy_emulation
from cvt_tiny import tiny_config
from minicvt import backend, distributed, nn
from minicvt.models import build_model
from minicvt.optim import AdamW, clip_grad_norm

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
LAUNCHER_VARS = [v for _, size, rank in distributed._LAUNCHERS for v in (size, rank) if v]


@pytest.fixture
def no_launcher(monkeypatch):
    for var in LAUNCHER_VARS + ["SLURM_NTASKS"]:
        monkeypatch.delenv(var, raising=False)
    distributed._state["world"] = None
    yield
    distributed._state["world"] = None


# -- who launched us, and the single process ---------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"PMI_RANK": "0", "PMI_SIZE": "1"}, None),                              # mpiexec -n 1
    ({"PMI_RANK": "0", "PMI_SIZE": "2"}, ("MPICH's mpiexec", 2)),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "PMIX_RANK": "0"}, ("Open MPI's mpirun", 4)),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, None),                      # the batch script itself
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}, ("Slurm's srun", 4)),
    ({"PMIX_RANK": "3"}, ("a PMIx launcher", None)),
])
def test_launcher_is_read_from_the_environment(env, expected):
    assert distributed.launched_ranks(env) == expected


def test_single_process_world(no_launcher):
    world = distributed.init()
    assert isinstance(world, distributed.SingleProcess) and distributed.world() is world
    assert (world.rank, world.size, world.local_rank, world.local_size) == (0, 1, 0, 1)
    a = np.arange(6.0)
    assert world.allreduce(a) is a and world.allreduce(a, op="mean") is a
    assert np.array_equal(a, np.arange(6.0))
    assert world.broadcast(a) is a and np.array_equal(a, np.arange(6.0))
    world.barrier()
    with pytest.raises(ValueError, match="root 1 does not exist"):
        world.broadcast(a, root=1)
    with pytest.raises(ValueError, match="'sum' or 'mean'"):
        world.allreduce(a, op="max")
    with pytest.raises(ValueError, match="floating"):
        world.allreduce(np.arange(3), op="mean")
    with pytest.raises(ValueError, match="C-contiguous"):
        world.allreduce(np.zeros((4, 4))[:, 1])


def test_single_process_never_imports_mpi4py():
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = str(ROOT)
    code = ("import sys; from minicvt import distributed; w = distributed.init('numpy'); "
            "print(type(w).__name__, 'mpi4py' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["SingleProcess", "False"]


def test_launched_without_mpi4py_refuses_in_one_line(no_launcher, monkeypatch):
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)           # `import mpi4py` raises ImportError
    with pytest.raises(distributed.DistributedError) as e:
        distributed.init("numpy")
    message = str(e.value)
    assert "\n" not in message and "2 ranks" in message and 'pip install -e ".[mpi]"' in message
    assert isinstance(e.value, RuntimeError)


def test_cupy_without_nccl_refuses_in_one_line(emulated_cupy, monkeypatch):
    cupy, nccl = backend.import_nccl()                        # the emulation's cupy.cuda.nccl
    assert nccl.available and nccl.NCCL_FLOAT32 == 7
    monkeypatch.setattr(nccl, "available", False)             # as CuPy sets it where NCCL cannot load
    with pytest.raises(backend.BackendError) as e:
        backend.import_nccl()
    assert "\n" not in str(e.value) and "pip install nvidia-nccl-cu12" in str(e.value)


# -- gradients in one flat buffer ----------------------------------------------------------------------

def _batch(seed=0, n=4):
    rng = np.random.default_rng(seed)
    return backend.to_device(rng.standard_normal((n, 3, 16, 16))), backend.to_device(rng.integers(0, 3, size=n))


def _backward(model, x, labels):
    loss_fn = nn.CrossEntropyLoss()
    loss_fn.forward(model.forward(x), labels)
    model.backward(loss_fn.backward(1.0))


def test_flat_grads_are_views_that_backward_fills(xp):
    model = build_model(tiny_config(), seed=0, dtype=np.float32)
    params = model.parameters()
    params[0].grad[...] = 1.5                                 # accumulated before flattening: kept
    flat = distributed.flatten_grads(params)
    (buffer,) = flat.buffers
    assert buffer.ndim == 1 and buffer.dtype == np.float32
    assert buffer.size == sum(p.data.size for p in params)
    assert all(xp.shares_memory(p.grad, buffer) for p in params)
    assert all(p.grad.shape == p.data.shape for p in params)
    assert float(buffer[:params[0].grad.size].min()) == 1.5 and float(abs(buffer[params[0].grad.size:]).max()) == 0

    model.zero_grad()                                         # writes into the views
    assert float(abs(buffer).max()) == 0 and all(xp.shares_memory(p.grad, buffer) for p in params)
    _backward(model, *_batch())
    start = 0
    for p in params:                                          # the buffer holds every gradient, in order
        assert xp.shares_memory(p.grad, buffer)
        np.testing.assert_array_equal(backend.to_numpy(buffer[start:start + p.grad.size]),
                                      backend.to_numpy(p.grad).ravel())
        start += p.grad.size
    assert float(abs(buffer).max()) > 0
    flat.check()


def test_one_buffer_per_dtype():
    model = build_model(tiny_config(), seed=0, dtype=np.float64)
    params = model.parameters()
    params[1].data = params[1].data.astype(np.float32)
    params[1].grad = np.zeros_like(params[1].data)
    flat = distributed.flatten_grads(params)
    assert [b.dtype for b in flat.buffers] == [np.float64, np.float32]
    assert flat.buffers[1].size == params[1].data.size


def test_reallocated_grads_are_noticed():
    model = build_model(tiny_config(), seed=0, dtype=np.float64)
    flat = distributed.flatten_grads(model.parameters())
    model.to(dtype=np.float64)                                # Module.to makes new gradient arrays
    with pytest.raises(RuntimeError, match="call flatten_grads again"):
        flat.allreduce(distributed.SingleProcess())


class _OtherRank(distributed.World):
    """A world of two ranks in one process: the other rank's arrays are given, one per
    allreduce in the order they come, and allreduce adds them in."""
    size = 2

    def __init__(self, arrays):
        self.arrays = list(arrays)

    def allreduce(self, array, op="sum"):
        array += self.arrays.pop(0)
        if op == "mean":
            array /= self.size
        return array


def test_one_allreduce_over_the_buffer_equals_one_per_parameter():
    """Rank 0's model `a` (flat) and `b` (not) see one batch, the other rank another batch."""
    a, b, other = (build_model(tiny_config(), seed=0, dtype=np.float64) for _ in range(3))
    flat = distributed.flatten_grads(a.parameters())
    for model, seed in ((a, 0), (b, 0), (other, 1)):
        _backward(model, *_batch(seed))
    own = [p.grad.copy() for p in a.parameters()]
    world = _OtherRank([np.concatenate([p.grad.ravel() for p in other.parameters()])])
    flat.allreduce(world, op="mean")
    assert world.arrays == []                                 # exactly one all-reduce
    per_parameter = _OtherRank([p.grad.copy() for p in other.parameters()])
    for p in b.parameters():
        per_parameter.allreduce(p.grad, op="mean")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        np.testing.assert_array_equal(pa.grad, pb.grad, err_msg=name)
    assert not all(np.array_equal(g, p.grad) for g, p in zip(own, a.parameters()))   # really reduced


def test_training_with_flat_grads_is_bit_identical(xp):
    """AdamW and gradient clipping (in place on the views) for 5 steps: the same weights, bit for
    bit, with and without flat gradients."""
    models = [build_model(tiny_config(), seed=0, dtype=np.float32) for _ in range(2)]
    distributed.flatten_grads(models[1].parameters())
    for model in models:
        opt = AdamW(model.named_parameters(), lr=1e-2)
        for step in range(5):
            model.zero_grad()
            _backward(model, *_batch(step))
            clip_grad_norm(model.parameters(), 0.5)
            opt.step()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        np.testing.assert_array_equal(backend.to_numpy(p.data), backend.to_numpy(q.data), err_msg=name)
    assert not np.array_equal(backend.to_numpy(models[0].parameters()[0].data),
                              backend.to_numpy(build_model(tiny_config(), seed=0).parameters()[0].data))


# -- two real ranks (needs mpi4py and the mpiexec of its MPI) ---------------------------------------

def _mpiexec():
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip('mpi4py is not installed (pip install -e ".[mpi]")')
    mpiexec = distributed.find_mpiexec()            # the mpich wheel puts one beside python
    if mpiexec is None:
        pytest.skip("no mpiexec beside this Python or on PATH (the mpich wheel puts one beside it)")
    return mpiexec


def _run_ranks(case, tmp_path, n=2, devices=1):
    """Each rank's JSON (tests/mpi_ranks.py), in rank order; the emulated CuPy shows `devices` GPUs."""
    env = cupy_emulation.subprocess_env(MINICVT_EMULATED_DEVICES=str(devices))   # `import cupy`: the emulation
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env["PYTHONPATH"]])
    env.pop("MINICVT_BACKEND", None)
    for var in LAUNCHER_VARS:
        env.pop(var, None)
    out = subprocess.run([_mpiexec(), "-n", str(n), sys.executable, str(TESTS / "mpi_ranks.py"), case, str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    return [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(n)]


def test_two_ranks_on_numpy(tmp_path):
    ranks = _run_ranks("numpy", tmp_path)
    for r, out in enumerate(ranks):
        assert out["world"] == "MPIWorld" and (out["rank"], out["size"]) == (r, 2)
        assert (out["local_rank"], out["local_size"]) == (r, 2)          # both on this machine
        assert out["sum"] == [0.0, 3.0, 6.0, 9.0]                       # arange*1 + arange*2
        assert out["mean"] == [0.0, 1.5, 3.0, 4.5]
        assert out["int_sum"] == [3, 20]
        assert out["broadcast"] == [1.0, 1.0, 1.0]                      # root 1's values
        assert "not CUDA-aware" in out["device_array"]
        assert out["flat_equals_per_parameter"] is True
    assert ranks[0]["barrier_wait"] > 0.3                               # rank 0 waited for rank 1
    assert ranks[0]["grad_digest"] == ranks[1]["grad_digest"]          # the same averaged gradients


def test_two_ranks_need_two_gpus(tmp_path):
    for out in _run_ranks("gpu-refusal", tmp_path):
        assert out["refusal"] == ("2 ranks on this machine but 1 GPU(s) visible: start at most 1 "
                                  "ranks per machine (each rank needs its own GPU)")


def test_nccl_world_on_the_emulated_nccl(tmp_path):
    """Two ranks, two (emulated) GPUs: NCCLWorld over cupy.cuda.nccl as CuPy 14.2 has it, its
    collectives run by the emulation through MPI on the arrays' host memory."""
    ranks = _run_ranks("nccl", tmp_path, devices=2)
    for r, out in enumerate(ranks):
        assert out["world"] == "NCCLWorld" and out["rank"] == r
        assert out["device"] == out["local_rank"] == r                   # each rank on its own GPU
        assert out["nccl"] == [r, r, 2]                                  # device_id, rank_id, size
        assert out["sum"] == [0.0, 3.0, 6.0, 9.0] and out["mean"] == [0.0, 1.5, 3.0]
        assert out["int_sum"] == [3, 20] and out["broadcast"] == [1.0, 1.0] and out["host_sum"] == [3.0]
        # the step: no device-to-host transfer, one all-reduce (one float32 buffer), at FlatGrads'
        assert out["transfers"] == 0 and len(out["collectives"]) == 1
        site, kind, n = out["collectives"][0]
        assert (kind, n) == ("allReduce", 1) and site.startswith("minicvt/distributed.py:"), site
        assert out["grads_equal_mpi_mean"] is True                       # NCCL's mean is MPI's mean
        assert out["reduce"] == ([0.0] * 4 if r == 0 else [10.0, 12.0, 14.0, 16.0])   # root 1 only
        assert out["nccl_broadcast"] == [10.0, 11.0, 12.0, 13.0]
        assert out["reduce_scatter"] == [[10.0, 11.0], [12.0, 13.0]][r]              # max, then split
        assert out["all_gather"] == [0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0]
        assert "Duplicate GPU detected: rank 0 and rank 1 both on CUDA device 0" in out["same_device"]
        assert "different unique ids" in out["own_ids"]
    assert ranks[0]["weights_digest"] == ranks[1]["weights_digest"]     # the same step on both
