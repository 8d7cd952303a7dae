"""The notebooks: each runs top to bottom, its assertions pass, and its committed outputs are fresh.

Every notebooks/*.ipynb is executed with nbclient in a new python3 kernel, with the notebooks
folder as working directory and a time budget per notebook; an error in any cell fails. The fresh
outputs are then compared cell by cell with the committed ones (refresh those with
`python3 notebooks/refresh.py`): printed text (stdout) and text/plain results, after normalising
what legitimately varies (memory addresses, timings); images only for being there, since PNG
bytes differ between matplotlib versions. stderr is not compared: it carries library warnings
that depend on installed versions. Cells tagged
- "gpu" are not compared: what they print depends on whether the machine has a GPU;
- "optional-files" are not compared: they use files that a user fetches (a pretrained model)
  where they are present, and say how to get them where they are not;
- "needs-mpi" are not compared: they run `mpiexec` where mpi4py and an mpiexec are installed
  (the `mpi` extra), and say how to install them where they are not;
- "depends-on-data" (and the "data-source" cell itself) are compared only when the "data-source"
  cell printed the same as in the committed notebook: notebooks 9 and 10 use CIFAR-10 where
  `data.find_cifar10()` finds it (CI points MINICVT_DATA at the project's archive) and synthetic
  images elsewhere; and a number they print may differ by one in its last digit (float32 sums
  in another order, with another thread count, round either way).

The structural checks read the JSON only: each notebook imports minicvt and redefines none of its
functions or classes (a notebook imports the code it teaches, never copies it), has a GPU cell,
asserts something, and its relative links (docs pages, other notebooks) resolve.
"""
import ast
import difflib
import json
import os
import re
import time
from pathlib import Path

import pytest

import cupy_emulation

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
NOTEBOOK_BUDGET_S = 60           # per notebook, all cells together (the issue: about a minute at most)

_VARIES = [(re.compile(r"0x[0-9a-fA-F]{4,}"), "0x?"),                       # object addresses
           (re.compile(r"\b\d+(\.\d+)?\s?(s|ms|us|µs|min)\b"), "<time>"),    # '1.2 s', '35ms'
           # a gradient check's measured error: round-off, which moves with the thread count and
           # the BLAS (each notebook asserts its bound itself)
           (re.compile(r"\b((?:rel_error|median) )\d(?:\.\d+)?e-\d+"), r"\1<measured>")]


def _load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _text(value):
    """Notebook text fields are a string or a list of lines."""
    return value if isinstance(value, str) else "".join(value)


def _source(cell):
    return _text(cell["source"])


def _tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def _code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _minicvt_names():
    """Names of the functions and classes defined at the top level of any minicvt module."""
    names = set()
    for path in (ROOT / "minicvt").rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
    return names


def test_notebooks_exist_in_reading_order():
    assert NOTEBOOKS, "no notebooks in notebooks/"
    numbers = []
    for path in NOTEBOOKS:
        m = re.fullmatch(r"(\d\d)_\w+\.ipynb", path.name)
        assert m, f"{path.name}: expected NN_name.ipynb (NN its place in the reading order)"
        numbers.append(int(m.group(1)))
    assert numbers == list(range(1, len(numbers) + 1)), f"numbers not consecutive from 01: {numbers}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_structure(path):
    nb = _load(path)
    code = _code_cells(nb)
    sources = [_source(c) for c in code]
    assert any(re.search(r"^\s*(import minicvt\b|from minicvt\b)", s, re.M) for s in sources), \
        f"{path.name} does not import minicvt"

    defined = set()
    for s in sources:
        python = [line for line in s.splitlines() if not line.lstrip().startswith(("%", "!"))]  # no magics
        tree = ast.parse("\n".join(python))
        defined |= {n.name for n in ast.walk(tree)
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    clash = sorted(defined & _minicvt_names())
    assert not clash, f"{path.name} redefines minicvt's {clash}: import them instead"

    gpu = [c for c in code if "cupy_available()" in _source(c)]
    assert gpu, f"{path.name} has no cell that runs on CuPy where a GPU is present"
    untagged = [_source(c).splitlines()[0] for c in gpu if "gpu" not in _tags(c)]
    assert not untagged, f"{path.name}: cells that test for a GPU must be tagged 'gpu': {untagged}"

    asserts = [s for s in sources if re.search(r"^\s*assert\b|\.assert_ok\(", s, re.M)]
    assert asserts, f"{path.name} asserts nothing"

    markdown = "\n".join(_source(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", markdown)
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("../docs/") for link in local), f"{path.name} links no docs page"
    missing = [link for link in local if not (NB_DIR / link).exists()]
    assert not missing, f"{path.name} links to missing files: {missing}"


def _normalise(text):
    for pattern, replacement in _VARIES:
        text = pattern.sub(replacement, text)
    return text


def _shown(cell):
    """What a code cell showed: ('stdout', text) with consecutive chunks joined (how a stream is
    split into messages varies), ('text', text/plain) of results and displays, ('image', '')."""
    items = []
    for out in cell.get("outputs", []):
        kind = out["output_type"]
        if kind == "stream" and out["name"] == "stdout":
            text = _text(out["text"])
            if items and items[-1][0] == "stdout":
                items[-1] = ("stdout", items[-1][1] + text)
            else:
                items.append(("stdout", text))
        elif kind in ("execute_result", "display_data"):
            data = out.get("data", {})
            if "text/plain" in data:
                items.append(("text", _text(data["text/plain"])))
            if any(mime.startswith("image/") for mime in data):
                items.append(("image", ""))
        elif kind == "error":
            items.append(("error", out.get("ename", "")))
    return [(kind, _normalise(text)) for kind, text in items]


_NUMBER = re.compile(r"-?\d+\.\d+|-?\d+")


def _same_but_last_digits(before, after):
    """Whether two cells' shown items agree, except that a printed number may be one unit off
    in its last digit: float32 sums in another order (another thread count) may round either
    way there. Text and the number of digits must agree exactly."""
    if [kind for kind, _ in before] != [kind for kind, _ in after]:
        return False
    for (_, a), (_, b) in zip(before, after):
        if _NUMBER.sub("#", a) != _NUMBER.sub("#", b):
            return False
        for x, y in zip(_NUMBER.findall(a), _NUMBER.findall(b)):
            places = len(x.split(".")[1]) if "." in x else 0
            if places != (len(y.split(".")[1]) if "." in y else 0):
                return False
            if abs(float(x) - float(y)) > 1.01 * 10.0 ** -places:
                return False
    return True


def test_numbers_may_differ_by_one_in_their_last_digit_only():
    assert _same_but_last_digits([("stdout", "acc 0.312, loss 1.25")], [("stdout", "acc 0.313, loss 1.25")])
    assert not _same_but_last_digits([("stdout", "acc 0.312")], [("stdout", "acc 0.314")])
    assert not _same_but_last_digits([("stdout", "acc 0.312")], [("stdout", "acc 0.3120")])
    assert not _same_but_last_digits([("stdout", "cat 0.312")], [("stdout", "dog 0.312")])
    assert not _same_but_last_digits([("stdout", "x")], [("stdout", "x"), ("image", "")])


def _lines(items):
    return [f"[{kind}] {line}" for kind, text in items for line in (text.splitlines() or [""])]


def _data_source(nb):
    return [_shown(c) for c in nb["cells"] if "data-source" in _tags(c)]


def _execute(path, emulated_cupy=False):
    """The notebook at path, run in a new kernel: at most NOTEBOOK_BUDGET_S seconds for all cells.
    emulated_cupy: the kernel's `import cupy` gives the emulated CuPy (tests/emulated_cupy), so
    the GPU cells run."""
    need = "the notebook tests need nbformat, nbclient and ipykernel: pip install -e '.[test]'"
    nbformat = pytest.importorskip("nbformat", reason=need)
    nbclient = pytest.importorskip("nbclient", reason=need)
    pytest.importorskip("ipykernel", reason=need)
    # without MPLBACKEND, which would override the kernel's inline backend (no figures with Agg)
    env = {k: v for k, v in (cupy_emulation.subprocess_env() if emulated_cupy else os.environ).items()
           if k != "MPLBACKEND"}
    node = nbformat.read(path, as_version=4)
    deadline = time.monotonic() + NOTEBOOK_BUDGET_S
    client = nbclient.NotebookClient(
        node, kernel_name="python3", record_timing=False, resources={"metadata": {"path": str(NB_DIR)}},
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())))   # what is left of it
    client.execute(env=env)
    return node


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_and_outputs_are_fresh(path):
    committed = _load(path)
    start = time.monotonic()
    fresh = _execute(path)              # raises CellExecutionError (naming the cell) on any error
    seconds = time.monotonic() - start
    assert seconds < NOTEBOOK_BUDGET_S, f"{path.name} took {seconds:.0f} s"

    same_data = _data_source(committed) == _data_source(fresh)
    stale = []
    for index, (old, new) in enumerate(zip(committed["cells"], fresh["cells"])):
        if old["cell_type"] != "code":
            continue
        tags = set(_tags(old))
        if tags & {"gpu", "optional-files", "needs-mpi"} or (tags & {"data-source", "depends-on-data"} and not same_data):
            continue
        before, after = _shown(old), _shown(new)
        # cells on the data (float32 training and predictions) may round their last digit either way
        loose = "depends-on-data" in tags and _same_but_last_digits(before, after)
        if before != after and not loose:
            diff = difflib.unified_diff(_lines(before), _lines(after), "committed", "fresh", lineterm="")
            stale.append(f"cell {index} ({_source(old).splitlines()[0]!r}):\n" + "\n".join(diff))
    assert not stale, (f"{path.name} has stale outputs; refresh with `python3 notebooks/refresh.py "
                       f"{path.name}` and commit the result:\n\n" + "\n\n".join(stale))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_gpu_cells_run_on_the_emulated_cupy(path):
    """Each notebook again, with `import cupy` giving the emulated CuPy: its GPU cells take their
    GPU branch (no "skipped"), and every cell, GPU or not, runs without an error."""
    fresh = _execute(path, emulated_cupy=True)
    gpu = [c for c in fresh["cells"] if c["cell_type"] == "code" and "gpu" in _tags(c)]
    printed = ["".join(_text(o.get("text", "")) for o in c.get("outputs", []) if o.get("name") == "stdout")
               for c in gpu]
    assert gpu and all(printed), f"{path.name}: a GPU cell printed nothing"
    assert not [p for p in printed if "skipped" in p or "no GPU" in p], printed
