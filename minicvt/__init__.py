"""minicvt: CvT written from scratch in NumPy/CuPy, every forward and backward by hand."""
__version__ = "0.1.0"

from . import backend, functional, gradcheck, nn  # noqa: E402,F401
from .models import build_model, from_pretrained, load  # noqa: E402,F401  (load: every model file we write)
from .errors import BadFileError  # noqa: E402,F401  (every refused file raises one)
