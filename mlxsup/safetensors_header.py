"""The header of a safetensors file, read and checked without numpy, mlx or the safetensors
package (nothing is unpickled): an 8-byte little-endian header length, a JSON object naming
each tensor's dtype, shape and byte range, then the raw data. The API checks uploads with it
(api/uploads.py) and the engine reads adapters with it (engine/adapter_files.py).

Hand-written because the two readers need what the `safetensors` package does not give: no
numpy or framework import in the API workers, and a message naming what is wrong."""

from __future__ import annotations

import struct
from typing import BinaryIO, NamedTuple

import orjson

WEIGHTS_NAME = "adapters.safetensors"  # mlx-lm's adapter file names
CONFIG_NAME = "adapter_config.json"
MAX_HEADER_BYTES = 100 << 20
DTYPES = {"BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32",
          "F32", "F64", "I64", "U64"}


class HeaderError(ValueError):
    """What is wrong with the file, phrased to follow its name ("adapters.safetensors is ...")."""


class TensorEntry(NamedTuple):
    name: str
    dtype: str
    shape: tuple
    begin: int  # byte offsets into the data that follows the header
    end: int


def _is_pickle_or_zip(head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05")


def read_header(f: BinaryIO, size: int) -> tuple[list[TensorEntry], int]:
    """The tensors of the safetensors file open as `f` (`size` bytes long), sorted by their
    data offset, and where the data starts. HeaderError for anything but a well-formed header
    of at least one tensor whose byte range lies inside the file."""
    head = f.read(8)
    if len(head) < 8:
        raise HeaderError(f"is truncated: {len(head)} bytes, not even a header length")
    (header_len,) = struct.unpack("<Q", head)
    if header_len == 0 or header_len > MAX_HEADER_BYTES or header_len > size - 8:
        if _is_pickle_or_zip(head):
            raise HeaderError("is a pickle/zip checkpoint; only safetensors is accepted")
        raise HeaderError(f"is corrupt or truncated: header of {header_len} bytes in a file of {size} bytes")
    try:
        header = orjson.loads(f.read(header_len))
    except orjson.JSONDecodeError as e:
        raise HeaderError(f"is corrupt: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise HeaderError("is corrupt: its header is not a JSON object")
    data_len = size - 8 - header_len
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(info, dict) and info.get("dtype") in DTYPES
                and isinstance(info.get("shape"), list)
                and all(type(d) is int and d >= 0 for d in info["shape"])
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
                and all(type(o) is int for o in info["data_offsets"])):  # fmt: skip
            raise HeaderError(f"is corrupt: tensor {name[:80]!r} has a malformed dtype, shape or data_offsets")
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= data_len:
            raise HeaderError(f"is truncated: the data of tensor {name[:80]!r} lies outside the file")
        entries.append(TensorEntry(name, info["dtype"], tuple(info["shape"]), begin, end))
    if not entries:
        raise HeaderError("holds no tensors")
    entries.sort(key=lambda e: (e.begin, e.name))
    return entries, 8 + header_len
