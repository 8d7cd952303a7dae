"""Run by tests/test_data_parallel.py as `mpiexec -n N python tests/mpi_train.py CASE DATA OUT`:
a short training run through the Python API (the trainer `minicvt train` runs), watched from
inside. Every rank writes what it saw to OUT/rank<r>.json.

CASE train:         as `minicvt train` would; each rank records the images of every batch it
                    was given (a digest of each, as the model receives it) and a digest of its
                    weights.
CASE no-allreduce:  the same with the gradient all-reduce taken out: the ranks' weights must
                    part (a test that could not tell would prove nothing).
CASE cupy:          `train` on the emulated CuPy (tests/emulated_cupy first on PYTHONPATH), NCCL
                    between the ranks: every training step runs under the emulation's no_sync(),
                    lifted only where the ranks meet to read their sums back and where a
                    checkpoint is written; the NCCL calls of the epochs are counted.

The settings are the test's: float64, cvt-cifar-s (drop path on), 2 epochs, batch 6. The run
folder is OUT/run.
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from minicvt import backend, data, distributed
from minicvt.train import Trainer
from minicvt.train_config import TrainConfig


def main(case, folder, out):
    name = "cupy" if case == "cupy" else "numpy"
    backend.set_backend(name)
    world = distributed.init(name)
    seen = []                                       # [(epoch, step, [a digest of each image given])]
    epoch_of = data.Loader.epoch

    def recording(loader, e, size=None, start=0):   # the training loader's batches, as given
        for i, (x, y) in enumerate(epoch_of(loader, e, size, start), start=start):
            if loader.shuffle:
                # each image as the model receives it, cropped and flipped: on the emulated CuPy
                # reading it back would be a transfer inside the watched step, so only counted
                given = [] if name == "cupy" else [hashlib.sha1(image.tobytes()).hexdigest()[:16] for image in x]
                seen.append((e, i, given))
            yield x, y
    data.Loader.epoch = recording
    if case == "no-allreduce":
        distributed.FlatGrads.allreduce = lambda self, world, op="mean": None

    nccl_calls = watch_the_steps() if case == "cupy" else {}

    # (without the all-reduce one epoch is enough to part)
    tc = TrainConfig(data=folder, epochs=1 if case == "no-allreduce" else 2, batch_size=6, val_size=30, seed=1, resolutions="", dtype="float64")
    trainer = Trainer(tc, Path(out) / "run", progress=False, log=lambda *a: None, world=world)
    trainer.fit()
    digest = hashlib.sha256()
    for name, array in sorted(trainer.model.state_dict().items()):
        digest.update(name.encode() + np.ascontiguousarray(backend.to_numpy(array)).tobytes())
    report = {"rank": world.rank, "size": world.size, "batches": seen, "weights": digest.hexdigest(),
              "history": [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")}
                          for h in trainer.history],
              "steps": len(seen), "nccl": nccl_calls,
              "batchnorms": sum(type(m).__name__ == "SyncBatchNorm2d" for _, m in trainer.model.named_modules())}
    (Path(out) / f"rank{world.rank}.json").write_text(json.dumps(report))


def watch_the_steps():
    """Run each training epoch under no_sync() (a device-to-host copy raises, naming its line),
    except inside the trainer's meetings (_read_progress) and saves (_save); -> a dict that
    fills with {NCCL call: count} made by minicvt/distributed.py during the epochs."""
    import contextlib

    from cupy import _emulator
    from minicvt import train

    calls = {}

    @contextlib.contextmanager
    def allowed():                       # the read-backs that are meant to be there
        ledger = _emulator._ledger
        forbid, ledger.forbid = ledger.forbid, 0
        try:
            yield
        finally:
            ledger.forbid = forbid

    def lifted(method):
        def call(self, *args, **kwargs):
            with allowed():
                return method(self, *args, **kwargs)
        return call

    def watched(method):
        def call(self, *args, **kwargs):
            with _emulator.no_sync(), _emulator.collectives() as made:
                result = method(self, *args, **kwargs)
            for (site, kind), n in made.items():
                if "distributed.py" in str(site):
                    calls[kind] = calls.get(kind, 0) + n
            return result
        return call

    train.Trainer._read_progress = lifted(train.Trainer._read_progress)
    train.Trainer._save = lifted(train.Trainer._save)
    train.Trainer.train_epoch = watched(train.Trainer.train_epoch)
    return calls


if __name__ == "__main__":
    main(*sys.argv[1:4])
