"""The simulator's ground truth: hidden parameters, the response model and the Oracle.

Nothing here is ever a feature. Training and serving read the logs; the ground truth is saved
apart (``data/<dataset>/ground_truth/``) and only scores policies: expected clicks, purchases
and GMV of any ranked list, and the optimal ranking of a candidate set.

Response model of user u to item i shown at position k (docs/simulator.md has the why):

    examined  ~ Bernoulli(e(k)),            e(k) = (1 + (k-1)/kappa) ** -theta
    click     ~ Bernoulli(sigmoid(z_click))  given examined
    cart      ~ Bernoulli(sigmoid(z_cart))   given click
    purchase  ~ Bernoulli(sigmoid(z_buy))    given cart, and only while the item is in stock
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from contract import columns as C
from contract.timeutil import NS_PER_DAY, to_ns

ARRAYS_FILE = "ground_truth.npz"
PARAMS_FILE = "ground_truth.json"


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def examination(positions: np.ndarray | int, kappa: float, theta: float) -> np.ndarray:
    """Probability that a user looks at slot ``positions`` (1-based)."""
    k = np.asarray(positions, dtype=np.float64)
    return (1.0 + (k - 1.0) / kappa) ** -theta


@dataclass
class GroundTruth:
    """Hidden parameters indexed by entity id (ids are 0..n-1 in the simulator)."""

    params: dict[str, float]
    user_taste: np.ndarray  # (n_users, latent_dim) unit vectors
    user_price_sensitivity: np.ndarray  # beta_u >= 0
    user_budget: np.ndarray  # b_u, the price above which u starts to balk
    user_country: np.ndarray  # int code into columns.COUNTRIES
    user_device: np.ndarray  # int code into columns.DEVICES
    item_latent: np.ndarray  # (n_items, latent_dim) unit vectors
    item_appeal: np.ndarray  # a_i, intrinsic attractiveness
    item_category: np.ndarray
    item_price: np.ndarray
    item_discount: np.ndarray  # 1 - price / list_price
    item_margin: np.ndarray
    item_shipping_days: np.ndarray
    item_created_ns: np.ndarray  # int64 ns since epoch
    item_seller_quality: np.ndarray  # q_s of the item's seller
    country_category: np.ndarray  # (n_countries, n_categories) taste shift
    device_category: np.ndarray  # (n_devices, n_categories) taste shift

    # --- response model --------------------------------------------------------------
    def examination(self, positions: np.ndarray | int) -> np.ndarray:
        return examination(
            positions, self.params["examination_kappa"], self.params["examination_theta"]
        )

    def examined(self, position: np.ndarray) -> np.ndarray:
        """P(looked at) of logged impressions: the feed's slot curve, and 1 for organic rows
        (position 0: search and browse show what the user looks at)."""
        return np.where(position >= 1, self.examination(np.maximum(position, 1)), 1.0)

    def cart_match(
        self, item_ids: np.ndarray, cart_item_ids: np.ndarray | None
    ) -> np.ndarray | None:
        """1 where the item shares a category with the cart (the checkout click term)."""
        if cart_item_ids is None or not len(cart_item_ids):
            return None
        cart_cats = np.unique(self.item_category[np.asarray(cart_item_ids)])
        return np.isin(self.item_category[item_ids], cart_cats).astype(float)

    def request_cart_match(
        self, request_ids: np.ndarray, item_ids: np.ndarray, carts: pd.DataFrame | None
    ) -> np.ndarray | None:
        """``cart_match`` of logged rows, each against its own request's cart (``carts``:
        request_id, item_id of checkout requests); None without carts."""
        if carts is None or not len(carts):
            return None
        n_cat = int(self.item_category.max()) + 1
        cart_keys = np.unique(
            carts[C.REQUEST_ID].to_numpy(np.int64) * n_cat
            + self.item_category[carts[C.ITEM_ID].to_numpy(np.int64)]
        )
        keys = np.asarray(request_ids, np.int64) * n_cat + self.item_category[item_ids]
        return np.isin(keys, cart_keys).astype(float)

    @functools.cached_property
    def _interest_items(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The per-item parts of ``interest``, worked out once (a tuple: ``save`` keeps only
        the arrays): float32 latent vectors (they halve the users x scanned x latent gather,
        the bulk of the time), log prices, and appeal plus the seller-quality term."""
        static = self.item_appeal + self.params["seller_quality_click"] * self.item_seller_quality
        return self.item_latent.astype(np.float32), np.log(self.item_price), static

    def interest(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """How well each of ``items`` (users x scanned) matches its row's user: the click
        logit's terms that do not depend on the moment (taste, appeal, seller quality, the
        country and device shifts, the price penalty). Organic sessions pick by it."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        latent = self._interest_items[0]
        taste = self.user_taste[users].astype(np.float32)
        affinity = np.einsum("bd,bkd->bk", taste, latent[items]).astype(np.float64)
        shift = (  # (users, categories): one gather per row instead of one per pair
            self.country_category[self.user_country[users]]
            + self.device_category[self.user_device[users]]
        )
        return self.interest_given(
            affinity,
            self.user_price_sensitivity[users][:, None],
            self.user_budget[users][:, None],
            shift,
            items,
        )

    def interest_given(
        self,
        affinity: np.ndarray,
        sensitivity: np.ndarray,
        budget: np.ndarray,
        shift: np.ndarray,
        items: np.ndarray,
    ) -> np.ndarray:
        """``interest`` with the user's hidden parameters given, broadcast against ``items``
        (2-D) as in ``response``; ``shift`` (rows, categories) is the country and device
        shift of each row's user."""
        _, log_price, static = self._interest_items
        over = log_price[items] - np.log(budget)
        return (
            self.params["affinity_strength"] * affinity
            + static[items]
            + np.take_along_axis(shift, self.item_category[items], axis=1)
            - sensitivity * np.maximum(over, 0.0)
            - 0.1 * over
        )

    def probabilities(
        self,
        users: np.ndarray,
        items: np.ndarray,
        at_ns: np.ndarray | int,
        cart_match: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """P(click | examined), P(cart | click), P(purchase | cart) for aligned pairs.

        ``at_ns`` is the time of the impression (it sets the item's novelty);
        ``cart_match`` flags items sharing a category with the cart (checkout surface).
        """
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        affinity = np.einsum("ij,ij->i", self.user_taste[users], self.item_latent[items])
        return self.response(
            affinity,
            self.user_price_sensitivity[users],
            self.user_budget[users],
            users,
            items,
            at_ns,
            cart_match,
        )

    def response(
        self,
        affinity: np.ndarray,
        sensitivity: np.ndarray,
        budget: np.ndarray,
        users: np.ndarray,
        items: np.ndarray,
        at_ns: np.ndarray | int,
        cart_match: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``probabilities`` with the user's hidden parameters given: ``affinity`` (taste .
        item latent), price ``sensitivity`` and ``budget`` broadcast against the items, so a
        (particles, 1) sensitivity against (impressions,) items gives (particles, impressions)
        (``training.simulate.posterior``); ``users`` gives the observable country and device."""
        p = self.params
        cat = self.item_category[items]
        age_days = (np.asarray(at_ns) - self.item_created_ns[items]) / NS_PER_DAY
        novelty = np.exp(-np.maximum(age_days, 0.0) / p["novelty_days"])
        over = np.log(self.item_price[items] / budget)
        price_pen = sensitivity * np.maximum(over, 0.0) + 0.1 * over
        q = self.item_seller_quality[items]
        disc = self.item_discount[items]
        z_click = (
            p["click_intercept"]
            + p["affinity_strength"] * affinity
            + self.item_appeal[items]
            + p["seller_quality_click"] * q
            + self.country_category[self.user_country[users], cat]
            + self.device_category[self.user_device[users], cat]
            - price_pen
            + p["discount_click"] * disc
            + p["novelty_click"] * novelty
        )
        if cart_match is not None:
            z_click = z_click + p["cart_match_click"] * cart_match
        ship = self.item_shipping_days[items]
        z_cart = (
            p["cart_intercept"]
            + p["cart_affinity"] * affinity
            + p["seller_quality_cart"] * q
            - p["shipping_cart"] * np.maximum(ship - 2.0, 0.0)
            + p["discount_cart"] * disc
            - 0.5 * price_pen
        )
        z_buy = (
            p["buy_intercept"]
            + p["buy_affinity"] * affinity
            + p["seller_quality_buy"] * q
            - 0.5 * price_pen
        )
        return sigmoid(z_click), sigmoid(z_cart), sigmoid(z_buy)

    # --- persistence ---------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray)}
        np.savez_compressed(directory / ARRAYS_FILE, **arrays)  # type: ignore[arg-type]
        (directory / PARAMS_FILE).write_text(json.dumps(self.params, indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: Path) -> GroundTruth:
        directory = Path(directory)
        if not (directory / ARRAYS_FILE).exists():
            raise FileNotFoundError(
                f"no ground truth in {directory}: only simulated datasets have one "
                "(run `homefeed simulate` first)"
            )
        with np.load(directory / ARRAYS_FILE) as npz:
            arrays = {k: npz[k] for k in npz.files}
        params = json.loads((directory / PARAMS_FILE).read_text())
        return cls(params=params, **arrays)


@dataclass(frozen=True)
class ListValue:
    """Expected outcomes of one ranked list under the ground truth."""

    clicks: float
    purchases: float
    gmv: float  # sum of p(purchase) x price x E[quantity]
    margin: float  # sum of p(purchase) x price x margin x E[quantity]: the served E[GMV]


class Oracle:
    """Scores ranked lists with the true response model. Never used to build a feature."""

    def __init__(self, truth: GroundTruth):
        self.truth = truth
        self.mean_quantity = 1.0 + truth.params["quantity_extra_mean"]

    @classmethod
    def load(cls, directory: Path) -> Oracle:
        return cls(GroundTruth.load(directory))

    def _at(self, at: pd.Timestamp | None) -> int:
        if at is None:
            return int(self.truth.params["end_ns"])
        return int(pd.Timestamp(at).value)

    def purchase_probability(
        self,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        at: pd.Timestamp | None = None,
        cart_item_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """P(purchase | examined) for aligned user/item pairs."""
        cart_match = self.truth.cart_match(np.asarray(item_ids), cart_item_ids)
        pc, pa, pb = self.truth.probabilities(user_ids, item_ids, self._at(at), cart_match)
        return pc * pa * pb

    def item_values(
        self,
        user_id: int,
        item_ids: np.ndarray,
        at: pd.Timestamp | None = None,
        cart_item_ids: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Per examined item: expected click, purchase, GMV and margin, and the response
        model's conditional steps ``cart`` = P(cart | click), ``buy`` = P(purchase | cart)."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        users = np.full(len(item_ids), user_id, dtype=np.int64)
        cart_match = self.truth.cart_match(item_ids, cart_item_ids)
        pc, pa, pb = self.truth.probabilities(users, item_ids, self._at(at), cart_match)
        buy = pc * pa * pb
        gmv = buy * self.truth.item_price[item_ids] * self.mean_quantity
        return {
            "click": pc,
            "cart": pa,
            "buy": pb,
            "purchase": buy,
            "gmv": gmv,
            "margin": gmv * self.truth.item_margin[item_ids],
        }

    def score(
        self,
        user_id: int,
        ranked_item_ids: np.ndarray,
        at: pd.Timestamp | None = None,
        cart_item_ids: np.ndarray | None = None,
    ) -> ListValue:
        """Expected outcomes of showing ``ranked_item_ids`` (slot 1 first) to ``user_id``."""
        values = self.item_values(user_id, ranked_item_ids, at, cart_item_ids)
        exam = self.truth.examination(np.arange(1, len(ranked_item_ids) + 1))
        return ListValue(
            clicks=float(exam @ values["click"]),
            purchases=float(exam @ values["purchase"]),
            gmv=float(exam @ values["gmv"]),
            margin=float(exam @ values["margin"]),
        )

    def score_impressions(
        self, impressions: pd.DataFrame, checkout_carts: pd.DataFrame | None = None
    ) -> pd.DataFrame:
        """Expected outcomes of every row of an impression log (user_id, item_id, position, ts).

        ``checkout_carts`` (request_id, item_id) gives the carts of checkout requests; without
        it checkout rows are scored as if the cart were empty. Sum the columns over rows to
        value a whole policy; divide by rows / 1000 for "per 1,000 impressions".
        """
        users = impressions[C.USER_ID].to_numpy(np.int64)
        items = impressions[C.ITEM_ID].to_numpy(np.int64)
        at = to_ns(impressions[C.TS])
        position = impressions[C.POSITION].to_numpy()
        # organic rows (position 0, search and browse) are looked at in full
        exam = self.truth.examined(position)
        cart_match = self.truth.request_cart_match(
            impressions[C.REQUEST_ID].to_numpy(np.int64), items, checkout_carts
        )
        pc, pa, pb = self.truth.probabilities(users, items, at, cart_match)
        buy = pc * pa * pb
        gmv = buy * self.truth.item_price[items] * self.mean_quantity
        return pd.DataFrame(
            {
                "clicks": exam * pc,
                "purchases": exam * buy,
                "gmv": exam * gmv,
                "margin": exam * gmv * self.truth.item_margin[items],
            },
            index=impressions.index,
        )

    def optimal(
        self,
        user_id: int,
        candidate_item_ids: np.ndarray,
        k: int,
        objective: str = "margin",
        at: pd.Timestamp | None = None,
        cart_item_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """The best ``k`` of the candidates, in order, for ``objective`` (margin, gmv, ...).

        Examination falls with position and does not depend on the item, so sorting by the
        per-examination value is optimal (rearrangement inequality).
        """
        values = self.item_values(user_id, candidate_item_ids, at, cart_item_ids)[objective]
        order = np.argsort(-values, kind="stable")[:k]
        return np.asarray(candidate_item_ids)[order]

    def position_curve(self, positions: int = 10) -> list[float]:
        """The true examination probabilities of slots 1..positions."""
        curve: Any = self.truth.examination(np.arange(1, positions + 1))
        return [float(x) for x in curve]
