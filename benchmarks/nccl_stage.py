"""The GPU report's `nccl` stage: training through the data-parallel path on real NCCL.

    python benchmarks/nccl_stage.py --data DATA --out FOLDER [--limit-train N] [--batch-size B]

NCCL refuses two ranks on one GPU, so a machine with one GPU can run one rank only. One rank
started by a launcher is normally a plain single process (distributed.init gives it a
SingleProcess, no collectives); this stage builds the NCCLWorld itself, so that everything a
rank of several does runs for real: the NCCL set-up (unique id, communicator on the rank's GPU),
SyncBatchNorm's all-reduces and the gradient all-reduce on the compute stream, and the ranks'
meetings over MPI. It first checks one all-reduce and one broadcast of device arrays against
their known results, then trains one epoch and prints its figures.

Run as it is, it starts itself under `mpiexec -n 1` (the MPICH wheel's, beside this Python);
without mpi4py or an mpiexec it says what is missing and exits 0 with the stage skipped (the GPU
machine has no internet: carry the mpi4py and mpich wheels to install them there).
"""
import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(argv):
    """Start this script under `mpiexec -n 1`; -> its exit code (0 with a note when it cannot)."""
    from minicvt.distributed import find_mpiexec
    mpiexec = find_mpiexec()
    missing = [name for name, ok in (("mpi4py", importlib.util.find_spec("mpi4py") is not None),
                                     ("mpiexec", mpiexec is not None)) if not ok]
    if missing:
        print(f"nccl stage skipped: {' and '.join(missing)} not installed here (pip install -e \".[mpi]\")")
        return 0
    command = [mpiexec, "-n", "1", sys.executable, __file__, *argv]
    print("$", " ".join(command), flush=True)
    return subprocess.run(command).returncode


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit-train", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--val-size", type=int, default=None, help="default: the trainer's for --limit-train")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from minicvt import backend, distributed
    if distributed.launched_ranks() is None and "PMI_RANK" not in os.environ:
        return launch(sys.argv[1:] if argv is None else argv)

    from minicvt.train import Trainer
    from minicvt.train_config import TrainConfig
    backend.set_backend("cupy")
    xp = backend.xp()
    world = distributed.NCCLWorld()          # built directly: init() would give one rank a SingleProcess
    print(f"{world} on GPU {xp.cuda.Device().id}, NCCL {world.nccl.get_version()}")

    a = xp.arange(4, dtype=xp.float32) * (world.rank + 1)
    world.allreduce(a)
    expected = sum(r + 1 for r in range(world.size)) * xp.arange(4, dtype=xp.float32)
    b = xp.full(3, float(world.rank))
    world.broadcast(b, root=0)
    ok = bool(xp.all(a == expected)) and bool(xp.all(b == 0))
    print(f"allreduce and broadcast of device arrays: {'as expected' if ok else 'WRONG'}")
    if not ok:
        return 1

    tc = TrainConfig(data=args.data, epochs=1, batch_size=args.batch_size, limit_train=args.limit_train,
                     val_size=args.val_size)
    trainer = Trainer(tc, Path(args.out), progress=False, cache_dir=args.cache_dir, overwrite=True, world=world)
    syncs = sum(type(m).__name__ == "SyncBatchNorm2d" for _, m in trainer.model.named_modules())
    start = time.perf_counter()
    trainer.fit()
    record = trainer.history[-1]
    print(f"trained 1 epoch through NCCL ({syncs} SyncBatchNorm2d layers, one gradient all-reduce a step): "
          f"{record['images_per_s']:.0f} images/s, val_acc {record.get('val_acc', float('nan')):.4f}, "
          f"{time.perf_counter() - start:.1f} s with validation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
