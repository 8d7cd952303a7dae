"""Parameters and modules: thin state around the pure functions in minicvt.functional.

A module's `forward` calls a pure function and keeps its cache; its `backward` takes that
cache (so a backward without a forward fails loudly), adds the parameter gradients into
`param.grad` (`+=`, so gradients accumulate until `zero_grad`) and returns dx.
Attribute names become state_dict keys exactly as in PyTorch (`blocks.0.attn.proj.weight`).
"""
from contextlib import contextmanager

import numpy as np

from .. import backend

_grad_state = {"enabled": True}


@contextmanager
def no_grad():
    """Inside this block forward passes keep no caches (inference uses less memory);
    calling backward afterwards raises."""
    prev = _grad_state["enabled"]
    _grad_state["enabled"] = False
    try:
        yield
    finally:
        _grad_state["enabled"] = prev


def grad_enabled():
    return _grad_state["enabled"]


class Parameter:
    """A trainable array and its gradient buffer (same shape, dtype and device)."""

    def __init__(self, data):
        self.data = data
        self.grad = backend.get_array_module(data).zeros_like(data)

    @property
    def shape(self):
        return self.data.shape

    def __repr__(self):
        return f"Parameter(shape={tuple(self.data.shape)}, dtype={self.data.dtype})"


class Module:
    """Base class. Subclasses set Parameters, buffers and sub-modules as attributes in
    __init__, and implement forward(...) and backward(dout)."""

    def __init__(self):
        object.__setattr__(self, "_params", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_cache", None)

    # -- registration: attributes become named parameters, buffers and children --------------
    def __setattr__(self, name, value):
        if isinstance(value, Parameter):
            self._params[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        elif name in self._buffers:
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):  # only called when normal lookup fails
        for table in ("_params", "_buffers", "_modules"):
            d = self.__dict__.get(table, {})
            if name in d:
                return d[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def register_buffer(self, name, array):
        """A state array that is saved and moved with the module but not trained
        (BatchNorm's running statistics)."""
        self._buffers[name] = array

    # -- traversal ------------------------------------------------------------------------------
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}{name}.")

    def named_parameters(self):
        """(name, Parameter) pairs, names as PyTorch state_dict keys."""
        for prefix, m in self.named_modules():
            for name, p in m._params.items():
                yield prefix + name, p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        for prefix, m in self.named_modules():
            for name, b in m._buffers.items():
                yield prefix + name, b

    def state_dict(self):
        """{name: array} of parameters and buffers (arrays are live, not copies)."""
        sd = {name: p.data for name, p in self.named_parameters()}
        sd.update(self.named_buffers())
        return sd

    def load_state_dict(self, state, strict=True):
        """Copy arrays into this module's parameters and buffers, on its backend and dtype.
        Every key must match by name and shape; a mismatch raises ValueError naming the key."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise ValueError(f"load_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        owners = {}
        for prefix, m in self.named_modules():
            for name in list(m._params) + list(m._buffers):
                owners[prefix + name] = (m, name)
        for key, value in state.items():
            if key not in owners:
                continue
            m, name = owners[key]
            target = own[key]
            if tuple(np.shape(value)) != tuple(target.shape):
                raise ValueError(f"load_state_dict: {key} has shape {tuple(np.shape(value))}, "
                                 f"expected {tuple(target.shape)}")
            # a copy, never a view of `value`: loading another module's live state_dict must
            # not tie the two modules' arrays together
            new = backend.xp().array(backend.to_numpy(value), dtype=target.dtype)
            if name in m._params:
                m._params[name].data = new
                m._params[name].grad = backend.get_array_module(new).zeros_like(new)
            else:
                m._buffers[name] = new

    # -- modes, gradients, devices ----------------------------------------------------------------
    def train(self, mode=True):
        for _, m in self.named_modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad[...] = 0

    def to(self, backend_name=None, dtype=None):
        """Move parameters (and their gradients) and buffers to a backend ('numpy' or 'cupy',
        which becomes the active one) and/or cast floating arrays to dtype. Random streams
        (backend.BackendRNG) need no move: they make their generator on the active backend."""
        if backend_name is not None:
            backend.set_backend(backend_name)

        def move(a):
            a = backend.to_device(backend.to_numpy(a) if backend_name else a)
            return a.astype(dtype) if dtype is not None and a.dtype.kind == "f" else a

        for _, m in self.named_modules():
            for p in m._params.values():
                p.data = move(p.data)
                p.grad = backend.get_array_module(p.data).zeros_like(p.data)
            for name, b in m._buffers.items():
                m._buffers[name] = move(b)
            m._cache = None
        return self

    # -- the forward cache ------------------------------------------------------------------------
    def _save(self, cache):
        """Keep the forward's cache for backward, unless inside no_grad()."""
        object.__setattr__(self, "_cache", cache if _grad_state["enabled"] else None)

    def _take(self):
        """Hand the cache to backward exactly once: a second backward, or one without a
        forward, is an error rather than a silently wrong gradient."""
        cache = self._cache
        if cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called without a forward "
                               "(or the forward ran under no_grad, or backward ran twice)")
        object.__setattr__(self, "_cache", None)
        return cache

    def __call__(self, *args, **kwargs):
        if not _grad_state["enabled"]:      # no earlier forward's cache is left for a backward
            object.__setattr__(self, "_cache", None)
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError

    def __repr__(self):
        n = sum(int(np.prod(p.shape)) for p in self.parameters())
        return f"{type(self).__name__}(parameters={n})"


class ModuleList(Module):
    """Children named 0, 1, 2, ... (state_dict keys `blocks.0.attn...`)."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        self._modules[str(len(self._modules))] = module

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class Sequential(ModuleList):
    """Modules applied in order; backward visits them in reverse."""

    def forward(self, x):
        for m in self:
            x = m(x)
        return x

    def backward(self, dout):
        for m in reversed(list(self)):
            dout = m.backward(dout)
        return dout
