"""The event log's records: what the features service writes (``LogEvents``) and what
training, the experiment analysis and monitoring read back. One module both sides import.

A record is one JSON object (UTF-8, compact) stored as the payload of one log entry
(``contract.eventlog``), keyed by its ``event_id``:

- an **event** (``type: "event"``): ``kind`` (:data:`KINDS`), ``event_id``, ``ts`` (ns since
  1970, UTC), ``user_id`` (-1 for inventory), ``item_id``, ``request_id`` ("" = organic),
  ``position`` (0 = organic), ``surface``; purchases add ``price`` and ``quantity``,
  inventory ``stock``;
- a **feed** (``type: "feed"``): what the gateway served for one request, keyed by
  ``feed:<request_id>``: ``request_id``, ``user_id``, ``ts``, ``surface``, ``items``,
  ``positions``, ``scores``, ``egmv``, ``propensities``, ``reasons``, ``model_version``,
  ``arm``, ``experiment``, ``experiment_arm``, ``degraded``, ``seen_filtered``, ``seen_items``,
  ``latency_ms``, ``country``, ``device``, ``categories``, ``new_seller``, ``prices`` and,
  for sampled feeds, ``features`` = ``{schema_hash, cols, values}`` (the rows the page was
  ranked with, row-major, one row per served item).

JSON keeps the log readable by anything (``jq`` over a segment's payloads) and costs
microseconds per record at the rates a feed log sees per replica.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

EVENT = "event"
FEED = "feed"

IMPRESSION = "impression"
CLICK = "click"
ADD_TO_CART = "add_to_cart"
PURCHASE = "purchase"
INVENTORY = "inventory"
KINDS = (IMPRESSION, CLICK, ADD_TO_CART, PURCHASE, INVENTORY)
BUYER_KINDS = (IMPRESSION, CLICK, ADD_TO_CART, PURCHASE)

# feed.v1.Reason values a feed record's ``reasons`` hold (the proto is the source of truth;
# training reads them without the generated code)
REASON_RANKED = 1
REASON_EXPLORATION = 2
REASON_HEURISTIC = 5
REASON_POPULAR = 6

FEED_KEY_PREFIX = "feed:"


def feed_key(request_id: str) -> str:
    """The log key of a served feed: one record per request id, so a retried log call (or
    a retried feed with the same request id) is stored once. A request id too long to fit
    an event id (128 characters) with the prefix is keyed by its hash."""
    key = FEED_KEY_PREFIX + request_id
    if len(key) <= 128 and len(key.encode()) <= 255:
        return key
    return FEED_KEY_PREFIX + "h:" + hashlib.blake2b(request_id.encode(), digest_size=16).hexdigest()


def encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode()


def decode(payload: bytes) -> dict[str, Any]:
    record = json.loads(payload)
    if not isinstance(record, dict) or record.get("type") not in (EVENT, FEED):
        raise ValueError(f"not an event-log record: {payload[:80]!r}")
    return record
