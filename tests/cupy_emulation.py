"""Switching between the real CuPy (where installed) and the emulated one (tests/emulated_cupy)
inside one test process, and the environment that gives a subprocess the emulated one.

    with emulated():            # `import cupy` / `import cupyx` give the emulation inside
        backend.set_backend("cupy")

The emulated modules are imported once and kept; entering swaps them into sys.modules in
place of whatever `cupy` entries were there (the real package, or none), leaving puts those
back. minicvt imports CuPy only inside backend.py's functions, so the swap reaches it.
"""
import contextlib
import os
import sys
from pathlib import Path

DIR = Path(__file__).resolve().parent / "emulated_cupy"
_emulated = {}


def _is_cupy(name):
    return name.split(".")[0] in ("cupy", "cupyx")


def _load():
    if _emulated:
        return _emulated
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if _is_cupy(k)}
    sys.path.insert(0, str(DIR))
    try:
        import cupy  # noqa: F401  (the emulation: DIR is first on the path)
        import cupyx.scipy.special  # noqa: F401
        _emulated.update({k: sys.modules.pop(k) for k in list(sys.modules) if _is_cupy(k)})
    finally:
        sys.path.remove(str(DIR))
        sys.modules.update(saved)
    return _emulated


@contextlib.contextmanager
def emulated():
    """The emulated cupy/cupyx in sys.modules inside the block."""
    modules = _load()
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if _is_cupy(k)}
    sys.modules.update(modules)
    try:
        yield modules["cupy"]
    finally:
        for k in [k for k in sys.modules if _is_cupy(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


def ledger():
    """The emulation's transfer and memory ledgers (cupy._emulator): no_sync, counting, allocations."""
    return _load()["cupy._emulator"]


def subprocess_env(**extra):
    """os.environ with the emulation first on PYTHONPATH (a subprocess's `import cupy` gets it)."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env
