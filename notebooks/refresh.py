"""Re-execute the notebooks in place, so that their committed outputs are fresh.

    python3 notebooks/refresh.py                        # every notebook, in reading order
    python3 notebooks/refresh.py 02_im2col.ipynb ...    # only these

Each notebook runs top to bottom in a new `python3` kernel with this folder as its working
directory, as tests/test_notebooks.py runs it, and its outputs are written back into the file.
Run it after changing a notebook or anything a notebook prints: the test fails on stale outputs.
Needs nbclient, nbformat and ipykernel (`pip install -e '.[test]'`).
"""
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def kernel_env():
    """The environment for the kernel: ours, without MPLBACKEND, which would override the
    kernel's inline backend (with MPLBACKEND=Agg figures would not appear in the notebook)."""
    return {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}


def refresh(path, timeout=600):
    """Execute the notebook at path and write it back with its new outputs; returns seconds."""
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(HERE)}})
    client.execute(env=kernel_env())
    nbformat.write(nb, path)
    return time.perf_counter() - start


def main(names):
    paths = [HERE / name for name in names] if names else sorted(HERE.glob("*.ipynb"))
    for path in paths:
        print(f"{path.name}: executed in {refresh(path):.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
