"""The training curves a run draws after every epoch (curves.png): loss and accuracy per
epoch, train and validation, with the image size marked where progressive resizing changes it.
matplotlib is imported when a figure is drawn, with the Agg backend (no display needed)."""
from ..atomic import atomic_write


def plot_curves(history, path):
    """Loss and accuracy per epoch (train and validation) to a PNG, written atomically (a
    temporary name, then a rename). history: the trainer's records, one dict per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    b.plot(ep, [h["train_acc"] for h in history], "o-", label="train")
    if "val_loss" in history[0]:
        a.plot(ep, [h["val_loss"] for h in history], "o-", label="validation")
        b.plot(ep, [h["val_acc"] for h in history], "o-", label="validation")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    b.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    sizes = [h.get("image_size") for h in history]
    # progressive resizing: where the image size changes, a dashed line and the new size
    starts = [i for i, size in enumerate(sizes) if size is not None and (i == 0 or size != sizes[i - 1])]
    for ax in (a, b):
        ax.grid(alpha=0.3)
        if len(starts) > 1:
            for i in starts:
                if i:
                    ax.axvline(ep[i] - 0.5, color="gray", linestyle="--", linewidth=0.8)
                ax.text(ep[i] - 0.4, 0.02, f"{sizes[i]}×{sizes[i]}", transform=ax.get_xaxis_transform(),
                        fontsize=8, color="gray")
        ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
