"""Shared fixtures: every test that takes `xp` runs once per backend; the CuPy run skips with
a reason when CuPy or a GPU is absent."""
import numpy as np
import pytest

from minicvt import backend

_CUPY_OK = None


def _cupy_ok():
    global _CUPY_OK
    if _CUPY_OK is None:
        _CUPY_OK = backend.cupy_available()
    return _CUPY_OK


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    """The array module of the backend under test; the backend is active during the test."""
    if request.param == "cupy" and not _cupy_ok():
        pytest.skip("CuPy or a GPU is not available")
    previous = backend.get_backend()
    module = backend.set_backend(request.param)
    yield module
    backend.set_backend(previous)


@pytest.fixture
def rand():
    """rand(*shape, dtype=float64, scale=1.0): standard-normal arrays drawn on the host from a
    fixed seed, moved to the active backend (same numbers on NumPy and CuPy)."""
    rng = np.random.default_rng(1234)

    def make(*shape, dtype=np.float64, scale=1.0):
        return backend.to_device(rng.standard_normal(shape) * scale, dtype=dtype)

    return make
