"""Run by tests/test_distributed.py as `mpiexec -n 2 python tests/mpi_ranks.py CASE DIR`: every
rank writes what it saw to DIR/<rank>.json (a file each: the ranks' stdout lines can interleave),
and the test checks the files together.

CASE numpy:        MPIWorld's ranks, allreduce (sum, mean, int), broadcast, barrier, the refusal
                   of a device array, and FlatGrads' one all-reduce against per-parameter ones.
CASE gpu-refusal:  the emulated CuPy (1 GPU) under 2 ranks on one machine: NCCLWorld refuses.
CASE nccl-standin: NCCLWorld against a stand-in for cupy.cuda.nccl whose names and signatures
                   are CuPy 14.2's (cupy_backends/cuda/libs/nccl.pyx and .pxd); the stand-in
                   does the reduction through MPI on the emulated arrays' host memory. It checks
                   the order of NCCLWorld's set-up and its calls, not NCCL itself.
"""
import ctypes
import hashlib
import json
import sys
import time
import types

import numpy as np

from minicvt import distributed


def numpy_case():
    from cvt_tiny import tiny_config
    from minicvt import nn
    from minicvt.models import build_model
    import cupy                                        # the emulated one (tests/emulated_cupy)

    world = distributed.init("numpy")
    r, n = world.rank, world.size
    out = {"world": type(world).__name__, "rank": r, "size": n,
           "local_rank": world.local_rank, "local_size": world.local_size}
    out["sum"] = world.allreduce(np.arange(4.0) * (r + 1)).tolist()
    out["mean"] = world.allreduce(np.arange(4.0, dtype=np.float32) * (r + 1), op="mean").tolist()
    out["int_sum"] = world.allreduce(np.array([r + 1, 10], dtype=np.int64)).tolist()
    out["broadcast"] = world.broadcast(np.full(3, float(r)), root=n - 1).tolist()
    try:
        world.allreduce(cupy.zeros(3))
        out["device_array"] = "accepted"
    except TypeError as e:
        out["device_array"] = str(e)

    # barrier: the last rank arrives 0.5 s late; everyone else must wait for it
    if r == n - 1:
        time.sleep(0.5)
    t = time.perf_counter()
    world.barrier()
    out["barrier_wait"] = time.perf_counter() - t

    # gradients: the same model on every rank, a different batch per rank
    model = build_model(tiny_config(), seed=0, dtype=np.float64)
    rng = np.random.default_rng(r)
    x, labels = rng.standard_normal((4, 3, 16, 16)), rng.integers(0, 3, size=4)
    flat = distributed.flatten_grads(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    loss_fn.forward(model.forward(x), labels)
    model.backward(loss_fn.backward(1.0))
    one_by_one = [world.allreduce(p.grad.copy(), op="mean") for p in model.parameters()]
    flat.allreduce(world, op="mean")
    out["flat_equals_per_parameter"] = all(np.array_equal(a, p.grad)
                                           for a, p in zip(one_by_one, model.parameters()))
    out["grad_digest"] = hashlib.sha256(b"".join(p.grad.tobytes() for p in model.parameters())).hexdigest()
    return out


def install_nccl_standin(events):
    """A stand-in for cupy.cuda.nccl in the emulated CuPy, with CuPy 14.2's names and signatures;
    `events` records the calls. Returns the emulated cupy."""
    import cupy                                        # the emulated one
    from mpi4py import MPI

    class Device:                                      # records which GPU is made current
        def __init__(self, device=None):
            self.id = device

        def use(self):
            events.append(f"use {self.id}")

    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.available = True
    # cupy_backends/cuda/libs/nccl.pxd (v14.2.0)
    nccl.NCCL_SUM, nccl.NCCL_FLOAT32, nccl.NCCL_FLOAT64 = 0, 7, 8
    nccl.NCCL_FLOAT16, nccl.NCCL_INT32, nccl.NCCL_INT64, nccl.NCCL_UINT8 = 6, 2, 4, 1
    ctype = {7: ctypes.c_float, 8: ctypes.c_double}

    def get_unique_id():                               # CuPy 14: bytes of NCCL_UNIQUE_ID_BYTES
        events.append("get_unique_id")
        return bytes(range(128))

    def host(ptr, count, datatype):                    # the emulated array's host memory
        return np.ctypeslib.as_array((ctype[datatype] * count).from_address(ptr))

    class NcclCommunicator:                            # nccl.pyx: (int ndev, bytes commId, int rank)
        def __init__(self, ndev, commId, rank):
            assert isinstance(commId, bytes) and len(commId) == 128, commId
            events.append(f"communicator ndev={ndev} rank={rank} id={hashlib.sha256(commId).hexdigest()[:8]}")

        def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
            assert sendbuf == recvbuf and op == nccl.NCCL_SUM and isinstance(stream, int)
            events.append(f"allReduce count={count} type={datatype}")
            MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, host(recvbuf, count, datatype), op=MPI.SUM)

        def bcast(self, buff, count, datatype, root, stream):
            assert isinstance(stream, int)
            events.append(f"bcast count={count} root={root}")
            MPI.COMM_WORLD.Bcast(host(buff, count, datatype), root=root)

    nccl.get_unique_id, nccl.NcclCommunicator = get_unique_id, NcclCommunicator
    cupy.cuda.nccl, cupy.cuda.Device = nccl, Device
    sys.modules["cupy.cuda.nccl"] = nccl
    return cupy


def gpu_refusal_case():
    install_nccl_standin([])                           # the emulation has one GPU
    try:
        distributed.init("cupy")
        return {"refusal": None}
    except distributed.DistributedError as e:
        return {"refusal": str(e)}


def nccl_standin_case():
    events = []
    cupy = install_nccl_standin(events)
    cupy.cuda.runtime.getDeviceCount = lambda: 2
    world = distributed.init("cupy")
    r = world.rank
    out = {"world": type(world).__name__, "rank": r}
    a = cupy.asarray(np.arange(3, dtype=np.float32) * (r + 1))
    out["mean"] = world.allreduce(a, op="mean").get().tolist()
    out["broadcast"] = world.broadcast(cupy.asarray(np.full(2, float(r))), root=1).get().tolist()
    out["host_sum"] = world.allreduce(np.array([r + 1.0])).tolist()   # NumPy still goes through MPI
    world.barrier()
    out["events"] = events
    return out


if __name__ == "__main__":
    from mpi4py import MPI
    case = {"numpy": numpy_case, "gpu-refusal": gpu_refusal_case, "nccl-standin": nccl_standin_case}
    result = case[sys.argv[1]]()
    with open(f"{sys.argv[2]}/{MPI.COMM_WORLD.Get_rank()}.json", "w") as f:
        json.dump(result, f)
