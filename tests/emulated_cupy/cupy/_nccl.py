"""Emulated cupy.cuda.nccl: CuPy 14.2's names and signatures (manifest.json, recorded from
cupy_backends/cuda/libs/nccl.pyx), with the collectives run by MPI on the host memory behind
the emulated device arrays.

Real NCCL moves device memory GPU to GPU. Here each rank is a process started by `mpiexec`, its
"device memory" is the NumPy memory behind its emulated arrays, and a communicator is a copy of
MPI's COMM_WORLD (mpi4py, imported when the first communicator is made; without mpi4py a world
of one rank works). The buffers come as raw addresses, as in CuPy (`a.data.ptr`), and are
found again in the memory ledger (`_emulator.memory.at`), so a host array's address, or an
address past the end of an array, is refused instead of read.

Checked as NCCL would, or where NCCL would hang instead: every argument of a call is an
integer (Cython's `intptr_t`/`size_t`/`int`: a Stream or a MemoryPointer object is refused,
not its `.ptr`); the id is 128 bytes; every rank passed the same id (rank 0's, sent to the
others); no two ranks of a machine are on the same device (NCCL's "Duplicate GPU detected":
the GPU is chosen with `Device(i).use()` before the communicator is made); a destroyed
communicator is not used. Not emulated: initAll (several GPUs in one process), commSplit,
send/recv, NcclConfig.

Every collective is counted in the ledger (`_emulator.collectives()`), apart from the
device-to-host transfers: it moves device memory and is allowed inside no_sync().
"""
import hashlib
import operator
import os
import socket

import numpy

from . import _devices
from . import _emulator as E

_NAMES = E.MANIFEST["namespaces"]["cupy.cuda.nccl"]
_MEMBERS = E.MANIFEST["classes"]["cupy.cuda.nccl.NcclCommunicator"]
BUILD_VERSION = 22707             # NCCL 2.27.7: what CuPy 14.2's wheel reports as its build


def _code(name):
    """The value CuPy 14.2 gives NCCL's constant `name` (recorded in the manifest)."""
    return int(_NAMES[name]["value"])


# NCCL's data types as NumPy dtypes (NCCL_BFLOAT16 has none), and its reductions as NumPy's
_DTYPES = {_code(f"NCCL_{n.upper()}"): numpy.dtype(n) for n in
           ("int8", "uint8", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64")}
_OPS = {_code("NCCL_SUM"): "SUM", _code("NCCL_PROD"): "PROD", _code("NCCL_MAX"): "MAX",
        _code("NCCL_MIN"): "MIN", _code("NCCL_AVG"): "AVG"}
_INVALID_ARGUMENT, _INVALID_USAGE = 4, 5       # ncclResult_t


class NcclError(RuntimeError):
    """cupy.cuda.nccl.NcclError(status), with NCCL's name and text for the status."""
    _TEXT = {_INVALID_ARGUMENT: ("NCCL_ERROR_INVALID_ARGUMENT", "invalid argument"),
             _INVALID_USAGE: ("NCCL_ERROR_INVALID_USAGE", "invalid usage")}

    def __init__(self, status):
        self.status = status
        name, text = self._TEXT.get(status, ("NCCL_ERROR_INTERNAL_ERROR", "internal error"))
        super().__init__(f"{name}: {text} (run with NCCL_DEBUG=WARN for details)")


def _fail(status, why):
    """NcclError(status) saying why (what NCCL_DEBUG=WARN would have printed)."""
    error = NcclError(status)
    error.args = (f"{error.args[0]} [emulated NCCL: {why}]",)
    return error


def check_status(status):
    if status != 0:
        raise NcclError(status)


def get_version():
    return BUILD_VERSION


def get_build_version():
    return BUILD_VERSION


def get_unique_id():
    """128 bytes (CuPy 14; a tuple of ints in CuPy 13), made on one rank and sent to the others."""
    return os.urandom(128)


def groupStart():
    pass                          # the collectives run at once here, so a group changes nothing


def groupEnd():
    pass


def _checked(name):
    """Wrap NcclCommunicator.name: the call is bound to CuPy's recorded signature and every
    argument converted as Cython converts to a C integer (TypeError for a non-integer,
    OverflowError for a negative size_t), then counted in the ledger as a collective."""
    qual = f"cupy.cuda.nccl.NcclCommunicator.{name}"
    params = _MEMBERS[name]["signature"]

    def wrap(method):
        def call(self, *args, **kwargs):
            E.check_bind(qual, params, (self,) + args, kwargs)
            named = dict(zip([p[0] for p in params[1:]], args), **kwargs)
            for arg, value in named.items():
                try:
                    operator.index(value)
                except TypeError:
                    raise TypeError(f"{qual}(): {arg} must be an integer (a device address, count or "
                                    f"code), not {type(value).__name__}") from None
                if arg in ("count", "recvcount") and value < 0:
                    raise OverflowError("can't convert negative value to size_t")
            self._live()
            method(self, **{k: operator.index(v) for k, v in named.items()})
            E.collective(name)
        call.__name__ = name
        return call
    return wrap


def _mpi():
    """mpi4py's MPI module, or None where mpi4py is not installed (a world of one rank)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI


class NcclCommunicator:
    """NcclCommunicator(ndev, commId, rank): this process's place in a group of `ndev` GPUs.
    The group is MPI's COMM_WORLD, so ndev must be its size and rank this process's rank."""

    def __init__(self, ndev, commId, rank, config=None):
        E.check_bind("cupy.cuda.nccl.NcclCommunicator", _NAMES["NcclCommunicator"]["signature"],
                     (ndev, commId, rank, config), {})
        if not isinstance(commId, bytes):
            raise TypeError(f"Argument 'commId' has incorrect type (expected bytes, got "
                            f"{type(commId).__name__})")
        if len(commId) != 128:
            raise ValueError(f"commId length {len(commId)} != 128.")
        if config is not None:
            raise NotImplementedError("emulated NcclCommunicator: config (NcclConfig) is not emulated")
        self.MPI = _mpi()
        world = self.MPI.COMM_WORLD if self.MPI else None
        size, me = (world.Get_size(), world.Get_rank()) if world else (1, 0)
        if (ndev, rank) != (size, me):
            raise _fail(_INVALID_ARGUMENT, f"NcclCommunicator(ndev={ndev}, rank={rank}) in MPI rank {me} "
                        f"of {size}: the emulation's communicator is MPI's COMM_WORLD")
        self._ndev, self._rank, self._device = ndev, rank, _devices.get_device()
        # what NCCL's rendezvous finds: the ranks that passed one id, each on its own GPU
        mine = (hashlib.sha256(commId).hexdigest(), socket.gethostname(), self._device)
        everyone = world.allgather(mine) if world else [mine]
        if len({e[0] for e in everyone}) > 1:
            raise _fail(_INVALID_USAGE, "the ranks passed different unique ids (rank 0 makes one "
                        "with get_unique_id and sends it to the others; real NCCL would wait forever)")
        seen = {}
        for r, (_, host, device) in enumerate(everyone):
            if (host, device) in seen:
                raise _fail(_INVALID_USAGE, f"Duplicate GPU detected: rank {seen[host, device]} and "
                            f"rank {r} both on CUDA device {device} (Device(i).use() first)")
            seen[host, device] = r
        self._comm = world.Dup() if world else None   # NCCL's traffic apart from the program's MPI

    def _live(self):
        if self._ndev is None:
            raise _fail(_INVALID_ARGUMENT, "the communicator was destroyed")

    @property
    def comm(self):
        return 0 if self._ndev is None else id(self)      # the ncclComm_t handle; 0 once destroyed

    def destroy(self):
        if self._ndev is not None and self._comm is not None:
            self._comm.Free()
        self._ndev = self._comm = None

    abort = destroy

    def device_id(self):
        self._live()
        return self._device

    def rank_id(self):
        self._live()
        return self._rank

    def size(self):
        self._live()
        return self._ndev

    def check_async_error(self):
        self._live()

    # -- the collectives: every rank's buffers, by address, reduced or sent through MPI ----------

    def _buffer(self, ptr, count, datatype):
        if datatype not in _DTYPES:
            raise _fail(_INVALID_ARGUMENT, f"datatype {datatype} is not one the emulation has")
        try:
            return E.memory.at(ptr, count, _DTYPES[datatype])
        except ValueError as e:
            raise _fail(_INVALID_ARGUMENT, f"{e} (NCCL reads and writes device memory only)") from None

    def _reduced(self, send, op):
        """op over the ranks of every rank's `send`, as a new host array (on every rank)."""
        if op not in _OPS:
            raise _fail(_INVALID_ARGUMENT, f"op {op} is not an NCCL reduction")
        out = send.copy()
        if self._comm is not None:
            mpi_op = getattr(self.MPI, "SUM" if _OPS[op] == "AVG" else _OPS[op])
            self._comm.Allreduce(self.MPI.IN_PLACE, out, op=mpi_op)
        if _OPS[op] == "AVG":
            out = (out / self._ndev if out.dtype.kind == "f" else out // self._ndev).astype(out.dtype)
        return out

    @_checked("allReduce")
    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        send = self._buffer(sendbuf, count, datatype)
        self._buffer(recvbuf, count, datatype)[...] = self._reduced(send, op)

    @_checked("reduce")
    def reduce(self, sendbuf, recvbuf, count, datatype, op, root, stream):
        reduced = self._reduced(self._buffer(sendbuf, count, datatype), op)
        if self._rank == root:                       # recvbuf is read only on the root
            self._buffer(recvbuf, count, datatype)[...] = reduced

    @_checked("reduceScatter")
    def reduceScatter(self, sendbuf, recvbuf, recvcount, datatype, op, stream):
        reduced = self._reduced(self._buffer(sendbuf, recvcount * self._ndev, datatype), op)
        mine = reduced[self._rank * recvcount:(self._rank + 1) * recvcount]
        self._buffer(recvbuf, recvcount, datatype)[...] = mine

    @_checked("allGather")
    def allGather(self, sendbuf, recvbuf, count, datatype, stream):
        send = self._buffer(sendbuf, count, datatype).copy()
        recv = self._buffer(recvbuf, count * self._ndev, datatype)
        if self._comm is None:
            recv[...] = send
        else:
            self._comm.Allgather(send, recv)

    @_checked("bcast")
    def bcast(self, buff, count, datatype, root, stream):
        self._broadcast(self._buffer(buff, count, datatype), root)

    @_checked("broadcast")
    def broadcast(self, sendbuff, recvbuff, count, datatype, root, stream):
        recv = self._buffer(recvbuff, count, datatype)
        if self._rank == root:                       # sendbuff is read only on the root
            recv[...] = self._buffer(sendbuff, count, datatype).copy()
        self._broadcast(recv, root)

    def _broadcast(self, buffer, root):
        if not 0 <= root < self._ndev:
            raise _fail(_INVALID_ARGUMENT, f"root {root} in a communicator of {self._ndev} rank(s)")
        if self._comm is not None:
            self._comm.Bcast(buffer, root=root)

    def _not_emulated(self, *args, **kwargs):
        raise NotImplementedError("emulated NcclCommunicator: send, recv and commSplit are not emulated")

    send = recv = commSplit = _not_emulated

    @staticmethod
    def initAll(devices):
        raise NotImplementedError("emulated NcclCommunicator.initAll (several GPUs in one process) "
                                  "is not emulated")


NcclCommunicator.__module__ = NcclError.__module__ = "cupy_backends.cuda.libs.nccl"

# the names cupy/_namespaces.py takes from here (the constants and `available` come from the
# manifest itself; NcclConfig and `annotations` are left not emulated)
OVERRIDES = {f"cupy.cuda.nccl.{f.__name__}": f for f in (
    NcclError, NcclCommunicator, check_status, get_version, get_build_version, get_unique_id,
    groupStart, groupEnd)}
