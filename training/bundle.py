"""The model bundle: one immutable, versioned directory holding everything serving loads.

Layout (paths relative to the bundle root; every file is listed with its sha256 in
``bundle.json``, which serving verifies before it loads anything):

    bundle.json                  manifest: version, created_at, data snapshot, feature schema
                                 hash, metrics, files -> sha256
    feature_schema.json          ordered feature names, dtypes, hash (FeatureSchema)
    ranker/purchase.txt          LightGBM purchase-probability model (source of truth)
    ranker/lambdamart.txt        LightGBM LambdaMART model
    ranker/purchase.so           TL2cgen-compiled purchase model (the served scorer)
    ranker/compile.json          compile parameters, parity (max |diff|), latency figures
    ranker/calibrator.json       isotonic calibration: x / y breakpoints
    retrieval/user_tower.npz     user-tower weights for numpy inference
    retrieval/item_ids.npy       item id of each ANN row
    retrieval/item_embeddings.npy
    retrieval/scann/             ScaNN index (serialized)
    retrieval/config.json        tower and index parameters
    retrieval/popular.json       popularity lists by (country, device): cold start, fallback
    retrieval/history.npz        each user's engaged items before the test period (history source)
    eval/                        eval.json, eval.md and plots of the run that made it
"""

from __future__ import annotations

BUNDLE_MANIFEST = "bundle.json"
FEATURE_SCHEMA = "feature_schema.json"
PURCHASE_MODEL = "ranker/purchase.txt"
LAMBDAMART_MODEL = "ranker/lambdamart.txt"
COMPILED_MODEL = "ranker/purchase.so"
COMPILE_REPORT = "ranker/compile.json"
CALIBRATOR = "ranker/calibrator.json"
USER_TOWER = "retrieval/user_tower.npz"
ITEM_IDS = "retrieval/item_ids.npy"
ITEM_EMBEDDINGS = "retrieval/item_embeddings.npy"
SCANN_DIR = "retrieval/scann"
RETRIEVAL_CONFIG = "retrieval/config.json"
POPULAR = "retrieval/popular.json"
HISTORY = "retrieval/history.npz"
EVAL_DIR = "eval"

REGISTERED_MODEL = "homefeed-ranker"
ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"
