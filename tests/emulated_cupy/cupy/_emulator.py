"""The core of the CuPy emulation: device arrays that are not NumPy arrays, CuPy's ufuncs, and
the ledger of device-to-host transfers and device memory.

A tests-only stand-in for CuPy 14.2 that runs NumPy's kernels (docs/backend.md says what it
catches and what only a real GPU can show). An emulated `ndarray` holds a NumPy array in `_a`
and behaves as CuPy's does where NumPy code usually breaks on a GPU:
- implicit conversion to the host (`np.asarray(a)`, matplotlib, PIL) raises CuPy's TypeError;
- a NumPy array as a ufunc operand, or assigned into a slice, raises as CuPy does;
- out-of-range integer-array indices wrap around instead of raising;
- reductions return 0-d device arrays, never host scalars;
- every device-to-host transfer (`.get()`, `float()`/`int()`/`bool()`, `.item()`, `.tolist()`,
  printing, and the CuPy functions that read results back inside) is counted by call site, and
  inside `no_sync()` each one is an error naming the line.
The emulation shows MINICVT_EMULATED_DEVICES GPUs (default 1): `runtime.getDeviceCount()`, and
`Device(i).use()` refused for i at or past it. NCCL's collectives (cupy/_nccl.py) run over MPI
and are counted in a ledger of their own (`collectives()`): they move data device to device.
"""
import collections
import contextlib
import ctypes
import inspect
import json
import os
import pathlib
import sys
import threading
import weakref

import numpy

from ._devices import Device as _Device, get_device

CUPY_VERSION = "14.2.0"
_HERE = str(pathlib.Path(__file__).resolve().parent.parent)        # tests/emulated_cupy
MANIFEST = json.loads((pathlib.Path(_HERE) / "manifest.json").read_text())
if MANIFEST["cupy"] != CUPY_VERSION:
    raise ImportError(f"emulated cupy: manifest.json records CuPy {MANIFEST['cupy']}, "
                      f"the emulation is written for {CUPY_VERSION}")


# -- the ledger: transfers and memory ---------------------------------------------------------

class TransferError(RuntimeError):
    """A device-to-host transfer inside no_sync()."""


class _Ledger(threading.local):
    def __init__(self):
        self.forbid = 0


_ledger = _Ledger()
_transfers = collections.Counter()          # (call site, kind) -> count, all threads


def call_site(depth=3):
    """Where the code asked: 'file:line (function)' of the innermost frame outside the
    emulation, then up to depth - 1 of its callers ('backend.py:135 (to_numpy) <- train.py:90
    (read_back) <- ...'), so a transfer inside a helper still names the line that needed it."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_HERE):
        frame = frame.f_back
    sites = []
    while frame is not None and len(sites) < depth:
        name = frame.f_code.co_filename
        relative = os.path.relpath(name) if os.path.isabs(name) else name
        sites.append(f"{name if relative.startswith('..') else relative}:{frame.f_lineno} "
                     f"({frame.f_code.co_name})")
        frame = frame.f_back
    return " <- ".join(sites) or "<unknown>"


def transfer(kind, times=1):
    """Record `times` device-to-host transfers of this kind at the caller's line."""
    site = call_site()
    if _ledger.forbid:
        raise TransferError(f"device-to-host transfer ({kind}) at {site} inside no_sync()")
    _transfers[(site, kind)] += times


@contextlib.contextmanager
def no_sync():
    """Every device-to-host transfer inside is a TransferError naming the line."""
    _ledger.forbid += 1
    try:
        yield
    finally:
        _ledger.forbid -= 1


@contextlib.contextmanager
def _counting(ledger):
    before = collections.Counter(ledger)
    made = collections.Counter()
    try:
        yield made
    finally:
        made.update({k: v - before.get(k, 0) for k, v in ledger.items() if v > before.get(k, 0)})


def counting():
    """Yields a Counter {(call site, kind): n} of the transfers made inside the block."""
    return _counting(_transfers)


_collectives = collections.Counter()        # (call site, NCCL call) -> count, all threads


def collective(kind):
    """Record one NCCL collective at the caller's line. Not a transfer: NCCL moves device memory
    to device memory, queued on a stream, so no_sync() allows it; it is counted apart so that
    a test sees a step's collectives beside its (absent) host round trips."""
    _collectives[(call_site(), kind)] += 1


def collectives():
    """Yields a Counter {(call site, NCCL call): n} of the collectives made inside the block."""
    return _counting(_collectives)


class _Memory:
    """Bytes of device memory: live now, the peak, and all ever allocated (emulated arrays whose
    NumPy buffer is new, plus the temporaries that CuPy makes inside a call and frees again)."""

    def __init__(self):
        self.live = self.peak = self.allocated = 0
        self._owners = set()
        self._roots = weakref.WeakValueDictionary()      # id -> the NumPy array that owns the memory
        # re-entrant: a garbage collection inside `track` (WeakValueDictionary makes a weak
        # reference) can run another array's finalizer, `_free`, in this thread, lock held
        self._lock = threading.RLock()

    def track(self, a):
        root = a
        while isinstance(root.base, numpy.ndarray):
            root = root.base
        if root.base is not None or not root.flags.owndata:
            return
        key = id(root)
        with self._lock:
            if key in self._owners:
                return
            self._owners.add(key)
            self._roots[key] = root
            self.live += root.nbytes
            self.allocated += root.nbytes
            self.peak = max(self.peak, self.live)
        weakref.finalize(root, self._free, key, root.nbytes)
        for hook in list(memory_hooks):      # cupy.cuda.MemoryHook's callback after a malloc
            hook.malloc_postprocess(device_id=get_device(), size=root.nbytes, mem_size=root.nbytes,
                                    mem_ptr=root.ctypes.data, pmem_id=0)

    def _free(self, key, nbytes):
        with self._lock:
            self._owners.discard(key)
            self.live -= nbytes

    def at(self, ptr, count, dtype):
        """`count` elements of `dtype` at device address `ptr` (an emulated array's `.data.ptr`,
        perhaps offset) as a writable 1-D NumPy array over the same memory: what a raw pointer
        handed to a CUDA library (NCCL) reaches. Raises ValueError unless the whole range lies
        in the memory of one live emulated array (a host array's address is not device memory)."""
        dtype = numpy.dtype(dtype)
        nbytes = count * dtype.itemsize
        with self._lock:
            roots = list(self._roots.values())
        for root in roots:
            start = root.ctypes.data
            if start <= ptr and ptr + nbytes <= start + root.nbytes:
                if not nbytes:
                    return numpy.empty(0, dtype)
                return numpy.frombuffer((ctypes.c_byte * nbytes).from_address(ptr), dtype)
        raise ValueError(f"address {ptr:#x} ({nbytes} bytes) is not in the memory of a live "
                         "emulated device array")

    def transient(self, nbytes):
        """A temporary allocated and freed inside one call."""
        with self._lock:
            self.allocated += nbytes
            self.peak = max(self.peak, self.live + nbytes)


memory = _Memory()
memory_hooks = []            # active cupy.cuda.MemoryHook objects
generators_made = 0          # cupy.random.default_rng / Generator objects made (cuRAND states)


@contextlib.contextmanager
def allocations():
    """Yields a dict filled on exit: 'allocated' (bytes allocated inside the block, temporaries
    included) and 'peak' (the most live at once inside it, above what was live at the start)."""
    with memory._lock:
        start_live, start_alloc, old_peak = memory.live, memory.allocated, memory.peak
        memory.peak = memory.live
    stats = {}
    try:
        yield stats
    finally:
        with memory._lock:
            stats["allocated"] = memory.allocated - start_alloc
            stats["peak"] = memory.peak - start_live
            memory.peak = max(old_peak, memory.peak)


# -- moving between the emulated device and NumPy ---------------------------------------------

_SCALARS = (bool, int, float, complex, numpy.generic)


def wrap(r):
    """NumPy results as device results: arrays and NumPy scalars become (0-d) device arrays."""
    if isinstance(r, numpy.ndarray):
        return ndarray._of(r)
    if isinstance(r, numpy.generic):
        return ndarray._of(numpy.asarray(r))
    if isinstance(r, tuple):
        return tuple(wrap(v) for v in r)
    if isinstance(r, list):
        return [wrap(v) for v in r]
    return r


def unwrap(x, host_ok=False, what="argument"):
    """Device arrays to their NumPy arrays, through lists and tuples; a NumPy array raises
    unless host_ok (CuPy's functions take device arrays only, bar the array constructors)."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, numpy.ndarray) and not host_ok:
        raise TypeError(f"Unsupported type {type(x)} ({what} is a NumPy array on the host; "
                        f"move it to the device with cupy.asarray first)")
    if isinstance(x, (list, tuple)):
        return type(x)(unwrap(v, host_ok, what) for v in x)
    return x


def check_bind(qualname, params, args, kwargs):
    """Raise TypeError, as Python would for the real CuPy function, when the call does not fit
    its recorded signature."""
    if params is None:
        return
    sig = _signatures.get(qualname)
    if sig is None:
        sig = inspect.Signature([inspect.Parameter(n, getattr(inspect.Parameter, k),
                                                   default=None if d else inspect.Parameter.empty)
                                 for n, k, d in params])
        _signatures[qualname] = sig
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{qualname}(): {e} (CuPy {CUPY_VERSION}'s signature is {sig})") from None


_signatures = {}


# -- ufuncs ------------------------------------------------------------------------------------

def _operand(x, name):
    """A ufunc operand: a device array or a scalar (CuPy's ufuncs refuse anything else)."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _SCALARS):
        return x
    raise TypeError(f"Unsupported type {type(x)}" + (
        f" (an operand of cupy.{name} is a NumPy array on the host)" if isinstance(x, numpy.ndarray) else ""))


class ufunc:
    """CuPy's ufunc: keywords out, dtype, casting only; operands device arrays or scalars."""

    def __init__(self, name, np_ufunc, nin, nout):
        self.name, self.__name__, self._np = name, name, np_ufunc
        self.nin, self.nout, self.nargs = nin, nout, nin + nout

    def __repr__(self):
        return f"<ufunc 'cupy_{self.name}'>"

    def _outs(self, args, out):
        outs = args[self.nin:]
        if out is not None:
            if outs:
                raise ValueError("Cannot specify 'out' as both a positional and keyword argument")
            outs = out if isinstance(out, tuple) else (out,)
        for o in outs:
            if o is not None and not isinstance(o, ndarray):
                raise TypeError(f"Output arrays of cupy.{self.name} must be cupy.ndarray, got {type(o)}")
        return outs

    def __call__(self, *args, out=None, dtype=None, casting="same_kind", **kwargs):
        if kwargs:
            raise TypeError(f"Wrong arguments {kwargs}")
        if not self.nin <= len(args) <= self.nargs:
            raise TypeError(f"Wrong number of arguments for {self.name!r}. It must be either "
                            f"{self.nin} or {self.nargs} (with outputs), but given {len(args)}.")
        ins = [_operand(a, self.name) for a in args[:self.nin]]
        outs = self._outs(args, out)
        extra = {"dtype": dtype, "casting": casting}
        if outs:
            self._np(*ins, out=tuple(None if o is None else o._a for o in outs), **extra)
            return outs[0] if len(outs) == 1 else tuple(outs)
        return wrap(self._np(*ins, **extra))

    def _method(self, method, *args, **kwargs):
        args = [unwrap(a, what=f"an argument of cupy.{self.name}.{method}") for a in args]
        kwargs = {k: unwrap(v, what=k) for k, v in kwargs.items()}
        out = kwargs.get("out")
        r = getattr(self._np, method)(*args, **kwargs)
        return wrap(r) if out is None else kwargs["out"]

    def reduce(self, *a, **k):
        return self._method("reduce", *a, **k)

    def accumulate(self, *a, **k):
        return self._method("accumulate", *a, **k)

    def reduceat(self, *a, **k):
        return self._method("reduceat", *a, **k)

    def outer(self, *a, **k):
        return self._method("outer", *a, **k)

    def at(self, a, indices, b=None):
        if not isinstance(a, ndarray):
            raise TypeError(f"cupy.{self.name}.at needs a cupy.ndarray, got {type(a)}")
        idx = a._wrapped_index(indices)
        args = () if b is None else (_operand(b, self.name),)
        self._np.at(a._a, idx, *args)


_UFUNCS = {}        # name -> emulated ufunc (filled by the namespaces)


def _uf(name):
    uf = _UFUNCS.get(name)
    return uf if uf is not None else getattr(sys.modules["cupy"], name)


# -- the device array --------------------------------------------------------------------------

class _MemoryPointer:
    def __init__(self, a):
        self.ptr, self.device = a.ctypes.data, _Device()


def _binary(name, reflected=False):
    def op(self, other):
        if not isinstance(other, (ndarray, numpy.ndarray) + _SCALARS):
            return NotImplemented
        return _uf(name)(other, self) if reflected else _uf(name)(self, other)
    op.__name__ = f"__{'r' if reflected else ''}{name}__"
    return op


def _inplace(name):
    def op(self, other):
        return _uf(name)(self, other, out=self)
    return op


def _unary(name):
    def op(self):
        return _uf(name)(self)
    return op


class ndarray:
    """An array in (emulated) device memory: a NumPy array `_a` behind CuPy's rules."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("emulated cupy.ndarray: memptr and strides are not emulated")
        self._a = numpy.empty(shape, dtype, order=order)
        memory.track(self._a)

    @classmethod
    def _of(cls, a):
        obj = cls.__new__(cls)
        obj._a = a
        memory.track(a)
        return obj

    # attributes that live on the host in CuPy too
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray._of(self._a.T))
    mT = property(lambda self: ndarray._of(numpy.swapaxes(self._a, -1, -2)))
    real = property(lambda self: ndarray._of(self._a.real))
    imag = property(lambda self: ndarray._of(self._a.imag))
    base = property(lambda self: None if self._a.base is None else ndarray._of(self._a.base)
                    if isinstance(self._a.base, numpy.ndarray) else None)
    data = property(lambda self: _MemoryPointer(self._a))
    device = property(lambda self: _Device())

    # what NumPy code does with an array, refused or counted as CuPy would
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def get(self, stream=None, order="C", out=None, blocking=True):
        transfer(".get()")
        if out is not None:
            out[...] = self._a
            return out
        return numpy.array(self._a, order=order)

    def set(self, arr, stream=None):
        if not isinstance(arr, numpy.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        if arr.shape != self.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        self._a[...] = arr

    def item(self):
        transfer(".item()")
        return self._a.item()

    def tolist(self):
        transfer(".tolist()")
        return self._a.tolist()

    def tobytes(self, order="C"):
        transfer(".tobytes()")
        return self._a.tobytes(order)

    def __float__(self):
        transfer("float()")
        return float(self._a)

    def __int__(self):
        transfer("int()")
        return int(self._a)

    def __complex__(self):
        transfer("complex()")
        return complex(self._a)

    def __bool__(self):
        transfer("bool()")
        return bool(self._a)

    def __repr__(self):
        transfer("repr()")
        return repr(self._a)

    def __str__(self):
        transfer("str()")
        return str(self._a)

    def __format__(self, spec):
        transfer("format()")
        return format(self._a, spec)

    def __len__(self):
        if self._a.ndim == 0:
            raise TypeError("len() of unsized object")
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self._a.shape[0]))

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def __reduce__(self):
        raise TypeError("emulated cupy.ndarray: pickling would move the array to the host; "
                        "use .get() explicitly")

    # NumPy's protocols: a NumPy function given a device array calls CuPy's of the same name
    def __array_ufunc__(self, np_ufunc, method, *inputs, **kwargs):
        if "out" in kwargs:
            out = kwargs["out"]
            if len(out) != 1:
                raise ValueError("The 'out' parameter must have exactly one array value")
            kwargs["out"] = out[0]
        from . import _namespaces
        func = _namespaces.ufunc_for(np_ufunc.__name__)
        if func is None or getattr(func, "not_emulated", False):
            return NotImplemented
        return func(*inputs, **kwargs) if method == "__call__" else getattr(func, method)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        from . import _namespaces
        cupy_func = _namespaces.lookup(func.__module__, func.__name__)
        if cupy_func is None:
            return NotImplemented
        return cupy_func(*args, **kwargs)

    # indexing: integer arrays wrap around, boolean masks read their count back
    def _wrapped_index(self, key, reading=True):
        key = key if isinstance(key, tuple) else (key,)
        key = [k._a if isinstance(k, ndarray) else k for k in key]
        consumed = sum(0 if k is None or k is Ellipsis else
                       getattr(k, "ndim", 1) if _is_bool_index(k) else 1 for k in key)
        axis, out = 0, []
        for k in key:
            if k is Ellipsis:
                axis += self._a.ndim - consumed
            elif k is None:
                pass
            elif _is_bool_index(k):
                if reading:
                    transfer("boolean-mask indexing")
                axis += numpy.ndim(k)
            elif isinstance(k, (numpy.ndarray, list)) and not isinstance(k, _SCALARS):
                k = numpy.asarray(k)
                if k.dtype.kind not in "iu":
                    raise IndexError(f"arrays used as indices must be of integer or boolean type "
                                     f"(actual: {k.dtype.type})")
                if axis < self._a.ndim and self._a.shape[axis]:
                    k = numpy.mod(k, self._a.shape[axis])          # CuPy wraps around
                axis += 1
            else:
                axis += 1
            out.append(k)
        return tuple(out)

    def __getitem__(self, key):
        return wrap(self._a[self._wrapped_index(key)])

    def __setitem__(self, key, value):
        index = self._wrapped_index(key, reading=False)
        advanced = any(isinstance(k, numpy.ndarray) and k.ndim > 0 for k in index)
        if isinstance(value, ndarray):
            value = value._a
        elif isinstance(value, numpy.ndarray) and value.ndim > 0 and not advanced:
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        elif not isinstance(value, _SCALARS + (numpy.ndarray,)):
            raise TypeError(f"Unsupported type {type(value)}")
        self._a[index] = value

    # operators are CuPy's ufuncs
    __add__, __radd__, __iadd__ = _binary("add"), _binary("add", True), _inplace("add")
    __sub__, __rsub__, __isub__ = _binary("subtract"), _binary("subtract", True), _inplace("subtract")
    __mul__, __rmul__, __imul__ = _binary("multiply"), _binary("multiply", True), _inplace("multiply")
    __truediv__, __rtruediv__, __itruediv__ = (_binary("true_divide"), _binary("true_divide", True),
                                               _inplace("true_divide"))
    __floordiv__, __rfloordiv__, __ifloordiv__ = (_binary("floor_divide"), _binary("floor_divide", True),
                                                  _inplace("floor_divide"))
    __mod__, __rmod__, __imod__ = _binary("remainder"), _binary("remainder", True), _inplace("remainder")
    __pow__, __rpow__, __ipow__ = _binary("power"), _binary("power", True), _inplace("power")
    __and__, __rand__, __iand__ = _binary("bitwise_and"), _binary("bitwise_and", True), _inplace("bitwise_and")
    __or__, __ror__, __ior__ = _binary("bitwise_or"), _binary("bitwise_or", True), _inplace("bitwise_or")
    __xor__, __rxor__, __ixor__ = _binary("bitwise_xor"), _binary("bitwise_xor", True), _inplace("bitwise_xor")
    __lt__, __le__, __gt__, __ge__ = _binary("less"), _binary("less_equal"), _binary("greater"), _binary("greater_equal")
    __eq__, __ne__ = _binary("equal"), _binary("not_equal")
    __neg__, __pos__, __abs__, __invert__ = _unary("negative"), _unary("positive"), _unary("absolute"), _unary("invert")

    def __matmul__(self, other):
        return _uf("matmul")(self, other)

    def __rmatmul__(self, other):
        return _uf("matmul")(other, self)

    def __imatmul__(self, other):
        return _uf("matmul")(self, other, out=self)

    # every other method CuPy's ndarray has runs NumPy's, with CuPy's signature
    def __getattr__(self, name):
        from . import _namespaces
        return _namespaces.array_method(self, name)


ndarray.__module__ = "cupy"
ndarray.__qualname__ = ndarray.__name__ = "ndarray"
ufunc.__module__ = "cupy"


def _is_bool_index(k):
    if isinstance(k, numpy.ndarray):
        return k.dtype == numpy.bool_
    if isinstance(k, list):
        return bool(k) and all(isinstance(v, (bool, numpy.bool_)) for v in k)
    return False

