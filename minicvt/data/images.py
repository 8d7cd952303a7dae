"""One image decoder for every path: image-folder datasets, their tar archives, and `--images`.

decode_image(file, label) gives an 8-bit RGB Pillow image, or refuses the file with one line
that names it (a DataError, so a BadFileError). In order, and why (docs/files.md):

1. Only the formats a picture comes in are opened (FORMATS): Pillow guesses the format from the
   bytes, not the name, and some of its readers run other programs (EPS starts Ghostscript).
2. Image.open reads only the header. Its width x height is checked against Pillow's
   decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 89,478,485 pixels) before one pixel is
   decoded: a 100000x100000 PNG is a few hundred bytes and would take 30 GB decoded. Pillow
   itself only warns between 1x and 2x the limit; here it is an error. Zero pixels is refused.
3. A PNG has a CRC on every chunk, but Pillow's decoder skips those of the image data, so a
   flipped bit gives wrong pixels silently; Image.verify checks them all first.
4. The first frame (an animated GIF or PNG), with the EXIF orientation applied: a phone photo
   stored sideways is shown upright, as every image viewer and transformers' load_image do.
5. To 8-bit RGB by mode (_to_rgb): 16-bit greyscale is scaled 0..65535 -> 0..255 (Pillow's
   convert('RGB') clips it, and a 16-bit photo comes out white); transparency is composited on
   white, as the picture shows on a page (the colours stored under transparent pixels are often
   arbitrary; transformers' convert_to_rgb does the same); floating-point greyscale, and 32-bit
   integers beyond 16 bits, have no standard white level and are refused.
"""
import contextlib
import io
import re
import warnings

import numpy as np

from .download import DataError

# what Image.open may recognise: the formats of photos and of image-folder datasets. JPEG
# includes MPO, the variant many cameras write; PPM covers .pgm/.ppm
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")


def printable(text):
    """text with every character that is not printable (a newline in a tar member's name)
    written as its escape, so a message stays one line."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def decode_image(file, label):
    """8-bit RGB PIL.Image of `file` (a path, or the bytes of an image file read from a tar).
    label: how messages name the file ('--images cat.png', 'train.tar: train/cat/1.png').
    Refused with a DataError of one line: not an image, truncated, damaged, no pixels, more
    pixels than Image.MAX_IMAGE_PIXELS, or a mode with no standard white level."""
    from PIL import Image, ImageOps

    Image.init()        # registers every format: open(formats=...) fails on one not yet loaded

    def open_():
        return Image.open(io.BytesIO(file) if isinstance(file, bytes) else file, formats=FORMATS)

    label = printable(label)
    limit = Image.MAX_IMAGE_PIXELS                     # None: the user turned the check off
    try:
        with _header_only(Image):
            im = open_()
        try:
            w, h = im.size
            if limit is not None and w * h > limit:
                raise DataError(f"{label}: {w}x{h} pixels is more than the {limit} a picture may have "
                                f"(a decompression bomb?)")
            if w < 1 or h < 1:
                raise DataError(f"{label}: the image has no pixels ({w}x{h})")
            if im.format == "PNG":
                im.verify()                   # reads every chunk and checks its CRC
                im.close()
                with _header_only(Image):
                    im = open_()
            im.load()                         # the first frame; truncated data fails here
            return _to_rgb(ImageOps.exif_transpose(im), label)
        finally:
            im.close()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{label} does not exist") from None
    except Exception as e:
        # Pillow's readers raise many types on a damaged file (OSError, SyntaxError, ValueError,
        # struct.error, IndexError, EOFError...): each one means this file cannot be read (our
        # own refusals are DataErrors, passed on as they are)
        raise DataError(f"{label} is not a readable image ({_reason(e)})") from e


@contextlib.contextmanager
def _header_only(Image):
    """Image.open with Pillow's own bomb check off: above twice its limit it raises without the
    size, between 1x and 2x it only warns. decode_image checks the size itself, right after."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _reason(e):
    """Pillow's message in one line, without the in-memory file's name (<_io.BytesIO object at
    0x...>) it puts there: the label names the file."""
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", " ".join(str(e).split()))
    return printable(text or type(e).__name__)


def _to_rgb(im, label):
    """8-bit RGB of a decoded image, for every mode Pillow reads (docstring of this module)."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im)                                     # (H, W) uint16 (any byte order) or int32
        if im.mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
            # 'I' is 16-bit data from a 16-bit PGM (and older Pillow's 16-bit PNG); beyond 16 bits
            # (a 32-bit TIFF) the white level is the writer's choice
            raise DataError(f"{label}: 32-bit integer greyscale beyond 0..65535 has no standard "
                            f"white level; save it as an 8- or 16-bit image")
        # round(v * 255 / 65535): 16-bit v = 257 * u of an 8-bit u comes back as u exactly
        grey = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if im.mode == "F":
        raise DataError(f"{label}: floating-point greyscale has no standard white level (0..1? "
                        f"0..255?); save it as an 8- or 16-bit image")
    if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")

