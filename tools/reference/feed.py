"""The naive feed: what a newcomer writes first, kept as the baseline ``make bench`` compares
the mesh against.

Everything runs in one process, per request:

1. Feast ``get_online_features`` for the user (profile, recent activity, category affinity)
   -> the bundle's numpy user tower -> a user vector;
2. brute-force retrieval: the dot product with every item embedding of the bundle,
   ``argpartition`` for the top ``candidates`` (cart items excluded);
3. one Feast ``get_online_features`` call with the ranker's feature references
   (``ranker_v2``: user, item, seller and inventory views) and one entity row per candidate
   -- the slow part: 500 rows take 120-340 ms through Feast's Python read path;
4. ``contract.features.build_matrix`` on those columns plus the request context;
5. LightGBM ``Booster.predict`` on the bundle's source model (not the compiled library),
   the bundle's isotonic calibrator, E[GMV] = p x price x margin [x the evidence shrink];
6. out-of-stock items dropped, the rest sorted by E[GMV], the first ``page_size`` returned.

It is honest rather than sabotaged: no per-item Python work beyond converting Feast's lists
to arrays, the same model and features as the mesh, defaults filled as
``feature_repo.schema.DEFAULTS`` says. What it lacks is what the mesh adds: an ANN index,
an item-feature cache, a compiled model, re-ranking, exploration, fallbacks. CHECKOUT gets
the same candidates as HOME minus the cart (no cart-similar retrieval).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from contract import affinity, content
from contract import bundle as B
from contract import columns as C
from contract.bundle import verify_bundle
from contract.calibration import Calibrator
from contract.catalog import Catalog
from contract.features import DAY_OF_WEEK, HOUR, FeatureSchema, build_matrix, feature_schema
from contract.paths import Paths
from contract.scorer import EvidenceShrink, LinearOffset
from contract.tower import UserTower
from feature_repo import schema as S

if TYPE_CHECKING:
    import lightgbm
    import pandas as pd
    from feast import FeatureStore

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = 500
USER_VIEWS = (S.USER_PROFILE, S.USER_CATEGORY_AFFINITY, S.USER_RECENT_ACTIVITY)
IN_STOCK = "in_stock"
CATEGORY_SHARE = "category_share"
for _name, _view in ((IN_STOCK, S.ITEM_INVENTORY), (CATEGORY_SHARE, S.ITEM_STATS)):
    if _name not in S.FEATURES[_view]:
        raise ImportError(f"{_view} lost {_name}: update the reference feed")
# the per-item reductions of per-user lists that candidate_columns computes
_REDUCED = {S.AFFINITY_FOR_ITEM, S.SELLER_DAYS_SINCE_ENGAGED, S.CONTENT_AFFINITY_FOR_ITEM}
if set(S.REDUCED_FOR_ITEM.values()) != _REDUCED:
    raise ImportError(
        f"the schema reduces lists to {sorted(set(S.REDUCED_FOR_ITEM.values()))}, the "
        f"reference feed computes {sorted(_REDUCED)}: update candidate_columns"
    )


@dataclass(frozen=True)
class FeedRequest:
    """One validated request, in domain terms."""

    user_id: int
    surface: str  # one of contract.columns.SURFACES
    page_size: int
    cart: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    country: str = ""  # used when Feast has no profile for the user
    device: str = ""
    when: datetime | None = None  # None: now


@dataclass(frozen=True)
class Page:
    """A ranked page: parallel arrays in display order, and where the time went (ms)."""

    item_ids: np.ndarray  # int64
    egmv: np.ndarray  # float64, descending
    candidates: int
    model_version: str
    stage_ms: dict[str, float]


def _cosines(profile: Sequence[float] | None, rows: np.ndarray) -> np.ndarray:
    """The cosine of ``profile`` with each of the items' ``rows``, 0 where either is zero or
    the widths differ (the ``contract.content`` rule, written out)."""
    p = np.asarray(profile if profile is not None else [], dtype=np.float64)
    out = np.zeros(len(rows))
    if len(p) == 0 or len(p) != rows.shape[1] or not np.linalg.norm(p) > 0:
        return out
    norms = np.linalg.norm(rows, axis=1)
    has = norms > 0
    out[has] = rows[has] @ p / (norms[has] * np.linalg.norm(p))
    return out


def _filled(values: Sequence[Any], name: str) -> np.ndarray:
    """A Feast column as an array, missing values replaced by the serving default."""
    default = S.DEFAULTS.get(name, 0)
    return np.array([default if v is None else v for v in values])


def _filled_str(values: Sequence[Any], name: str) -> np.ndarray:
    default = S.DEFAULTS.get(name, "unknown")
    return np.array([default if v is None else str(v) for v in values], dtype=object)


class ReferenceFeed:
    """The naive pipeline over one bundle and one Feast store. Thread-safe for reads (the
    gRPC pool calls ``feed`` concurrently); nothing is mutated after construction."""

    def __init__(
        self,
        bundle_dir: Path,
        store: FeatureStore,
        items: pd.DataFrame,
        model_version: str = "",
        candidates: int = DEFAULT_CANDIDATES,
    ) -> None:
        import lightgbm

        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        manifest = verify_bundle(bundle_dir)
        schema = FeatureSchema.from_dict(json.loads((bundle_dir / B.FEATURE_SCHEMA).read_text()))
        if schema != feature_schema():
            raise ValueError(
                f"bundle {bundle_dir} was built for feature schema {schema.hash[:12]}, this "
                f"code builds {feature_schema().hash[:12]}"
            )
        self.model_version = model_version or str(manifest.get("version", ""))
        self.candidates = candidates
        self.store = store
        self.tower = UserTower.load(bundle_dir / B.USER_TOWER)
        if self.tower.spec.vector != affinity.BUCKETS:
            raise ValueError(
                f"bundle {bundle_dir}'s user tower reads {self.tower.spec.vector!r}, not "
                f"{affinity.BUCKETS!r}: it was trained before the sparse category affinity"
            )
        # category_affinity_for_item's uniform prior, as the features service has it
        self.n_categories = Catalog.load(bundle_dir / B.CATALOG).n_categories
        self.item_ids = np.load(bundle_dir / B.ITEM_IDS).astype(np.int64)
        self.item_embeddings = np.load(bundle_dir / B.ITEM_EMBEDDINGS).astype(np.float32)
        self.booster: lightgbm.Booster = lightgbm.Booster(
            model_file=str(bundle_dir / B.PURCHASE_MODEL)
        )
        self.calibrator = Calibrator.from_dict(json.loads((bundle_dir / B.CALIBRATOR).read_text()))
        self.offset = LinearOffset.read(bundle_dir / B.LINEAR_OFFSET)
        click = bundle_dir / B.CLICK_MODEL  # a two-stage model's click stage
        self.click = lightgbm.Booster(model_file=str(click)) if click.exists() else None
        self.click_offset = LinearOffset.read(bundle_dir / B.CLICK_OFFSET)
        self.evidence = EvidenceShrink.read(bundle_dir / B.EVIDENCE, feature_schema().names)
        # training's p: offset or not, one stage or two
        from training.ranking.models import two_stage_probability

        self._probability = two_stage_probability
        ids = items[C.ITEM_ID].to_numpy(np.int64)
        order = np.argsort(ids)
        self._catalog_ids = ids[order]
        self._seller = items[C.SELLER_ID].to_numpy(np.int64)[order]
        self._margin = items[C.MARGIN].to_numpy(np.float64)[order]
        # the items' rows in the catalogue's content space, where profiles live ((items, 0)
        # without content); the cosine with the profile is written out below
        self._content = content.table_unit(items).astype(np.float64)[order]
        self.user_refs = S.feature_refs(USER_VIEWS)
        self.ranker_refs = S.feature_refs(S.RANKER_VIEWS)

    @classmethod
    def open(
        cls,
        home: Path,
        dataset: str,
        bundle_dir: Path,
        model_version: str = "",
        candidates: int = DEFAULT_CANDIDATES,
    ) -> ReferenceFeed:
        """The feed over ``dataset``'s Feast store and items table under ``home``."""
        from contract.feature_store import open_store
        from training.tables import read_tables

        paths = Paths(Path(home).resolve())
        items = read_tables(paths.raw(dataset), [C.ITEMS])[C.ITEMS]
        store = open_store(dataset, paths=paths)
        return cls(bundle_dir, store, items, model_version, candidates)

    def _rows_of(self, item_ids: np.ndarray) -> np.ndarray:
        """Items-table row of each id (the bundle's item ids all come from that table)."""
        rows = np.searchsorted(self._catalog_ids, item_ids)
        return np.minimum(rows, len(self._catalog_ids) - 1)

    def user_vector(self, request: FeedRequest) -> tuple[np.ndarray, dict[str, Any]]:
        """The user's tower embedding ``(dim,)`` and the user features it was made from."""
        got = self.store.get_online_features(
            features=self.user_refs, entity_rows=[{C.USER_ID: request.user_id}]
        ).to_dict()
        spec = self.tower.spec
        features: dict[str, Any] = {}
        for name in spec.numeric:
            features[name] = _filled(got[name], name).astype(np.float64)
        for name, _ in spec.categorical:
            features[name] = _filled_str(got[name], name)
        # no row: empty lists and a total of 0, which read as the uniform vector
        features[spec.vector] = affinity.buckets_one(
            got[S.AFFINITY_CATEGORIES][0],
            got[S.AFFINITY_WEIGHTS][0],
            got[S.AFFINITY_TOTAL][0] or 0.0,
            spec.vector_dim,
        )
        return self.tower.embed(features)[0], features

    def retrieve(self, user_vector: np.ndarray, exclude: np.ndarray) -> np.ndarray:
        """Top ``candidates`` item ids by dot product, brute force, ``exclude`` left out."""
        scores = self.item_embeddings @ user_vector
        if len(exclude):
            scores[np.isin(self.item_ids, exclude)] = -np.inf
        k = min(self.candidates, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.isfinite(scores[top])]
        return self.item_ids[top]

    def candidate_columns(
        self, request: FeedRequest, item_ids: np.ndarray, when: datetime
    ) -> dict[str, Any]:
        """build_matrix's input columns for the candidates: one Feast read of the ranker's
        features with one entity row per candidate, defaults filled, context added."""
        sellers = self._seller[self._rows_of(item_ids)]
        entity_rows = [
            {C.USER_ID: request.user_id, C.ITEM_ID: int(i), C.SELLER_ID: int(s)}
            for i, s in zip(item_ids, sellers, strict=True)
        ]
        got = self.store.get_online_features(
            features=self.ranker_refs, entity_rows=entity_rows
        ).to_dict()
        columns: dict[str, Any] = {}
        for view in S.RANKER_VIEWS:
            for name, kind in S.FEATURES[view].items():
                if kind == "string":
                    columns[name] = _filled_str(got[name], name)
                elif not kind.endswith("[]"):
                    columns[name] = _filled(got[name], name).astype(np.float64)
        # every row carries the same user's affinity lists; an item without an item_stats
        # row (no category) reads the uniform prior
        item_category = np.array([-1 if c is None else c for c in got[C.CATEGORY]], np.int64)
        columns[S.AFFINITY_FOR_ITEM] = affinity.for_items(
            got[S.AFFINITY_CATEGORIES][0],
            got[S.AFFINITY_WEIGHTS][0],
            got[S.AFFINITY_TOTAL][0] or 0.0,
            item_category,
            columns[CATEGORY_SHARE],
            self.n_categories,
        )
        # every row carries the same user's lists; most recent first, so the first entry of
        # a seller wins
        listed, days = got[S.RECENT_SELLERS][0] or [], got[S.RECENT_SELLER_DAYS][0] or []
        days_of = dict(zip(reversed(listed), reversed(days), strict=True))
        default_days = S.DEFAULTS[S.SELLER_DAYS_SINCE_ENGAGED]
        columns[S.SELLER_DAYS_SINCE_ENGAGED] = np.array(
            [days_of.get(seller, default_days) for seller in sellers.tolist()]
        )
        # every row carries the same user's content profile: its cosine with each item's
        # content; 0 without a profile, for a profile of another width or an item without one
        columns[S.CONTENT_AFFINITY_FOR_ITEM] = _cosines(
            got[S.CONTENT_PROFILE][0], self._content[self._rows_of(item_ids)]
        )
        for name, fallback in ((C.COUNTRY, request.country), (C.DEVICE, request.device)):
            if fallback:
                values = columns[name]
                columns[name] = np.where(values == "unknown", fallback, values)
        columns[HOUR] = when.hour
        columns[DAY_OF_WEEK] = when.weekday()
        columns[C.SURFACE] = request.surface
        return columns

    def rank(self, columns: Mapping[str, Any], item_ids: np.ndarray) -> np.ndarray:
        """E[GMV] of each candidate: calibrated LightGBM p(purchase) x price x margin (the
        trees boosted from the bundle's linear offset when it has one), times the bundle's
        evidence shrink when it has one."""
        X = build_matrix(columns)
        p = self.calibrator.apply(
            self._probability(self.booster, self.offset, self.click, self.click_offset, X)
        )
        margin = self._margin[self._rows_of(item_ids)]
        egmv = np.asarray(p * np.asarray(columns[C.PRICE], np.float64) * margin)
        return egmv if self.evidence is None else self.evidence.apply(X, egmv)

    def feed(self, request: FeedRequest) -> Page:
        """One page for ``request``; ``Page.stage_ms`` has retrieval, features, ranking, total."""
        start = time.perf_counter()
        when = request.when or datetime.now(UTC)
        vector, _ = self.user_vector(request)
        item_ids = self.retrieve(vector, request.cart)
        t_retrieved = time.perf_counter()
        if len(item_ids) == 0:
            stage_ms = {
                "retrieval": (t_retrieved - start) * 1e3,
                "total": (t_retrieved - start) * 1e3,
            }
            return Page(item_ids, np.empty(0), 0, self.model_version, stage_ms)
        columns = self.candidate_columns(request, item_ids, when)
        t_features = time.perf_counter()
        egmv = self.rank(columns, item_ids)
        keep = np.asarray(columns[IN_STOCK]) > 0
        ids, egmv = item_ids[keep], egmv[keep]
        order = np.argsort(-egmv, kind="stable")[: request.page_size]
        end = time.perf_counter()
        stage_ms = {
            "retrieval": (t_retrieved - start) * 1e3,
            "features": (t_features - t_retrieved) * 1e3,
            "ranking": (end - t_features) * 1e3,
            "total": (end - start) * 1e3,
        }
        return Page(ids[order], egmv[order], len(item_ids), self.model_version, stage_ms)


def format_stage_ms(stage_ms: Mapping[str, float]) -> str:
    """``retrieval=0.81;features=1.20;...``: the gateway's ``hf-stage-ms`` trailer format."""
    return ";".join(f"{name}={ms:.2f}" for name, ms in stage_ms.items())
