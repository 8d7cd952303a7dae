"""The settings of a training run, TrainConfig: what `minicvt train`'s flags set, what every
checkpoint stores (meta["train_config"]), and what `--resume` compares. Each setting is checked
here, and a refusal names the command line's flag.
"""
from dataclasses import dataclass

from . import schedules
from .checkpoint import saved_train_settings


def flag(name):
    """The command line's flag of a TrainConfig field: 'batch_size' -> '--batch-size'."""
    return "--config" if name == "model" else "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in every checkpoint."""
    model: str = "cvt-cifar-s"
    data: str = "cifar10"
    epochs: int = 24
    batch_size: int = 128
    optimizer: str = "adamw"         # 'adamw' (as the official recipe) or 'sgd' (momentum, Nesterov)
    lr: float = None                 # peak learning rate after warm-up (adamw 1e-3, sgd 0.1)
    min_lr: float = 0.0
    warmup_epochs: float = 1.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = None       # adamw 0.05 (decoupled), sgd 5e-4 (L2)
    label_smoothing: float = 0.1
    clip_grad: float = 0.0           # max global gradient norm; 0 = no clipping
    crop_padding: int = 4
    augment: bool = True
    val_size: int = None             # held out for validation: 5000, or with limit_train a fifth of it
                                     # (500 to 5000): a quick trial's validation stays quick
    limit_train: int = 0             # use only this many training images (0 = all)
    seed: int = 0
    dtype: str = "float32"
    eval_batch_size: int = 500
    init_from: str = ""              # start from this checkpoint's (or model file's) weights
    # progressive resizing: "0.5:0.5,0.75:0.25" trains the first 50 % of the epochs on images
    # resized to half their side (16x16 for CIFAR-10), the next 25 % at three quarters (24x24),
    # and the rest (at least the last epoch) at their own size. A size below 1 is a fraction of
    # the side, one of 1 or more whole pixels ("16:0.5,24:0.25"); "" = off. See schedules.py
    resolutions: str = "0.5:0.5,0.75:0.25"
    eval_flip: bool = True           # validation averages the logits of each image and its mirror
    minutes: float = 0.0             # plan the number of epochs to end within this many minutes
                                     # (0: take `epochs` as given); see planner.py
    sync_bn: bool = True             # under several ranks, BatchNorm's batch statistics are those of the
                                     # whole global batch (False: of each rank's slice, as PyTorch's DDP,
                                     # so the result depends on the number of ranks); docs/distributed.md

    @classmethod
    def from_saved(cls, saved):
        """The settings stored in a checkpoint, those it predates as its run ran them."""
        return cls(**saved_train_settings(saved))

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        # the two optimisers want very different step sizes and decays: default each its own
        if self.lr is None:
            self.lr = 1e-3 if self.optimizer == "adamw" else 0.1
        if self.weight_decay is None:
            self.weight_decay = 0.05 if self.optimizer == "adamw" else 5e-4
        if self.val_size is None:
            self.val_size = min(5000, max(500, self.limit_train // 5)) if self.limit_train else 5000
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        # messages name the command line's flag (--batch-size), which Python users read as well
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        for name in ("min_lr", "weight_decay", "warmup_epochs", "clip_grad", "crop_padding", "limit_train",
                     "minutes", "val_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        schedules.parse_resolutions(self.resolutions)       # a malformed schedule fails here

    def resolution_plan(self, native, epochs=None):
        """[(side in pixels, first epoch, end epoch)] of this run's progressive resizing on
        images of side `native` (schedules.resolution_plan); epochs: another number of epochs
        than the run's (to plan one)."""
        return schedules.resolution_plan(self.resolutions, native, self.epochs if epochs is None else epochs)

    def train_size(self, epoch, native):
        """The side of the training images in (0-based) epoch `epoch`; `native` after the plan."""
        return schedules.train_size(self.resolutions, native, self.epochs, epoch)
