"""Shared fixtures: every test that takes `xp` runs three ways: `numpy`; `cupy-emulated`, the
strict NumPy-backed stand-in for CuPy 14.2 in tests/emulated_cupy (always, CI included); and
`cupy`, the real one, which skips with a reason where CuPy or a GPU is absent."""
import contextlib

import numpy as np
import pytest

from minicvt import backend, kernels

import cupy_emulation

_CUPY_OK = None


def real_cupy_ok():
    global _CUPY_OK
    if _CUPY_OK is None:
        _CUPY_OK = backend.cupy_available()
    return _CUPY_OK


@pytest.fixture(scope="session", autouse=True)
def cache_folder(tmp_path_factory):
    """Downloads and decoded images of the whole session go to one temporary cache folder
    (MINICVT_CACHE, which subprocesses and notebook kernels inherit), never the user's."""
    import os
    previous = os.environ.get("MINICVT_CACHE")
    os.environ["MINICVT_CACHE"] = str(tmp_path_factory.mktemp("minicvt-cache"))
    yield os.environ["MINICVT_CACHE"]
    if previous is None:
        del os.environ["MINICVT_CACHE"]
    else:
        os.environ["MINICVT_CACHE"] = previous


@pytest.fixture(params=["numpy", "cupy-emulated", "cupy"])
def xp(request):
    """The array module of the backend under test; the backend is active during the test."""
    if request.param == "cupy" and not real_cupy_ok():
        pytest.skip("CuPy or a GPU is not available (the cupy-emulated case ran instead)")
    previous = backend.get_backend()
    try:
        with cupy_emulation.emulated() if request.param == "cupy-emulated" else contextlib.nullcontext():
            yield backend.set_backend("numpy" if request.param == "numpy" else "cupy")
    finally:          # outside the emulation, so that a previous 'cupy' is the real one again
        backend.set_backend(previous)


@pytest.fixture(params=kernels.NAMES)
def both_kernels(request):
    """The test runs once with each set of layer functions (minicvt.kernels): a test module
    that writes `pytestmark = pytest.mark.usefixtures("both_kernels")` and calls its layers
    through `from minicvt.kernels import ops as F` checks the reference and the fast kernels."""
    with kernels.use(request.param):
        yield request.param


@pytest.fixture
def emulated_cupy():
    """The emulated CuPy as the active backend (for tests that are about the emulation or the
    GPU path's transfers); yields the emulation's ledger module (no_sync, counting, allocations)."""
    previous = backend.get_backend()
    try:
        with cupy_emulation.emulated():
            backend.set_backend("cupy")
            yield cupy_emulation.ledger()
    finally:
        backend.set_backend(previous)


@pytest.fixture
def rand():
    """rand(*shape, dtype=float64, scale=1.0): standard-normal arrays drawn on the host from a
    fixed seed, moved to the active backend (same numbers on NumPy and CuPy)."""
    rng = np.random.default_rng(1234)

    def make(*shape, dtype=np.float64, scale=1.0):
        return backend.to_device(rng.standard_normal(shape) * scale, dtype=dtype)

    return make
