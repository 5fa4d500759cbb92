"""Read and write the safetensors format with numpy alone (bfloat16 through ml_dtypes), so that
loading a Hugging Face checkpoint into JAX never needs torch.

Format: 8-byte little-endian header length N, N bytes of JSON ({name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}), then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file is truncated, corrupt or holds something we cannot read."""


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(tensor entries, offset of the data section), validated against the file size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: file too short ({size} bytes) to be safetensors")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsError(
                f"{path}: header length {n} does not fit in a {size}-byte file (truncated?)"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    spans = []
    for name, entry in header.items():
        spans.append((*_check_entry(path, name, entry, data_size), name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise SafetensorsError(f"{path}: tensors {a!r} and {b!r} overlap (corrupt header)")
    return header, 8 + n


def _check_entry(path, name, entry, data_size: int) -> tuple[int, int]:
    """(begin, end) of a header entry, after checking it describes bytes inside the file."""
    bad = lambda why: SafetensorsError(f"{path}: tensor {name!r}: {why} (corrupt header)")
    if not isinstance(entry, dict):
        raise bad("entry is not an object")
    if entry.get("dtype") not in DTYPES:
        raise bad(f"unsupported dtype {entry.get('dtype')!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(x, int) and x >= 0 for x in shape)):
        raise bad(f"invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(x, int) for x in offsets)):
        raise bad(f"invalid data_offsets {offsets!r}")
    begin, end = offsets
    nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[entry["dtype"]].itemsize
    if begin < 0 or end - begin != nbytes or end > data_size:
        raise SafetensorsError(
            f"{path}: tensor {name!r} (shape {shape}) lies outside the file's {data_size} data "
            "bytes or has the wrong size (truncated or corrupt file)")
    return begin, end


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one file, memory-mapped read-only (copy before mutating)."""
    header, data_start = read_header(path)
    out = {}
    if not header:
        return out
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        buf = mm[data_start + begin : data_start + end]
        out[name] = buf.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return out


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None
) -> None:
    """Write tensors (numpy, any dtype of DTYPES) atomically: to a temp file, then rename."""
    path = Path(path)
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.asarray(arr, order="C")  # not ascontiguousarray: it turns 0-d into (1,)
        if arr.dtype not in CODES:
            raise SafetensorsError(f"cannot write tensor {name!r} of dtype {arr.dtype}")
        header[name] = {"dtype": CODES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)
