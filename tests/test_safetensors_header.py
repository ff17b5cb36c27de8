"""mlxsup.safetensors_header: the one safetensors header check of the API and the engine."""

from __future__ import annotations

import io
import json
import pickle
import struct

import pytest

from mlxsup.safetensors_header import HeaderError, read_header


def _file(header: dict, data: bytes = b"") -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def _read(raw: bytes):
    return read_header(io.BytesIO(raw), len(raw))


def test_entries_sorted_by_offset_and_where_the_data_starts():
    raw = _file({"__metadata__": {"format": "mlx"},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
                 "a": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}}, b"\0" * 16)  # fmt: skip
    entries, start = _read(raw)
    assert [(e.name, e.dtype, e.shape, e.begin, e.end) for e in entries] == [
        ("a", "F16", (2, 2), 0, 8), ("b", "F32", (2,), 8, 16)]
    assert start == len(raw) - 16


@pytest.mark.parametrize("raw, words", [
    (b"\x01\x02", "truncated"),
    (pickle.dumps({"a": [1, 2, 3]}), "pickle"),
    (b"\xff" * 64, "corrupt or truncated: header"),
    (struct.pack("<Q", 5) + b"{nope", "not JSON"),
    (_file([1, 2]), "not a JSON object"),  # type: ignore[arg-type]
    (_file({}), "holds no tensors"),
    (_file({"t": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4), "malformed"),
    (_file({"t": {"dtype": "nope", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "malformed"),
    (_file({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "'t' lies outside"),
])  # fmt: skip
def test_what_is_wrong_is_said(raw, words):
    with pytest.raises(HeaderError, match=words):
        _read(raw)
