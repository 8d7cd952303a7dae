"""What `minicvt attention` does: load a checkpoint, take images (from a dataset by index, or
the user's own files), predict with attention kept, and write the figures.

Shapes: images uint8 (N, 3, H, W); probabilities (N, K).
"""
from pathlib import Path

import numpy as np

from .. import backend, data
from ..checkpoint import CheckpointError, load_checkpoint
from ..models import from_checkpoint, from_pretrained, prepare_images
from ..models.inputs import fit
from .figures import plot_cls_attention, plot_grid, plot_query_attention, plot_rollout
from .maps import capture_attention, rollout

KINDS = ("grid", "query", "cls", "rollout")
_META_KEYS = ("model_config", "normalization", "classes")


def load_model(path):
    """(model in eval mode on the active backend, meta) from a checkpoint whose metadata holds
    model_config, normalization (mean, std on the 0..1 scale) and classes, as `minicvt train`
    writes them; the dtype is the run's (train_config.dtype), float32 if absent."""
    state, _, meta = load_checkpoint(path)
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path} has no {', '.join(missing)} in its metadata "
                              f"(attention maps need a checkpoint written by `minicvt train`)")
    return from_checkpoint(state, meta, path), meta


def read_image_files(paths, size):
    """uint8 (N, 3, size, size) from image files: each decoded to 8-bit RGB by
    data.decode_image (docs/files.md), its central square cropped (so nothing is stretched),
    then resized to size x size with Pillow's bicubic filter (which widens its support when
    shrinking, so it antialiases)."""
    return data.load_image_files(paths, lambda im: fit(im, {"size": size, "crop": "square"}))


def predict(model, meta, images):
    """Class probabilities (N, K) and attention maps of uint8 images (N, 3, H, W), normalised
    with the checkpoint's mean and std."""
    dtype = model.head.weight.data.dtype
    norm = meta["normalization"]
    x = data.normalize(backend.to_device(images), backend.to_device(np.asarray(norm["mean"])),
                       backend.to_device(np.asarray(norm["std"])), dtype)
    return predict_inputs(model, x)


def predict_inputs(model, x):
    """Class probabilities (N, K) and attention maps of prepared inputs x (N, 3, H, W)."""
    dtype = model.head.weight.data.dtype
    x = backend.to_device(x, dtype) if isinstance(x, np.ndarray) else x.astype(dtype, copy=False)
    logits, maps = capture_attention(model, x)
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))            # stable softmax
    return e / e.sum(axis=1, keepdims=True), maps


def _select(data_path, split, index, kind, meta, cache_dir=None):
    """(images, labels, class names, names) of the chosen dataset images; by default the first
    eight (grid, rollout) or the first one (query, cls). split 'val' takes them from the run's
    held-out images (indices count within that split), 'test' from the official test batch,
    'train' from the training images (an image folder's are all its images). None: 'test' where
    the data has a test split, else 'val' on the run's own training data (if it held any out),
    else 'train'."""
    has_test = data.has_test_split(data_path)
    if split == "test" and not has_test:       # the folder's images would pass for unseen ones
        raise data.DataError(f"--split test: {data_path} has no test split (only 'cifar10' and the official "
                             f"archive cifar-10-python.tar.gz have one); give --split val for the run's "
                             f"held-out images, or --split train for all of its images")
    if split is None and has_test:
        split = "test"
    images, labels, classes = data.load_dataset(data_path, split="test" if split == "test" else "train",
                                                cache_dir=cache_dir)
    if split is None:        # (a run that held nothing out has no 'val' to default to)
        held = meta is not None and meta["train_config"].get("val_size", 0) > 0
        split = "val" if held and data.is_training_data(images, labels, meta) else "train"
    if split == "val":
        images, labels = data.held_out(images, labels, meta, data_path)
    n = len(labels)
    if index is None:
        index = list(range(min(n, 8 if kind in ("grid", "rollout") else 1)))
    bad = [i for i in index if not 0 <= i < n]
    if bad:
        raise ValueError(f"--index {bad[0]}: the {split} split of {data_path} has {n} images (0..{n - 1})"
                         + ("; --split train for the others" if split == "val" else ""))
    return images[index], labels[index], list(classes), [str(i) for i in index]


def _file_ids(paths):
    """Names for the user's image files in output names: their stems, numbered where two are
    the same (cat.jpg, cat.png -> cat-0, cat-1)."""
    stems, seen = [Path(p).stem for p in paths], {}
    ids = []
    for s in stems:
        ids.append(f"{s}-{seen.get(s, 0)}" if stems.count(s) > 1 else s)
        seen[s] = seen.get(s, 0) + 1
    return ids


def _numbered(out, name, many):
    return out if not many else out.with_name(f"{out.stem}-{name}{out.suffix}")


def attention_figures(checkpoint, out, kind="grid", data_path=None, split=None, image_files=None,
                      index=None, query=None, log=print, cache_dir=None, pretrained=None):
    """Write the `kind` figure(s) to `out` (a .png) and return their paths. query and cls write
    one figure per image when there are several, FIG-<name>.png: the dataset index, or the
    image file's name (--images cat.jpg dog.jpg -> FIG-cat.png, FIG-dog.png); grid and rollout
    one figure for all. query = (row, col) in pixels of the model's input (default: centre).
    pretrained: a Hugging Face CvT folder instead of a checkpoint, with image_files, at its own
    resolution and preprocessing."""
    out = Path(out)
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {KINDS}, got {kind!r}")
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: figures are written as .png")
    if (checkpoint is None) == (pretrained is None):
        raise ValueError("give either --checkpoint or --pretrained")
    if pretrained is not None and image_files is None:
        raise ValueError("--pretrained takes --images (the model's own data is not here)")
    if (data_path is None) == (image_files is None):
        raise ValueError("give either --data (with --index) or --images, not both and not neither")
    if pretrained is not None:
        model = from_pretrained(pretrained)
        config, names, meta = model.config, model.classes, None
    else:
        model, meta = load_model(checkpoint)
        config, names = model.config, meta["classes"]
    if kind == "cls" and not config.cls_token[-1]:
        raise ValueError(f"--kind cls: {config.name} has no class token in its last stage "
                         f"(it reads the mean of its tokens); use --kind query or rollout")
    if pretrained is not None:                  # resized and cropped as its image processor does
        images, x = prepare_images(image_files, model.preprocessing)
        labels, true_names, ids = None, None, _file_ids(image_files)
    elif image_files is not None:
        images, labels, true_names = read_image_files(image_files, config.image_size), None, None
        ids = _file_ids(image_files)
    else:
        images, labels, true_names, ids = _select(data_path, split, index, kind, meta, cache_dir)
    H, W = images.shape[2:]
    query = (H // 2, W // 2) if query is None else tuple(query)
    if not (0 <= query[0] < H and 0 <= query[1] < W):
        raise ValueError(f"--query {query[0]} {query[1]} is outside the {H}x{W} input image")
    probs, maps = predict_inputs(model, x) if pretrained is not None else predict(model, meta, images)
    pred = probs.argmax(axis=1)
    titles = []
    for i in range(len(images)):
        t = f"pred {names[pred[i]]} ({probs[i, pred[i]]:.2f})"
        t += f"\ntrue {true_names[labels[i]]}" if labels is not None else ""
        titles.append(t)
        log(f"image {ids[i]}: " + t.replace("\n", ", "))
    if kind in ("query", "cls"):
        paths = []
        for i in range(len(images)):
            target = _numbered(out, ids[i], len(images) > 1)
            if kind == "query":
                paths.append(plot_query_attention(images[i], maps, config, query, target, i,
                                                  titles[i].replace("\n", ", ")))
            else:
                paths.append(plot_cls_attention(images[i], maps, config, target, i,
                                                titles[i].replace("\n", ", ")))
        return paths
    ro = rollout(maps, config, (H, W))
    if kind == "rollout":
        return [plot_rollout(images, ro, out, titles)]
    correct = None if labels is None else [names[p] == true_names[y] for p, y in zip(pred, labels)]
    return [plot_grid(images, ro.image, out, titles, correct)]
