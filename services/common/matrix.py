"""numpy float32 matrices to and from ``homefeed.common.v1.FloatMatrix``.

Measured on this machine (protobuf 7.36 upb, numpy 2.4), a 500 x 40 float32 matrix:

    write  msg.values.extend(X.ravel())             2150 us  (a Python float per element)
           FloatMatrix(values=X.ravel().tolist())     430 us
           msg.MergeFromString(<packed field bytes>)    3.4 us  <- used
    read   np.fromiter(msg.values, float32)           475 us
           np.array(list(msg.values), float32)        635 us
           np.array(msg.values, float32)                2.8 us  <- used (a copy)

The write path encodes field 3 in protobuf's packed wire format (tag, varint byte length,
little-endian float32s) and lets the parser merge it: the bytes are exactly what
``values=X.ravel().tolist()`` serializes to, NaN payloads and -0.0 included.
"""

from __future__ import annotations

import numpy as np
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
