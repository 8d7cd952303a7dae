"""CuPy's namespaces built from the recorded manifest: every name CuPy 14.2 has and no other.

Each function runs NumPy's (or SciPy's) function of the same name under CuPy's recorded
signature, with device arrays in and out; the overrides below are the places where CuPy
behaves differently: it reads a result back to the host inside (`bincount`, `nonzero`,
`sliding_window_view`, ...), wraps out-of-range indices (`take`), takes no `out=` (`einsum`),
or is a GPU object with no NumPy counterpart (`cuda`, memory pools, `random.Generator`,
`cuda.nccl`: cupy/_nccl.py).
A name CuPy has that is not emulated raises NotImplementedError when it is used.
"""
import importlib
import sys
import time
import types

import numpy

from . import _devices, _einsum_model
from . import _emulator as E
from . import _nccl

NAMESPACES = E.MANIFEST["namespaces"]
CLASSES = E.MANIFEST["classes"]

# the NumPy or SciPy module whose functions stand for each CuPy namespace's
MIRRORS = {"cupy": "numpy", "cupy.random": "numpy.random", "cupy.linalg": "numpy.linalg",
           "cupy.fft": "numpy.fft", "cupy.lib.stride_tricks": "numpy.lib.stride_tricks",
           "cupyx.scipy.special": "scipy.special", "cupyx": None, "cupy.testing": "numpy.testing"}

# functions that take host data (the array constructors copy it to the device)
HOST_INPUTS = {"cupy.array", "cupy.asarray", "cupy.asanyarray"}
# CuPy-only keywords that NumPy's function lacks (no effect on the host)
CUPY_ONLY_KEYWORDS = {"blocking"}

# functions that read a value back to the host inside, and how often per call (CuPy's source:
# e.g. bincount checks `(x < 0).any()` and takes `int(x.max())` for the number of bins)
SYNCING = {"cupy.bincount": 2, "cupy.nonzero": 1, "cupy.argwhere": 1, "cupy.flatnonzero": 1,
           "cupy.unique": 1, "cupy.compress": 1, "cupy.extract": 1, "cupy.unravel_index": 2,
           "cupy.trim_zeros": 1, "cupy.histogram": 1}


def not_emulated(qualname):
    def stub(*args, **kwargs):
        raise NotImplementedError(f"{qualname} exists in CuPy {E.CUPY_VERSION} but is not emulated "
                                  f"(tests/emulated_cupy); it cannot run without a GPU here")
    stub.__name__ = qualname.rsplit(".", 1)[-1]
    stub.not_emulated = True
    return stub


def function(qualname, np_func, params, syncs=0):
    """NumPy's np_func under CuPy's signature `params`, device arrays in and out."""
    host_ok = qualname in HOST_INPUTS

    def f(*args, **kwargs):
        E.check_bind(qualname, params, args, kwargs)
        if syncs:
            E.transfer(f"{qualname} reads back inside", syncs)
        a = E.unwrap(args, host_ok, f"an argument of {qualname}")
        k = {n: E.unwrap(v, host_ok, f"{n}= of {qualname}") for n, v in kwargs.items()
             if n not in CUPY_ONLY_KEYWORDS}
        r = np_func(*a, **k)
        if host_ok and isinstance(r, numpy.ndarray) and _shares_host_memory(r, args):
            r = r.copy()              # host data is copied to the device: never the same memory
        return E.wrap(r)

    f.__name__ = f.__qualname__ = qualname.rsplit(".", 1)[-1]
    return f


def _shares_host_memory(r, args):
    hosts = [a for a in args if isinstance(a, numpy.ndarray)]
    hosts += [v for a in args if isinstance(a, (list, tuple)) for v in a if isinstance(v, numpy.ndarray)]
    return any(numpy.shares_memory(r, h) for h in hosts)


# -- overrides ---------------------------------------------------------------------------------

def einsum(*operands, **kwargs):
    """CuPy's einsum: string subscripts, keywords dtype and optimize only (no out=); the
    temporaries its batched-matmul rewrite allocates are added to the memory ledger."""
    dtype = kwargs.pop("dtype", None)
    optimize = kwargs.pop("optimize", False)
    if kwargs:
        raise TypeError(f"Did not understand the following kwargs: {list(kwargs.keys())}")
    spec, arrays = operands[0], [a if isinstance(a, E.ndarray) else E.ndarray._of(numpy.asarray(a))
                                 for a in operands[1:]]
    if not isinstance(spec, str):
        raise NotImplementedError("emulated cupy.einsum: only string subscripts are emulated")
    result_dtype = numpy.result_type(*[a.dtype for a in arrays]) if dtype is None else numpy.dtype(dtype)
    temp = _einsum_model.temporaries(spec, [(a.shape, a.strides) for a in arrays], result_dtype.itemsize)
    if temp:
        E.memory.transient(temp)
    return E.wrap(numpy.einsum(spec, *[a._a for a in arrays], dtype=dtype, optimize=optimize))


def take(a, indices, axis=None, out=None):
    """CuPy's take wraps out-of-range indices around (NumPy's raises)."""
    if not isinstance(a, E.ndarray):
        raise TypeError(f"Unsupported type {type(a)}")
    idx = E.unwrap(indices, True)
    n = a._a.size if axis is None else a._a.shape[axis]
    r = numpy.take(a._a, idx, axis=axis, mode="wrap" if n else "raise",
                   out=None if out is None else out._a)
    return out if out is not None else E.wrap(r)


def where(condition, x=None, y=None):
    if x is None and y is None:                  # one argument: nonzero, which syncs
        E.transfer("cupy.where (one argument) reads back inside")
        return E.wrap(numpy.nonzero(E.unwrap(condition)))
    return E.wrap(numpy.where(*E.unwrap((condition, x, y), what="an argument of cupy.where")))


def repeat(a, repeats, axis=None):
    if isinstance(repeats, E.ndarray) and repeats.size > 1:
        E.transfer("cupy.repeat (array repeats) reads back inside", 2)
    return E.wrap(numpy.repeat(E.unwrap(a), E.unwrap(repeats), axis=axis))


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    if isinstance(a, E.ndarray):
        return a.get(order=order, out=out)
    return numpy.asarray(a, order=order)


def get_array_module(*args):
    for a in args:
        if isinstance(a, E.ndarray):
            return sys.modules["cupy"]
    return numpy


def sliding_window_view(x, window_shape, axis=None, *, subok=False, writeable=False):
    """CuPy copies window_shape to the device and tests each entry (`if dim < 0`), one read
    back per window axis."""
    if writeable:
        raise NotImplementedError("Writeable views are not supported.")
    shape = tuple(window_shape) if numpy.iterable(window_shape) else (window_shape,)
    E.transfer("cupy.lib.stride_tricks.sliding_window_view reads back inside", len(shape))
    return E.wrap(numpy.lib.stride_tricks.sliding_window_view(E.unwrap(x), shape, axis=axis))


def as_strided(x, shape=None, strides=None):
    return E.wrap(numpy.lib.stride_tricks.as_strided(E.unwrap(x), shape, strides))


class MemoryPool:
    """The default pool: bytes of live emulated arrays, and the most ever live."""

    def used_bytes(self):
        return E.memory.live

    def total_bytes(self):
        return E.memory.peak

    def free_bytes(self):
        return 0

    def free_all_blocks(self, stream=None):
        pass

    def n_free_blocks(self):
        return 0

    def set_limit(self, size=None, fraction=None):
        pass

    def get_limit(self):
        return 0


_POOL, _PINNED = MemoryPool(), MemoryPool()


class MemoryHook:
    """cupy.cuda.MemoryHook: inside `with hook:`, malloc_postprocess is called after every
    allocation of an emulated array (the other callbacks are never called)."""
    name = "MemoryHook"

    def __enter__(self):
        E.memory_hooks.append(self)
        return self

    def __exit__(self, *exc):
        E.memory_hooks.remove(self)
        return False

    def malloc_preprocess(self, **kwargs):
        pass

    def malloc_postprocess(self, **kwargs):
        pass


class Generator:
    """cupy.random.Generator's methods, as recorded, drawing from NumPy's PCG64 (CuPy's
    default_rng draws XORWOW on the GPU: the numbers differ, the shapes and dtypes do not)."""

    def __init__(self, seed=None):
        self._g = numpy.random.default_rng(seed)
        E.generators_made += 1

    def __getattr__(self, name):
        member = CLASSES["cupy.random.Generator"].get(name)
        if member is None or name.startswith("_"):
            raise AttributeError(f"'cupy.random.Generator' object has no attribute {name!r}")
        qual = f"cupy.random.Generator.{name}"

        def method(*args, **kwargs):
            E.check_bind(qual, member["signature"], (self,) + args, kwargs)
            if name == "random" and numpy.dtype(kwargs.get("dtype", numpy.float64)) not in (
                    numpy.float32, numpy.float64):
                raise TypeError("cupy.random.Generator.random: dtype must be float32 or float64")
            out = kwargs.get("out")
            r = getattr(self._g, name)(*E.unwrap(args), **{k: E.unwrap(v) for k, v in kwargs.items()})
            return out if out is not None else E.wrap(r)
        return method


def default_rng(seed=None):
    return Generator(seed)


class Stream:
    null = None

    def __init__(self, null=False, non_blocking=False, ptds=False):
        # instance attributes in CuPy (cupy/cuda/stream.pyx, _BaseStream), so not in the manifest;
        # the raw handle is 0 for the null stream (what NCCL calls take as `stream`)
        self.ptr, self.device_id = (0 if null else id(self)), _devices.get_device()

    def synchronize(self):
        pass

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


Stream.null = Stream(null=True)


class Event:
    """Times by the host clock (the emulation runs synchronously)."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    @property
    def done(self):
        return True


def get_elapsed_time(start, end):
    return (end.t - start.t) * 1e3


def _runtime_properties(device):
    return {"name": b"Emulated CuPy (NumPy kernels)", "totalGlobalMem": 0, "major": 9, "minor": 0,
            "multiProcessorCount": 0}


OVERRIDES = {
    "cupy.einsum": einsum, "cupy.take": take, "cupy.where": where, "cupy.repeat": repeat,
    "cupy.asnumpy": asnumpy, "cupy.get_array_module": get_array_module, "cupy.ndarray": E.ndarray,
    "cupy.ufunc": E.ufunc,
    "cupy.get_default_memory_pool": lambda: _POOL,
    "cupy.get_default_pinned_memory_pool": lambda: _PINNED,
    "cupy.lib.stride_tricks.sliding_window_view": sliding_window_view,
    "cupy.lib.stride_tricks.as_strided": as_strided,
    "cupy.random.default_rng": default_rng, "cupy.random.Generator": Generator,
    "cupy.cuda.Device": E._Device, "cupy.cuda.Stream": Stream, "cupy.cuda.Event": Event,
    "cupy.cuda.MemoryPool": MemoryPool, "cupy.cuda.MemoryHook": MemoryHook, "cupy.cuda.PinnedMemoryPool": MemoryPool,
    "cupy.cuda.get_current_stream": lambda device_id=-1: Stream.null,
    "cupy.cuda.get_elapsed_time": get_elapsed_time, "cupy.cuda.is_available": lambda: True,
    "cupy.cuda.get_device_id": _devices.get_device,
    "cupy.cuda.runtime.getDeviceCount": _devices.device_count, "cupy.cuda.runtime.getDevice": _devices.get_device,
    "cupy.cuda.runtime.setDevice": _devices.set_device,
    "cupy.cuda.runtime.CUDARuntimeError": _devices.CUDARuntimeError,
    "cupy.cuda.runtime.deviceSynchronize": lambda: None,
    "cupy.cuda.runtime.getDeviceProperties": _runtime_properties,
    "cupy.cuda.runtime.runtimeGetVersion": lambda: 13000,
    "cupy.cuda.runtime.driverGetVersion": lambda: 13000,
    "cupy.cuda.runtime.memGetInfo": lambda: (0, 0),
    "cupy.cuda.runtime.is_hip": False,
    "cupyx.scipy": None,              # a package: built below
    **_nccl.OVERRIDES,
}


# -- building the modules ----------------------------------------------------------------------

def _mirror(namespace):
    name = MIRRORS.get(namespace)
    return None if name is None else importlib.import_module(name)


def make(namespace, name):
    """The emulated object for `namespace.name`, from the manifest entry."""
    qual = f"{namespace}.{name}"
    entry = NAMESPACES[namespace][name]
    if qual in OVERRIDES and OVERRIDES[qual] is not None:
        return OVERRIDES[qual]
    kind, mirror = entry["kind"], _mirror(namespace)
    np_obj = getattr(mirror, name, None) if mirror is not None else None
    if kind == "module":
        return module(qual)
    if kind == "numpy-type":
        return getattr(numpy, entry["name"])
    if kind == "constant":
        return np_obj if np_obj is not None else eval(entry["value"], {})    # a repr of a literal
    if kind == "ufunc":
        if not isinstance(np_obj, numpy.ufunc):
            return not_emulated(qual)
        uf = E._UFUNCS.setdefault(name, E.ufunc(name, np_obj, entry["nin"], entry["nout"]))
        return uf
    if kind == "gufunc":                          # matmul
        return E._UFUNCS.setdefault(name, _matmul(qual, np_obj, entry["signature"]))
    if kind in ("function", "class") and callable(np_obj) and not isinstance(np_obj, type):
        if namespace == "cupy.testing":
            return _testing(qual, np_obj)
        return function(qual, np_obj, entry.get("signature"), SYNCING.get(qual, 0))
    if kind == "class" and isinstance(np_obj, type) and issubclass(np_obj, BaseException):
        return np_obj
    if kind == "other" and np_obj is not None:
        return np_obj
    return not_emulated(qual)


def _matmul(qual, np_matmul, params):
    def matmul(*args, out=None, **kwargs):
        E.check_bind(qual, params, args, dict(kwargs, out=out))
        ins = [E._operand(a, "matmul") for a in args]
        if out is not None:
            np_matmul(*ins, out=out._a, **kwargs)
            return out
        return E.wrap(np_matmul(*ins, **kwargs))
    matmul.__name__ = "matmul"
    return matmul


def _testing(qual, np_func):
    """cupy.testing compares on the host: each device array is read back."""
    def f(*args, **kwargs):
        def host(x):
            if isinstance(x, E.ndarray):
                return x.get()
            return x
        return np_func(*[host(a) for a in args], **{k: host(v) for k, v in kwargs.items()})
    return f


def _resolve(mod, name):
    """mod.name, made from the manifest at first use and kept on the module."""
    if name.startswith("__") or name not in NAMESPACES.get(mod.__name__, {}):
        raise AttributeError(f"module {mod.__name__!r} has no attribute {name!r} "
                             f"(CuPy {E.CUPY_VERSION} has no such name)")
    value = make(mod.__name__, name)
    setattr(mod, name, value)
    return value


def _add_submodules(mod):
    """Attach the submodules below mod: the recorded namespaces and the packages between
    (cupy.lib holds cupy.lib.stride_tricks, cupyx.scipy holds cupyx.scipy.special)."""
    prefixes = {".".join(n.split(".")[:i]) for n in NAMESPACES for i in range(2, n.count(".") + 2)}
    for sub in sorted(prefixes):
        parent, _, leaf = sub.rpartition(".")
        if parent == mod.__name__:
            setattr(mod, leaf, module(sub))


class _Namespace(types.ModuleType):
    def __getattr__(self, name):
        return _resolve(self, name)

    def __dir__(self):
        return sorted(NAMESPACES.get(self.__name__, {}))


def module(qualname):
    """The emulated module `qualname` (registered in sys.modules, so `import` finds it)."""
    if isinstance(sys.modules.get(qualname), _Namespace):
        return sys.modules[qualname]
    mod = _Namespace(qualname, f"emulated {qualname} (CuPy {E.CUPY_VERSION} names; NumPy kernels)")
    mod.__path__ = []                             # a package: its submodules import
    sys.modules[qualname] = mod
    _add_submodules(mod)
    return mod


def install(root):
    """Fill the package module `root` ('cupy' or 'cupyx') from its namespace."""
    root.__getattr__ = lambda name: _resolve(root, name)
    root.__dir__ = lambda: sorted(NAMESPACES[root.__name__])
    _add_submodules(root)


def lookup(np_module, name):
    """CuPy's function for NumPy's `np_module.name` (NumPy's __array_function__ protocol), or
    None when CuPy has none."""
    parts = np_module.split(".")
    if parts[0] != "numpy":
        return None
    namespace = ".".join(["cupy"] + parts[1:])
    if name not in NAMESPACES.get(namespace, {}):
        return None
    obj = getattr(sys.modules["cupy"] if namespace == "cupy" else module(namespace), name)
    return None if getattr(obj, "not_emulated", False) else obj


def ufunc_for(name):
    """CuPy's ufunc of this name (cupy's, else cupyx.scipy.special's), or None."""
    for namespace in ("cupy", "cupyx.scipy.special"):
        if NAMESPACES[namespace].get(name, {}).get("kind") == "ufunc":
            root = sys.modules["cupy"] if namespace == "cupy" else module(namespace)
            return getattr(root, name)
    return None


def array_method(arr, name):
    """Bound method `name` of a device array: NumPy's ndarray method under CuPy's signature."""
    member = CLASSES["cupy.ndarray"].get(name)
    if member is None or name.startswith("__"):
        raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r}")
    qual = f"cupy.ndarray.{name}"
    if member["kind"] != "method":
        raise NotImplementedError(f"{qual} is not emulated")
    special = _METHODS.get(name)
    np_method = getattr(arr._a, name, None)
    if special is None and np_method is None:
        return not_emulated(qual)

    def method(*args, **kwargs):
        E.check_bind(qual, member["signature"], (arr,) + args, kwargs)
        if special is not None:
            return special(arr, *args, **kwargs)
        a = E.unwrap(args, what=f"an argument of {qual}")
        k = {n: E.unwrap(v, what=f"{n}= of {qual}") for n, v in kwargs.items()}
        return E.wrap(np_method(*a, **k))
    method.__name__ = name
    return method


def _fill(arr, value):
    if isinstance(value, numpy.ndarray) and value.ndim:
        raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
    arr._a.fill(E.unwrap(value))


def _nonzero(arr):
    E.transfer("cupy.ndarray.nonzero reads back inside")
    return E.wrap(arr._a.nonzero())


def _compress(arr, condition, axis=None, out=None):
    E.transfer("cupy.ndarray.compress reads back inside")
    return E.wrap(arr._a.compress(E.unwrap(condition, True), axis=axis))


def _scatter(op):
    def scatter(arr, slices, value):
        getattr(numpy, op).at(arr._a, arr._wrapped_index(slices, reading=False), E.unwrap(value))
    return scatter


_METHODS = {"take": lambda arr, indices, axis=None, out=None: take(arr, indices, axis, out),
            "repeat": lambda arr, repeats, axis=None: repeat(arr, repeats, axis),
            "fill": _fill, "nonzero": _nonzero, "compress": _compress,
            "scatter_add": _scatter("add"), "scatter_max": _scatter("maximum"),
            "scatter_min": _scatter("minimum")}
