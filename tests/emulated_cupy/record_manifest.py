"""Record the names and signatures of the real CuPy into the manifest the emulation reads.

    python tests/emulated_cupy/record_manifest.py --source CUPY_CHECKOUT [--out PATH]

Run it where the real CuPy is installed (`pip install cupy-cuda13x==14.2.0`); `import cupy` works
on a machine without a GPU, only allocating fails, so no GPU is needed. CUPY_CHECKOUT is CuPy's
source at the installed version's tag (`git clone https://github.com/cupy/cupy -b v14.2.0`):
the methods of `cupy.ndarray` are compiled by Cython without introspectable signatures, so
theirs are read from `cupy/_core/core.pyx`; so are the functions and `NcclCommunicator` of
`cupy.cuda.nccl`, from `cupy_backends/cuda/libs/nccl.pyx`. Everything else comes from the
installed package. `cupy.cuda.nccl` has its names only where CuPy can load NCCL
(`pip install nvidia-nccl-cu13`; no GPU needed for that either).
"""
import argparse
import inspect
import json
import pathlib
import platform
import re
import sys
import types

# the script's own folder holds the emulated cupy: `import cupy` must find the real one
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != pathlib.Path(__file__).resolve().parent]

NAMESPACES = ["cupy", "cupy.random", "cupy.linalg", "cupy.fft", "cupy.lib.stride_tricks",
              "cupy.cuda", "cupy.cuda.runtime", "cupy.cuda.nccl", "cupy.testing", "cupyx",
              "cupyx.scipy.special"]
CLASSES = {"cupy.ndarray": "cupy.ndarray", "cupy.random.Generator": "cupy.random.Generator",
           "cupy.ufunc": "cupy.ufunc", "cupy.cuda.Stream": "cupy.cuda.Stream",
           "cupy.cuda.Event": "cupy.cuda.Event", "cupy.cuda.MemoryPool": "cupy.cuda.MemoryPool",
           "cupy.cuda.Device": "cupy.cuda.Device",
           "cupy.cuda.nccl.NcclCommunicator": "cupy.cuda.nccl.NcclCommunicator"}
# where Cython hides a signature, the source file that has it
PYX = {"cupy.ndarray": ("cupy/_core/core.pyx", "_ndarray_base"),
       "cupy.cuda.nccl": ("cupy_backends/cuda/libs/nccl.pyx", None),
       "cupy.cuda.nccl.NcclCommunicator": ("cupy_backends/cuda/libs/nccl.pyx", "NcclCommunicator")}


def params_of(obj):
    """[[name, kind, has_default], ...] from inspect, or None where Cython hides them."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [[p.name, p.kind.name, p.default is not inspect.Parameter.empty]
            for p in sig.parameters.values()]


def entry(obj):
    import cupy
    import numpy
    if isinstance(obj, types.ModuleType):
        return {"kind": "module"}
    if isinstance(obj, cupy.ufunc):
        return {"kind": "ufunc", "nin": obj.nin, "nout": obj.nout}
    if type(obj).__name__ == "_GUFunc":
        return {"kind": "gufunc", "signature": params_of(obj)}
    if isinstance(obj, type):
        if obj.__module__ == "numpy" or issubclass(obj, numpy.generic):
            return {"kind": "numpy-type", "name": obj.__name__}
        return {"kind": "class", "signature": params_of(obj)}
    if callable(obj):
        return {"kind": "function", "signature": params_of(obj)}
    if isinstance(obj, (bool, int, float, complex, str, type(None))):
        return {"kind": "constant", "value": repr(obj)}
    return {"kind": "other", "type": type(obj).__name__}


def namespace(name, pyx=None):
    """{name: entry} of a module's public names; hidden function signatures from `pyx`
    ({function: params}) and a class's from its `__init__` there, less `self`."""
    import importlib
    module = importlib.import_module(name)
    if name == "cupy.cuda.nccl" and not module.available:
        raise SystemExit("CuPy cannot load NCCL here, so cupy.cuda.nccl has no names: "
                         "pip install nvidia-nccl-cu13")
    out = {a: entry(getattr(module, a)) for a in sorted(dir(module))
           if not a.startswith("_") and hasattr(module, a)}
    for a, e in out.items():
        if pyx and e["kind"] in ("function", "class") and e["signature"] is None:
            if e["kind"] == "function" and a in pyx:
                e["signature"] = pyx[a]
            elif e["kind"] == "class" and f"{a}.__init__" in pyx:
                e["signature"] = pyx[f"{a}.__init__"][1:]
    return out


def pyx_signatures(source, path, cls=None):
    """{name: params} for the `def`/`cpdef` methods of class `cls` in the .pyx file `path` of
    CuPy's source, or for its module-level functions (and every class's `Class.__init__`)
    when cls is None."""
    text = (pathlib.Path(source) / path).read_text()
    if cls is None:
        out = _defs(text, "")
        for m in re.finditer(r"^(?:cdef )?class (\w+)\b.*$", text, re.M):
            for method, params in pyx_signatures(source, path, m.group(1)).items():
                if method == "__init__":
                    out[f"{m.group(1)}.__init__"] = params
        return out
    start = re.search(rf"^(?:cdef )?class {cls}\b.*$", text, re.M).end()
    end = re.search(r"^\S", text[start:], re.M)
    return _defs(text[start:start + end.start()] if end else text[start:], "    ")


def _defs(body, indent):
    """{name: params} of the `def`/`cpdef` functions at this indent of a Cython source."""
    out = {}
    for m in re.finditer(rf"^{indent}(?:cpdef|def)\s+(?:[\w\.]+\s+)?(\w+)\(", body, re.M):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(body[i], 0)
            i += 1
        raw = " ".join(body[m.end():i - 1].split())
        params, kind = [], "POSITIONAL_OR_KEYWORD"
        for p in [p.strip() for p in raw.split(",") if p.strip()]:
            if p == "*":
                kind = "KEYWORD_ONLY"
                continue
            head, _, default = p.partition("=")
            pname = head.split()[-1]
            if pname.startswith("**"):
                params.append([pname[2:], "VAR_KEYWORD", False])
            elif pname.startswith("*"):
                params.append([pname[1:], "VAR_POSITIONAL", False])
                kind = "KEYWORD_ONLY"
            else:
                params.append([pname, kind, bool(default)])
        out.setdefault(m.group(1), params)
    return out


def class_members(path, pyx=None):
    import importlib
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    members = {}
    for a in sorted(dir(cls)):
        if a.startswith("_") and not (a.startswith("__") and a.endswith("__")):
            continue
        attr = inspect.getattr_static(cls, a)
        kind = "method" if callable(attr) or type(attr).__name__ in ("method_descriptor",) else "attribute"
        sig = params_of(getattr(cls, a)) if kind == "method" else None
        if kind == "method" and sig is None and pyx is not None:
            sig = pyx.get(a)
        members[a] = {"kind": kind, "signature": sig}
    return members


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="CuPy's source at the installed version's tag")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).with_name("manifest.json")))
    args = ap.parse_args()
    import cupy
    import numpy
    pyx = {n: pyx_signatures(args.source, *where) for n, where in PYX.items()}
    manifest = {
        "cupy": cupy.__version__,
        "recorded_with": {"numpy": numpy.__version__, "python": platform.python_version()},
        "namespaces": {n: namespace(n, pyx.get(n)) for n in NAMESPACES},
        "classes": {p: class_members(p, pyx.get(p)) for p in CLASSES},
    }
    pathlib.Path(args.out).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    total = sum(len(v) for v in manifest["namespaces"].values())
    print(f"cupy {cupy.__version__}: {total} names in {len(NAMESPACES)} namespaces, "
          f"{sum(len(v) for v in manifest['classes'].values())} class members -> {args.out}")


if __name__ == "__main__":
    main()
