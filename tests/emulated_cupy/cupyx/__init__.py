"""Emulated cupyx (CuPy 14.2's names): `cupyx.scipy.special` runs SciPy's ufuncs; see cupy/."""
import sys as _sys

import cupy as _cupy  # noqa: F401  (the emulation's core; cupyx is never imported without it)
from cupy import _namespaces

_namespaces.install(_sys.modules[__name__])
