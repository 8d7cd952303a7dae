"""One command that measures minicvt on a GPU, and writes one results folder.

    python benchmarks/gpu_report.py [--data data/cifar10-jpeg-train.tar.xz] [--out FOLDER]
    python benchmarks/gpu_report.py --dry-run --out /tmp/report       # no GPU: see below

For a machine with CuPy, PyTorch with CUDA and the training images (the GPU machine has no
internet: copy the archive into the repository's git-ignored data/ folder, which travels with
the working tree). Five stages, each in its own process with its own time limit, each reported
whatever happened to the others, about 7 minutes in all on one H100/H200:

    tests   the real-CuPy test cases (pytest -k "cupy and not emulat")               90 s
    check   minicvt check --backend cupy (float64 gradient checks on the GPU)          30 s
    step    benchmarks/step_vs_torch.py --backend cupy --tf32, batch 128 and 512,
            against PyTorch CUDA eager, TF32 off then on                              150 s
    train   minicvt train --backend cupy, one epoch of the training images:
            images/s and validation accuracy                                          90 s
    nccl    benchmarks/nccl_stage.py: one rank under mpiexec -n 1 through real NCCL (one
            all-reduce and broadcast checked, then an epoch of 5,000 images with
            SyncBatchNorm and the gradient all-reduce); skipped without mpi4py        60 s

OUT (default benchmarks/results/gpu-DATE-COMMIT) gets report.json, report.md (tables ready for
docs/performance.md) and each stage's full output as STAGE.log.

--dry-run runs the same five stages on the emulated CuPy (tests/emulated_cupy on PYTHONPATH, so
each stage's `import cupy` gets it), shrunk: one test file, the step benchmark's own --dry-run,
and a training run of a few steps on a small image folder it writes. It checks that the report
works end to end (the test suite runs it); its numbers are not GPU results, and report.md says so.
"""
import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests" / "emulated_cupy"
STAGES = ("tests", "check", "step", "train", "nccl")
LIMITS = {"tests": 90, "check": 30, "step": 150, "train": 90, "nccl": 60}          # seconds


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_tiny_folder(root, classes=("a", "b", "c"), per_class=8, size=16):
    """root/<class>/<i>.png: a small learnable image folder for the dry run's training stage."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.normal(60.0, 20.0, (size, size, 3))
            img[..., k] += 120.0
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def commands(args, out):
    """{stage: argv}; the dry run's are the same commands, shrunk."""
    py = sys.executable
    minicvt = [py, "-m", "minicvt"]
    # (train --overwrite: a report run again into the same folder starts its training over)
    if args.dry_run:
        data = args.data or str(write_tiny_folder(out / "dry-data"))
        return {
            "tests": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cupy and not emulat",
                      "tests/test_gradients_norm.py"],
            "check": minicvt + ["check", "--backend", "cupy"],
            "step": [py, "benchmarks/step_vs_torch.py", "--backend", "cupy", "--tf32", "--dry-run",
                     "--json", str(out / "step.json")],
            "train": minicvt + ["train", "--backend", "cupy", "--data", data, "--epochs", "1",
                                "--batch-size", "4", "--val-size", "6", "--quiet", "--out", str(out / "train"),
                                "--overwrite", "--cache-dir", str(out / "cache")],
            "nccl": [py, "benchmarks/nccl_stage.py", "--data", data, "--limit-train", "12", "--val-size", "6",
                     "--batch-size", "4",
                     "--out", str(out / "nccl"), "--cache-dir", str(out / "cache")],
        }
    return {
        "tests": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cupy and not emulat"],
        "check": minicvt + ["check", "--backend", "cupy"],
        "step": [py, "benchmarks/step_vs_torch.py", "--backend", "cupy", "--tf32", "--batch-size", "128",
                 "512", "--repeats", "10", "--warmup", "3", "--json", str(out / "step.json")],
        "train": minicvt + ["train", "--backend", "cupy", "--data", args.data, "--epochs", "1", "--quiet",
                            "--out", str(out / "train"), "--overwrite", "--cache-dir", str(out / "cache")],
        "nccl": [py, "benchmarks/nccl_stage.py", "--data", args.data, "--out", str(out / "nccl"),
                 "--cache-dir", str(out / "cache")],
    }


def run_stage(name, argv, env, limit, log):
    """Run one stage in its own process group; (status, seconds, output). On the time limit the
    whole group is killed (the step benchmark starts processes of its own)."""
    start = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timed out after {limit} s"
    return status, time.monotonic() - start, Path(log).read_text(errors="replace")


def figures(name, output, out):
    """The numbers each stage reports, read from its output and files."""
    if name == "tests":
        tail = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
        counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail[-1])} if tail else {}
        return {"summary": tail[-1].strip("= ") if tail else "no pytest summary", **counts}
    if name == "check":
        errors = [float(e) for e in re.findall(r"max rel_error ([0-9.e+-]+)", output)]
        verdict = output.strip().splitlines()[-1] if output.strip() else ""
        return {"layers": len(errors), "worst_rel_error": max(errors) if errors else None, "verdict": verdict}
    if name == "step":
        path = out / "step.json"
        if not path.exists():
            return {}
        rows = []
        for r in json.loads(path.read_text())["runs"]:
            med = {k: {s: sorted(v)[len(v) // 2] for s, v in r[k].items()} for k in ("step_ms", "forward_ms")}
            row = {"batch": r["batch"], "tf32": r["tf32"], "logits_rel_diff": r["logits_rel_diff"],
                   "step_ms": med["step_ms"], "forward_ms": med["forward_ms"],
                   "step_ratio": med["step_ms"]["minicvt"] / med["step_ms"]["torch"],
                   "forward_ratio": med["forward_ms"]["minicvt"] / med["forward_ms"]["torch"],
                   "images_per_s": {s: r["batch"] / (ms / 1e3) for s, ms in med["step_ms"].items()}}
            if "memory" in r and {"minicvt", "torch"} <= set(r["memory"]):
                row["steady_mb"] = {s: r["memory"][s]["steady_mb"] for s in ("minicvt", "torch")}
            rows.append(row)
        return {"runs": rows}
    if name == "train":
        path = out / "train" / "metrics.jsonl"
        if not path.exists():
            return {}
        record = json.loads(path.read_text().splitlines()[-1])
        return {k: record.get(k) for k in ("epoch", "seconds", "images_per_s", "train_loss", "train_acc",
                                            "val_acc")}
    if name == "nccl":
        lines = [line for line in output.splitlines()
                 if line.startswith(("nccl stage skipped", "NCCLWorld", "allreduce and", "trained 1 epoch"))]
        return {"lines": lines, "skipped": any(line.startswith("nccl stage skipped") for line in lines)}
    return {}


def markdown(report):
    """report.md: a stage table, then the step benchmark's table."""
    lines = [f"# GPU report, {report['date']}, commit {report['commit']}", ""]
    if report["dry_run"]:
        lines += ["**DRY RUN on the emulated CuPy (NumPy kernels on the CPU): these figures check that "
                  "the report runs; they are not GPU measurements.**", ""]
    lines += [f"- machine: {report['machine']}", "", "| stage | status | seconds | result |",
              "|---|---|---:|---|"]
    for name in STAGES:
        s = report["stages"][name]
        f = s["figures"]
        if name == "tests":
            result = f.get("summary", "")
        elif name == "check":
            result = f"{f.get('layers')} layers, worst relative error {f.get('worst_rel_error')}: {f.get('verdict')}"
        elif name == "train":
            result = (f"{f['images_per_s']:.0f} images/s, {f['seconds']:.1f} s an epoch, validation accuracy "
                      f"{f['val_acc']:.4f}") if f.get("images_per_s") else ""
        elif name == "nccl":
            result = "; ".join(f.get("lines", []))
        else:
            result = f"{len(f.get('runs', []))} runs (below)"
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.0f} | {result} |")
    runs = report["stages"]["step"]["figures"].get("runs", [])
    if runs:
        lines += ["", "cvt-cifar-s, float32; median ms of alternated calls; CuPy against PyTorch CUDA eager:", "",
                  "| batch | TF32 | training step minicvt / PyTorch ms | ratio | images/s minicvt / PyTorch "
                  "| inference forward minicvt / PyTorch ms | ratio | steady-state memory MB minicvt / PyTorch |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in runs:
            mem = r.get("steady_mb")
            mem = f"{mem['minicvt']:.0f} / {mem['torch']:.0f}" if mem else ""
            lines.append(
                f"| {r['batch']} | {r['tf32']} | {r['step_ms']['minicvt']:.1f} / {r['step_ms']['torch']:.1f} "
                f"| **{r['step_ratio']:.2f}** | {r['images_per_s']['minicvt']:.0f} / {r['images_per_s']['torch']:.0f} "
                f"| {r['forward_ms']['minicvt']:.1f} / {r['forward_ms']['torch']:.1f} | **{r['forward_ratio']:.2f}** "
                f"| {mem} |")
    return "\n".join(lines) + "\n"


def machine():
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        gpu = ""
    return gpu or "no nvidia-smi (no GPU, or not visible)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="the training images (default data/cifar10-jpeg-train.tar.xz; the dry "
                                  "run writes a small folder)")
    p.add_argument("--out", help="results folder (default benchmarks/results/gpu-DATE-COMMIT)")
    p.add_argument("--dry-run", action="store_true", help="the stages on the emulated CuPy, shrunk")
    p.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages")
    args = p.parse_args(argv)
    date = datetime.date.today().isoformat()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"gpu-{date}-{commit()}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run:
        args.data = args.data or str(ROOT / "data" / "cifar10-jpeg-train.tar.xz")
        if not Path(args.data).exists():
            print(f"gpu_report: note: {args.data} is missing: the train stage will fail (give --data)",
                  file=sys.stderr)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        ([str(EMULATION)] if args.dry_run else []) + [str(ROOT)]
        + [q for q in os.environ.get("PYTHONPATH", "").split(os.pathsep) if q]))
    report = {"date": date, "commit": commit(), "dry_run": args.dry_run, "machine": machine(), "stages": {}}
    for name, argv in commands(args, out).items():
        if args.only and name not in args.only:
            continue
        limit = LIMITS[name] * (3 if args.dry_run else 1)       # the emulation on 2 CPU cores is slower
        print(f"gpu_report: {name} (at most {limit} s) ...", flush=True)
        status, seconds, output = run_stage(name, argv, env, limit, out / f"{name}.log")
        report["stages"][name] = {"status": status, "seconds": seconds, "command": argv,
                                  "figures": figures(name, output, out)}
        print(f"gpu_report: {name}: {status} in {seconds:.0f} s", flush=True)
        (out / "report.json").write_text(json.dumps(report, indent=1))      # after every stage
    for name in STAGES:
        report["stages"].setdefault(name, {"status": "not run", "seconds": 0.0, "figures": {}})
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    print(f"gpu_report: wrote {out / 'report.md'} and report.json")
    return 0 if all(s["status"] == "ok" for s in report["stages"].values() if s["status"] != "not run") else 1


if __name__ == "__main__":
    sys.exit(main())
