"""A Hugging Face folder's weight files, read without trusting them: nothing the file merely
claims is allocated before it is checked (docs/files.md).

model.safetensors is an 8-byte little-endian header length N, N bytes of JSON, then the tensors'
bytes, one after another:

    {"__metadata__": {"format": "pt"},                       (optional, text to text)
     "classifier.weight": {"dtype": "F32", "shape": [1000, 384], "data_offsets": [0, 1536000]},
     ...}

data_offsets are [begin, end) in the bytes after the header. `safetensors_header` reads the
length and the JSON, bounded by the file's size, and checks every entry: a known dtype, a shape
of whole numbers, offsets inside the file, no two tensors overlapping, and end - begin equal to
prod(shape) * itemsize. The caller compares the names and shapes with the model's before
`read_safetensors` reads any tensor (with numpy, from the offsets: only what was checked).
Large models come in shards that model.safetensors.index.json lists ({"weight_map": {tensor name:
shard file}}); each shard is read the same way.

pytorch_model.bin is PyTorch's zip of a pickle (data.pkl) and one member per storage. Its
members' names and sizes are checked before torch.load, with weights_only=True, and the tensors
after: names, shapes, dtypes and NaN/infinity.
"""
import json
import math
import os
import reprlib
import zipfile

import numpy as np

from ..npz import DAMAGED
from ..errors import BadFileError

# safetensors' dtype names; BF16 has no NumPy type: its 16 bits are the top half of a float32's
_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<u2",
           "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8", "U8": "u1"}
MAX_HEADER_BYTES = 100 * 2 ** 20            # safetensors' own limit
MAX_JSON_BYTES = 16 * 2 ** 20               # an index of a few thousand tensors is ~200 KB


class PretrainedError(BadFileError):
    """A folder that is not a Hugging Face CvT minicvt can read; the message says why."""


def read_json(path, what="a JSON object"):
    """A small JSON file holding an object, as a dict; PretrainedError naming it otherwise."""
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise PretrainedError(f"{path}: {size:,} bytes, far more than {what} needs")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:          # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PretrainedError(f"{path}: not readable JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise PretrainedError(f"{path}: must hold {what}, got a JSON {type(value).__name__}")
    return value


def safetensors_header(path):
    """{tensor name: (dtype, shape, begin, end)} of a .safetensors file, begin and end absolute
    positions in the file, after every check above; PretrainedError naming the file otherwise.
    dtype is the NumPy dtype of the stored bytes (uint16 for BF16)."""
    def fail(problem):
        raise PretrainedError(f"{path} is not a readable safetensors file: {problem}")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            fail(f"{size} bytes, too short for the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > MAX_HEADER_BYTES:
            fail(f"its header claims {n:,} bytes but the file has {size:,} (truncated or not safetensors)")
        text = f.read(n)
    try:
        header = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        fail(f"its header is not readable JSON ({type(e).__name__})")
    if not isinstance(header, dict):
        fail(f"its header must be a JSON object, got a {type(header).__name__}")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        fail("__metadata__ must map text to text")
    start, entries = 8 + n, {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            fail(f"tensor {name!r} must be a record of dtype, shape and data_offsets, got {reprlib.repr(entry)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            fail(f"tensor {name!r} has dtype {reprlib.repr(dtype)}; minicvt reads {', '.join(_DTYPES)}")
        if not isinstance(shape, list) or not all(_whole(d) for d in shape):
            fail(f"tensor {name!r} has shape {reprlib.repr(shape)}, not a list of whole numbers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(o) for o in offsets)
                and offsets[0] <= offsets[1] <= size - start):
            fail(f"tensor {name!r} has data_offsets {reprlib.repr(offsets)} outside the file's "
                 f"{size - start:,} bytes of data")
        dt = np.dtype(_DTYPES[dtype])
        nbytes = math.prod(shape) * dt.itemsize
        if offsets[1] - offsets[0] != nbytes:
            fail(f"tensor {name!r} of shape {shape} and dtype {dtype} needs {nbytes:,} bytes, its "
                 f"offsets span {offsets[1] - offsets[0]:,}")
        entries[name] = (np.dtype("<u2") if dtype == "BF16" else dt, tuple(shape),
                         start + offsets[0], start + offsets[1], dtype)
    spans = sorted((b, e, name) for name, (_, _, b, e, _) in entries.items() if e > b)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            fail(f"tensors {first!r} and {second!r} overlap")
    return entries


def as_checked(entries):
    """{name: (dtype, shape)} for expect.state_problems: BF16 counts as the float32 it becomes."""
    return {k: (np.dtype("float32") if kind == "BF16" else dt, shape)
            for k, (dt, shape, _, _, kind) in entries.items()}


def read_safetensors(path, entries, names):
    """{name: array} of the checked entries `names` of one file: exactly their bytes, BF16
    widened to float32."""
    out = {}
    with open(path, "rb") as f:
        for name in names:
            dtype, shape, begin, end, kind = entries[name]
            f.seek(begin)
            count = math.prod(shape)
            a = np.fromfile(f, dtype=dtype, count=count)
            if a.size != count:
                raise PretrainedError(f"{path}: tensor {name!r} is cut short (the file changed while read?)")
            if kind == "BF16":
                a = (a.astype(np.uint32) << 16).view(np.float32)
            out[name] = a.reshape(shape)
    return out


def shard_files(folder, index):
    """{shard path: [tensor names]} from model.safetensors.index.json, its names checked: a shard
    is a plain file name in the folder, and every tensor is in exactly one shard."""
    weight_map = read_json(index, "an index of shards").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise PretrainedError(f"{index}: has no weight_map of tensor names to shard files")
    shards = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or os.path.basename(file) != file or file.startswith(".") \
                or not file.endswith(".safetensors"):
            raise PretrainedError(f"{index}: tensor {name!r} maps to {reprlib.repr(file)}, not a "
                                  f".safetensors file name in the folder")
        shards.setdefault(folder / file, []).append(name)
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise PretrainedError(f"{index}: names shards the folder lacks: {', '.join(missing[:4])}")
    return shards


def bin_members(path):
    """(number of members, bytes they inflate to) of a pytorch_model.bin, after refusing what
    torch.load should not be given: not PyTorch's zip format (a legacy pickle, which only an
    unrestricted unpickler reads), an encrypted member, one compressed past plausibility, or not
    exactly one pickle. The caller bounds the bytes by the model's size."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except DAMAGED as e:
        with open(path, "rb") as f:
            legacy = f.read(2) == b"\x80\x02"                  # pickle protocol 2, torch < 1.6
        if legacy:
            raise PretrainedError(f"{path} is a legacy (pre-1.6) PyTorch pickle, which cannot be read "
                                  f"safely; convert it to model.safetensors") from None
        raise PretrainedError(f"{path} is not a readable PyTorch state dict (not PyTorch's zip "
                              f"format: {' '.join(str(e).split())[:120]})") from None
    for info in infos:
        if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise PretrainedError(f"{path}: member {info.filename!r} is encrypted or compressed in a "
                                  f"way torch.save never writes")
        if info.file_size > 100 * info.compress_size + 65536:
            raise PretrainedError(f"{path}: member {info.filename!r} claims to inflate "
                                  f"{info.compress_size:,} bytes to {info.file_size:,} (a zip bomb?)")
    pickles = sum(info.filename.endswith(".pkl") for info in infos)
    if pickles != 1:
        raise PretrainedError(f"{path} is not a readable PyTorch state dict ({pickles} pickles in it, "
                              f"torch.save writes one)")
    return len(infos), sum(info.file_size for info in infos)


def _whole(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
