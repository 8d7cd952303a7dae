"""The one place that chooses between NumPy and CuPy.

Every other file gets its array module from here:

    from minicvt import backend
    xp = backend.xp()                  # the active module, for creating arrays
    xp = backend.get_array_module(x)   # the module that owns x, inside the math

Rules (see docs/backend.md):
- No other file imports CuPy. Asking for CuPy where it or a GPU is missing raises
  BackendError with what to install; there is never a silent fallback to NumPy.
- Initial weights are drawn on the host from a seeded NumPy generator (`host_rng`) and then
  moved with `to_device`, so a CPU run and a GPU run start from identical weights.
- Random numbers needed during training (dropout masks, augmentation) come from
  `BackendRNG`, streams keyed by (seed, purpose, epoch, step), drawn on the device that holds
  the data.
- On Linux, importing minicvt asks the C allocator to keep freed large blocks for reuse
  (`reuse_freed_memory`; MINICVT_REUSE_MEMORY=0 turns it off).
"""
import ctypes
import os
import sys
import zlib

import numpy as np

_NAMES = ("numpy", "cupy")
_state = {"name": None, "xp": None}


def reuse_freed_memory(limit=1 << 30):
    """Let glibc's malloc serve arrays up to `limit` bytes from its heap and keep freed ones
    there, instead of mapping fresh pages from the kernel for every array over 32 MB (its
    largest default) and unmapping them on free. NumPy allocates a new array for every
    result, and the first write to each freshly mapped page is a page fault: for a 33 MB
    array (the MLP's hidden activations in stage 0 at batch 128) that costs about 30 ms,
    several times the matmul that fills it (docs/performance.md). With the blocks kept, the
    next step reuses the same memory. The process keeps its peak memory instead of returning
    it to the system between steps. Returns whether it took effect (glibc on Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):                      # another C library (e.g. musl)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3            # from glibc's malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, limit))


if os.environ.get("MINICVT_REUSE_MEMORY", "1") != "0":
    reuse_freed_memory()


class BackendError(RuntimeError):
    """The requested backend cannot be used on this machine."""


def _import_cupy():
    """Import CuPy and check that a GPU answers; raise BackendError saying what to do."""
    try:
        import cupy
    except ImportError as e:
        raise BackendError(
            "backend 'cupy' needs CuPy, which is not installed: install the wheel that "
            "matches your CUDA (e.g. `pip install cupy-cuda12x` or `pip install cupy-cuda13x`, "
            "or, in a clone of minicvt, `pip install -e \".[gpu]\"`), or use MINICVT_BACKEND=numpy"
        ) from e
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA driver missing or broken
        raise BackendError(f"backend 'cupy': CuPy is installed but CUDA is not usable ({e})") from e
    if n < 1:
        raise BackendError("backend 'cupy': CuPy is installed but no GPU was found")
    return cupy


def import_nccl():
    """CuPy and its NCCL wrapper, cupy.cuda.nccl (for minicvt/distributed.py's GPU collectives);
    BackendError with what to install where either is missing."""
    cupy = _import_cupy()
    try:
        from cupy.cuda import nccl      # not imported by `import cupy`
    except ImportError:
        nccl = None
    if nccl is None or not nccl.available:
        raise BackendError("CuPy cannot load NCCL, which training on several GPUs needs: "
                           "pip install nvidia-nccl-cu12 (CUDA 12) or nvidia-nccl-cu13 (CUDA 13), "
                           "or `pip install -e \".[gpu]\"`")
    return cupy, nccl


def set_backend(name):
    """Select 'numpy' or 'cupy' for everything created from now on; returns the module."""
    if name not in _NAMES:
        raise ValueError(f"unknown backend {name!r}: expected one of {_NAMES}")
    xp = np if name == "numpy" else _import_cupy()
    _state["name"], _state["xp"] = name, xp
    return xp


def get_backend():
    """Name of the active backend; on first use it is read from MINICVT_BACKEND (default numpy)."""
    if _state["name"] is None:
        name = os.environ.get("MINICVT_BACKEND", "numpy").strip().lower() or "numpy"
        if name not in _NAMES:
            raise ValueError(f"MINICVT_BACKEND={name!r} is not a backend: set it to one of {_NAMES}")
        set_backend(name)
    return _state["name"]


def xp():
    """The active array module (numpy or cupy)."""
    get_backend()
    return _state["xp"]


def cupy_available():
    """True when CuPy imports and sees a GPU (used by tests to skip with a reason)."""
    try:
        _import_cupy()
        return True
    except BackendError:
        return False


def get_array_module(*arrays):
    """numpy or cupy, whichever owns the arrays (CuPy's own idiom, without importing it here
    unless a non-NumPy array is actually passed)."""
    for a in arrays:
        if isinstance(a, np.ndarray) or np.isscalar(a) or a is None:
            continue
        mod = type(a).__module__.split(".")[0]
        if mod == "cupy":
            import cupy
            return cupy
    return np


def is_cupy_array(a):
    return type(a).__module__.split(".")[0] == "cupy"


def to_device(a, dtype=None):
    """Move a host array (or one already on the active backend) there, optionally casting.
    To bring a CuPy array back to the host use to_numpy."""
    module = xp()
    out = module.asarray(a)
    return out if dtype is None else out.astype(dtype, copy=False)


def to_numpy(a):
    """Bring any array (NumPy or CuPy) back to a NumPy array on the host."""
    if is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def synchronize():
    """Wait for queued GPU work (timing needs it); a no-op on NumPy."""
    if get_backend() == "cupy":
        _state["xp"].cuda.get_current_stream().synchronize()


def erfc(x, out=None):
    """Elementwise complementary error function 1 - erf(x), keeping x's dtype (into `out` when
    given): NumPy has none, so SciPy's ufunc is used on the host and cupyx's kernel on the GPU.
    Exact GELU needs it: for large x it keeps the digits that 1 - erf(x) would lose to
    cancellation (the left tail)."""
    if is_cupy_array(x):
        from cupyx.scipy.special import erfc as cupy_erfc
        return cupy_erfc(x, out=out)
    from scipy.special import erfc as scipy_erfc
    return scipy_erfc(x, out=out)


def einsum(spec, *operands, out):
    """xp.einsum written into `out`: NumPy's einsum takes out=, CuPy's has no such argument
    (its result is copied in; see sum_of_products for what CuPy's einsum allocates)."""
    if is_cupy_array(out):
        out[...] = get_array_module(out).einsum(spec, *operands)
    else:
        np.einsum(spec, *operands, out=out)
    return out


def sum_of_products(spec, a, b):
    """einsum(spec, a, b) for a and b of one shape, summed over the axes missing from the
    output (e.g. "nhwc,nhwc->c", a per-channel sum of a * b; the output's axes in a's order).
    NumPy's einsum multiplies and adds in one pass, with no product array. CuPy's einsum
    turns it into transposed copies of both operands and a batched matrix product, twice a's
    size in temporaries (measured under the emulated CuPy, docs/backend.md); there the product
    array and one reduction are half that."""
    if is_cupy_array(a):
        inputs, output = spec.replace(" ", "").split("->")
        labels = inputs.split(",")[0]
        if [c for c in labels if c in output] != list(output):
            raise ValueError(f"sum_of_products: {spec!r} must keep the output's axes in a's order")
        return (a * b).sum(axis=tuple(i for i, c in enumerate(labels) if c not in output))
    return np.einsum(spec, a, b)


def read_back(*scalars):
    """Several 0-d device arrays as Python floats, in one device-to-host transfer (each float()
    of a CuPy array is a transfer, and a wait for the GPU, of its own)."""
    module = get_array_module(*scalars)
    return [float(v) for v in to_numpy(module.stack(scalars))]


def host_rng(seed):
    """Seeded NumPy generator for initial weights: same numbers on every backend."""
    return np.random.default_rng(seed)


_default_host = {"rng": np.random.default_rng(0)}


def manual_seed(seed):
    """Reseed the host generator that layers draw their initial weights from by default."""
    _default_host["rng"] = np.random.default_rng(seed)


def default_host_rng():
    return _default_host["rng"]


class BackendRNG:
    """A stream of random numbers drawn where the data lives (dropout masks, augmentation),
    named by a key: (seed, purpose, epoch, step).

        rng = BackendRNG(seed, "dropout")
        rng.at(epoch, step)            # the draws of that step: they depend on the key alone
        mask = rng.random((N, 1, 1))

    Keyed streams are what an exact resume from the middle of an epoch needs (the stream of
    step s can be made again from its key, without replaying steps 0..s-1), what data
    parallelism builds on (ranks that make the same stream draw for the whole global batch and
    each takes its slice: `share` below),
    and what CuPy allows: a cuRAND generator's state cannot be saved, a key can. `purpose`
    keeps the streams of one run apart ('dropout' for the model's masks, 'augment' for the
    data's crops and flips).

    Under data parallelism (docs/distributed.md) each rank holds one of `size` equal slices of
    the global batch. `share(rank, size)` makes every draw one for the whole global batch, of
    which this rank keeps its rows: a draw of shape (b, ...) is drawn as (size * b, ...) and
    rows rank*b .. (rank+1)*b are returned. The first axis of every draw is the batch (masks,
    crops, flips), so N ranks apply exactly the masks one process draws for the whole batch.

    The generator is made at the first draw after `at`, on the backend active then: on NumPy a
    numpy Generator, on CuPy cupy.random's, so masks are made on the GPU without a host round
    trip; a model moved with .to() draws on its new backend from the same key. The numbers
    differ between backends.
    """

    def __init__(self, seed=0, purpose="dropout"):
        self.purpose = purpose
        self.rank, self.size = 0, 1
        self.seed(seed)

    def share(self, rank, size):
        """Draw for a global batch of `size` equal slices and keep slice `rank`; returns self."""
        if not 0 <= rank < size:
            raise ValueError(f"share: rank {rank} is not in [0, {size})")
        self.rank, self.size = int(rank), int(size)
        return self

    def seed(self, seed):
        """Start again from `seed`, at epoch 0, step 0."""
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"a random seed must be a whole number >= 0, got {seed!r}")
        self.initial_seed = int(seed)
        return self.at(0, 0)

    def at(self, epoch, step):
        """Move the stream to the draws of (epoch, step); returns self."""
        self.epoch, self.step = int(epoch), int(step)
        self.backend, self._gen = None, None
        return self

    def key(self):
        """NumPy's SeedSequence of (seed, purpose, epoch, step), which mixes the four so that
        nearby keys give unrelated streams (128 bits of state: no two steps of any run share one)."""
        purpose = zlib.crc32(self.purpose.encode())
        return np.random.SeedSequence(self.initial_seed, spawn_key=(purpose, self.epoch, self.step))

    def _generator(self):
        if self._gen is None or self.backend != get_backend():
            self.backend, key = get_backend(), self.key()
            # NumPy's generator takes the SeedSequence itself; CuPy's takes an integer seed: 63
            # bits drawn from it (cuRAND's generators may keep fewer)
            self._gen = (np.random.default_rng(key) if self.backend == "numpy"
                         else xp().random.default_rng(int(key.generate_state(1, np.uint64)[0] >> 1)))
        return self._gen

    def random(self, shape, dtype=np.float32):
        """Uniform [0, 1) samples of the given shape and dtype."""
        return self._mine(self._generator().random(self._global(shape), dtype=dtype))

    def integers(self, low, high, shape):
        """Integers in [low, high) of the given shape."""
        return self._mine(self._generator().integers(low, high, size=self._global(shape)))

    def _global(self, shape):                  # (b, ...) -> (size * b, ...): the global batch's draw
        shape = tuple(shape)
        return shape if self.size == 1 else (shape[0] * self.size, *shape[1:])

    def _mine(self, draws):                    # this rank's rows of the global draw
        if self.size == 1:
            return draws
        b = len(draws) // self.size
        return draws[self.rank * b:(self.rank + 1) * b]
