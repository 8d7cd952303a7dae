"""Reading an `.npz` file without trusting it: every size is checked before it is allocated.

The format, in a few lines. An `.npz` is a zip archive with one member per array, named
'<key>.npy'; np.savez stores the members as they are, np.savez_compressed deflates them. The
zip's central directory, at the end of the file, lists each member's name, its compressed and
uncompressed sizes and its CRC-32. Each member is a `.npy` file: the magic b'\\x93NUMPY', a
version byte pair, the length of the header, the header (a Python dict literal such as
"{'descr': '<f4', 'fortran_order': False, 'shape': (64, 3, 3, 3), }") and then the array's
bytes, exactly prod(shape) * itemsize of them.

np.load believes all of it: a header that declares a terabyte-sized shape is allocated before a
byte is read, and a member deflated from a few kilobytes inflates to whatever it inflates to.
`NpzReader` reads only the members' headers when it opens a file and refuses, naming the file:
- a member that is not a `.npy` array, is encrypted, or uses a compression numpy never writes;
- a stored member whose two sizes differ, and a deflated one that claims to inflate more than
  MAX_RATIO times (trained weights barely compress: a member that claims more is a bomb);
- sizes that add up to more than the file holds;
- a header that cannot be parsed, an object or structured dtype, or a shape whose byte count is
  not the member's size (a lying header).
Fortran order is legitimate (np.save writes it for Fortran-ordered arrays). The caller then
compares the headers with what it expects (see minicvt.models.expect) and reads the arrays it
wants with `read`, which reads the member's bytes, never more than it declared, into an array of
the declared shape; zip checks the CRC-32 as the last byte is read, so a flipped bit is an error.
"""
import math
import os
import struct
import zipfile
import zlib

import numpy as np
from numpy.lib import format as npy

from .errors import BadFileError

# deflate's limit is 1032:1 (all zeros); trained weights compress about 1.1:1. A member that
# claims more than this ratio (past a small allowance for tiny members) is refused.
MAX_RATIO = 100
RATIO_ALLOWANCE = 64 * 1024
MAX_HEADER = 10_000                # numpy's own limit on a header it parses safely

# what zipfile, zlib and numpy's header parser raise on a damaged file
DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, SyntaxError, TypeError,
           KeyError, IndexError, struct.error, OverflowError, NotImplementedError, UnicodeDecodeError,
           RuntimeError)


class NpzReader:
    """An .npz opened for checked reading; use as a context manager.

    headers: {key: (dtype, shape)} of every array, from the headers alone (nothing read yet).
    error: the BadFileError subclass raised, with the path in front of every message."""

    def __init__(self, path, error=BadFileError):
        self.path, self.error = str(path), error
        if not os.path.isfile(path):
            self.fail("does not exist")
        self.file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":
                self.fail("is a single .npy array, not an .npz file")
        try:
            self.zip = zipfile.ZipFile(path)
        except DAMAGED as e:
            self.fail(f"is corrupt or not an .npz file (a zip archive of arrays): {_reason(e)}")
        try:
            self._members = self._check_members()
            self.headers, self._offsets = {}, {}
            for key, info in self._members.items():
                self._read_header(key, info)
        except BaseException:
            self.zip.close()
            raise

    def fail(self, message):
        raise self.error(f"{self.path}: {message}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.zip.close()

    def _check_members(self):
        """{key: ZipInfo} after checking what the central directory says about each member."""
        members, compressed = {}, 0
        for info in self.zip.infolist():
            name = info.filename
            if not name.endswith(".npy"):
                self.fail(f"member {name!r} is not a .npy array (not an .npz file numpy wrote)")
            key = name[:-len(".npy")]
            if key in members:
                self.fail(f"member {name!r} appears twice")
            if info.flag_bits & 0x1:
                self.fail(f"member {name!r} is encrypted")
            if info.compress_type == zipfile.ZIP_STORED:
                if info.file_size != info.compress_size:
                    self.fail(f"member {name!r} is stored uncompressed but declares two sizes "
                              f"({info.file_size} and {info.compress_size} bytes): damaged")
            elif info.compress_type == zipfile.ZIP_DEFLATED:
                if info.file_size > MAX_RATIO * info.compress_size + RATIO_ALLOWANCE:
                    self.fail(f"member {name!r} claims to inflate {info.compress_size:,} bytes to "
                              f"{info.file_size:,}: more than weights ever compress (a zip bomb?)")
            else:
                self.fail(f"member {name!r} uses zip compression method {info.compress_type}, "
                          f"which numpy never writes")
            compressed += info.compress_size
            members[key] = info
        if compressed > self.file_size:
            self.fail(f"its members declare {compressed:,} bytes but the file has {self.file_size:,} "
                      f"(truncated or damaged)")
        return members

    def _read_header(self, key, info):
        """Parse one member's .npy header and check it against the member's size."""
        try:
            with self.zip.open(info) as f:
                version = npy.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = npy.read_array_header_1_0(f, max_header_size=MAX_HEADER)
                elif version == (2, 0):
                    shape, fortran, dtype = npy.read_array_header_2_0(f, max_header_size=MAX_HEADER)
                else:
                    self.fail(f"array {key!r} has .npy format version {version}, which np.savez "
                              f"never writes for plain arrays")
                offset = f.tell()
        except self.error:
            raise
        except DAMAGED as e:
            self.fail(f"array {key!r} is corrupt: no readable .npy header ({_reason(e)})")
        if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None:
            self.fail(f"array {key!r} holds {dtype} values (objects or records), not numbers or text")
        if dtype.kind not in "fiubU" or dtype.itemsize == 0:
            self.fail(f"array {key!r} holds {dtype} values, not numbers or text")
        if any(n < 0 for n in shape):
            self.fail(f"array {key!r} declares a negative shape {shape}")
        nbytes = math.prod(shape) * dtype.itemsize                  # Python ints: no overflow
        if offset + nbytes != info.file_size:
            self.fail(f"array {key!r} declares shape {shape} of {dtype} ({nbytes:,} bytes) but its "
                      f"member holds {info.file_size - offset:,} bytes (a lying or damaged header)")
        self.headers[key] = (dtype, tuple(shape))
        self._offsets[key] = (offset, fortran)

    def nbytes(self, key):
        dtype, shape = self.headers[key]
        return math.prod(shape) * dtype.itemsize

    def read(self, key):
        """The array `key`, of its declared dtype and shape. Reads exactly the bytes the header
        declared (which the caller has checked) and no more; a short or corrupt member (CRC) fails."""
        dtype, shape = self.headers[key]
        offset, fortran = self._offsets[key]
        buf = bytearray(self.nbytes(key))
        try:
            with self.zip.open(self._members[key]) as f:
                f.read(offset)                               # the header, already parsed
                view, done = memoryview(buf), 0
                while done < len(buf):
                    n = f.readinto(view[done:])
                    if not n:
                        self.fail(f"array {key!r} is cut short (truncated file)")
                    done += n
                f.read(1)                                    # at the end: zip checks the CRC
        except self.error:
            raise
        except DAMAGED as e:
            self.fail(f"array {key!r} is corrupt: {_reason(e)}")
        array = np.frombuffer(buf, dtype=dtype)
        return array.reshape(shape, order="F" if fortran else "C")

    def read_text(self, key, max_chars):
        """The 0-d text array `key` (JSON metadata) as a str, refused above max_chars characters."""
        dtype, shape = self.headers[key]
        if dtype.kind != "U" or shape != ():
            self.fail(f"{key!r} must be a text entry, got an array of {dtype} and shape {shape}")
        if dtype.itemsize // 4 > max_chars:
            self.fail(f"{key!r} declares {dtype.itemsize // 4:,} characters of metadata; "
                      f"at most {max_chars:,} are expected")
        return str(self.read(key)[()])


def _reason(e):
    """An exception as a few words on one line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."
