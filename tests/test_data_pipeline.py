"""The batch pipeline on every backend: the train/validation split, channel statistics,
normalisation, random crop and flip (each output checked against the transform it claims to
be), and the Loader (every image once per epoch, seeded order that a resumed run repeats)."""
import tracemalloc

import numpy as np
import pytest

from minicvt import backend
from minicvt.backend import BackendRNG
from minicvt.data import (Loader, channel_stats, fingerprint, normalize, pipeline, random_crop, random_hflip,
                          split_indices)

host = backend.to_numpy


def _u8(*shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# -- split --------------------------------------------------------------------------------------

def test_split_is_deterministic_disjoint_and_complete():
    train, val = split_indices(50, 12, seed=3)
    assert len(train) == 38 and len(val) == 12
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(50))   # disjoint, all
    assert np.array_equal(train, np.sort(train)) and np.array_equal(val, np.sort(val))
    again = split_indices(50, 12, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, split_indices(50, 12, seed=4)[1])


def test_split_without_validation_keeps_everything():
    train, val = split_indices(7, 0)
    assert np.array_equal(train, np.arange(7)) and len(val) == 0


@pytest.mark.parametrize("val_size", [-1, 10, 11])
def test_split_rejects_bad_sizes(val_size):
    with pytest.raises(ValueError, match=r"validation size must be in \[0, 10\)"):
        split_indices(10, val_size)


# -- statistics and normalisation ---------------------------------------------------------------

def test_channel_stats_of_a_hand_made_set(xp):
    images = np.zeros((2, 3, 2, 2), np.uint8)
    images[:, 0] = 255                 # red always 1: mean 1, std 0
    images[0, 2] = 255                 # blue 1 in one image, 0 in the other: mean 1/2, std 1/2
    mean, std = channel_stats(backend.to_device(images))
    np.testing.assert_allclose(host(mean), [1.0, 0.0, 0.5], rtol=0, atol=1e-15)
    np.testing.assert_allclose(host(std), [0.0, 0.0, 0.5], rtol=0, atol=1e-15)


def test_channel_stats_match_a_direct_computation(xp):
    images = _u8(5, 3, 4, 6)
    mean, std = channel_stats(backend.to_device(images))
    for c in range(3):
        v = [float(p) / 255.0 for p in images[:, c].ravel()]
        m = sum(v) / len(v)
        s = (sum((p - m) ** 2 for p in v) / len(v)) ** 0.5
        assert abs(float(host(mean)[c]) - m) < 1e-12 and abs(float(host(std)[c]) - s) < 1e-12


def test_normalize_gives_hand_computed_values(xp):
    batch = np.array([0, 51, 255], np.uint8).reshape(1, 1, 1, 3).repeat(3, axis=1)   # (1, 3, 1, 3)
    mean = backend.to_device(np.array([0.5, 0.2, 0.0]), dtype=np.float32)
    std = backend.to_device(np.array([0.25, 1.0, 0.5]), dtype=np.float32)
    out = normalize(backend.to_device(batch), mean, std)
    assert out.dtype == np.float32 and backend.get_array_module(out) is xp
    # (x/255 - mean) / std with x/255 = 0, 0.2, 1
    want = [[-2.0, -1.2, 2.0], [-0.2, 0.0, 0.8], [0.0, 0.4, 2.0]]
    np.testing.assert_allclose(host(out)[0, :, 0], want, rtol=0, atol=1e-6)   # float32 rounding


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normalize_keeps_the_requested_dtype(xp, dtype):
    # float64 statistics (what channel_stats returns) must not promote a float32 batch
    images = backend.to_device(_u8(4, 3, 2, 5))
    mean, std = channel_stats(images)
    out = normalize(images, mean, std, dtype=dtype)
    assert out.dtype == dtype
    want = (_u8(4, 3, 2, 5) / 255.0 - host(mean)[:, None, None]) / host(std)[:, None, None]
    tol = 1e-5 if dtype == np.float32 else 1e-12        # float32 rounding of values up to ~2
    np.testing.assert_allclose(host(out), want, rtol=0, atol=tol)


def _float64_stats(images):
    """channel_stats as it was first written: a float64 copy of the whole set."""
    x = images.astype(np.float64) / 255.0
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))


def test_channel_stats_in_chunks_equal_the_float64_formula(xp, monkeypatch):
    images = _u8(300, 3, 16, 16, seed=4)
    images[:, 1] //= 8                                  # one dark channel: means far apart
    monkeypatch.setattr(pipeline, "STATS_CHUNK_BYTES", 8 * images[0].size * 7)   # 7 images a chunk
    mean, std = channel_stats(backend.to_device(images))
    assert backend.get_array_module(mean) is xp         # on the device the images are on
    want_mean, want_std = _float64_stats(images)
    np.testing.assert_allclose(host(mean), want_mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(host(std), want_std, rtol=1e-12, atol=0)


def test_channel_stats_of_indices_are_those_of_the_gathered_images(xp, monkeypatch):
    images = _u8(40, 3, 4, 5, seed=5)
    indices = np.array([7, 3, 3, 39, 0, 12, 25, 8, 8, 8, 31])          # unsorted, repeated
    monkeypatch.setattr(pipeline, "STATS_CHUNK_BYTES", 8 * images[0].size * 4)
    mean, std = channel_stats(backend.to_device(images), indices)
    want_mean, want_std = _float64_stats(images[indices])
    np.testing.assert_allclose(host(mean), want_mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(host(std), want_std, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="no images"):
        channel_stats(images, np.array([], dtype=np.int64))


def _memmap(tmp_path, images):
    np.save(tmp_path / "images.npy", images)
    return np.load(tmp_path / "images.npy", mmap_mode="r")


def _peak(f):
    tracemalloc.start()
    try:
        out = f()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_channel_stats_of_a_memmap_never_copy_the_set(tmp_path, monkeypatch):
    images = _u8(2000, 3, 16, 16, seed=6)                            # 1.5 MB; float64: 12.3 MB
    mapped = _memmap(tmp_path, images)
    monkeypatch.setattr(pipeline, "STATS_CHUNK_BYTES", 1 << 20)
    train = np.arange(0, 2000, 3)
    for indices in (None, train):
        (mean, std), peak = _peak(lambda: channel_stats(mapped, indices))
        # a chunk as int64 and its square: about 2 MB, far from a copy of the set in float64
        assert peak < 3 << 20, peak
        want = _float64_stats(images if indices is None else images[indices])
        np.testing.assert_allclose(mean, want[0], rtol=1e-12, atol=0)
        np.testing.assert_allclose(std, want[1], rtol=1e-12, atol=0)


def test_fingerprint_of_a_memmap_reads_only_its_sample(tmp_path):
    images, labels = _u8(5000, 3, 8, 8, seed=7), np.arange(5000) % 10
    mapped = _memmap(tmp_path, images)
    got, peak = _peak(lambda: fingerprint(mapped, labels))
    assert got == fingerprint(images, labels)          # a checkpoint's fingerprint still matches
    assert peak < 64 * images[0].nbytes + (1 << 17), peak        # the 64 sampled images, not 1 MB


def test_to_device_keeps_a_memmap_mapped_on_numpy(tmp_path):
    # the Loader moves the set with backend.to_device: on NumPy that is np.asarray, a view of
    # the map (the file's pages, shared with the other ranks), not a copy in this process
    mapped = _memmap(tmp_path, _u8(10, 3, 4, 4))
    previous = backend.get_backend()
    try:
        backend.set_backend("numpy")
        on_device = backend.to_device(mapped)
    finally:
        backend.set_backend(previous)
    assert np.shares_memory(on_device, mapped) and not on_device.flags.owndata
    assert on_device.base is mapped and not on_device.flags.writeable


# -- augmentation -------------------------------------------------------------------------------

def _crop_offsets(out, x, p):
    """For each output image, the offsets (dy, dx) in [0, 2p]^2 at which it equals a crop of
    the zero-padded input (host arrays (B, C, H, W))."""
    H, W = x.shape[2:]
    xpad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))                    # (B, C, H+2p, W+2p)
    return [[(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
             if np.array_equal(out[b], xpad[b, :, dy:dy + H, dx:dx + W])] for b in range(len(x))]


def test_random_crop_is_a_crop_of_the_padded_image(xp, rand):
    x = rand(12, 2, 5, 7, dtype=np.float32)
    out = random_crop(x, 2, BackendRNG(0))
    assert out.shape == x.shape and out.dtype == x.dtype and backend.get_array_module(out) is xp
    found = _crop_offsets(host(out), host(x), 2)
    # random values: exactly one offset in [0, 4]^2 reproduces each image
    assert all(len(f) == 1 for f in found), found
    assert len({f[0] for f in found}) > 3             # offsets are drawn per image


def test_random_crop_reaches_both_ends_of_the_offset_range(xp, rand):
    # padding 1: offsets 0, 1, 2 per axis; over 64 images each occurs (else p(miss) ~ 1e-11)
    x = rand(64, 1, 3, 3, dtype=np.float32)
    found = _crop_offsets(host(random_crop(x, 1, BackendRNG(0))), host(x), 1)
    assert all(len(f) == 1 for f in found)
    assert {f[0][0] for f in found} == {0, 1, 2} and {f[0][1] for f in found} == {0, 1, 2}


def test_random_crop_is_seeded_and_padding_zero_is_identity(xp, rand):
    x = rand(8, 3, 4, 4, dtype=np.float32)
    a = host(random_crop(x, 3, BackendRNG(5)))
    assert np.array_equal(a, host(random_crop(x, 3, BackendRNG(5))))
    assert not np.array_equal(a, host(random_crop(x, 3, BackendRNG(6))))
    assert np.array_equal(host(random_crop(x, 0, BackendRNG(5))), host(x))


def test_random_hflip_mirrors_about_half(xp, rand):
    x = rand(1000, 2, 2, 3, dtype=np.float32)
    out, xh = host(random_hflip(x, BackendRNG(0))), host(x)
    same = [np.array_equal(o, i) for o, i in zip(out, xh)]
    mirrored = [np.array_equal(o, i[..., ::-1]) for o, i in zip(out, xh)]
    assert all(s != m for s, m in zip(same, mirrored))   # each is exactly one of the two
    # Binomial(1000, 1/2) has std ~16: the bound is over 6 std wide
    assert 400 < sum(mirrored) < 600
    assert np.array_equal(out, host(random_hflip(x, BackendRNG(0))))
    assert not np.array_equal(out, host(random_hflip(x, BackendRNG(1))))


# -- Loader -------------------------------------------------------------------------------------

N, H, W = 10, 4, 5
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _loader(**kwargs):
    """A Loader over N random images whose labels are their own indices (unique ids)."""
    args = dict(batch_size=4, mean=MEAN, std=STD)
    args.update(kwargs)
    return Loader(_u8(N, 3, H, W, seed=1), np.arange(N), **args)


def _normalized(images):
    """(x/255 - mean) / std on the host in float64: what the Loader should give unaugmented."""
    return (images / 255.0 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]


def _epoch(loader, e):
    """All batches of epoch e joined on the host: x (n, 3, H, W), y (n,)."""
    batches = [(host(x), host(y)) for x, y in loader.epoch(e)]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


@pytest.mark.parametrize("drop_last, sizes", [(False, [4, 4, 2]), (True, [4, 4])])
def test_batches_have_the_right_shapes_and_dtypes(xp, drop_last, sizes):
    loader = _loader(drop_last=drop_last)
    assert len(loader) == len(sizes)
    for (x, y), b in zip(loader.epoch(0), sizes, strict=True):
        assert backend.get_array_module(x, y) is xp
        assert x.shape == (b, 3, H, W) and x.dtype == np.float32
        assert y.shape == (b,) and y.dtype == np.int64


def test_unshuffled_unaugmented_batches_are_the_normalized_images(xp):
    x, y = _epoch(_loader(), 0)
    assert np.array_equal(y, np.arange(N))
    np.testing.assert_allclose(x, _normalized(_u8(N, 3, H, W, seed=1)), rtol=0, atol=1e-5)  # float32


@pytest.mark.parametrize("drop_last", [False, True])
def test_shuffled_epoch_visits_every_image_once(xp, drop_last):
    loader = _loader(shuffle=True, drop_last=drop_last)
    x, y = _epoch(loader, 0)
    assert len(set(y.tolist())) == len(y) == (8 if drop_last else N)
    assert not np.array_equal(y, np.sort(y))
    # images travel with their labels
    np.testing.assert_allclose(x, _normalized(_u8(N, 3, H, W, seed=1))[y], rtol=0, atol=1e-5)


def test_order_depends_only_on_seed_and_epoch(xp):
    a, b = _loader(shuffle=True, augment=True, seed=3), _loader(shuffle=True, augment=True, seed=3)
    xa0, ya0 = _epoch(a, 0)
    xa1, ya1 = _epoch(a, 1)
    assert not np.array_equal(ya0, ya1)               # a new order every epoch
    # a second Loader (a resumed run) asked for epoch 1 first draws the same batches
    xb1, yb1 = _epoch(b, 1)
    assert np.array_equal(ya1, yb1) and np.array_equal(xa1, xb1)
    xb0, yb0 = _epoch(b, 0)
    assert np.array_equal(ya0, yb0) and np.array_equal(xa0, xb0)
    assert not np.array_equal(ya0, _epoch(_loader(shuffle=True, seed=4), 0)[1])


def test_augmented_images_are_crops_or_mirrored_crops(xp):
    # the order depends on (seed, epoch) only, so the unaugmented Loader gives each source image
    p = 2
    x, y = _epoch(_loader(shuffle=True, augment=True, crop_padding=p), 0)
    clean, y_clean = _epoch(_loader(shuffle=True, augment=False), 0)
    assert np.array_equal(y, y_clean)
    plain, mirrored = _crop_offsets(x, clean, p), _crop_offsets(x, clean[..., ::-1], p)
    for i in range(N):
        assert len(plain[i]) + len(mirrored[i]) == 1, f"image {i}: {plain[i]} {mirrored[i]}"
    assert any(mirrored) and not all(mirrored)          # both kinds occur in this seeded epoch
    assert any(f != [(p, p)] for f in plain + mirrored if f)    # and not every crop is central


@pytest.mark.parametrize("images, labels, batch_size, message", [
    (np.zeros((4, 3, 2, 2), np.float32), np.arange(4), 2, r"images must be uint8 \(N, C, H, W\)"),
    (np.zeros((4, 2, 2), np.uint8), np.arange(4), 2, r"images must be uint8 \(N, C, H, W\)"),
    (np.zeros((4, 3, 2, 2), np.uint8), np.arange(3), 2, r"4 images but labels of shape \(3,\)"),
    (np.zeros((4, 3, 2, 2), np.uint8), np.arange(4), 0, r"batch_size must be >= 1, got 0"),
])
def test_loader_rejects_bad_inputs(xp, images, labels, batch_size, message):
    with pytest.raises(ValueError, match=message):
        Loader(images, labels, batch_size, MEAN, STD)
