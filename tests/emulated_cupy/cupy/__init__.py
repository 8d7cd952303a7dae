"""Emulated CuPy 14.2 for the tests: CuPy's names and rules over NumPy's kernels, no GPU.

Never part of minicvt: tests/conftest.py puts it in place of `cupy` for the `cupy-emulated`
cases, and subprocess tests put tests/emulated_cupy on PYTHONPATH. What it checks and what
it cannot: docs/backend.md. `cupy._emulator` holds the transfer ledger (`no_sync`, `counting`)
and the memory ledger (`allocations`).
"""
import sys as _sys

from . import _emulator, _namespaces

__version__ = _emulator.CUPY_VERSION
EMULATED = True            # (not a CuPy name: how a test tells the emulation from the real one)
_namespaces.install(_sys.modules[__name__])
