"""From uint8 images to training batches: normalise, augment, resize, iterate.

Shapes: images (N, 3, H, W) uint8, labels (N,) int64; a batch x (B, 3, H, W) float, y (B,).
The whole uint8 set is moved to the backend once; batches are gathered, converted and
augmented there, so on a GPU nothing but indices crosses from the host per step.
The order of epoch e depends only on (seed, e), and batch i's augmentation only on (seed, e, i):
a resumed run draws exactly the batches and augmentations the uninterrupted run would have.
"""
import numpy as np

from .. import backend
from ..backend import get_array_module


def channel_stats(images):
    """Per-channel mean and std (3,) of uint8 images (N, 3, H, W), on the 0..1 scale."""
    x = images.astype(np.float64) / 255.0
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))


def normalize(batch_u8, mean, std, dtype=np.float32):
    """uint8 (B, 3, H, W) -> float (x/255 - mean) / std, mean/std (3,) device arrays."""
    x = batch_u8.astype(dtype) * (1.0 / 255.0)
    # float64 statistics (as channel_stats gives) would otherwise promote the whole batch
    mean, std = mean.astype(dtype, copy=False), std.astype(dtype, copy=False)
    return (x - mean[:, None, None]) / std[:, None, None]


def random_crop(x, padding, rng):
    """Pad by zeros and crop back to (H, W) at a random offset per image (the CIFAR recipe).
    x (B, C, H, W) float on the backend; rng a BackendRNG. Zero padding is applied after
    normalisation, so padded pixels are the dataset mean, as torchvision's recipe gives."""
    if padding == 0:
        return x
    xp = get_array_module(x)
    B, C, H, W = x.shape
    xpad = xp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))   # (B, C, H+2p, W+2p)
    dy = rng.integers(0, 2 * padding + 1, (B,))
    dx = rng.integers(0, 2 * padding + 1, (B,))
    rows = dy[:, None] + xp.arange(H)                           # (B, H)
    cols = dx[:, None] + xp.arange(W)                           # (B, W)
    n = xp.arange(B)[:, None, None]                             # (B, 1, 1)
    # advanced indices on axes 0, 2, 3 around a slice: the result is (B, H, W, C)
    out = xpad[n, :, rows[:, :, None], cols[:, None, :]]
    return xp.ascontiguousarray(out.transpose(0, 3, 1, 2))     # (B, C, H, W)


def random_hflip(x, rng):
    """Mirror each image left-right with probability 1/2. x (B, C, H, W)."""
    xp = get_array_module(x)
    flip = rng.random((x.shape[0],), dtype=x.dtype) < 0.5       # (B,)
    return xp.where(flip[:, None, None, None], x[..., ::-1], x)


def resize_matrix(n_in, n_out):
    """(n_out, n_in) float64 weights of a linear resize along one axis, antialiased as Pillow's
    (and torch's antialias=True) bilinear filter: output pixel i is centred at (i + 1/2) s in
    input pixels, s = n_in / n_out, and averages its neighbours with a triangle of half-width
    max(s, 1), so that a downscale by s averages over s pixels instead of skipping them. Each
    row sums to 1 (near the border, over the pixels that exist)."""
    s = n_in / n_out
    half = max(s, 1.0)
    centre = (np.arange(n_out) + 0.5) * s                        # (n_out,) in input pixels
    offset = (np.arange(n_in) + 0.5)[None, :] - centre[:, None]  # (n_out, n_in)
    w = np.maximum(0.0, 1.0 - np.abs(offset) / half)
    return w / w.sum(axis=1, keepdims=True)


_RESIZE_MATRICES = {}          # (n_in, n_out, dtype, array module) -> R: made once, kept on the device


def resize(x, size):
    """Images x (B, C, H, W) on the backend -> (B, C, size, size) by the separable resize of
    resize_matrix: two matrix products, rows then columns, x' = R_H x R_Wᵀ per image and
    channel. Used by progressive resizing to train the first epochs on smaller images."""
    B, C, H, W = x.shape
    if (H, W) == (size, size):
        return x
    xp = get_array_module(x)

    def matrix(n):                # (size, n) on x's device, copied there once, not every batch
        key = (n, size, x.dtype.str, xp.__name__)
        if key not in _RESIZE_MATRICES:
            _RESIZE_MATRICES[key] = xp.asarray(resize_matrix(n, size).astype(x.dtype))
        return _RESIZE_MATRICES[key]
    return matrix(H) @ x @ matrix(W).T                                   # (B, C, size, size)


class Loader:
    """Batches of one split, on the active backend.

    images (N, 3, H, W) uint8 and labels (N,) on the host (images may be a memory map of the
    decoded cache); indices: the split's images among them (default all), gathered batch by
    batch, so a split is never copied whole on the host; mean/std (3,) on the 0..1 scale.
    `epoch(e)` yields (x (B, 3, H, W) dtype, y (B,) int64) for epoch e: shuffled by a
    permutation seeded with (seed, e) when shuffle, augmented (random crop with `crop_padding`,
    horizontal flip) when augment, batch i's draws from the stream keyed (seed, 'augment', e, i).
    The last partial batch is kept unless drop_last.
    `epoch(e, size=S)` resizes each batch to S×S after augmenting it at the images' own size
    (so the crop's padding shrinks with the image); `epoch(e, start=i)` begins at batch i, the
    same batches as the whole epoch's from there on.
    shard=(rank, size): data parallelism (docs/distributed.md). batch_size is the global batch;
    this rank yields its slice of b = batch_size / size images of every batch, and the crops
    and flips drawn for the whole batch at those images (BackendRNG.share). Needs drop_last
    (every batch full) and a batch_size that divides by size.
    """

    def __init__(self, images, labels, batch_size, mean, std, shuffle=False, augment=False,
                 crop_padding=4, drop_last=False, seed=0, dtype=np.float32, indices=None, shard=(0, 1)):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"Loader: images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"Loader: {images.shape[0]} images but labels of shape {labels.shape}")
        if batch_size < 1:
            raise ValueError(f"Loader: batch_size must be >= 1, got {batch_size}")
        rank, size = shard
        if size > 1 and (batch_size % size or not drop_last):
            raise ValueError(f"Loader: a batch of {batch_size} cannot be split into {size} equal full slices")
        index = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        if backend.get_backend() != "numpy":
            # on a GPU the split's images go to the device once, as one array (where it fits)
            images, labels, index = images[index], labels[index], np.arange(len(index))
        self.images = backend.to_device(images)        # on NumPy: no copy (a memory map stays one)
        self.labels = backend.to_device(np.asarray(labels, dtype=np.int64))
        self.index = index                             # (n,) host: the split's rows of images
        self.mean = backend.to_device(np.asarray(mean), dtype=dtype)
        self.std = backend.to_device(np.asarray(std), dtype=dtype)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.crop_padding, self.drop_last, self.seed, self.dtype = crop_padding, drop_last, seed, dtype
        self.rank, self.size = rank, size

    def __len__(self):
        n, b = len(self.index), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def epoch(self, e, size=None, start=0):
        """The batches of epoch e, from batch `start` on (a run resumed inside the epoch)."""
        n, B = len(self.index), self.batch_size
        b = B // self.size                              # this rank's slice of every batch
        order = np.random.default_rng([self.seed, e]).permutation(n) if self.shuffle else np.arange(n)
        rng = backend.BackendRNG(self.seed, "augment").share(self.rank, self.size)
        for i in range(start, len(self)):
            rng.at(e, i)                            # the crops and flips of batch i depend on (seed, e, i)
            rows = order[i * B:(i + 1) * B][self.rank * b:(self.rank + 1) * b]
            idx = backend.to_device(self.index[rows])
            x = normalize(self.images[idx], self.mean, self.std, self.dtype)
            if self.augment:
                x = random_hflip(random_crop(x, self.crop_padding, rng), rng)
            if size is not None:
                x = resize(x, size)
            yield x, self.labels[idx]
