"""From a user's pictures to a model's inputs, and from its logits to named classes: what
`model.predict(images)` and `minicvt predict` do.

A loaded model knows how its inputs were prepared, `model.preprocessing`:

    {"size": S, "crop": "square" or "shortest_edge", "crop_pct": c, "mean": [3], "std": [3]}

- a checkpoint of `minicvt train` ("square"): the picture's central square, resized to S x S
  (S the run's image size) with Pillow's bicubic filter, then normalised with the mean and std
  of the run's training images (`meta["normalization"]`);
- a Hugging Face folder ("shortest_edge"): as its image processor (ConvNext's, which CvT
  uses): below 384 pixels the shorter side resized to S / crop_pct and the central S x S
  cropped, from 384 on resized to S x S; normalised with the processor's mean and std.

Pictures are decoded to 8-bit RGB by data.decode_image (16-bit, palette, CMYK and alpha
included, docs/files.md); uint8 arrays (N, 3, H, W) of any size are taken as such pictures.
"""
import os

import numpy as np

from .. import backend, data, nn

BATCH = 32                          # pictures per forward in predict


def run_preprocessing(config, normalization):
    """The preprocessing of a `minicvt train` run: its image size, the central square, and its
    normalisation ({"mean": [3], "std": [3]} on the 0..1 scale)."""
    return {"size": config.image_size, "crop": "square", "crop_pct": 1.0,
            "mean": list(normalization["mean"]), "std": list(normalization["std"])}


def fit(im, preprocessing):
    """A Pillow RGB image -> S x S, cropped and resized as `preprocessing` says."""
    from PIL import Image          # imported where it is used: a slow import

    S, (w, h) = preprocessing["size"], im.size
    if preprocessing.get("crop", "shortest_edge") == "square":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return im.crop((left, top, left + s, top + s)).resize((S, S), Image.BICUBIC)
    if S >= 384:
        return im.resize((S, S), Image.BICUBIC)
    edge = int(S / preprocessing["crop_pct"])
    w, h = (edge, int(edge * h / w)) if w <= h else (int(edge * w / h), edge)
    left, top = (w - S) // 2, (h - S) // 2                      # as transformers' center_crop
    return im.resize((w, h), Image.BICUBIC).crop((left, top, left + S, top + S))


def prepare_images(images, preprocessing):
    """(shown uint8 (N, 3, S, S), x float32 (N, 3, S, S)) for image files (a list of paths) or
    uint8 pictures (N, 3, H, W): each cropped and resized by `fit`, then scaled to 0..1 and
    normalised with the mean and std. `shown` is the crop, for drawing."""
    from PIL import Image

    if isinstance(images, np.ndarray) or hasattr(images, "__cuda_array_interface__"):
        pixels = backend.to_numpy(images)
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"images: give image files, or uint8 pictures (N, 3, H, W); got {pixels.dtype} "
                             f"{pixels.shape}" + ("; pictures laid out (N, H, W, 3) need "
                                                  "images.transpose(0, 3, 1, 2)" if pixels.shape[-1:] == (3,) else ""))
        shown = np.stack([np.asarray(fit(Image.fromarray(np.ascontiguousarray(p.transpose(1, 2, 0))),
                                         preprocessing)).transpose(2, 0, 1) for p in pixels])
    else:
        if isinstance(images, (str, bytes)) or not hasattr(images, "__iter__"):
            images = [images]                     # one path
        images = list(images)
        other = [im for im in images if not isinstance(im, (str, bytes, os.PathLike))]
        if other:
            hint = ("; several pictures as arrays go in one array: np.stack(pictures)"
                    if hasattr(other[0], "shape") else "; save it to a file, or give np.asarray(picture) "
                    "transposed to (3, H, W) in an array (N, 3, H, W)")
            raise ValueError(f"images: give image files (paths), or uint8 pictures (N, 3, H, W) as one "
                             f"array; got a list holding a {type(other[0]).__name__}{hint}")
        shown = data.load_image_files(images, lambda im: fit(im, preprocessing))
    return shown, data.normalize(shown, np.asarray(preprocessing["mean"]), np.asarray(preprocessing["std"]))


def predict(model, images, top=5):
    """The `top` most probable classes of each picture: one list per picture of (class name,
    probability), most probable first (ties in class order). The model runs in eval mode,
    without keeping anything for a backward pass, and is left in the mode it was in."""
    if getattr(model, "preprocessing", None) is None:
        raise ValueError(f"{model.config.name}: this model does not know how its inputs were prepared (a "
                         f"new model, or a models.save file); load a checkpoint of `minicvt train` or a "
                         f"Hugging Face folder with minicvt.load, or call model(x) on normalised images")
    if top < 1:
        raise ValueError(f"top={top}: show at least one class")
    _, x = prepare_images(images, model.preprocessing)
    dtype, was_training = model.head.weight.data.dtype, model.training
    model.eval()
    try:
        with nn.no_grad():          # in batches: a folder of photos must not take a forward at once
            logits = np.concatenate([backend.to_numpy(model.forward(backend.to_device(x[i:i + BATCH], dtype)))
                                     for i in range(0, len(x), BATCH)]).astype(np.float64)    # (N, K)
    finally:
        model.train(was_training)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))             # a stable softmax
    probs = e / e.sum(axis=1, keepdims=True)
    classes = model.classes or [str(k) for k in range(probs.shape[1])]
    return [[(classes[k], float(p[k])) for k in np.argsort(-p, kind="stable")[:top]] for p in probs]
