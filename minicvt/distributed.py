"""Data parallelism's communicator: who the ranks are, and the three collectives a step needs.

The model (docs/distributed.md):

- A launcher (`mpiexec -n 4 ...`, `srun ...`) starts the same program several times. Each copy
  is a *rank*, numbered 0..size-1 across all machines. Every rank holds the whole model, trains
  on its own slice of the global batch, and after backward the ranks *all-reduce* their
  gradients (each ends with the mean over all ranks), so every rank takes the same optimiser
  step and the weights stay identical without ever being sent.
- The *local rank* numbers the ranks on one machine (0..local_size-1). MPI finds it by
  splitting COMM_WORLD into groups that share memory (one group per machine). On a GPU
  machine the local rank picks the GPU: rank with local rank 2 uses GPU 2.
- On the host (NumPy) MPI moves the arrays itself: mpi4py's upper-case buffer methods
  (`Allreduce`, `Bcast`) read and write the NumPy array's memory directly, with no pickling.
- On GPUs (CuPy) NCCL moves them, GPU to GPU (NVLink, PCIe, InfiniBand). MPI only introduces
  the ranks to each other: rank 0 makes NCCL's unique id and MPI broadcasts it. NCCL's
  collectives are queued on the compute stream like a kernel, so a step has no host round trip.
  The MPI wheels on PyPI are not CUDA-aware: a device array is never handed to MPI.
- Gradients live in one flat buffer per dtype (`flatten_grads`): every Parameter's `.grad` is a
  view into it, so a step makes one all-reduce over one long array (one launch, full bandwidth)
  instead of one per parameter (about 200 small ones for a CvT), with no packing and unpacking.

One process started without a launcher gets `SingleProcess` (size 1, every collective a no-op)
and mpi4py is never imported, so minicvt runs as it always did.
"""
import os
import sys

import numpy as np

from . import backend


class DistributedError(RuntimeError):
    """The ranks cannot be set up as asked (says what to install or change)."""


# -- who launched us ------------------------------------------------------------------------------

# (launcher, size variable, rank variable). Slurm's srun sets SLURM_STEP_NUM_TASKS for every task
# of a step; SLURM_NTASKS is also set in the batch script itself, which is one process only.
_LAUNCHERS = (
    ("MPICH's mpiexec", "PMI_SIZE", "PMI_RANK"),
    ("Open MPI's mpirun", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    ("Slurm's srun", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID"),
    ("a PMIx launcher", None, "PMIX_RANK"),              # rank only: a rank above 0 means several
)


def launched_ranks(env=None):
    """(launcher, size) when the environment says this process is one of several ranks, else
    None. size is None where the launcher gives only a rank (PMIx)."""
    env = os.environ if env is None else env

    def number(var):
        try:
            return int(env[var]) if var else None
        except (KeyError, ValueError):
            return None

    for name, size_var, rank_var in _LAUNCHERS:
        size, rank = number(size_var), number(rank_var)
        if (size or 0) > 1 or (rank or 0) > 0:
            return name, size
    return None


# -- the worlds -----------------------------------------------------------------------------------

class World:
    """rank, size, local_rank, local_size, and three collectives. allreduce and broadcast work
    in place on one contiguous array, so its memory (and every view into it) gets the result."""
    rank, size, local_rank, local_size = 0, 1, 0, 1

    def allreduce(self, array, op="sum"):
        """Every rank's `array` becomes the elementwise sum (op="sum") or mean (op="mean") over
        all ranks. Returns array."""
        raise NotImplementedError

    def broadcast(self, array, root=0):
        """Every rank's `array` becomes root's. Returns array."""
        raise NotImplementedError

    def barrier(self):
        """Return only once every rank has called barrier."""
        raise NotImplementedError

    def abort(self, exit_code):
        """Stop every rank now (an error on one rank: the others may be waiting in a collective
        for it, and would wait forever)."""

    def __repr__(self):
        return (f"{type(self).__name__}(rank={self.rank}, size={self.size}, "
                f"local_rank={self.local_rank}, local_size={self.local_size})")


def _check(array, op="sum"):
    if op not in ("sum", "mean"):
        raise ValueError(f"allreduce: op must be 'sum' or 'mean', not {op!r}")
    if op == "mean" and array.dtype.kind != "f":
        raise ValueError(f"allreduce: op='mean' needs a floating array, not {array.dtype}")
    if not array.flags.c_contiguous:   # the collectives read count elements from one address
        raise ValueError("allreduce/broadcast: the array must be C-contiguous (a flat buffer)")


class SingleProcess(World):
    """One rank: the sum and the mean over one rank are the array itself."""

    def allreduce(self, array, op="sum"):
        _check(array, op)
        return array

    def broadcast(self, array, root=0):
        if root != 0:
            raise ValueError(f"broadcast: root {root} does not exist in a world of size 1")
        return array

    def barrier(self):
        pass


class MPIWorld(World):
    """Ranks from MPI's COMM_WORLD; collectives on NumPy arrays through mpi4py's buffer methods."""

    def __init__(self):
        from mpi4py import MPI               # only here: a single process never imports it
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)   # the ranks on this machine
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()

    def _host(self, array):
        if not isinstance(array, np.ndarray):
            raise TypeError(f"{type(self).__name__} carries NumPy arrays only, not "
                            f"{type(array).__module__}.{type(array).__name__} (the MPI wheels are "
                            "not CUDA-aware; CuPy arrays go through NCCLWorld)")

    def allreduce(self, array, op="sum"):
        self._host(array)
        _check(array, op)
        self.comm.Allreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)
        if op == "mean":
            array /= self.size
        return array

    def broadcast(self, array, root=0):
        self._host(array)
        _check(array)
        self.comm.Bcast(array, root=root)
        return array

    def barrier(self):
        self.comm.Barrier()

    def abort(self, exit_code):
        self.comm.Abort(exit_code)        # MPI_Abort: the launcher ends every rank


class NCCLWorld(MPIWorld):
    """MPI for the ranks, NCCL for CuPy arrays (NumPy arrays still go through MPI).

    UNVERIFIED on a GPU: written against CuPy 14.2's cupy.cuda.nccl (see docs/distributed.md)."""

    # CuPy dtype -> NCCL's data type code (cupy_backends/cuda/libs/nccl.pxd)
    _TYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
              "int32": "NCCL_INT32", "int64": "NCCL_INT64", "uint8": "NCCL_UINT8"}

    def __init__(self):
        super().__init__()
        cupy, nccl = backend.import_nccl()
        gpus = cupy.cuda.runtime.getDeviceCount()
        if self.local_size > gpus:
            raise DistributedError(f"{self.local_size} ranks on this machine but {gpus} GPU(s) visible: "
                                   f"start at most {gpus} ranks per machine (each rank needs its own GPU)")
        # the GPU first: NCCL binds its communicator to the device that is current when it is made
        cupy.cuda.Device(self.local_rank).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None    # 128 bytes (a tuple in CuPy 13)
        uid = self.comm.bcast(uid, root=0)      # lower-case bcast pickles: fine for a small id, once
        self.cupy, self.nccl = cupy, nccl
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def _type(self, array):
        name = self._TYPES.get(array.dtype.name)
        if name is None:
            raise ValueError(f"NCCLWorld: no NCCL type for {array.dtype}")
        return getattr(self.nccl, name)

    def _stream(self):
        # the compute stream: the collective is ordered after the backward that filled the buffer
        return self.cupy.cuda.get_current_stream().ptr

    def allreduce(self, array, op="sum"):
        if isinstance(array, np.ndarray):
            return super().allreduce(array, op)
        _check(array, op)
        ptr = array.data.ptr
        self.nccl_comm.allReduce(ptr, ptr, array.size, self._type(array), self.nccl.NCCL_SUM, self._stream())
        if op == "mean":
            array /= self.size                  # on the device, queued after the sum
        return array

    def broadcast(self, array, root=0):
        if isinstance(array, np.ndarray):
            return super().broadcast(array, root)
        _check(array)
        self.nccl_comm.bcast(array.data.ptr, array.size, self._type(array), root, self._stream())
        return array

    def barrier(self):
        self.cupy.cuda.get_current_stream().synchronize()   # this rank's queued collectives done
        self.comm.Barrier()


# -- choosing the world ---------------------------------------------------------------------------

_state = {"world": None}


def init(backend_name=None):
    """Set up this process's World and return it: SingleProcess without a launcher (mpi4py is
    not imported), MPIWorld for NumPy under a launcher, NCCLWorld for CuPy under a launcher.
    backend_name defaults to the active backend. Raises DistributedError when a launcher started
    several ranks but mpi4py is missing: each would otherwise train alone, unaware of the others."""
    launched = launched_ranks()
    if launched is None:
        _state["world"] = SingleProcess()
        return _state["world"]
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        name, size = launched
        ranks = f"{size} ranks" if size else "several ranks"
        raise DistributedError(f"{name} started {ranks} but mpi4py is not installed, so each would "
                               "train alone: pip install -e \".[mpi]\"") from None
    name = backend_name or backend.get_backend()
    _state["world"] = NCCLWorld() if name == "cupy" else MPIWorld()
    return _state["world"]


def world():
    """The World set up by init (calling init on first use)."""
    return _state["world"] or init()


def find_mpiexec():
    """The launcher to start ranks with: the mpiexec beside this Python (where the mpich wheel
    installs it, so that it matches the MPI mpi4py uses), else one on PATH; None if neither."""
    import shutil
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


def current():
    """The World set up by init, or None before it."""
    return _state["world"]


def position():
    """(rank, size) of this process: its World's, or before init (an error while the World is
    made) the launcher's; (0, 1) alone. size 0: a launcher that gives the rank only (PMIx)."""
    world = _state["world"]
    if world is not None:
        return world.rank, world.size
    launched = launched_ranks()
    if launched is None:
        return 0, 1
    rank = next((int(os.environ[var]) for _, _, var in _LAUNCHERS if os.environ.get(var, "").isdigit()), 0)
    return rank, launched[1] or 0


def abort_every_rank(exit_code):
    """End every rank now, as MPI_Abort does, when this process is one of several (the others may
    be waiting for it in a collective, which would never return); alone, nothing happens. Works
    before init has finished too (NCCL's set-up refused after MPI's), through COMM_WORLD."""
    world = _state["world"]
    if world is not None:
        if world.size > 1:
            world.abort(exit_code)
        return
    mpi = sys.modules.get("mpi4py.MPI")            # MPI started, the World not made
    if launched_ranks() is not None and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.COMM_WORLD.Abort(exit_code)


def share_cores(world):
    """Give each rank on a machine its share of the cores: minicvt's thread pool and BLAS each
    get cores / local ranks threads (at least one), instead of every rank taking them all and
    the ranks' threads fighting over the cores; where the launcher has bound each rank to cores
    of its own, those. MINICVT_NUM_THREADS, if set, is the pool's count instead. One rank on its
    machine: nothing changes. Returns the threads per rank."""
    if world.local_size == 1:
        return None
    from threadpoolctl import threadpool_limits

    from .fast import parallel
    machine = os.cpu_count() or 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else machine
    if not os.environ.get("MINICVT_NUM_THREADS", "").strip():
        # a launcher that binds each rank to its own cores (srun -c 8) has shared them already
        parallel.set_num_threads(max(1, cores // world.local_size) if cores == machine else cores)
    threads = parallel.num_threads()
    # the pool runs BLAS on one thread inside its blocks; outside them (and with one thread)
    # BLAS would start its own threads on every core: limit them to the share too
    _state["blas"] = threadpool_limits(limits=threads, user_api="blas")
    return threads


# -- gradients in one flat buffer ------------------------------------------------------------------

def _address(a):
    return a.data.ptr if backend.is_cupy_array(a) else a.ctypes.data


class FlatGrads:
    """Every parameter's `.grad` as a view into one contiguous buffer per dtype.

    Modules add into `p.grad` (`+=`), `zero_grad` writes `p.grad[...] = 0`, the optimisers and
    `clip_grad_norm` scale in place: none of them replaces the array, so the views hold. `Module.to`
    and `load_state_dict` do replace it; `check()` (called by `allreduce`) notices."""

    def __init__(self, parameters):
        self.params = list({id(p): p for p in parameters}.values())   # a shared one once
        groups = {}                                           # dtype -> [Parameter], in order
        for p in self.params:
            groups.setdefault(p.grad.dtype, []).append(p)
        self.buffers = []
        for dtype, params in groups.items():
            xp = backend.get_array_module(params[0].grad)
            if any(backend.get_array_module(p.grad) is not xp for p in params):
                raise ValueError(f"flatten_grads: the {dtype} gradients are on different backends")
            buffer = xp.zeros(sum(p.grad.size for p in params), dtype=dtype)
            start = 0
            for p in params:
                view = buffer[start:start + p.grad.size].reshape(p.grad.shape)   # a view, no copy
                view[...] = p.grad                            # keep what was accumulated so far
                p.grad = view
                start += p.grad.size
            self.buffers.append(buffer)
        self._addresses = [_address(p.grad) for p in self.params]

    def check(self):
        """Raise if some parameter's .grad is no longer its view (the all-reduce would miss it)."""
        for p, address in zip(self.params, self._addresses):
            if _address(p.grad) != address:
                raise RuntimeError("a parameter's gradient was reallocated after flatten_grads "
                                   "(Module.to or load_state_dict): call flatten_grads again")

    def allreduce(self, world, op="mean"):
        """One all-reduce per buffer: every gradient becomes the mean (or sum) over the ranks."""
        self.check()
        for buffer in self.buffers:
            world.allreduce(buffer, op)


def flatten_grads(parameters):
    """Make every parameter's .grad a view into one contiguous buffer per dtype, on the
    parameters' backend, keeping the values the gradients had. Returns the FlatGrads (its
    `.buffers`: one 1-D array per dtype, in the parameters' order)."""
    return FlatGrads(parameters)
