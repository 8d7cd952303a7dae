"""benchmarks/data_parallel.py: its on-paper model's arithmetic, and that --collectives runs (one
process here; two ranks under mpiexec where mpi4py is installed) and counts SyncBatchNorm's
collectives as two per BatchNorm layer. No time is asserted: timings are not tests."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import data_parallel  # noqa: E402

from minicvt.distributed import find_mpiexec  # noqa: E402
from minicvt.models import get_config  # noqa: E402

LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                 "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "PMIX_RANK")


def test_macs_of_cvt13_match_the_paper():
    # the CvT paper's Table 2: CvT-13, 4.5 G FLOPs (multiply-adds) at 224x224
    assert data_parallel.macs_per_image(get_config("cvt-13")) == pytest.approx(4.5e9, rel=0.02)
    # a quarter of the pixels: the convolutions and token-wise layers shrink 4x, attention 16x
    small = data_parallel.macs_per_image(get_config("cvt-13"), image_size=112)
    assert 4.5e9 / 16 < small < 4.6e9 / 4


def test_ring_and_tree_formulas():
    assert data_parallel.ring_seconds(1e9, 1, 1e9, 1e-5) == 0.0
    # 2(N-1)/N x bytes / bandwidth + 2(N-1) x latency
    assert data_parallel.ring_seconds(8e9, 4, 1e9, 1e-5) == pytest.approx(2 * 3 / 4 * 8 + 6e-5)
    assert data_parallel.tree_seconds(8e9, 4, 1e9, 1e-5) == pytest.approx(4e-5 + 16)
    # SyncBN: per layer of C channels, (N, 1 + 3C) floats forward and (2, C) backward
    C, n = 64, 2
    expected = data_parallel.ring_seconds(n * (1 + 3 * C) * 4, n, 1e9, 1e-6) + \
        data_parallel.ring_seconds(2 * C * 4, n, 1e9, 1e-6)
    assert data_parallel.syncbn_seconds([C, C], n, 1e9, 1e-6) == pytest.approx(2 * expected)


def _run(command, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for var in LAUNCHER_VARS:
        env.pop(var, None)
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads((tmp_path / "dp.json").read_text())


def _check(result, size):
    c = result["collectives"]
    assert c["size"] == size and c["bn_layers"] == 15               # cvt-cifar-s: 5 blocks x q, k, v
    assert c["gradient_bytes"] == 4 * c["parameters"]
    assert [r["syncbn_calls"] for r in c["per_rank"]] == [30.0] * size    # 2 per layer per step
    for r in c["per_rank"]:
        assert r["forward_backward"] >= r["syncbn"] >= 0 and r["step"] >= r["allreduce"] >= 0


def test_collectives_one_process(tmp_path):
    result = _run([sys.executable, "benchmarks/data_parallel.py", "--collectives", "--quick",
                   "--json", str(tmp_path / "dp.json")], tmp_path)
    _check(result, 1)


def test_collectives_two_ranks(tmp_path):
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip('mpi4py is not installed (pip install -e ".[mpi]")')
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec beside this Python or on PATH (the mpich wheel puts one beside it)")
    result = _run([str(mpiexec), "-n", "2", sys.executable, "benchmarks/data_parallel.py", "--collectives",
                   "--quick", "--threads", "1", "--json", str(tmp_path / "dp.json")], tmp_path)
    _check(result, 2)
