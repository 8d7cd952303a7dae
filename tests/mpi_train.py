"""Run by tests/test_data_parallel.py as `mpiexec -n N python tests/mpi_train.py CASE DATA OUT`:
a short training run through the Python API (the trainer `minicvt train` runs), watched from
inside. Every rank writes what it saw to OUT/rank<r>.json.

CASE train:         as `minicvt train` would; each rank records the images of every batch it
                    was given (their positions in the data set) and a digest of its weights.
CASE no-allreduce:  the same with the gradient all-reduce taken out: the ranks' weights must
                    part (a test that could not tell would prove nothing).

The settings are the test's: float64, cvt-cifar-s (drop path on), 2 epochs, batch 6.
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
    backend.set_backend("numpy")
    world = distributed.init("numpy")
    seen = []                                       # [(epoch, step, [image positions])]
    epoch_of = data.Loader.epoch

    def recording(loader, e, size=None, start=0):   # the training loader's batches, as given
        for i, (x, y) in enumerate(epoch_of(loader, e, size, start), start=start):
            if loader.shuffle:
                B, b = loader.batch_size, loader.batch_size // loader.size
                order = np.random.default_rng([loader.seed, e]).permutation(len(loader.index))
                rows = order[i * B:(i + 1) * B][loader.rank * b:(loader.rank + 1) * b]
                assert len(x) == len(rows) == b
                seen.append((e, i, loader.index[rows].tolist()))
            yield x, y
    data.Loader.epoch = recording
    if case == "no-allreduce":
        distributed.FlatGrads.allreduce = lambda self, world, op="mean": None

    tc = TrainConfig(data=folder, epochs=2, batch_size=6, val_size=30, seed=1, resolutions="", dtype="float64")
    trainer = Trainer(tc, Path(out) / "run", progress=False, log=lambda *a: None, world=world)
    trainer.fit()
    digest = hashlib.sha256()
    for name, array in sorted(trainer.model.state_dict().items()):
        digest.update(name.encode() + np.ascontiguousarray(array).tobytes())
    report = {"rank": world.rank, "size": world.size, "batches": seen, "weights": digest.hexdigest(),
              "history": [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")}
                          for h in trainer.history]}
    (Path(out) / f"rank{world.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:4])
