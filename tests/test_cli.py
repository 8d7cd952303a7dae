"""The `minicvt` command: `check` proves every layer's gradients and says so; errors are one
line on stderr and a non-zero exit, never a traceback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cupy_emulation
import minicvt
from minicvt import backend, cli

# one word from the printed name of each layer family the check must cover
FAMILIES = ["Conv2d", "DepthwiseConv2d", "Linear", "BatchNorm2d", "LayerNorm", "GELU", "QuickGELU",
            "Dropout", "DropPath", "AvgPool2d", "TokenMean", "Attention", "CrossEntropy"]


@pytest.fixture
def restore_backend():
    """`check` selects a backend for the whole process; put the previous one back."""
    previous = backend.get_backend()
    yield
    backend.set_backend(previous)


def _assert_check_output(out, name="numpy"):
    """For each set of kernels, a header, then one `ok` line per checked layer; then the verdict."""
    lines = out.strip().splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("float64 gradient checks")]
    assert [lines[i].split("kernels ")[1].split()[0] for i in headers] == ["'fast'", "'reference'"], out
    for start, end in zip(headers, headers[1:] + [len(lines) - 1]):
        assert lines[start].startswith(f"float64 gradient checks on backend '{name}'"), out
        results = lines[start + 1:end]
        assert all(line.split()[0] == "ok" and "max rel_error" in line for line in results), out
        for family in FAMILIES:
            assert any(line.split()[1] == family for line in results), \
                f"no result line for {family}:\n{out}"
    assert lines[-1] == "all gradients agree"


def test_check_passes_in_process(capsys, restore_backend):
    assert cli.main(["check", "--backend", "numpy"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    _assert_check_output(out)


def test_check_as_python_module():
    env = {**os.environ, "MINICVT_BACKEND": "numpy"}
    root = Path(minicvt.__file__).parent.parent
    proc = subprocess.run([sys.executable, "-m", "minicvt", "check"], capture_output=True, text=True,
                          env=env, cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    _assert_check_output(proc.stdout)


def test_check_on_cupy_as_a_user_runs_it():
    """`MINICVT_BACKEND=cupy python -m minicvt check` in a fresh process, `import cupy` giving the
    emulated CuPy (tests/emulated_cupy on PYTHONPATH) where no real one is installed."""
    env = cupy_emulation.subprocess_env(MINICVT_BACKEND="cupy")
    if backend.cupy_available():
        env = {**os.environ, "MINICVT_BACKEND": "cupy"}                 # the real GPU
    root = Path(minicvt.__file__).parent.parent
    proc = subprocess.run([sys.executable, "-m", "minicvt", "check"], capture_output=True, text=True,
                          env=env, cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _assert_check_output(proc.stdout, "cupy")


@pytest.mark.parametrize("kernel_set", ["fast", "reference"])
def test_check_fails_loudly_on_a_wrong_gradient(capsys, monkeypatch, restore_backend, kernel_set):
    # a GELU backward off by 1% in one set must be caught there: the check can fail, and says so
    module = minicvt.fast if kernel_set == "fast" else minicvt.functional
    right = module.gelu_backward
    monkeypatch.setattr(module, "gelu_backward", lambda dout, cache: 1.01 * right(dout, cache))
    assert cli.main(["check", "--backend", "numpy"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    sections = "\n".join(lines).split("float64 gradient checks")[1:]
    failed = {s.split("kernels ")[1].split()[0]: [line.split()[1] for line in s.splitlines()
                                                 if line.split() and line.split()[0] == "FAIL"]
              for s in sections}
    assert failed == {f"'{k}'": (["GELU", "GELU"] if k == kernel_set else []) for k in ("fast", "reference")}
    assert lines[-1] == "2 layer(s) FAILED"                  # the erf and the tanh forms


def test_missing_cupy_is_one_line_on_stderr(capsys, monkeypatch, restore_backend):
    monkeypatch.setitem(sys.modules, "cupy", None)        # `import cupy` now fails on any machine
    code = cli.main(["check", "--backend", "cupy"])
    out, err = capsys.readouterr()
    assert code != 0
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("minicvt check: error: backend 'cupy' needs CuPy")
    assert "pip install" in lines[0]


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train-everything"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_no_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "required" in capsys.readouterr().err
