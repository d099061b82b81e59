"""numpy arrays into protobuf repeated fields without a Python object per element:
float32 matrices to and from ``homefeed.common.v1.FloatMatrix``, and ``extend_packed`` for
any packed repeated numeric field.

Building a repeated field element by element makes a Python object per element; the write
path here encodes the field in protobuf's packed wire format (tag, varint byte length, the
little-endian values) and lets the parser merge it, so the bytes are exactly what
``extend(a.tolist())`` serializes to, NaN payloads and -0.0 included. For varint fields
(bool, enum, small ints) it applies when every value is in 0..127, one byte each; other ints
take the plain path. Reading, ``np.array(msg.values, dtype)`` copies the parsed buffer
without per-element objects. The costs of both ways are in docs/serving.md
(``scripts/bench_cores.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from homefeed.common.v1 import common_pb2

from services.common.errors import InvalidArgument

_VALUES_TAG = bytes([(3 << 3) | 2])  # FloatMatrix.values = 3, wire type 2 (length-delimited)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_FIXED = {FieldDescriptor.TYPE_FLOAT: "<f4", FieldDescriptor.TYPE_DOUBLE: "<f8"}
_VARINT = frozenset(
    {
        FieldDescriptor.TYPE_BOOL,
        FieldDescriptor.TYPE_ENUM,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
    }
)
_FIELDS: dict[tuple[Any, str], tuple[bytes, str | None, bool]] = {}


def _field(message: Message, field: str) -> tuple[bytes, str | None, bool]:
    """(tag, fixed-width dtype or None, varint) of a packed repeated numeric field."""
    key = (message.DESCRIPTOR, field)
    found = _FIELDS.get(key)
    if found is None:
        fd = message.DESCRIPTOR.fields_by_name[field]
        if not (fd.is_repeated and fd.is_packed) or (
            fd.type not in _FIXED and fd.type not in _VARINT
        ):
            raise TypeError(
                f"{message.DESCRIPTOR.name}.{field} is not a packed repeated number field"
            )
        found = _FIELDS[key] = (
            bytes([(fd.number << 3) | 2]) if fd.number < 16 else _varint((fd.number << 3) | 2),
            _FIXED.get(fd.type),
            fd.type in _VARINT,
        )
    return found


def extend_packed(message: Message, field: str, values: np.ndarray) -> None:
    """Append ``values`` (1-D) to the packed repeated numeric ``field`` of ``message``, as
    ``getattr(message, field).extend(values.tolist())`` would, with the same bytes."""
    if not len(values):
        return
    tag, dtype, varint = _field(message, field)
    if dtype is not None:
        data = np.ascontiguousarray(values, dtype=dtype).tobytes()
    elif varint and (values.dtype == np.bool_ or (values.min() >= 0 and values.max() < 0x80)):
        data = values.astype(np.uint8).tobytes()
    else:
        getattr(message, field).extend(values.tolist())
        return
    message.MergeFromString(tag + _varint(len(data)) + data)


def to_float_matrix(X: np.ndarray, schema_hash: str) -> common_pb2.FloatMatrix:
    """A FloatMatrix holding ``X`` (2-D, cast to float32) row-major, tagged with the
    feature schema hash the columns follow."""
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (rows, cols), got shape {X.shape}")
    rows, cols = X.shape
    msg = common_pb2.FloatMatrix(rows=rows, cols=cols, schema_hash=schema_hash)
    if X.size:
        data = np.ascontiguousarray(X, dtype="<f4").tobytes()
        msg.MergeFromString(_VALUES_TAG + _varint(len(data)) + data)
    return msg


def from_float_matrix(msg: common_pb2.FloatMatrix, expected_cols: int | None = None) -> np.ndarray:
    """The matrix as a float32 array of shape (rows, cols); InvalidArgument when the values
    do not fill rows x cols or the column count is not the one expected."""
    n = len(msg.values)
    if n != msg.rows * msg.cols:
        raise InvalidArgument(
            f"matrix values must number rows x cols = {msg.rows} x {msg.cols} = "
            f"{msg.rows * msg.cols}, got {n}"
        )
    if expected_cols is not None and msg.cols != expected_cols:
        raise InvalidArgument(
            f"matrix must have {expected_cols} columns (the feature schema's), got {msg.cols}"
        )
    return np.array(msg.values, dtype=np.float32).reshape(msg.rows, msg.cols)
