"""Run by tests/test_distributed.py as `mpiexec -n 2 python tests/mpi_ranks.py CASE DIR`: every
rank writes what it saw to DIR/<rank>.json (a file each: the ranks' stdout lines can interleave),
and the test checks the files together.

CASE numpy:        MPIWorld's ranks, allreduce (sum, mean, int), broadcast, barrier, the refusal
                   of a device array, and FlatGrads' one all-reduce against per-parameter ones.
CASE gpu-refusal:  the emulated CuPy with 1 GPU (MINICVT_EMULATED_DEVICES=1) under 2 ranks on
                   one machine: NCCLWorld refuses.
CASE nccl:         the emulated CuPy with 2 GPUs: NCCLWorld over the emulation's cupy.cuda.nccl
                   (CuPy 14.2's names and signatures; the collectives run through MPI on the
                   emulated arrays' host memory): each rank on its own device, the collectives'
                   results, a training step with no host round trip and one all-reduce, and what
                   NCCL refuses. It checks NCCLWorld's set-up and calls, not NCCL itself.
"""
import hashlib
import json
import sys
import time

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


def gpu_refusal_case():
    """MINICVT_EMULATED_DEVICES=1: two ranks on one machine need two GPUs."""
    try:
        distributed.init("cupy")
        return {"refusal": None}
    except distributed.DistributedError as e:
        return {"refusal": str(e)}


def nccl_case():
    """MINICVT_EMULATED_DEVICES=2: NCCLWorld on the emulated cupy.cuda.nccl."""
    import cupy                                        # the emulated one
    from cupy import _emulator as ledger
    from cupy.cuda import nccl
    from cvt_tiny import tiny_config
    from minicvt import backend, nn
    from minicvt.models import build_model
    from minicvt.optim import AdamW, clip_grad_norm

    backend.set_backend("cupy")
    world = distributed.init()
    r, comm = world.rank, world.nccl_comm
    out = {"world": type(world).__name__, "rank": r, "local_rank": world.local_rank,
           "device": cupy.cuda.runtime.getDevice(), "nccl": [comm.device_id(), comm.rank_id(), comm.size()]}
    out["sum"] = world.allreduce(cupy.arange(4.0) * (r + 1)).get().tolist()
    out["mean"] = world.allreduce(cupy.asarray(np.arange(3, dtype=np.float32) * (r + 1)), op="mean").get().tolist()
    out["int_sum"] = world.allreduce(cupy.asarray(np.array([r + 1, 10], dtype=np.int64))).get().tolist()
    out["broadcast"] = world.broadcast(cupy.full(2, float(r)), root=1).get().tolist()
    out["host_sum"] = world.allreduce(np.array([r + 1.0])).tolist()     # NumPy still goes through MPI
    world.barrier()

    # one data-parallel step, a different batch per rank: no host round trip, one collective
    model = build_model(tiny_config(), seed=0, dtype=np.float32)
    flat = distributed.flatten_grads(model.parameters())
    opt = AdamW(model.named_parameters(), lr=1e-2)
    rng = np.random.default_rng(r)
    x = backend.to_device(rng.standard_normal((4, 3, 16, 16)), dtype=np.float32)
    labels = backend.to_device(rng.integers(0, 3, size=4))
    loss_fn = nn.CrossEntropyLoss(check_labels=False)
    with ledger.counting() as transfers, ledger.collectives() as collectives, ledger.no_sync():
        model.zero_grad()
        loss_fn.forward(model.forward(x), labels)
        model.backward(loss_fn.backward())
        own = [p.grad.copy() for p in model.parameters()]
        flat.allreduce(world, op="mean")
        reduced = [p.grad.copy() for p in model.parameters()]
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
    out["transfers"] = len(transfers)
    out["collectives"] = [[site, kind, n] for (site, kind), n in collectives.items()]
    by_mpi = [world.allreduce(g.get(), op="mean") for g in own]         # the host's mean, through MPI
    out["grads_equal_mpi_mean"] = all(np.array_equal(a.get(), b) for a, b in zip(reduced, by_mpi))
    out["weights_digest"] = hashlib.sha256(b"".join(p.data.get().tobytes() for p in model.parameters())).hexdigest()

    # the emulation's other collectives, called as CuPy's: rank 0 sends 0 1 2 3, rank 1 10 11 12 13
    f64, stream = nccl.NCCL_FLOAT64, cupy.cuda.get_current_stream().ptr
    mine = cupy.arange(4.0) + 10 * r
    calls = {"reduce": (4, lambda p: comm.reduce(mine.data.ptr, p, 4, f64, nccl.NCCL_SUM, 1, stream)),
             "nccl_broadcast": (4, lambda p: comm.broadcast(mine.data.ptr, p, 4, f64, 1, stream)),
             "reduce_scatter": (2, lambda p: comm.reduceScatter(mine.data.ptr, p, 2, f64, nccl.NCCL_MAX, stream)),
             "all_gather": (8, lambda p: comm.allGather(mine.data.ptr, p, 4, f64, stream))}
    for name, (n, call) in calls.items():
        recv = cupy.zeros(n)
        call(recv.data.ptr)
        out[name] = recv.get().tolist()

    # what real NCCL refuses (or waits forever on), each on both ranks
    uid = world.comm.bcast(nccl.get_unique_id() if r == 0 else None, root=0)
    for name, device, commId in (("same_device", 0, uid), ("own_ids", r, nccl.get_unique_id())):
        cupy.cuda.Device(device).use()
        try:
            nccl.NcclCommunicator(2, commId, r)
            out[name] = None
        except nccl.NcclError as e:
            out[name] = str(e)
    return out


if __name__ == "__main__":
    from mpi4py import MPI
    case = {"numpy": numpy_case, "gpu-refusal": gpu_refusal_case, "nccl": nccl_case}
    result = case[sys.argv[1]]()
    with open(f"{sys.argv[2]}/{MPI.COMM_WORLD.Get_rank()}.json", "w") as f:
        json.dump(result, f)
