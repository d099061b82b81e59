"""Column names and table layouts of the homefeed event schema.

Every stage reads and writes these names through the constants here, never through string
literals, so a rename is one edit. `docs/data-schema.md` is the human-readable contract;
`TABLES` below is the machine-readable one (column -> logical type) that the validator,
the ingest adapters and the simulator share.

Logical types: ``id`` (int64, non-negative), ``ts`` (timezone-aware UTC timestamp),
``float``, ``int``, ``bool``, ``str``, ``vector`` (fixed-length list of float32).
"""

from __future__ import annotations

# --- ids -------------------------------------------------------------------------------
USER_ID = "user_id"
ITEM_ID = "item_id"
SELLER_ID = "seller_id"
REQUEST_ID = "request_id"
IMPRESSION_ID = "impression_id"

# --- common ------------------------------------------------------------------------------
TS = "ts"
CREATED_AT = "created_at"
SIGNUP_AT = "signup_at"

# --- sellers -------------------------------------------------------------------------------
RATING = "rating"
IS_NEW = "is_new"

# --- items -------------------------------------------------------------------------------
CATEGORY = "category"
BRAND = "brand"
PRICE = "price"
LIST_PRICE = "list_price"
MARGIN = "margin"
SHIPPING_DAYS = "shipping_days"
STOCK = "stock"
CONTENT = "content"

# --- users -------------------------------------------------------------------------------
COUNTRY = "country"
DEVICE = "device"
COHORT = "cohort"

# --- impressions -------------------------------------------------------------------------
POSITION = "position"
SURFACE = "surface"
POLICY = "policy"
PROPENSITY = "propensity"

# --- purchases ---------------------------------------------------------------------------
QUANTITY = "quantity"

# --- labels and training-set columns ------------------------------------------------------
EVENT_TIMESTAMP = "event_timestamp"  # Feast's entity-dataframe timestamp column
LABEL_PURCHASE = "label_purchase_7d"
LABEL_CLICK = "label_click"
LABEL_ATC = "label_add_to_cart"
WEIGHT = "sample_weight"
SPLIT = "split"

# --- enumerations ---------------------------------------------------------------------------
SURFACES = ("HOME", "CHECKOUT")
POLICY_HEURISTIC = "heuristic"
POLICY_RANDOM = "random"
# An event that no feed policy served (search, browse, a store visit in real data): its
# impression row exists only to carry the purchase's join key; position is 0 and the
# propensity is null. Never used for position-bias estimation or IPS.
POLICY_ORGANIC = "organic"
POLICIES = (POLICY_HEURISTIC, POLICY_RANDOM, POLICY_ORGANIC)
# Training-set rows only, never in the event tables: an item sampled as a negative for an
# organic purchase in purchase-only data (Complete Journey), where nothing unbought was shown.
POLICY_SAMPLED = "sampled_negative"
DEVICES = ("ios", "android", "web")
# users.device of a log that does not record devices. A table value, not one of DEVICES: the
# feature matrix encodes it like any unknown device (code len(DEVICES)), the simulator never
# draws it, and a feed request leaves the device empty instead.
DEVICE_UNKNOWN = "unknown"
# items.brand of an item without a brand (brand codes are labels; this one is no brand).
NO_BRAND = -1
COUNTRIES = ("US", "GB", "DE", "FR", "CA")
SPLITS = ("train", "valid", "test")

# --- tables -----------------------------------------------------------------------------
SELLERS = "sellers"
ITEMS = "items"
USERS = "users"
IMPRESSIONS = "impressions"
CLICKS = "clicks"
ADD_TO_CARTS = "add_to_carts"
PURCHASES = "purchases"
INVENTORY = "inventory"

ENTITY_TABLES = (SELLERS, ITEMS, USERS)
EVENT_TABLES = (IMPRESSIONS, CLICKS, ADD_TO_CARTS, PURCHASES, INVENTORY)
ALL_TABLES = ENTITY_TABLES + EVENT_TABLES

# Required columns of each table with their logical type. Extra columns are allowed and
# carried through; a missing required column is a validation error.
TABLES: dict[str, dict[str, str]] = {
    SELLERS: {SELLER_ID: "id", CREATED_AT: "ts", RATING: "float", IS_NEW: "bool"},
    ITEMS: {
        ITEM_ID: "id",
        SELLER_ID: "id",
        CATEGORY: "int",
        BRAND: "int",
        PRICE: "float",
        LIST_PRICE: "float",
        MARGIN: "float",
        CREATED_AT: "ts",
        SHIPPING_DAYS: "int",
        STOCK: "int",
        CONTENT: "vector",
    },
    USERS: {USER_ID: "id", SIGNUP_AT: "ts", COUNTRY: "str", DEVICE: "str", COHORT: "str"},
    IMPRESSIONS: {
        IMPRESSION_ID: "id",
        REQUEST_ID: "id",
        USER_ID: "id",
        ITEM_ID: "id",
        POSITION: "int",
        SURFACE: "str",
        TS: "ts",
        POLICY: "str",
        PROPENSITY: "float",
    },
    CLICKS: {IMPRESSION_ID: "id", TS: "ts"},
    ADD_TO_CARTS: {IMPRESSION_ID: "id", TS: "ts"},
    PURCHASES: {IMPRESSION_ID: "id", TS: "ts", PRICE: "float", QUANTITY: "int"},
    INVENTORY: {ITEM_ID: "id", TS: "ts", STOCK: "int"},
}

# The column whose time orders a table's rows (None: a dimension table).
TIME_COLUMN: dict[str, str | None] = {
    SELLERS: CREATED_AT,
    ITEMS: CREATED_AT,
    USERS: SIGNUP_AT,
    IMPRESSIONS: TS,
    CLICKS: TS,
    ADD_TO_CARTS: TS,
    PURCHASES: TS,
    INVENTORY: TS,
}

# Primary keys (unique, non-null).
PRIMARY_KEY: dict[str, str | None] = {
    SELLERS: SELLER_ID,
    ITEMS: ITEM_ID,
    USERS: USER_ID,
    IMPRESSIONS: IMPRESSION_ID,
    CLICKS: IMPRESSION_ID,  # at most one click per impression
    ADD_TO_CARTS: IMPRESSION_ID,
    PURCHASES: None,
    INVENTORY: None,
}
