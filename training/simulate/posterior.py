"""The history-limited Oracle: the ceiling of any policy that learns the user from the logs.

The Oracle knows every user's hidden taste, price sensitivity and budget; no policy does.
``HistoryOracle`` knows everything else the simulator knows (every item's latent vector,
appeal and seller quality, the response model and its parameters, the world's prior over
users) and infers the user's hidden parameters by Bayes' rule from that user's logged
impressions before the request: each feed or organic impression's click, add-to-cart and
purchase outcome, and which items the user's organic sessions looked at. It then ranks
items by their posterior expected E[GMV] (p x price x margin), which is the best any
policy can do in expectation with that history and that much knowledge of the items. A
learned ranker knows the items far less well, so the gap between this policy and the
Oracle is the part of the optimum no ranker trained on these logs can earn; the gap
between a ranker and this policy is what better learning could still earn.

Inference is importance sampling: ``n_particles`` draws of (taste, sensitivity, budget)
from the world's own prior (``world.draw_user_hidden``), weighted by the likelihood of
the user's history. The effective sample size of the weights says how well the particles
cover the posterior; a user whose history pins the taste down more tightly than the
particles resolve gets a coarser posterior (its expectation is then over fewer particles).

The likelihood, per impression at slot k (organic impressions are looked at in full):

    click    ~ Bernoulli(e(k) * P(click | examined))
    cart     ~ Bernoulli(P(cart | click))        given a click
    purchase ~ Bernoulli(P(purchase | cart) F(t)) given a cart t hours before the request,
                                                F the purchase delay's distribution
                                                (stock-outs ignored)
    an organic session looks at item i with probability exp(f * interest_i) / (N Z),
                 Z the mean of exp(f * interest) over the listed catalogue, N the scan size

(the organic pick is without replacement among the scanned items; the model treats each
pick as one draw from the whole scan, which is exact when the picks are a small share of
the scan's weight). Ground truth only: nothing here is a feature.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from contract import columns as C
from contract.timeutil import NS_PER_S, to_ns
from training.simulate.engine import purchase_delay_cdf
from training.simulate.groundtruth import GroundTruth, sigmoid
from training.simulate.world import draw_user_hidden, world_categories

PARTICLES = 20_000  # prior draws per posterior (shared by every user)
NORMALISER_ITEMS = 2_000  # catalogue sample that estimates the organic pick's normaliser
CHUNK = 10_000  # particles scored at once (memory: chunk x impressions floats, several)


NEVER = np.iinfo(np.int64).max


@dataclass(frozen=True)
class History:
    """One user's logged impressions, oldest first (aligned arrays); an outcome's time is
    ``NEVER`` when it did not happen (or was not logged before the window closed)."""

    items: np.ndarray
    position: np.ndarray  # 0 = organic
    ts_ns: np.ndarray
    click_ns: np.ndarray
    cart_ns: np.ndarray
    purchase_ns: np.ndarray
    cart_match: np.ndarray  # 1 where a checkout impression shares a category with its cart
    at_ns: int = NEVER  # the moment the outcomes are read at

    def before(self, at_ns: int) -> History:
        """The impressions before ``at_ns``, their outcomes as known at ``at_ns`` (a purchase
        days after its click is not yet in the history of a request between the two)."""
        n = int(np.searchsorted(self.ts_ns, at_ns, side="left"))
        return History(
            self.items[:n],
            self.position[:n],
            self.ts_ns[:n],
            self.click_ns[:n],
            self.cart_ns[:n],
            self.purchase_ns[:n],
            self.cart_match[:n],
            at_ns,
        )

    @property
    def clicked(self) -> np.ndarray:
        return self.click_ns < self.at_ns

    @property
    def carted(self) -> np.ndarray:
        return self.cart_ns < self.at_ns

    @property
    def purchased(self) -> np.ndarray:
        return self.purchase_ns < self.at_ns


class Histories:
    """Every user's impression history from the event tables, for ``HistoryOracle``."""

    def __init__(
        self,
        tables: dict[str, pd.DataFrame],
        truth: GroundTruth,
        checkout_carts: pd.DataFrame | None = None,
    ):
        imp = tables[C.IMPRESSIONS].sort_values(C.TS, kind="stable")
        ids = pd.Index(imp[C.IMPRESSION_ID].to_numpy(np.int64))

        def when(table: str) -> np.ndarray:
            events = tables[table]
            at = np.full(len(ids), NEVER, dtype=np.int64)
            rows = ids.get_indexer(pd.Index(events[C.IMPRESSION_ID].to_numpy(np.int64)))
            np.minimum.at(at, rows[rows >= 0], to_ns(events[C.TS])[rows >= 0])
            return at

        match = truth.request_cart_match(
            imp[C.REQUEST_ID].to_numpy(np.int64), imp[C.ITEM_ID].to_numpy(np.int64), checkout_carts
        )
        frame = pd.DataFrame(
            {
                "user": imp[C.USER_ID].to_numpy(np.int64),
                "item": imp[C.ITEM_ID].to_numpy(np.int64),
                "position": imp[C.POSITION].to_numpy(np.int64),
                "ts": to_ns(imp[C.TS]),
                "click": when(C.CLICKS),
                "cart": when(C.ADD_TO_CARTS),
                "purchase": when(C.PURCHASES),
                "cart_match": np.zeros(len(imp)) if match is None else match,
            }
        )
        self._by_user = {
            int(str(user)): History(
                g["item"].to_numpy(),
                g["position"].to_numpy(),
                g["ts"].to_numpy(),
                g["click"].to_numpy(),
                g["cart"].to_numpy(),
                g["purchase"].to_numpy(),
                g["cart_match"].to_numpy(np.float64),
            )
            for user, g in frame.groupby("user", sort=False)
        }

    def all_before(self, before_ns: int) -> tuple[np.ndarray, ...]:
        """Every user's impressions before ``before_ns``: user, item, time, position,
        clicked (by then) and cart match, concatenated."""
        parts = [(u, h.before(before_ns)) for u, h in self._by_user.items()]
        return (
            np.concatenate([np.full(len(h.items), u, dtype=np.int64) for u, h in parts]),
            np.concatenate([h.items for _, h in parts]),
            np.concatenate([h.ts_ns for _, h in parts]),
            np.concatenate([h.position for _, h in parts]),
            np.concatenate([h.clicked for _, h in parts]),
            np.concatenate([h.cart_match for _, h in parts]),
        )

    def of(self, user_id: int, before_ns: int) -> History:
        empty = np.zeros(0, np.int64)
        found = self._by_user.get(int(user_id))
        if found is None:
            return History(*(empty,) * 6, np.zeros(0), before_ns)
        return found.before(before_ns)


@dataclass(frozen=True)
class Posterior:
    """Particles (indices into the oracle's prior draws) and their normalised weights."""

    particles: np.ndarray
    weights: np.ndarray
    ess: float  # effective sample size of the full weight vector: 1 / sum(w^2)

    def thinned(self, n: int) -> Posterior:
        """At most ``n`` particles with equal weights, by systematic resampling (unbiased:
        each particle is kept in proportion to its weight), for catalogue-wide scoring."""
        if len(self.particles) <= n:
            return self
        grid = (np.arange(n) + 0.5) / n
        picked = np.minimum(np.searchsorted(np.cumsum(self.weights), grid), len(self.weights) - 1)
        return Posterior(self.particles[picked], np.full(n, 1.0 / n), self.ess)


class HistoryOracle:
    """Posterior-expected item values for a user given the logged history (module doc)."""

    def __init__(
        self,
        truth: GroundTruth,
        cat_pop: np.ndarray,
        cat_centroid: np.ndarray,
        organic_focus: float,
        organic_scan: int,
        n_particles: int = PARTICLES,
        seed: int = 0,
        mass: float = 1.0 - 1e-6,
    ):
        rng = np.random.default_rng(seed)
        self.truth = truth
        self.taste, self.sensitivity, self.budget = draw_user_hidden(
            rng, n_particles, cat_pop, cat_centroid
        )
        self.focus = organic_focus
        self.log_scan = float(np.log(organic_scan))
        self.mass = mass
        self.mean_quantity = 1.0 + truth.params["quantity_extra_mean"]
        n_items = len(truth.item_price)
        self._norm_items = rng.choice(n_items, size=min(NORMALISER_ITEMS, n_items), replace=False)
        self._log_z: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def from_dataset(
        cls, raw_dir: Path, truth: GroundTruth, n_particles: int = PARTICLES, seed: int = 0
    ) -> HistoryOracle:
        """For a simulated dataset: its world's prior from the config ``dataset.json`` keeps."""
        config = json.loads((Path(raw_dir) / "dataset.json").read_text())["config"]
        cat_pop, cat_centroid = world_categories(
            int(config["seed"]), int(config["categories"]), int(config["latent_dim"])
        )
        return cls(
            truth,
            cat_pop,
            cat_centroid,
            float(config.get("organic_focus", 1.0)),
            int(config.get("organic_scan", 1000)),
            n_particles,
            seed,
        )

    def believing(self, truth: GroundTruth) -> HistoryOracle:
        """The same prior draws and normaliser sample with other beliefs about the items
        (``truth`` with, e.g., appeal or latent vectors replaced by what the logs tell)."""
        other = copy.copy(self)
        other.truth = truth
        other._log_z = {}
        return other

    def _shift(self, user: int) -> np.ndarray:
        t = self.truth
        return (t.country_category[t.user_country[user]] + t.device_category[t.user_device[user]])[
            None, :
        ]

    def _item_logits(
        self, user: int, items: np.ndarray, at_ns: np.ndarray | int, cart_match: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The click, cart and purchase logits' terms that do not depend on the hidden user
        parameters: ``GroundTruth.response`` at affinity 0 and a budget equal to the price
        (no price penalty), once per item instead of once per particle and item."""
        users = np.full(len(items), user, dtype=np.int64)
        zero = np.zeros(len(items))
        probs = self.truth.response(
            zero, zero, self.truth.item_price[items], users, items, at_ns, cart_match
        )
        return tuple(np.log(q) - np.log1p(-q) for q in probs)

    def _response(
        self,
        rows: slice | np.ndarray,
        items: np.ndarray,
        item_logits: tuple[np.ndarray, np.ndarray, np.ndarray],
        clicks_only: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``GroundTruth.response`` for particles x items, from the per-item logits
        (``_item_logits``, worked out once per call) plus the affinity and price-penalty
        terms (the response is affine in them: a test holds the two equal). ``clicks_only``:
        the cart and purchase steps only for these columns."""
        p = self.truth.params
        z_click, z_cart, z_buy = item_logits
        affinity = self.taste[rows] @ self.truth.item_latent[items].T
        over = np.log(self.truth.item_price[items]) - np.log(self.budget[rows, None])
        penalty = self.sensitivity[rows, None] * np.maximum(over, 0.0) + 0.1 * over
        pc = sigmoid(z_click + p["affinity_strength"] * affinity - penalty)
        if clicks_only is not None:
            affinity, penalty = affinity[:, clicks_only], penalty[:, clicks_only]
            z_cart, z_buy = z_cart[clicks_only], z_buy[clicks_only]
        pa = sigmoid(z_cart + p["cart_affinity"] * affinity - 0.5 * penalty)
        pb = sigmoid(z_buy + p["buy_affinity"] * affinity - 0.5 * penalty)
        return pc, pa, pb

    def log_likelihood(self, user: int, history: History) -> np.ndarray:
        """log P(history | particle) for every prior particle (up to a constant)."""
        n = len(self.taste)
        out = np.zeros(n)
        if not len(history.items):
            return out
        exam = self.truth.examined(history.position)
        organic = history.position == 0
        clicked, carted = history.clicked, history.carted
        if (carted & ~clicked).any():
            raise ValueError(f"user {user}: an add-to-cart without a click before it")
        bought = history.purchased[carted]
        # a cart without a purchase yet: either no purchase, or one still on its way
        waited_h = (history.at_ns - history.cart_ns[carted][~bought]) / (3600 * NS_PER_S)
        pending = purchase_delay_cdf(waited_h)
        logits = self._item_logits(user, history.items, history.ts_ns, history.cart_match)
        for lo in range(0, n, CHUNK):
            rows = slice(lo, min(lo + CHUNK, n))
            pc, pa, pb = self._response(rows, history.items, logits, clicked)
            seen = exam * pc
            total = np.log1p(-seen[:, ~clicked]).sum(axis=1) + np.log(seen[:, clicked]).sum(axis=1)
            cart_of_click = carted[clicked]  # a cart follows a click: pa, pb are per click
            pb = pb[:, cart_of_click]
            total += np.log(pa[:, cart_of_click]).sum(axis=1)
            total += np.log1p(-pa[:, ~cart_of_click]).sum(axis=1)
            total += np.log(pb[:, bought]).sum(axis=1)
            total += np.log1p(-pb[:, ~bought] * pending).sum(axis=1)
            if organic.any():
                total += self._organic_log_likelihood(rows, user, history.items[organic])
            out[rows] = total
        return out

    def _log_normaliser(self, user: int, rows: slice) -> np.ndarray:
        """log Z per particle: it depends on the user only through the country and device
        shift, so it is worked out once per (country, device) and kept."""
        t = self.truth
        key = (int(t.user_country[user]), int(t.user_device[user]))
        if key not in self._log_z:
            n = len(self.taste)
            log_z = np.empty(n)
            items = self._norm_items
            for lo in range(0, n, CHUNK):
                part = slice(lo, min(lo + CHUNK, n))
                norm = self.focus * self._interest(part, user, items)
                top = norm.max(axis=1, keepdims=True)
                log_z[part] = top[:, 0] + np.log(np.exp(norm - top).mean(axis=1))
            self._log_z[key] = log_z
        return self._log_z[key][rows]

    def _interest(self, rows: slice, user: int, items: np.ndarray) -> np.ndarray:
        affinity = self.taste[rows] @ self.truth.item_latent[items].T
        return self.truth.interest_given(
            affinity,
            self.sensitivity[rows, None],
            self.budget[rows, None],
            self._shift(user),
            items[None, :],
        )

    def _organic_log_likelihood(self, rows: slice, user: int, picked: np.ndarray) -> np.ndarray:
        log_z = self._log_normaliser(user, rows)
        picks = self.focus * self._interest(rows, user, picked)
        return picks.sum(axis=1) - len(picked) * (log_z + self.log_scan)

    def posterior(self, user: int, history: History) -> Posterior:
        ll = self.log_likelihood(user, history)
        w = np.exp(ll - ll.max())
        w /= w.sum()
        ess = float(1.0 / np.square(w).sum())
        order = np.argsort(-w, kind="stable")
        keep = int(np.searchsorted(np.cumsum(w[order]), self.mass)) + 1
        kept = order[:keep]
        return Posterior(kept, w[kept] / w[kept].sum(), ess)

    def expected_values(
        self,
        user: int,
        posterior: Posterior,
        items: np.ndarray,
        at_ns: int,
        cart_item_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """Posterior mean of each item's E[margin-GMV] per examination (the Oracle's
        ``item_values(...)["margin"]`` averaged over the user's posterior)."""
        items = np.asarray(items, dtype=np.int64)
        logits = self._item_logits(user, items, at_ns, self.truth.cart_match(items, cart_item_ids))
        t = self.truth
        worth = t.item_price[items] * self.mean_quantity * t.item_margin[items]
        value = np.zeros(len(items))
        step = max(1, CHUNK * 200 // max(len(items), 1))
        for lo in range(0, len(posterior.particles), step):
            rows = posterior.particles[lo : lo + step]
            pc, pa, pb = self._response(rows, items, logits)
            value += posterior.weights[lo : lo + step] @ (pc * pa * pb)
        return value * worth


APPEAL_GRID = np.linspace(-4.0, 4.0, 41)  # the appeal posterior's grid, in prior sds


def believed_appeal(
    truth: GroundTruth,
    histories: Histories,
    before_ns: int,
    appeal_sd: float,
    chunk: int = 2_000_000,
) -> np.ndarray:
    """What the logs say of each item's hidden appeal a_i (prior N(0, appeal_sd^2)) as of
    ``before_ns``: log E[exp(a_i) | the click outcomes of the item's impressions], the
    effective appeal of a click probability that is near exp(z) (clicks are rare: the
    intercept is -2.7). The likelihood takes every *other* parameter of each impression as
    known (the Oracle's view of its user), so it says more than any learner could: a
    ceiling again. Items never shown keep the prior's log E[exp(a)] = sd^2 / 2."""
    grid = appeal_sd * APPEAL_GRID
    n_items = len(truth.item_appeal)
    log_post = np.tile(-0.5 * np.square(APPEAL_GRID), (n_items, 1))
    users, items, ts, position, clicked, match = histories.all_before(before_ns)
    for lo in range(0, len(items), chunk):
        part = slice(lo, lo + chunk)
        u, i = users[part], items[part]
        pc = truth.probabilities(u, i, ts[part], match[part])[0]
        base = np.log(pc) - np.log1p(-pc) - truth.item_appeal[i]  # z_click without a_i
        exam = truth.examined(position[part])
        hit = clicked[part]
        for k, a in enumerate(grid):
            seen = exam / (1.0 + np.exp(-(base + a)))
            ll = np.where(hit, np.log(seen), np.log1p(-seen))
            log_post[:, k] += np.bincount(i, weights=ll, minlength=n_items)
    log_post -= log_post.max(axis=1, keepdims=True)
    w = np.exp(log_post)
    w /= w.sum(axis=1, keepdims=True)
    return np.log(w @ np.exp(grid))
