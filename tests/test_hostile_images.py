"""Images, image folders and their tar archives, read defensively (docs/files.md).

- Every legitimate mode gives the pixels of its 8-bit RGB equivalent: 16-bit, 1-bit, greyscale,
  palette (with transparency), alpha, CMYK, animated GIF, EXIF-rotated JPEG; through
  `minicvt predict` a 16-bit PNG gets the same answer as its 8-bit original.
- Every refusal is one DataError (a BadFileError) of one line naming the file: bombs (lying
  image headers, tar members and tar headers that declare gigabytes), truncated and damaged
  images and archives, a damaged decoded cache (rebuilt instead, never used).
- Fuzz tests (hypothesis, fixed seed; MINICVT_FUZZ_EXAMPLES scales them): truncation and bit flips
  of PNG, JPEG, .tar, .tar.gz, .tar.xz and the cache files, lying PNG dimensions, tar member names
  and types; each example is refused in one line or read right, with bounded memory. A subprocess
  under RLIMIT_AS holds the bombs to a memory ceiling.
"""
import gzip
import io
import json
import lzma
import os
import re
import struct
import subprocess
import sys
import tarfile
import textwrap
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from PIL import Image

from minicvt import cli
from minicvt.data import DataError, decode_image, folders, load_dataset, load_image_files, load_image_folder
from minicvt.errors import BadFileError

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "cvt-cifar-s.npz"
FUZZ = dict(derandomize=True, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def examples(n):
    """The suite's number of examples n, or MINICVT_FUZZ_EXAMPLES for a longer run."""
    return int(os.environ.get("MINICVT_FUZZ_EXAMPLES", "0")) or n


# -- pictures and files built by hand -----------------------------------------------------------

H, W = 12, 16
_rng = np.random.default_rng(0)
# 64 colours (each channel 0, 85, 170 or 255): a palette holds it exactly
PIC = (_rng.integers(0, 4, (H, W, 3)) * 85).astype(np.uint8)                  # (H, W, 3)
GREY = np.asarray(Image.fromarray(PIC).convert("L"))                          # (H, W)
_yy, _xx = np.mgrid[0:24, 0:32]
SMOOTH = np.stack([_xx * 6, _yy * 8, 255 - _xx * 4], -1).astype(np.uint8)    # for JPEG: lossy on noise


def save(im, fmt, **kw):
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(w, h, bit_depth, colour_type, raw):
    """A PNG written by hand: any IHDR (a lying one too, with a valid CRC) and the rows `raw`."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def png16(a):
    """16-bit PNG of a (H, W, C) uint16 array (Pillow writes 16 bits for greyscale only)."""
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[a.shape[2]]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in a)       # filter 0 per row
    return png(a.shape[1], a.shape[0], 16, colour_type, raw)


def white_composite(rgb, alpha):
    """rgb (H, W, 3) uint8 over white with alpha (H, W) uint8, as 8-bit RGB."""
    a = alpha[..., None].astype(float) / 255
    return np.round(rgb * a + 255 * (1 - a)).astype(np.uint8)


def _palette_with_transparency():
    p = Image.fromarray(PIC).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    index = np.asarray(p)
    t = int(index[0, 0])
    p.info["transparency"] = t
    expected = np.asarray(p.convert("RGB")).copy()
    expected[index == t] = 255                                              # transparent -> white
    return save(p, "PNG", transparency=t), expected


def _rgba(alpha):
    return save(Image.fromarray(np.dstack([PIC, alpha])), "PNG"), white_composite(PIC, alpha)


def _exif_jpeg(orientation, stored_as):
    exif = Image.Exif()
    exif[0x0112] = orientation                     # a phone photo: pixels stored sideways + a tag
    return save(Image.fromarray(SMOOTH).transpose(stored_as), "JPEG", quality=95, exif=exif.tobytes())


def _grey(a):
    return np.dstack([a] * 3)


ALPHA = _rng.integers(0, 256, (H, W)).astype(np.uint8)
BIT = GREY > 100
# name -> () -> (file bytes, expected (H, W, 3) uint8, tolerance in levels)
MODES = {
    "RGB PNG": lambda: (save(Image.fromarray(PIC), "PNG"), PIC, 0),
    "greyscale L": lambda: (save(Image.fromarray(GREY), "PNG"), _grey(GREY), 0),
    "16-bit greyscale PNG (I;16)": lambda: (save(Image.fromarray(GREY.astype(np.uint16) * 257), "PNG"),
                                            _grey(GREY), 0),
    "16-bit greyscale PGM (I)": lambda: (save(Image.fromarray(GREY.astype(np.uint16) * 257), "PPM"),
                                         _grey(GREY), 0),
    "16-bit RGB PNG": lambda: (png16(PIC.astype(np.uint16) * 257), PIC, 0),
    "16-bit RGBA PNG": lambda: (png16(np.dstack([PIC, ALPHA]).astype(np.uint16) * 257),
                                white_composite(PIC, ALPHA), 1),
    "16-bit greyscale+alpha PNG": lambda: (png16(np.dstack([GREY, ALPHA]).astype(np.uint16) * 257),
                                           white_composite(_grey(GREY), ALPHA), 1),
    "32-bit integer TIFF within 16 bits (I)": lambda: (save(Image.fromarray(GREY.astype(np.int32) * 257), "TIFF"),
                                                       _grey(GREY), 0),
    "1-bit": lambda: (save(Image.fromarray(BIT), "PNG"), _grey(BIT.astype(np.uint8) * 255), 0),
    "palette P": lambda: (save(Image.fromarray(PIC).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), PIC, 0),
    "palette P with a transparent colour": lambda: (*_palette_with_transparency(), 0),
    "RGBA, opaque": lambda: (*_rgba(np.full((H, W), 255, np.uint8)), 0),
    "RGBA, varying alpha": lambda: (*_rgba(ALPHA), 1),
    "greyscale+alpha LA": lambda: (save(Image.fromarray(np.dstack([GREY, ALPHA]), "LA"), "PNG"),
                                   white_composite(_grey(GREY), ALPHA), 1),
    "CMYK TIFF": lambda: (save(Image.fromarray(PIC).convert("CMYK"), "TIFF"), PIC, 0),
    "CMYK JPEG": lambda: (save(Image.fromarray(SMOOTH).convert("CMYK"), "JPEG", quality=95), SMOOTH, 8),
    "RGB JPEG": lambda: (save(Image.fromarray(SMOOTH), "JPEG", quality=95), SMOOTH, 8),
    "animated GIF (first frame)": lambda: (save(Image.fromarray(PIC), "GIF", save_all=True,
                                                append_images=[Image.fromarray(255 - PIC)]), PIC, 0),
    "JPEG with EXIF orientation 6 (phone portrait)": lambda: (_exif_jpeg(6, Image.Transpose.ROTATE_90), SMOOTH, 8),
    "JPEG with EXIF orientation 3": lambda: (_exif_jpeg(3, Image.Transpose.ROTATE_180), SMOOTH, 8),
    "JPEG with EXIF orientation 8": lambda: (_exif_jpeg(8, Image.Transpose.ROTATE_270), SMOOTH, 8),
    "BMP": lambda: (save(Image.fromarray(PIC), "BMP"), PIC, 0),
}


@pytest.mark.parametrize("name", MODES)
def test_every_mode_gives_its_8_bit_rgb_equivalent(name):
    data, expected, tol = MODES[name]()
    got = np.asarray(decode_image(data, "x"))
    assert got.dtype == np.uint8 and got.shape == expected.shape, (got.shape, expected.shape)
    assert np.abs(got.astype(int) - expected).max() <= tol, name


def test_16_bit_is_scaled_not_clipped():
    # a full 16-bit ramp: v -> round(v * 255 / 65535); convert('RGB') would give 255 above 255
    ramp = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)
    got = np.asarray(decode_image(save(Image.fromarray(ramp), "PNG"), "ramp.png"))[..., 0]
    np.testing.assert_array_equal(got, np.arange(256).reshape(16, 16))


def test_predict_gives_the_same_answer_for_every_equivalent_file(tmp_path, capsys):
    names = ["RGB PNG", "16-bit RGB PNG", "palette P", "RGBA, opaque", "CMYK TIFF"]
    paths = []
    for i, name in enumerate(names):
        paths.append(tmp_path / f"{i}.img")
        paths[-1].write_bytes(MODES[name]()[0])
    grey = ["greyscale L", "16-bit greyscale PNG (I;16)", "16-bit greyscale PGM (I)"]
    for i, name in enumerate(grey):
        paths.append(tmp_path / f"g{i}.img")
        paths[-1].write_bytes(MODES[name]()[0])
    assert cli.main(["predict", "--checkpoint", str(CHECKPOINT), "--top", "10",
                     "--images", *map(str, paths)]) == 0
    blocks = capsys.readouterr().out.split(".img:\n")[1:]          # each: 10 lines 'class  prob'
    blocks = [b.split(str(tmp_path))[0].strip() for b in blocks]
    assert len(blocks) == len(paths) and len(blocks[0].splitlines()) == 10
    assert blocks[:len(names)] == [blocks[0]] * len(names), blocks
    assert blocks[len(names):] == [blocks[len(names)]] * len(grey), blocks


# -- refusals of single images ------------------------------------------------------------------

def one_line(e, *words):
    message = str(e.value if hasattr(e, "value") else e)
    assert isinstance(e.value if hasattr(e, "value") else e, BadFileError)
    assert "\n" not in message and "\r" not in message, message
    for w in words:
        assert str(w) in message, (w, message)
    return message


def _sof_bomb():
    """A real JPEG whose frame header says 65000x65000."""
    data = bytearray(save(Image.fromarray(SMOOTH), "JPEG"))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


def _gif_bomb():
    data = bytearray(save(Image.fromarray(PIC), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)             # the logical screen
    return bytes(data)


def _tiff_float():
    return save(Image.fromarray(GREY.astype(np.float32) / 255), "TIFF")


REFUSED = {
    # name -> (bytes, words in the message)
    "PNG declaring 100000x100000": (png(100000, 100000, 8, 2, b"\x00" * 49), ["100000x100000 pixels", "89478485"]),
    "PNG declaring 10000x9000 (Pillow only warns)": (png(10000, 9000, 8, 2, b"\x00" * 49), ["10000x9000 pixels"]),
    "JPEG declaring 65000x65000": (_sof_bomb(), ["65000x65000 pixels"]),
    "GIF declaring 65535x65535": (_gif_bomb(), ["65535x65535 pixels"]),
    "PNG of 0x5 pixels": (png(0, 5, 8, 2, b""), ["not a readable image"]),
    "truncated PNG": (save(Image.fromarray(PIC), "PNG")[:-30], ["not a readable image"]),
    "truncated JPEG": (save(Image.fromarray(SMOOTH), "JPEG")[:-20], ["not a readable image", "truncated"]),
    "PNG with a flipped bit in its image data": (None, ["not a readable image", "checksum"]),
    "text file": (b"hello, I am not a picture\n", ["not a readable image", "cannot identify"]),
    "empty file": (b"", ["not a readable image"]),
    "EPS named .png (Pillow would start Ghostscript)": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
                                                       ["not a readable image", "cannot identify"]),
    "floating-point TIFF (F)": (_tiff_float(), ["floating-point greyscale", "white level"]),
    "32-bit integer TIFF beyond 16 bits": (save(Image.fromarray(GREY.astype(np.int32) * 70000), "TIFF"),
                                           ["32-bit integer greyscale"]),
}


def _flipped_png():
    data = bytearray(save(Image.fromarray(PIC), "PNG"))
    i = data.index(b"IDAT") + 12
    data[i] ^= 0x04
    return bytes(data)


@pytest.mark.parametrize("name", REFUSED)
def test_bad_image_is_refused_in_one_line_naming_it(name, tmp_path):
    data, words = REFUSED[name]
    data = _flipped_png() if data is None else data
    path = tmp_path / "pic ture.png"
    path.write_bytes(data)
    with pytest.raises(DataError) as e:
        decode_image(path, f"--images {path}")
    one_line(e, f"--images {path}", *words)
    with pytest.raises(DataError) as e:                            # from bytes, as from a tar
        decode_image(data, "train.tar: train/cat/1.png")
    one_line(e, "train.tar: train/cat/1.png", *words)


def test_images_that_are_not_files(tmp_path):
    with pytest.raises(DataError) as e:
        load_image_files([tmp_path / "nowhere.png"], lambda im: im)
    one_line(e, "--images", "nowhere.png", "does not exist")
    with pytest.raises(DataError) as e:
        load_image_files([tmp_path], lambda im: im)
    one_line(e, "--images", str(tmp_path), "is not a file")


def test_a_sliver_is_refused_before_it_is_resized(tmp_path):
    (tmp_path / "sliver.png").write_bytes(save(Image.new("RGB", (1, 500)), "PNG"))
    with pytest.raises(DataError) as e:
        load_image_files([tmp_path / "sliver.png"], lambda im: pytest.fail("resized"))
    one_line(e, "sliver.png", "1x500", "elongated")


def test_a_name_with_a_newline_stays_one_line():
    with pytest.raises(DataError) as e:
        decode_image(b"junk", "train.tar: train/cat/evil\nname.png")
    one_line(e, r"evil\nname.png")


def _cli_error(capsys, argv, *words):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in out + err, (code, err)
    assert len(err.splitlines()) == 1 and err.startswith(f"minicvt {argv[0]}: error: "), err
    for w in words:
        assert str(w) in err, (w, err)


@pytest.mark.parametrize("name", ["PNG declaring 100000x100000", "truncated JPEG", "floating-point TIFF (F)"])
def test_predict_refuses_a_bad_image_in_one_line(name, tmp_path, capsys):
    path = tmp_path / "big.png"
    path.write_bytes(REFUSED[name][0])
    _cli_error(capsys, ["predict", "--checkpoint", CHECKPOINT, "--images", path],
               f"--images {path}", *REFUSED[name][1])


# -- tar archives ---------------------------------------------------------------------------------

def _member(name, data=b"", kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, len(data) if kind == tarfile.REGTYPE else 0
    return info, io.BytesIO(data) if kind == tarfile.REGTYPE else None


CLEAN = [(f"train/{c}/{i}.png", (PIC if (i + (c == 'cat')) % 2 else 255 - PIC)) for c in ("cat", "dog")
         for i in range(2)]


def tar_bytes(extra=(), fmt=tarfile.GNU_FORMAT):
    """A tar of the CLEAN image folder (PNGs), then the `extra` (TarInfo, file) members."""
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=fmt) as tar:
        for name, pixels in CLEAN:
            tar.addfile(*_member(name, save(Image.fromarray(pixels), "PNG")))
        for info, f in extra:
            tar.addfile(info, f)
    return b.getvalue()


def expected_clean():
    images = np.stack([p.transpose(2, 0, 1) for _, p in sorted(CLEAN)])
    return images, np.array([0, 0, 1, 1]), ["cat", "dog"]


def assert_clean(result):
    images, labels, classes = expected_clean()
    np.testing.assert_array_equal(result[0], images)
    np.testing.assert_array_equal(result[1], labels)
    assert result[2] == classes


COMPRESS = {".tar": lambda b: b, ".tar.gz": gzip.compress, ".tar.xz": lzma.compress}


@pytest.mark.parametrize("suffix", COMPRESS)
def test_the_clean_archive_reads_right(tmp_path, suffix):
    path = tmp_path / f"train{suffix}"
    path.write_bytes(COMPRESS[suffix](tar_bytes()))
    assert_clean(load_image_folder(path, use_cache=False))


_AUDIT = {"paths": None}


def _audit(event, args):
    if event == "open" and _AUDIT["paths"] is not None and args and isinstance(args[0], (str, bytes, Path)):
        _AUDIT["paths"].append(os.fsdecode(args[0]))


sys.addaudithook(_audit)       # records the files opened while a test sets _AUDIT['paths']


def test_links_and_devices_are_ignored_and_nothing_outside_is_opened(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(save(Image.fromarray(np.zeros((3, 3, 3), np.uint8)), "PNG"))   # another size
    extra = [_member("train/cat/sym.png", kind=tarfile.SYMTYPE, linkname=str(outside)),
             _member("train/cat/rel.png", kind=tarfile.SYMTYPE, linkname="../../outside.png"),
             _member("train/dog/hard.png", kind=tarfile.LNKTYPE, linkname=str(outside)),
             _member("train/dog/hard2.png", kind=tarfile.LNKTYPE, linkname="train/cat/0.png"),
             _member("train/dog/zero.png", kind=tarfile.CHRTYPE, linkname=""),
             _member("train/dog/fifo.png", kind=tarfile.FIFOTYPE),
             _member("train/dog/dir.png", kind=tarfile.DIRTYPE)]
    extra[4][0].devmajor, extra[4][0].devminor = 1, 5              # /dev/zero
    path = tmp_path / "box" / "train.tar"
    path.parent.mkdir()
    path.write_bytes(tar_bytes(extra))
    _AUDIT["paths"] = []
    try:
        result = load_image_folder(path, use_cache=False)
    finally:
        opened, _AUDIT["paths"] = _AUDIT["paths"], None
    assert_clean(result)                                   # none of them counted
    assert str(outside) not in opened and "/dev/zero" not in opened
    assert {p for p in opened if str(tmp_path) in p} == {str(path)}, opened
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["box", "outside.png", "train.tar"]


def _sparse_header(name, real_size):
    """A GNU sparse member ('S') of `real_size` bytes that stores none: tarfile reads it back
    as real_size zeros. 512 bytes that declare gigabytes."""
    info = tarfile.TarInfo(name)
    buf = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    buf[156:157] = tarfile.GNUTYPE_SPARSE
    buf[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf[:512])
    return bytes(buf)


def _zeros_targz(kind, size):
    """A .tar.gz whose first member (or pax / long-name header) holds `size` zero bytes: about
    size / 1000 bytes on disk (repeated deflate blocks of 1 MiB of zeros), a complete stream with
    its CRC. `size` a multiple of 1 MiB."""
    info = tarfile.TarInfo("train/cat/zeros.png")
    info.type, info.size = kind, size
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    rest = tar_bytes()
    raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [raw.compress(header) + raw.flush(zlib.Z_FULL_FLUSH)]
    zeros = zlib.compressobj(9, zlib.DEFLATED, -15)
    mib = bytes(1 << 20)
    parts += [zeros.compress(mib) + zeros.flush(zlib.Z_FULL_FLUSH)] * (size >> 20)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts.append(tail.compress(rest) + tail.flush())
    crc = zlib.crc32(header)
    for _ in range(size >> 20):
        crc = zlib.crc32(mib, crc)
    crc = zlib.crc32(rest, crc)
    total = len(header) + size + len(rest)
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"".join(parts)
            + struct.pack("<II", crc, total & 0xFFFFFFFF))


BOMB_SIZE = 1 << 30


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """{name: (path, words of the refusal)}: archives that declare or inflate to gigabytes."""
    d = tmp_path_factory.mktemp("bombs")
    files = {
        "sparse member of 4 GiB (.tar)": ("sparse.tar", _sparse_header("train/cat/s.png", 4 << 30) + tar_bytes(),
                                          ["member 'train/cat/s.png' declares 4294967296 bytes"]),
        "sparse member of 4 GiB (.tar.gz)": ("sparse.tar.gz", gzip.compress(_sparse_header("train/cat/s.png", 4 << 30)
                                                                            + tar_bytes()), ["declares 4294967296"]),
        "member of 1 GiB of zeros (.tar.gz, 1 MB)": ("zeros.tar.gz", _zeros_targz(tarfile.REGTYPE, BOMB_SIZE),
                                                     ["member 'train/cat/zeros.png' declares 1073741824"]),
        "pax header of 1 GiB (.tar.gz)": ("pax.tar.gz", _zeros_targz(tarfile.XHDTYPE, BOMB_SIZE),
                                          ["a header near byte", "declares 1073741824"]),
        "GNU long name of 1 GiB (.tar.gz)": ("longname.tar.gz", _zeros_targz(tarfile.GNUTYPE_LONGNAME, BOMB_SIZE),
                                             ["declares 1073741824"]),
        "tar header alone declaring 1 GiB (.tar)": ("header.tar", _pax_header_only(BOMB_SIZE),
                                                    ["declares 1073741824"]),
    }
    out = {}
    for name, (file, data, words) in files.items():
        (d / file).write_bytes(data)
        out[name] = (d / file, words)
    return out


def _pax_header_only(size):
    """A plain .tar of one pax header that declares `size` bytes and holds a few: tarfile
    would ask the file for all of them at once (a buffer of that size)."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, size
    return info.tobuf(format=tarfile.USTAR_FORMAT) + bytes(1024)


BOMBS = ["sparse member of 4 GiB (.tar)", "sparse member of 4 GiB (.tar.gz)",
         "member of 1 GiB of zeros (.tar.gz, 1 MB)", "pax header of 1 GiB (.tar.gz)",
         "GNU long name of 1 GiB (.tar.gz)", "tar header alone declaring 1 GiB (.tar)"]


@pytest.mark.parametrize("name", BOMBS)
def test_tar_bombs_are_refused_before_they_allocate(bombs, name):
    path, words = bombs[name]
    assert path.stat().st_size < 2 << 20                       # at most about a megabyte on disk
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as e:
            load_dataset(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_line(e, path, *words)
    assert peak < 32 << 20, peak


def test_tar_images_adding_up_to_more_than_half_the_memory_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "train.tar"
    path.write_bytes(tar_bytes())
    monkeypatch.setattr(folders, "memory_bytes", lambda: 2000)
    with pytest.raises(DataError) as e:
        load_image_folder(path, use_cache=False)
    one_line(e, path, "add up to more than", "half this machine's memory")


def test_decoded_images_taking_more_than_half_the_memory_are_refused(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        (root / c / "1.png").write_bytes(save(Image.fromarray(PIC), "PNG"))
    monkeypatch.setattr(folders, "memory_bytes", lambda: 2 * 2 * 3 * H * W - 2)
    with pytest.raises(DataError) as e:
        load_image_folder(root, use_cache=False)
    one_line(e, root, f"2 images of {W}x{H}", "resize them first")


def test_a_folder_file_larger_than_an_image_may_be_is_refused_unread(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "1.png").write_bytes(save(Image.fromarray(PIC), "PNG"))
    monkeypatch.setattr(folders, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(DataError) as e:
        load_image_folder(root, use_cache=False)
    one_line(e, "cat/1.png", "bytes is more than the 100")


def test_a_fifo_named_png_in_a_folder_is_ignored(tmp_path):
    root = tmp_path / "data"
    for name, pixels in CLEAN:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(save(Image.fromarray(pixels), "PNG"))
    os.mkfifo(root / "train" / "cat" / "fifo.png")       # reading it would block forever
    assert_clean(load_image_folder(root / "train", use_cache=False))


def test_tar_cut_at_a_member_boundary_is_refused(tmp_path):
    data = tar_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1].offset               # the last member's header
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:last])                        # tarfile alone reads 3 images, no word
    with pytest.raises(DataError) as e:
        load_image_folder(path, use_cache=False)
    one_line(e, path, "cut short after member 'train/dog/0.png'")


def test_tar_with_a_damaged_header_in_the_middle_is_refused(tmp_path):
    data = bytearray(tar_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        third = tar.getmembers()[2].offset
    data[third + 10] ^= 1                               # its name: the header checksum fails
    path = tmp_path / "flip.tar"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        load_image_folder(path, use_cache=False)
    one_line(e, path, "damaged header after member 'train/cat/1.png'")


def test_train_refuses_a_bad_tar_in_one_line(bombs, tmp_path, capsys):
    path, words = bombs["member of 1 GiB of zeros (.tar.gz, 1 MB)"]
    _cli_error(capsys, ["train", "--data", path, "--out", tmp_path / "out", "--quiet", "--backend", "numpy",
                        "--epochs", "1"], path, *words)
    cut = tmp_path / "cut.tar.xz"
    cut.write_bytes(lzma.compress(tar_bytes())[:-30])
    _cli_error(capsys, ["train", "--data", cut, "--out", tmp_path / "out", "--quiet", "--backend", "numpy",
                        "--epochs", "1"], cut, "neither a folder nor a readable tar archive")
    assert not (tmp_path / "out").exists()


# -- the bombs under a memory ceiling -----------------------------------------------------------

def test_bombs_stay_under_a_memory_ceiling(bombs, tmp_path):
    """In a subprocess whose address space is capped at what it had after its imports plus
    400 MB, each bomb is refused in one line (none needs more than a few MB)."""
    images = {name: tmp_path / f"{i}.img" for i, name in enumerate(REFUSED) if "declaring" in name}
    for name, path in images.items():
        path.write_bytes(REFUSED[name][0])
    files = [str(p) for p, _ in bombs.values()] + [str(p) for p in images.values()]
    script = textwrap.dedent(f"""
        import resource, sys
        from minicvt.data import DataError, decode_image, load_dataset
        from minicvt.errors import BadFileError
        vm = int([l for l in open('/proc/self/status') if l.startswith('VmSize')][0].split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (400 << 20),) * 2)
        for f in {files!r}:
            try:
                (load_dataset if '.tar' in f else lambda f: decode_image(f, f))(f)
                print('READ', f)
            except BadFileError as e:
                print('REFUSED', str(e).replace('\\n', '<NEWLINE>'))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", MINICVT_CACHE=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == len(files) and all(l.startswith("REFUSED") for l in lines), run.stdout
    assert all(f in l for f, l in zip(files, lines)) and "<NEWLINE>" not in run.stdout


# -- the decoded cache --------------------------------------------------------------------------

def _cached_folder(tmp_path):
    """(tar path, cache dir, {cache file name: its good bytes}) after one load wrote the cache."""
    path = tmp_path / "train.tar"
    path.write_bytes(tar_bytes())
    cache = tmp_path / "cache"
    assert_clean(load_image_folder(path, cache_dir=cache))
    files = {p.name.split(".", 2)[-1]: p for p in (cache / "folders").rglob("train.tar.*")}
    assert sorted(files) == ["images.npy", "labels.npy", "meta.json"]
    return path, cache, {k: (p, p.read_bytes()) for k, p in files.items()}


def _npy_with_shape(good, shape):
    """The .npy bytes `good` with a header that declares `shape` (data unchanged)."""
    f = io.BytesIO(good)
    np.lib.format.read_magic(f)
    _, _, dtype = np.lib.format.read_array_header_1_0(f)
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(dtype),
                                               "fortran_order": False, "shape": shape})
    return out.getvalue() + good[f.tell():]


def _load_counting_decodes(path, cache, monkeypatch):
    calls = []
    real = folders.decode_image
    monkeypatch.setattr(folders, "decode_image", lambda *a: calls.append(1) or real(*a))
    result = load_image_folder(path, cache_dir=cache)
    monkeypatch.setattr(folders, "decode_image", real)
    return result, len(calls)


CACHE_DAMAGE = {
    "images.npy truncated (a killed run)": ("images.npy", lambda b: b[: len(b) // 2]),
    "images.npy empty (a full disk)": ("images.npy", lambda b: b""),
    "images.npy declaring 10^12 images": ("images.npy", lambda b: _npy_with_shape(b, (10 ** 12, 3, H, W))),
    "images.npy with one pixel changed": ("images.npy", lambda b: b[:-1] + bytes([b[-1] ^ 1])),
    "images.npy not an array": ("images.npy", lambda b: b"not an npy file"),
    "labels.npy truncated": ("labels.npy", lambda b: b[:-3]),
    "meta.json truncated": ("meta.json", lambda b: b[:20]),
    "meta.json a list": ("meta.json", lambda b: b"[1, 2]"),
    "meta.json with classes of the wrong type": ("meta.json", lambda b: json.dumps(
        dict(json.loads(b), classes=[1, 2])).encode()),
    "meta.json with a lying shape": ("meta.json", lambda b: json.dumps(
        dict(json.loads(b), shape=[10 ** 12, 3, H, W])).encode()),
    "meta.json of an older version": ("meta.json", lambda b: json.dumps(
        {k: v for k, v in json.loads(b).items() if k != "version"}).encode()),
    "meta.json not UTF-8": ("meta.json", lambda b: b"\xff\xfe" + b),
}


@pytest.mark.parametrize("name", CACHE_DAMAGE)
def test_a_damaged_cache_is_rebuilt_never_used(tmp_path, monkeypatch, name):
    path, cache, files = _cached_folder(tmp_path)
    which, damage = CACHE_DAMAGE[name]
    files[which][0].write_bytes(damage(files[which][1]))
    tracemalloc.start()
    try:
        result, decodes = _load_counting_decodes(path, cache, monkeypatch)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_clean(result)
    assert decodes == len(CLEAN)                            # decoded again, not read from the cache
    assert peak < 32 << 20, peak
    assert {k: p.read_bytes() for k, (p, _) in files.items()} == {k: b for k, (_, b) in files.items()}
    assert _load_counting_decodes(path, cache, monkeypatch)[1] == 0      # the rebuilt cache is used


def test_a_cache_that_cannot_be_written_is_said_in_one_line(tmp_path, capsys):
    path = tmp_path / "train.tar"
    path.write_bytes(tar_bytes())
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder would go")
    assert_clean(load_image_folder(path, cache_dir=blocker))
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "could not write the decoded images' cache" in err, err


# -- fuzz -----------------------------------------------------------------------------------------

def damage(data, draw_cut, flips):
    """data truncated at draw_cut (None: whole) with the bits `flips` [(position, bit)] flipped."""
    out = bytearray(data if draw_cut is None else data[:draw_cut])
    for pos, bit in flips:
        if out:
            out[pos % len(out)] ^= 1 << bit
    return bytes(out)


damages = st.tuples(st.one_of(st.none(), st.integers(0, 10 ** 6)),
                    st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 7)), max_size=4))


def _cut(data, cut):
    return None if cut is None else cut % max(1, len(data))


def _kind(message, label):
    """The gist of a refusal, for hypothesis' statistics (pytest --hypothesis-show-statistics)."""
    return re.sub(r"\d+", "N", message.replace(str(label), "")).split(" (")[0].strip(": ")[:50]


def _decode_or_refuse(data, label="train.tar: train/cat/1.png"):
    """decode_image's array, or None after checking the refusal is one line naming the file;
    with the Python-side peak memory."""
    tracemalloc.start()
    try:
        try:
            got = np.asarray(decode_image(data, label))
            event("read")
            return got, tracemalloc.get_traced_memory()[1]
        except DataError as e:
            event(f"refused: {_kind(one_line(e, label), label)}")
            return None, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


PNG_BYTES = save(Image.fromarray(PIC), "PNG")
JPEG_BYTES = save(Image.fromarray(SMOOTH), "JPEG", quality=90)


@settings(max_examples=examples(200), **FUZZ)
@given(damages)
def test_fuzz_png_is_refused_or_read_exactly(d):
    cut, flips = d
    got, peak = _decode_or_refuse(damage(PNG_BYTES, _cut(PNG_BYTES, cut), flips))
    # a PNG has CRCs, checked: a damaged one is refused or (a flip after IEND) gives the same pixels
    assert got is None or np.array_equal(got, PIC)
    assert peak < 32 << 20


@settings(max_examples=examples(200), **FUZZ)
@given(damages)
def test_fuzz_jpeg_is_refused_or_read(d):
    cut, flips = d
    got, peak = _decode_or_refuse(damage(JPEG_BYTES, _cut(JPEG_BYTES, cut), flips))
    # JPEG has no checksum: a flipped bit can give other pixels (or another size), never more
    # than the limit, and always 8-bit RGB
    if got is not None:
        assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[2] == 3
        assert got.shape[0] * got.shape[1] <= Image.MAX_IMAGE_PIXELS
    if got is not None and not flips:
        assert np.abs(got.astype(int) - SMOOTH).max() <= 10
    assert peak < 32 << 20


@settings(max_examples=examples(100), **FUZZ)
@given(st.integers(0, 2 ** 31 - 1), st.integers(0, 2 ** 31 - 1), st.sampled_from([0, 2, 3, 4, 6]))
def test_fuzz_png_with_lying_dimensions(w, h, colour_type):
    raw = b"".join(b"\x00" + row.tobytes() for row in PIC)               # the real 16x12 RGB rows
    data = png(w, h, 8, colour_type, raw)
    got, peak = _decode_or_refuse(data, f"--images w{w}h{h}.png")
    if (w, h, colour_type) == (W, H, 2):
        np.testing.assert_array_equal(got, PIC)
    elif w * h > Image.MAX_IMAGE_PIXELS:
        assert got is None
    assert got is None or got.shape == (h, w, 3)
    assert peak < 32 << 20


ARCHIVES = {suffix: compress(tar_bytes()) for suffix, compress in COMPRESS.items()}


@settings(max_examples=examples(300), **FUZZ)
@given(st.sampled_from(sorted(ARCHIVES)), damages)
def test_fuzz_tar_is_refused_or_read_exactly(tmp_path_factory, suffix, d):
    cut, flips = d
    data = ARCHIVES[suffix]
    path = tmp_path_factory.mktemp("fuzz") / f"train{suffix}"
    path.write_bytes(damage(data, _cut(data, cut), flips))
    tracemalloc.start()
    try:
        try:
            result = load_image_folder(path, use_cache=False)
            event("read")
        except DataError as e:
            event(f"refused: {_kind(one_line(e, path), path)}")
            result = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the members are PNGs: a damaged byte the tar and its stream do not check, the PNG does
    if result is not None:
        assert_clean(result)
    assert peak < 32 << 20


_PARTS = st.sampled_from(["..", "train", "cat", "dog", "", ".", "/", "a.png", "b.PNG", "c.jpg", "x.txt"])
_KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                          tarfile.FIFOTYPE, tarfile.DIRTYPE])


@settings(max_examples=examples(100), **FUZZ)
@given(st.lists(st.tuples(st.lists(_PARTS, min_size=1, max_size=4), _KINDS,
                          st.sampled_from(["", "../../outside.png", "/etc/passwd", "train/cat/0.png"])),
                max_size=5))
def test_fuzz_tar_member_names_and_kinds(tmp_path_factory, members):
    d = tmp_path_factory.mktemp("names")
    (d / "outside.png").write_bytes(save(Image.fromarray(np.zeros((3, 3, 3), np.uint8)), "PNG"))
    png_ = save(Image.fromarray(PIC), "PNG")
    extra, regular = [], 0
    for parts, kind, link in members:
        name = "/".join(parts)
        if not name.strip("/."):
            continue
        extra.append(_member(name, png_ if kind == tarfile.REGTYPE else b"", kind, link))
        info = extra[-1][0]
        regular += info.isfile() and folders._is_image(info.name)       # tarfile may strip a trailing /
    path = d / "box" / "t.tar"
    path.parent.mkdir()
    path.write_bytes(tar_bytes(extra))
    _AUDIT["paths"] = []
    try:
        try:
            images, labels, classes = load_image_folder(path, use_cache=False)
            event("read")
        except DataError as e:
            message = one_line(e, path)
            event(f"refused: {_kind(message, path)}")
            assert "share one size" not in message           # the 3x3 picture outside was never read
            images = None
    finally:
        opened, _AUDIT["paths"] = _AUDIT["paths"], None
    if images is not None:
        assert len(images) == len(CLEAN) + regular        # only regular files are images
        assert all(a.shape == (3, H, W) for a in images)
    assert {p for p in opened if str(d) in p} == {str(path)}, opened
    assert sorted(p.name for p in d.rglob("*")) == ["box", "outside.png", "t.tar"]


@settings(max_examples=examples(100), **FUZZ)
@given(st.sampled_from(["images.npy", "labels.npy", "meta.json"]), damages,
       st.one_of(st.none(), st.tuples(st.integers(0, 2 ** 40), st.integers(0, 2 ** 20))))
def test_fuzz_cache_is_rebuilt_or_used_only_when_whole(tmp_path_factory, which, d, lying):
    path, cache, files = _cached_folder(tmp_path_factory.mktemp("cache"))
    good = files[which][1]
    bad = damage(good, _cut(good, d[0]), d[1])
    if lying is not None and which != "meta.json":
        bad = _npy_with_shape(good, (lying[0], 3, lying[1], W) if which == "images.npy" else (lying[0],))
    files[which][0].write_bytes(bad)
    tracemalloc.start()
    try:
        result = load_image_folder(path, cache_dir=cache)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_clean(result)
    assert peak < 32 << 20
