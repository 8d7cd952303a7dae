"""The backend module: choosing NumPy or CuPy, moving arrays, seeded randomness, erfc, and the
rule that no file but backend.py imports CuPy."""
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import minicvt
from minicvt import backend, nn


@pytest.fixture
def no_cupy(monkeypatch):
    """Make `import cupy` fail on every machine (a None entry in sys.modules does that), so the
    missing-CuPy error is tested even where CuPy is installed."""
    monkeypatch.setitem(sys.modules, "cupy", None)


@pytest.fixture
def fresh_state(monkeypatch):
    """Forget the chosen backend, as in a new process; the old choice comes back afterwards."""
    monkeypatch.setitem(backend._state, "name", None)
    monkeypatch.setitem(backend._state, "xp", None)


# -- choosing a backend -------------------------------------------------------------------------

def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown backend 'torch'.*'numpy'.*'cupy'"):
        backend.set_backend("torch")


def test_missing_cupy_says_what_to_install(no_cupy):
    before = backend.get_backend()
    with pytest.raises(backend.BackendError, match=r"pip install cupy-cuda12x"):
        backend.set_backend("cupy")
    # the failed request leaves the previous choice in place: no half-switched state
    assert backend.get_backend() == before
    assert not backend.cupy_available()


def test_backend_error_is_not_a_silent_fallback(no_cupy):
    # BackendError must not be swallowed as an ImportError by callers that try/except imports
    assert not issubclass(backend.BackendError, ImportError)
    with pytest.raises(backend.BackendError):
        backend.set_backend("cupy")


@pytest.mark.parametrize("value", ["numpy", " NumPy ", ""])
def test_environment_variable_is_read_on_first_use(monkeypatch, fresh_state, value):
    # surrounding spaces and case are forgiven; an empty value means the default, numpy
    monkeypatch.setenv("MINICVT_BACKEND", value)
    assert backend.get_backend() == "numpy"
    assert backend.xp() is np


def test_environment_variable_is_read_only_once(monkeypatch, fresh_state):
    monkeypatch.setenv("MINICVT_BACKEND", "numpy")
    backend.get_backend()
    monkeypatch.setenv("MINICVT_BACKEND", "not-a-backend")   # too late: the choice is made
    assert backend.get_backend() == "numpy"


def test_invalid_environment_variable_is_an_error(monkeypatch, fresh_state):
    monkeypatch.setenv("MINICVT_BACKEND", "jax")
    with pytest.raises(ValueError, match=r"MINICVT_BACKEND='jax' is not a backend.*'numpy'.*'cupy'"):
        backend.get_backend()


def test_environment_asking_for_missing_cupy_is_an_error(monkeypatch, fresh_state, no_cupy):
    monkeypatch.setenv("MINICVT_BACKEND", "cupy")
    with pytest.raises(backend.BackendError, match="needs CuPy"):
        backend.xp()


# -- arrays and where they live -----------------------------------------------------------------

@pytest.mark.parametrize("value", [np.zeros((2, 3), np.float32), np.arange(4), np.float32(1.5), 2.0, 3])
def test_get_array_module_of_host_values_is_numpy(value):
    assert backend.get_array_module(value) is np
    assert backend.get_array_module(None, value) is np
    assert not backend.is_cupy_array(value)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.bool_])
def test_to_device_and_back_round_trips(xp, dtype):
    host = (np.arange(12).reshape(3, 4) % 3).astype(dtype)
    dev = backend.to_device(host)
    assert backend.get_array_module(dev) is xp
    back = backend.to_numpy(dev)
    assert type(back) is np.ndarray
    assert back.dtype == dtype and back.shape == (3, 4)
    np.testing.assert_array_equal(back, host)


def test_to_device_casts_when_asked(xp):
    dev = backend.to_device(np.linspace(0, 1, 5), dtype=np.float32)
    assert backend.get_array_module(dev) is xp and dev.dtype == np.float32
    np.testing.assert_array_equal(backend.to_numpy(dev), np.linspace(0, 1, 5).astype(np.float32))


# -- randomness ---------------------------------------------------------------------------------

def test_host_rng_is_deterministic():
    a = backend.host_rng(5).standard_normal(10)
    b = backend.host_rng(5).standard_normal(10)
    c = backend.host_rng(6).standard_normal(10)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.fixture
def keep_default_host_rng(monkeypatch):
    """manual_seed replaces a global generator; put the old one back after the test."""
    monkeypatch.setitem(backend._default_host, "rng", backend.default_host_rng())


def _conv_weight_after_seed(seed):
    backend.manual_seed(seed)
    conv = nn.Conv2d(3, 4, 3)
    return backend.to_numpy(conv.weight.data), backend.to_numpy(conv.bias.data)


def test_manual_seed_makes_initialisation_reproducible(xp, keep_default_host_rng):
    w1, b1 = _conv_weight_after_seed(11)
    w2, b2 = _conv_weight_after_seed(11)
    w3, _ = _conv_weight_after_seed(12)
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_array_equal(b1, b2)
    assert not np.array_equal(w1, w3)


def test_weights_are_drawn_on_the_host_from_the_given_rng(xp):
    # the same host generator gives the same weights whatever the backend
    expected = backend.host_rng(3).uniform(-1 / math.sqrt(6), 1 / math.sqrt(6), size=(5, 6))
    layer = nn.Linear(6, 5, rng=backend.host_rng(3), dtype=np.float64)
    assert backend.get_array_module(layer.weight.data) is xp
    np.testing.assert_array_equal(backend.to_numpy(layer.weight.data), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backend_rng_streams(xp, dtype):
    rng = backend.BackendRNG(3)
    a = rng.random((50, 40), dtype=dtype)
    rng.seed(3)
    b = rng.random((50, 40), dtype=dtype)
    c = backend.BackendRNG(4).random((50, 40), dtype=dtype)
    assert backend.get_array_module(a) is xp
    assert a.shape == (50, 40) and a.dtype == dtype
    a, b, c = backend.to_numpy(a), backend.to_numpy(b), backend.to_numpy(c)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() < 1.0


def test_backend_rng_integers(xp):
    rng = backend.BackendRNG(0)
    a = rng.integers(2, 7, (1000,))
    rng.seed(0)
    b = rng.integers(2, 7, (1000,))
    assert backend.get_array_module(a) is xp and a.shape == (1000,) and a.dtype.kind in "iu"
    a, b = backend.to_numpy(a), backend.to_numpy(b)
    np.testing.assert_array_equal(a, b)
    # 1000 draws from 5 values: every value appears (missing one has probability ~5 * 0.8^1000)
    assert set(np.unique(a)) == {2, 3, 4, 5, 6}


def test_a_random_stream_depends_on_its_key_alone(xp):
    """BackendRNG(seed, purpose).at(epoch, step): the same key gives the same draws whatever was
    drawn before (what a resume from the middle of an epoch needs); another seed, purpose,
    epoch or step gives other draws."""
    rng = backend.BackendRNG(3, "dropout")
    first = backend.to_numpy(rng.at(2, 5).random((4, 3)))
    rng.random((4, 3))                                   # more draws of the same step
    rng.at(0, 0).random((7,))                            # another step's
    np.testing.assert_array_equal(backend.to_numpy(rng.at(2, 5).random((4, 3))), first)
    others = [backend.BackendRNG(4, "dropout").at(2, 5), backend.BackendRNG(3, "augment").at(2, 5),
              backend.BackendRNG(3, "dropout").at(2, 6), backend.BackendRNG(3, "dropout").at(3, 5)]
    for other in others:
        assert not np.array_equal(backend.to_numpy(other.random((4, 3))), first)
    with pytest.raises(ValueError, match="whole number >= 0"):
        backend.BackendRNG(-1)


# -- erfc ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-6), (np.float64, 1e-14)])
def test_erfc_keeps_dtype_and_matches_math(xp, dtype, rtol):
    # rtol: float32 carries ~7 digits, float64 ~16; erfc is computed in the input's precision
    host = np.linspace(-4.0, 4.0, 81)
    out = backend.erfc(backend.to_device(host, dtype=dtype))
    assert backend.get_array_module(out) is xp and out.dtype == dtype
    reference = math.erfc
    expected = np.array([reference(v) for v in host.astype(dtype).astype(np.float64)])
    np.testing.assert_allclose(backend.to_numpy(out), expected, rtol=rtol, atol=rtol * 1e-3)


# -- the one-importer rule ----------------------------------------------------------------------

_CUPY_IMPORT = re.compile(r"^\s*(import|from)\s+cupy", re.MULTILINE)   # cupy and cupyx


def test_only_backend_imports_cupy():
    package = Path(minicvt.__file__).parent
    files = sorted(package.rglob("*.py"))
    offenders = [str(f.relative_to(package)) for f in files
                 if f.name != "backend.py" and _CUPY_IMPORT.search(f.read_text())]
    assert offenders == [], f"only minicvt/backend.py may import CuPy; also found in {offenders}"
    # the pattern does find the imports that are allowed, so the scan above can fail
    assert _CUPY_IMPORT.search((package / "backend.py").read_text())
    assert len(files) > 5



_FAULTS_OF_A_REUSED_40MB_ARRAY = """
import resource, numpy as np, minicvt.backend
a = np.ones(40 * 2 ** 20, np.uint8)            # allocated, written (page faults), freed
del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(40 * 2 ** 20, np.uint8)            # the same size again
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_reuse_freed_memory_spares_the_page_faults_of_a_large_array():
    """With glibc's default, an array over 32 MB is mapped fresh and every page faults again on
    first write; after minicvt's import (reuse_freed_memory) the freed block is reused."""
    import os
    import subprocess

    faults = {}
    for setting in ("0", "1"):
        env = {**os.environ, "MINICVT_REUSE_MEMORY": setting}
        run = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_REUSED_40MB_ARRAY], env=env,
                             capture_output=True, text=True, check=True)
        faults[setting] = int(run.stdout.strip())
    # 40 MB is 10240 pages of 4 KB (20 if the kernel backs them with 2 MB huge pages)
    assert faults["0"] >= 20, faults
    assert faults["1"] <= faults["0"] // 10, faults
