"""CPU threads for NumPy: one pool of threads that runs every large pass of the model.

NumPy runs every elementwise operation and every reduction on a single core; only matrix
products (BLAS) use them all. PyTorch's CPU kernels use every core for both, so on a 2-core
machine an activation, a LayerNorm or a depthwise convolution takes NumPy about twice as long
(docs/performance.md). NumPy releases Python's global lock inside its loops, so plain threads
working on separate rows of the same arrays do run at the same time.

    parallel.rows(fn, (a, b, out), c)   # fn(a[i:j], b[i:j], out[i:j], c), a block of rows per thread
    parallel.matmul(x, w)               # x @ w, a block of x's rows (or of a stack's matrices) per thread
    parallel.matmul_t(d, x)             # d.T @ x, the blocks' shares of the sum over rows added up
    parallel.rows(fn, (a, out), pieces=True)   # each thread walks its block in cache-sized pieces

Every layer that uses it keeps its math in a function over a block of rows and writes the
results into output arrays allocated once outside; rows whose results must be added up
(a weight gradient over the batch) return their partial sums, which the caller adds (`total`).

Matrix products are split the same way, with BLAS itself on one thread: OpenBLAS's own threads
would otherwise keep spinning on the cores after each product, taking them from the passes
that follow, and on small matrices (a stack of attention scores per image) waking them costs
more than the product. So once the pool starts, this module sets NumPy's OpenBLAS to one
thread (through threadpoolctl) for the rest of the process; `set_num_threads(1)` gives it back
its own threads.

It is one call on the whole arrays, in the calling thread, where threads cannot help: CuPy
arrays (the GPU is parallel already), arrays under `min_elements` or one thread (but for the
pieces), or a call made from inside a block. The number of threads is the cores this process may use, or
MINICVT_NUM_THREADS, or `set_num_threads(n)`. Results do not depend on the threads except for
the order in which partial sums are added (the last bits of a float32 weight gradient).
"""
import contextlib
import os
import queue
import threading

from .. import backend

# below this many elements handing a block to another thread (tens of microseconds) costs
# more than the pass it saves
MIN_ELEMENTS = 1 << 15

# pieces=True: each thread walks its block in pieces of about this many bytes of the first array,
# well inside a core's L2 cache (2 MB here)
PIECE_BYTES = 1 << 20

_state = {"threads": None, "min_elements": MIN_ELEMENTS, "piece_bytes": PIECE_BYTES, "pool": None,
          "blas": None}
_inside = threading.local()           # set in a worker's block: no nested hand-offs


def _usable_cores():
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def num_threads():
    """How many threads `rows` splits into (MINICVT_NUM_THREADS, else the usable cores)."""
    if _state["threads"] is None:
        value = os.environ.get("MINICVT_NUM_THREADS", "").strip()
        try:
            n = int(value) if value else _usable_cores()
        except ValueError:
            raise ValueError(f"MINICVT_NUM_THREADS must be a whole number, got {value!r}") from None
        set_num_threads(n)
    return _state["threads"]


def set_num_threads(n):
    """Use n threads from now on (1 turns the splitting off)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of threads must be a whole number >= 1, got {n!r}")
    if _state["pool"] is not None:
        _state["pool"].shutdown()
    if _state["blas"] is not None:            # BLAS gets its own threads back
        _state["blas"].restore_original_limits()
    _state["threads"], _state["pool"], _state["blas"] = n, None, None


@contextlib.contextmanager
def settings(threads=None, min_elements=None, piece_bytes=None):
    """Temporarily change the thread count, the size below which nothing is split, and the
    size of the pieces (tests use min_elements=0 and tiny pieces to send tiny arrays through
    every path)."""
    old = (num_threads(), _state["min_elements"], _state["piece_bytes"])
    try:
        if threads is not None:
            set_num_threads(threads)
        if min_elements is not None:
            _state["min_elements"] = min_elements
        if piece_bytes is not None:
            _state["piece_bytes"] = piece_bytes
        yield
    finally:
        if old[0] != _state["threads"]:
            set_num_threads(old[0])
        _state["min_elements"], _state["piece_bytes"] = old[1], old[2]


class _Workers:
    """n threads, each waiting on a queue of its own for (fn, args, done); each puts
    (its index, ok, fn's result or exception) into `done`. A hand-off is one put and one get:
    concurrent.futures' ThreadPoolExecutor (a Future, its locks and notifications per task)
    took about 50 us to start a block on the 2-core VM, this about 10 us, and a forward makes
    about 150 hand-offs (docs/performance.md)."""

    def __init__(self, n):
        self.queues = [queue.SimpleQueue() for _ in range(n)]
        for i, q in enumerate(self.queues):
            threading.Thread(target=self._work, args=(q,), name=f"minicvt-{i}", daemon=True).start()

    @staticmethod
    def _work(tasks):
        while True:
            task = tasks.get()
            if task is None:                   # shutdown
                return
            index, fn, args, done = task
            try:
                done.put((index, True, fn(*args)))
            except BaseException as e:         # re-raised in the calling thread
                done.put((index, False, e))

    def shutdown(self):
        for q in self.queues:
            q.put(None)


def _pool():
    if _state["pool"] is None:     # the calling thread takes the first block itself
        from threadpoolctl import ThreadpoolController
        _state["blas"] = ThreadpoolController().select(internal_api="openblas").limit(limits=1)
        _state["pool"] = _Workers(num_threads() - 1)
    return _state["pool"]


def _run(fn, pieces):
    """One thread's share: fn on each of its pieces in turn (no nested hand-offs inside)."""
    _inside.active = True
    try:
        return [fn(*piece) for piece in pieces]
    finally:
        _inside.active = False


def rows(fn, arrays, *shared, pieces=False):
    """Call fn(*blocks, *shared) on consecutive blocks of rows (the leading axis) of `arrays`,
    one block per thread, and return fn's results in row order (a list). The arrays share
    the leading length (None passes through as None); `shared` goes to every call whole.
    The blocks are views, so fn writes into the output arrays it is given; when it returns
    partial sums, the caller adds them up (`total`).

    pieces: each thread walks its block in pieces of about PIECE_BYTES of the first array, one
    call each. For a function that makes several passes over its block (an activation, a
    norm) a piece that fits in the core's cache is read from memory once instead of once a
    pass (QuickGELU in the model: 32 -> 25 ms a forward)."""
    first = arrays[0]
    n = first.shape[0] if first.ndim else 1
    if n == 0 or backend.is_cupy_array(first) or getattr(_inside, "active", False):
        return [fn(*arrays, *shared)]
    k = min(num_threads(), n) if first.size >= _state["min_elements"] else 1
    step = max(1, int(_state["piece_bytes"] * n // max(first.nbytes, 1))) if pieces else n
    bounds = [n * i // k for i in range(k + 1)]
    shares = [[[None if a is None else a[p:min(p + step, hi)] for a in arrays] + list(shared)
               for p in range(lo, hi, step)] for lo, hi in zip(bounds, bounds[1:])]
    if k == 1 and len(shares[0]) == 1:
        return [fn(*arrays, *shared)]
    done = queue.SimpleQueue()
    for i, share in enumerate(shares[1:], start=1):      # (one thread: no pool, BLAS keeps its own)
        _pool().queues[i - 1].put((i, _run, (fn, share), done))
    try:
        blocks = [(True, _run(fn, shares[0]))]
    except BaseException as e:
        blocks = [(False, e)]
    blocks += [None] * (len(shares) - 1)
    for _ in shares[1:]:               # every block is waited for, even after an error: none
        i, ok, value = done.get()      # may still be writing when the caller sees the exception
        blocks[i] = (ok, value)
    results = []
    for ok, value in blocks:
        if not ok:
            raise value
        results += value
    return results


def matmul(a, b, bias=None):
    """a @ b (+ bias), a block of rows per thread: a (M, K) @ b (K, P) -> (M, P), the rows of
    a split, each block adding the bias (P,) while it is still in the cache; or stacks of
    matrices a (n, ..., M, K) @ b (n, ..., K, P) -> (n, ..., M, P), the stack split along its
    first axis. The result is a new C-ordered array."""
    xp = backend.get_array_module(a, b)
    out = xp.empty(a.shape[:-1] + b.shape[-1:], dtype=xp.result_type(a, b))
    if b.ndim == 2:
        rows(_matmul_into, (a, out), b, bias)
    elif a.shape[:-2] == b.shape[:-2] and bias is None:
        rows(lambda a, b, out: _matmul_into(a, out, b), (a, b, out))
    else:
        raise ValueError(f"parallel.matmul: stacks of matrices must have the same leading shape "
                         f"(and no bias), got {tuple(a.shape)} and {tuple(b.shape)}")
    return out


def _matmul_into(a, out, b, bias=None):
    backend.get_array_module(a).matmul(a, b, out=out)
    if bias is not None:
        out += bias


def matmul_t(a, b):
    """a.T @ b for a (M, P), b (M, K) -> (P, K): a sum over the M rows, so each thread takes
    a block of rows and their products are added up (a weight gradient over the batch)."""
    return total(rows(lambda a, b: a.T @ b, (a, b)))


def sum_rows(a):
    """a.sum(axis=0): each thread sums a block of rows, and the blocks' sums are added (a bias
    gradient over the batch)."""
    return total(rows(lambda a: a.sum(axis=0), (a,)))


def total(partials):
    """Add up the partial results of `rows`: a list of arrays (or None), or of tuples of them."""
    if partials[0] is None:
        return None
    if isinstance(partials[0], tuple):
        return tuple(total(list(p)) for p in zip(*partials))
    out = partials[0]
    for p in partials[1:]:
        out = out + p
    return out
