"""minicvt: CvT written from scratch in NumPy/CuPy, every forward and backward by hand."""
__version__ = "0.1.0"

from . import backend, functional, gradcheck, nn  # noqa: E402,F401
