"""benchmarks/gpu_report.py, the one command that measures minicvt on a GPU, in its dry run: the
same five stages (real-CuPy tests, gradient check, step benchmark against PyTorch, a training run,
one rank through NCCL) on the emulated CuPy, shrunk, each a subprocess whose `import cupy` gets the emulation. It shows
that the report runs end to end and writes its folder; its figures are not GPU results."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_report_dry_run(tmp_path):
    pytest.importorskip("torch", reason="the step stage compares with PyTorch: pip install -e '.[parity]'")
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_report.py", "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["dry_run"] is True
    assert {name: s["status"] for name, s in report["stages"].items()} == \
        {"tests": "ok", "check": "ok", "step": "ok", "train": "ok", "nccl": "ok"}
    stages = report["stages"]
    assert stages["tests"]["figures"]["passed"] > 0 and "failed" not in stages["tests"]["figures"]
    assert stages["check"]["figures"]["verdict"] == "all gradients agree"
    assert [(r["batch"], r["tf32"]) for r in stages["step"]["figures"]["runs"]] == [(2, "off"), (2, "on")]
    assert 0 <= stages["train"]["figures"]["val_acc"] <= 1
    nccl = stages["nccl"]["figures"]
    if importlib.util.find_spec("mpi4py") is None:       # the stage says what is missing, and passes
        assert nccl["skipped"] and "pip install" in nccl["lines"][0]
    else:                                                # one rank through the emulated NCCL
        assert not nccl["skipped"] and "as expected" in " ".join(nccl["lines"])
        assert any(line.startswith("trained 1 epoch through NCCL (15 SyncBatchNorm2d") for line in nccl["lines"])
    md = (out / "report.md").read_text()
    assert "DRY RUN on the emulated CuPy" in md and "| step | ok |" in md
    for name in ("tests", "check", "step", "train", "nccl"):
        assert (out / f"{name}.log").read_text().startswith("$ ")
