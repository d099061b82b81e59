"""Feast online-store values as Python, for the services that read the provider directly
(``online_read`` skips ``get_online_features``' per-value conversion, 3-6x cheaper)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto


def decode_value(value: ValueProto) -> Any:
    """A Feast ``Value`` proto as a Python scalar or list; None when it holds nothing."""
    kind = value.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    field = getattr(value, kind)
    return list(field.val) if kind.endswith("_list_val") else field
