"""The communicator that distributed layers talk to, and two stand-ins that need no MPI.

A communicator is any object with

    comm.rank                        this process's number, 0 .. size - 1
    comm.size                        how many ranks take part
    comm.allreduce(array, op="sum")  -> the elementwise sum of `array` over all ranks

The contract of allreduce, which every communicator keeps:
- every rank calls it the same number of times, in the same order, with arrays of one shape
  and dtype (a collective is a meeting: a rank that does not come leaves the others waiting);
- it returns the sum, the same numbers on every rank (so state computed from it, such as
  BatchNorm's running statistics, stays identical across ranks without a broadcast);
- it MAY reuse `array` for the result (MPI's and NCCL's in-place all-reduce do): use the
  returned array, and do not read the argument afterwards.
Only op="sum" is needed by the layers so far (minicvt.functional.sync_batchnorm2d_*).

Stand-ins, for tests and notebooks:
- SingleProcess(): a world of one; allreduce returns the array itself.
- ThreadWorld(n): n ranks as n threads of this process; run(fn) calls fn(comm) on each. Its
  allreduce meets the other ranks at a threading.Barrier and sums their arrays in rank order,
  so every rank gets the same bits, as from a real all-reduce.
The real communicator (MPI via mpi4py, NCCL via cupy.cuda.nccl) keeps the same three names.
"""
import threading

OPS = ("sum",)


def _check_op(op):
    if op not in OPS:
        raise ValueError(f"allreduce: op must be one of {OPS}, got {op!r}")


class SingleProcess:
    """A world of one rank: the sum over ranks is the array itself (no copy)."""

    rank, size = 0, 1

    def allreduce(self, array, op="sum"):
        _check_op(op)
        return array

    def __repr__(self):
        return "SingleProcess()"


class ThreadWorld:
    """n ranks run as threads of this process; an all-reduce is a meeting at a barrier.

        world = ThreadWorld(2)
        results = world.run(lambda comm: comm.allreduce(xp.ones(3)) * comm.rank)  # [0, 2] * ones

    `world.comms[r]` is rank r's communicator (objects that keep one, such as an
    nn.SyncBatchNorm2d, are built with it once); run(fn) calls fn(world.comms[r]) in thread r
    and returns the n results in rank order. An exception in one rank breaks the meeting for
    the others and run raises it (the lowest rank's); ranks that call allreduce with
    different shapes, or a different number of times, are an error, not a hang.
    """

    def __init__(self, size, timeout=60.0):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"ThreadWorld: size must be a positive int, got {size!r}")
        self.size, self.timeout = size, timeout
        self.comms = [_ThreadComm(self, r) for r in range(size)]
        self._barrier = None            # one per run
        self._slots = [None] * size     # what each rank brought to the current meeting

    def run(self, fn):
        """fn(comm) on every rank at once, each in its own thread -> [result of rank 0, ...]."""
        self._barrier = threading.Barrier(self.size, timeout=self.timeout)
        results, errors = [None] * self.size, [None] * self.size

        def rank_main(r):
            try:
                results[r] = fn(self.comms[r])
                self._meet(r, ("finished", None, None), None)   # nobody is still waiting for us
            except BaseException as e:                            # noqa: BLE001 (re-raised below)
                errors[r] = e
                self._barrier.abort()                             # wake the others: no hang

        threads = [threading.Thread(target=rank_main, args=(r,), name=f"rank{r}") for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._barrier = None
        own = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
        if own:
            raise own[0]
        if any(errors):
            raise RuntimeError(f"ThreadWorld: the ranks waited more than {self.timeout} s for each other "
                               f"at a collective")
        return results

    def _meet(self, rank, what, array):
        """Deposit (kind, shape, dtype) and array, wait for every rank, check they all brought
        the same kind of thing; returns the deposited arrays in rank order."""
        self._slots[rank] = (what, array)
        self._barrier.wait()
        kinds = [slot[0] for slot in self._slots]
        if len(set(kinds)) > 1:                          # every rank sees the same list: all raise
            listed = ", ".join(f"rank {r}: {_describe(k)}" for r, k in enumerate(kinds))
            raise RuntimeError(f"ThreadWorld: the ranks disagree on the collective ({listed})")
        arrays = [slot[1] for slot in self._slots]
        return arrays

    def _allreduce(self, rank, array):
        arrays = self._meet(rank, ("allreduce", tuple(array.shape), str(array.dtype)), array)
        total = arrays[0].copy()                         # rank order: the same bits on every rank
        for a in arrays[1:]:
            total += a
        self._barrier.wait()                             # all have read the slots before anyone reuses them
        return total


def _describe(kind):
    name, shape, dtype = kind
    return name if shape is None else f"{name} of {dtype} {shape}"


class _ThreadComm:
    """Rank `rank` of a ThreadWorld: the communicator its thread's fn receives."""

    def __init__(self, world, rank):
        self.world, self.rank, self.size = world, rank, world.size

    def allreduce(self, array, op="sum"):
        _check_op(op)
        if self.world._barrier is None:
            raise RuntimeError(f"ThreadWorld rank {self.rank}: allreduce called outside ThreadWorld.run "
                               f"(the other ranks are not running to meet it)")
        return self.world._allreduce(self.rank, array)

    def __repr__(self):
        return f"ThreadWorld rank {self.rank} of {self.size}"
