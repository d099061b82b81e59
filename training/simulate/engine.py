"""Day-by-day simulation: requests, the logging policy's feeds, organic sessions (search and
browse), and the users' responses.

State carried from day to day: the heuristic's 7-day click counts, item stock, each user's
cart (recent add-to-carts not yet bought), each user's price cap (from what they bought),
and purchases still pending (decided, not yet happened: delays run past 7 days).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from contract import columns as C
from contract.heuristic import heuristic_score
from contract.timeutil import NS_PER_DAY, NS_PER_S, from_ns, to_ns
from training.simulate.config import SimConfig
from training.simulate.policy import NEG_INF, plackett_luce_topk
from training.simulate.world import COUNTRY_PRICE_CAP, World

log = logging.getLogger(__name__)

CART_SLOTS = 3
CART_DAYS = 7
POP_DAYS = 7
CHECKOUT_CATEGORY_BONUS = np.log(8.0)  # the heuristic's boost for the cart's categories
REQUEST_CHUNK = 1024
# String columns are logged as int8 codes and decoded once at the end, sharing two str objects
# across millions of rows instead of allocating one per row.
SURFACE_NAMES = np.array(["HOME", "CHECKOUT"], dtype=object)
POLICY_NAMES = np.array([C.POLICY_HEURISTIC, C.POLICY_RANDOM, C.POLICY_ORGANIC], dtype=object)
ORGANIC_CODE = list(POLICY_NAMES).index(C.POLICY_ORGANIC)
ORGANIC_CHUNK = 512  # organic sessions scored at once (memory: chunk x organic_scan floats)

_HOURS = np.arange(24)
DIURNAL = 0.25 + np.exp(-((_HOURS - 12.5) ** 2) / 8.0) + 1.3 * np.exp(-((_HOURS - 20.5) ** 2) / 6.0)
DIURNAL /= DIURNAL.sum()


@dataclass
class _Log:
    """Columns of every event table, appended day by day as numpy chunks."""

    chunks: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=dict)

    def add(self, table: str, **cols: np.ndarray) -> None:
        store = self.chunks.setdefault(table, {})
        for name, values in cols.items():
            store.setdefault(name, []).append(np.asarray(values))

    def frame(self, table: str, order: list[str]) -> pd.DataFrame:
        store = self.chunks.get(table, {})
        return pd.DataFrame(
            {name: np.concatenate(store[name]) if name in store else [] for name in order}
        )


PURCHASE_DELAY_KINDS = (0.6, 0.3, 0.1)  # within hours, within days, past a week
PURCHASE_DELAY_HOURS = (2.0, 48.0, 72.0)  # exponential means (the last after 7 days)
PURCHASE_DELAY_FLOOR_H = 7 * 24  # where the late kind's delay starts


def _purchase_delay_ns(rng: np.random.Generator, n: int) -> np.ndarray:
    """Cart -> purchase delay: 60 % within hours, 30 % within days, 10 % past 7 days."""
    kind = rng.choice(3, size=n, p=list(PURCHASE_DELAY_KINDS))
    soon, days, late = PURCHASE_DELAY_HOURS
    hours = np.select(
        [kind == 0, kind == 1],
        [rng.exponential(soon, n), rng.exponential(days, n)],
        PURCHASE_DELAY_FLOOR_H + rng.exponential(late, n),
    )
    return (hours * 3600 * NS_PER_S).astype(np.int64)


def purchase_delay_cdf(hours: np.ndarray) -> np.ndarray:
    """P(a decided purchase has happened within ``hours`` of its cart): the distribution
    ``_purchase_delay_ns`` draws from."""
    h = np.maximum(np.asarray(hours, dtype=np.float64), 0.0)
    (p_soon, p_days, p_late), (soon, days, late) = PURCHASE_DELAY_KINDS, PURCHASE_DELAY_HOURS
    after = np.maximum(h - PURCHASE_DELAY_FLOOR_H, 0.0)
    return (
        p_soon * -np.expm1(-h / soon)
        + p_days * -np.expm1(-h / days)
        + p_late * -np.expm1(-after / late)
    )


def _distinct_draws(rng: np.random.Generator, rows: int, m: int, n: int) -> np.ndarray:
    """(rows, m) indices into ``range(n)``, distinct within each row, each row a uniform
    draw without replacement (column by column, redrawing clashes: uniform over what is left)."""
    out = np.empty((rows, m), dtype=np.int64)
    for j in range(m):
        col = rng.integers(0, n, rows)
        clash = (out[:, :j] == col[:, None]).any(axis=1)
        while clash.any():
            col[clash] = rng.integers(0, n, int(clash.sum()))
            clash = (out[:, :j] == col[:, None]).any(axis=1)
        out[:, j] = col
    return out


class Simulation:
    """Runs the marketplace for ``cfg.days`` days and returns the event tables."""

    def __init__(
        self,
        cfg: SimConfig,
        world: World,
        rng: np.random.Generator,
        organic_rng: np.random.Generator,
        explore_rng: np.random.Generator,
    ):
        self.cfg = cfg
        self.world = world
        self.rng = rng
        # organic sessions and the feed's exploration draw from their own streams: with
        # organic_share 0 and explore_epsilon 0 the feed's logs are exactly those of a
        # simulator without either
        self.organic_rng = organic_rng
        self.explore_rng = explore_rng
        truth = world.truth
        self.n_users = len(world.users)
        self.n_items = len(world.items)
        items = world.items
        self.price = items[C.PRICE].to_numpy()
        self.category = items[C.CATEGORY].to_numpy()
        self.item_created = to_ns(items[C.CREATED_AT])
        seller_created = to_ns(world.sellers[C.CREATED_AT])
        self.item_seller_created = seller_created[items[C.SELLER_ID].to_numpy()]
        self.stock = items[C.STOCK].to_numpy().copy()
        # slots a slate is drawn for: the largest page; each request shows its first `page`
        self.slots = int(max((*cfg.page_sizes_home, cfg.page_size_checkout)))
        self.signup = to_ns(world.users[C.SIGNUP_AT])
        self.activity = np.minimum(
            cfg.mean_sessions_per_day * np.exp(rng.normal(-0.5 * 0.9**2, 0.9, self.n_users)),
            5.0,
        )
        self.price_cap = COUNTRY_PRICE_CAP[truth.user_country].astype(np.float64)
        self.spend_sum = np.zeros(self.n_users)
        self.spend_n = np.zeros(self.n_users)
        history = world.item_history_pop / POP_DAYS
        self.pop_days: deque[np.ndarray] = deque([history] * POP_DAYS, maxlen=POP_DAYS)
        self.cart = np.full((self.n_users, CART_SLOTS), -1, dtype=np.int64)
        self.recent_carts = pd.DataFrame(
            {
                C.USER_ID: np.array([], np.int64),
                C.ITEM_ID: np.array([], np.int64),
                C.TS: np.array([], np.int64),
            }
        )
        self.pending = {  # purchases decided but not yet happened
            C.IMPRESSION_ID: np.array([], np.int64),
            C.USER_ID: np.array([], np.int64),
            C.ITEM_ID: np.array([], np.int64),
            C.TS: np.array([], np.int64),
            C.QUANTITY: np.array([], np.int64),
        }
        self.next_request = 0
        self.next_impression = 0
        self.log = _Log()
        self.stats = {
            "purchases_out_of_stock": 0,
            "purchases_censored": 0,
            "explored_impressions": 0,
        }

    # ------------------------------------------------------------------------------------
    def run(self) -> dict[str, pd.DataFrame]:
        cfg = self.cfg
        start = cfg.start_ts.value
        existing = self.item_created < start
        self.log.add(
            C.INVENTORY,
            item_id=np.flatnonzero(existing),
            ts=np.full(int(existing.sum()), start, np.int64),
            stock=self.stock[existing],
        )
        new = ~existing
        self.log.add(
            C.INVENTORY,
            item_id=np.flatnonzero(new),
            ts=self.item_created[new],
            stock=self.stock[new],
        )
        for day in tqdm(range(cfg.days), desc=f"simulate {cfg.preset}", unit="day", leave=False):
            self._simulate_day(day)
        self.stats["purchases_censored"] = len(self.pending[C.TS])
        return self._tables()

    # ------------------------------------------------------------------------------------
    def _sessions(
        self, rng: np.random.Generator, rate: np.ndarray, day_start: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(user, ts) of the day's sessions, in time order: Poisson(rate_u) per user,
        diurnal hours, and on the signup day uniform after the signup."""
        day_end = day_start + NS_PER_DAY
        active = np.flatnonzero(self.signup < day_end)
        joined_today = np.clip((day_end - self.signup[active]) / NS_PER_DAY, 0.0, 1.0)
        sessions = rng.poisson(rate[active] * joined_today)
        users = np.repeat(active, sessions)
        hour = rng.choice(24, size=len(users), p=DIURNAL)
        ts = day_start + (hour * 3600 + rng.uniform(0, 3600, len(users))) * NS_PER_S
        ts = ts.astype(np.int64)
        late_signup = self.signup[users] > day_start
        lo = np.maximum(self.signup[users], day_start)
        ts = np.where(
            late_signup, lo + (rng.random(len(users)) * (day_end - lo)).astype(np.int64), ts
        )
        order = np.argsort(ts, kind="stable")
        return users[order], ts[order]

    def _requests(self, day_start: int) -> dict[str, np.ndarray]:
        rng, cfg = self.rng, self.cfg
        users, ts = self._sessions(rng, self.activity, day_start)
        has_cart = self.cart[users, 0] >= 0
        checkout = has_cart & (rng.random(len(users)) < cfg.checkout_share)
        randomized = rng.random(len(users)) < cfg.randomized_share
        page = np.where(
            checkout,
            cfg.page_size_checkout,
            rng.choice(np.asarray(cfg.page_sizes_home), len(users)),
        )
        ids = np.arange(self.next_request, self.next_request + len(users), dtype=np.int64)
        self.next_request += len(users)
        return {
            "request_id": ids,
            "user": users,
            "ts": ts,
            "checkout": checkout,
            "randomized": randomized,
            "page": page,
        }

    def _pool(self, day_start: int) -> np.ndarray:
        """Today's candidate pool: top items by popularity x recency, listed and in stock."""
        pop = np.sum(np.stack(self.pop_days), axis=0)
        age = (day_start - self.item_created) / NS_PER_DAY
        score = heuristic_score(pop, age, self.cfg.recency_days)
        eligible = (self.item_created <= day_start) & (self.stock > 0)
        score = np.where(eligible, score, 0.0)
        size = min(self.cfg.pool_size, int(eligible.sum()))
        pool = np.argpartition(-score, size - 1)[:size]
        self._pool_score = score[pool]
        return pool

    def _slates(
        self, req: dict[str, np.ndarray], pool: np.ndarray, explore: np.ndarray | None = None
    ) -> tuple[np.ndarray, ...]:
        cfg, k = self.cfg, self.slots
        base_logits = np.log(self._pool_score) / cfg.policy_temperature
        pool_price = self.price[pool]
        pool_cat = self.category[pool]
        cols_out: list[np.ndarray] = []
        prop_out: list[np.ndarray] = []
        for lo in range(0, len(req["user"]), REQUEST_CHUNK):
            sl = slice(lo, lo + REQUEST_CHUNK)
            users = req["user"][sl]
            logits = np.broadcast_to(base_logits, (len(users), len(pool))).copy()
            logits[pool_price[None, :] > self.price_cap[users][:, None]] = NEG_INF
            checkout = np.flatnonzero(req["checkout"][sl])
            if len(checkout):
                cart = self.cart[users[checkout]]
                cart_cat = np.where(cart >= 0, self.category[np.maximum(cart, 0)], -1)
                match = (pool_cat[None, :, None] == cart_cat[:, None, :]).any(axis=2)
                in_cart = (pool[None, :, None] == cart[:, None, :]).any(axis=2)
                sub = logits[checkout] + CHECKOUT_CATEGORY_BONUS * match
                sub[in_cart] = NEG_INF
                logits[checkout] = sub
            rand = req["randomized"][sl]
            logits[rand] = np.where(np.isfinite(logits[rand]), 0.0, NEG_INF)
            cols, prop = plackett_luce_topk(logits, k, self.rng)
            chosen = np.where(cols >= 0, pool[np.maximum(cols, 0)], -1)
            if explore is not None:
                chosen, prop, explored = self._explore(chosen, prop, ~rand, explore)
                on_page = np.arange(k)[None, :] < req["page"][sl, None]
                self.stats["explored_impressions"] += int((explored & on_page).sum())
            cols_out.append(chosen)
            prop_out.append(prop)
        chosen = np.concatenate(cols_out) if cols_out else np.zeros((0, k), np.int64)
        prop = np.concatenate(prop_out) if prop_out else np.zeros((0, k))
        slot = np.arange(chosen.shape[1])[None, :]
        shown = (chosen >= 0) & (slot < req["page"][:, None])
        r, j = np.nonzero(shown)
        return r, j, chosen[r, j], prop[r, j]

    def _exploration_pool(self, day_start: int, pool: np.ndarray) -> np.ndarray | None:
        """The items the feed explores today: listed within ``explore_new_item_days`` or of a
        seller who joined within ``new_seller_days`` (the served exploration pool's rule), in
        stock and outside today's heuristic pool; None when exploration is off or the pool
        cannot fill a page."""
        cfg = self.cfg
        if cfg.explore_epsilon <= 0:
            return None
        listed = (self.item_created <= day_start) & (self.stock > 0)
        recent = day_start - self.item_created < cfg.explore_new_item_days * NS_PER_DAY
        new_seller = day_start - self.item_seller_created < cfg.new_seller_days * NS_PER_DAY
        eligible = listed & (recent | new_seller)
        eligible[pool] = False
        items = np.flatnonzero(eligible)
        if len(items) < self.slots:
            log.warning(
                "day %s: %d items to explore, fewer than a page: no exploration",
                day_start,
                len(items),
            )
            return None
        return items

    def _explore(
        self, chosen: np.ndarray, prop: np.ndarray, active: np.ndarray, explore: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The served re-ranker's epsilon-exploration applied to the heuristic's slates.

        Slots are filled top to bottom; on the ``active`` rows a coin with P(heads) =
        ``explore_epsilon`` decides each: heads, the slot takes the next exploration item
        (uniform over ``explore`` without replacement); tails, the next item of the
        heuristic's own slate. The logged propensity stays the probability of the item in
        its slot given the slots above: ``(1 - eps) x`` the Plackett-Luce factor for the
        heuristic's items, ``eps / (|E| - t)`` for the ``t``-th (0-based) explored item."""
        eps = self.cfg.explore_epsilon
        rows, k = chosen.shape
        coins = np.zeros((rows, k), dtype=bool)
        coins[active] = self.explore_rng.random((int(active.sum()), k)) < eps
        explored_before = np.cumsum(coins, axis=1)  # explored slots up to and including s
        heuristic_slot = np.clip(np.arange(k)[None, :] - explored_before, 0, k - 1)
        scale = np.where(active, 1.0 - eps, 1.0)[:, None]
        out = np.take_along_axis(chosen, heuristic_slot, axis=1)
        out_prop = np.take_along_axis(prop, heuristic_slot, axis=1) * scale
        m = int(explored_before[:, -1].max()) if rows else 0
        if m:
            draws = _distinct_draws(self.explore_rng, rows, m, len(explore))
            t = np.maximum(explored_before - 1, 0)
            out = np.where(coins, explore[np.take_along_axis(draws, t, axis=1)], out)
            out_prop = np.where(coins, eps / (len(explore) - t), out_prop)
        return out, out_prop, coins

    # ------------------------------------------------------------------------------------
    def _simulate_day(self, day: int) -> None:
        cfg, rng, truth = self.cfg, self.rng, self.world.truth
        day_start = cfg.start_ts.value + day * NS_PER_DAY
        day_end = day_start + NS_PER_DAY
        req = self._requests(day_start)
        pool = self._pool(day_start)
        r, j, items, prop = self._slates(req, pool, self._exploration_pool(day_start, pool))
        n = len(items)
        users = req["user"][r]
        ts = req["ts"][r]
        position = (j + 1).astype(np.int64)
        imp_ids = np.arange(self.next_impression, self.next_impression + n, dtype=np.int64)
        self.next_impression += n
        checkout = req["checkout"][r]
        self.log.add(
            C.IMPRESSIONS,
            impression_id=imp_ids,
            request_id=req["request_id"][r],
            user_id=users,
            item_id=items,
            position=position,
            surface=checkout.astype(np.int8),  # codes into SURFACE_NAMES
            ts=ts,
            policy=req["randomized"][r].astype(np.int8),  # codes into POLICY_NAMES
            propensity=prop,
        )
        co = np.flatnonzero(req["checkout"])
        cart = self.cart[req["user"][co]]
        keep = cart >= 0
        self.log.add(
            "checkout_carts",
            request_id=np.repeat(req["request_id"][co], keep.sum(axis=1)),
            item_id=cart[keep],
        )

        # -- responses ------------------------------------------------------------------
        cart_match = np.zeros(n)
        if checkout.any():
            rows_cart = self.cart[users[checkout]]
            cats = np.where(rows_cart >= 0, self.category[np.maximum(rows_cart, 0)], -1)
            cart_match[checkout] = (cats == self.category[items[checkout]][:, None]).any(axis=1)
        carted, cart_ts, clicked = self._respond(
            rng, imp_ids, users, items, ts, truth.examination(position), 2.0 * position, cart_match
        )
        o_users, o_items, o_carted, o_cart_ts, o_clicked = self._organic_day(day_start)
        bought = self._settle_purchases(day_end)
        self._restock(day_start, day_end)
        self._update_carts(
            np.concatenate([users[carted], o_users[o_carted]]),
            np.concatenate([items[carted], o_items[o_carted]]),
            np.concatenate([cart_ts[carted], o_cart_ts[o_carted]]),
            bought,
            day_end,
        )
        self.pop_days.append(
            np.bincount(
                np.concatenate([items[clicked], o_items[o_clicked]]), minlength=self.n_items
            ).astype(float)
        )

    def _respond(
        self,
        rng: np.random.Generator,
        imp_ids: np.ndarray,
        users: np.ndarray,
        items: np.ndarray,
        ts: np.ndarray,
        exam: np.ndarray,
        click_delay_s: np.ndarray,
        cart_match: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Clicks, add-to-carts and (queued) purchases of impressions looked at with
        probability ``exam``; returns (carted, cart_ts, clicked)."""
        cfg, truth = self.cfg, self.world.truth
        n = len(items)
        p_click, p_cart, p_buy = truth.probabilities(users, items, ts, cart_match)
        examined = rng.random(n) < exam
        clicked = examined & (rng.random(n) < p_click)
        carted = clicked & (rng.random(n) < p_cart)
        buys = carted & (rng.random(n) < p_buy)
        click_ts = ts + ((click_delay_s + rng.exponential(20.0, n)) * NS_PER_S).astype(np.int64)
        cart_ts = click_ts + (rng.exponential(90.0, n) * NS_PER_S).astype(np.int64)
        # the log ends with the window: later events are censored, like late purchases
        window_end = cfg.end_ts.value
        clicked &= click_ts < window_end
        carted &= clicked & (cart_ts < window_end)
        buys &= carted
        self.log.add(C.CLICKS, impression_id=imp_ids[clicked], ts=click_ts[clicked])
        self.log.add(C.ADD_TO_CARTS, impression_id=imp_ids[carted], ts=cart_ts[carted])
        nb = int(buys.sum())
        self._queue_purchases(
            imp_ids[buys],
            users[buys],
            items[buys],
            cart_ts[buys] + _purchase_delay_ns(rng, nb),
            1 + rng.poisson(truth.params["quantity_extra_mean"], nb),
        )
        return carted, cart_ts, clicked

    # ------------------------------------------------------------------------------------
    def _organic_day(self, day_start: int) -> tuple[np.ndarray, ...]:
        """The day's organic sessions (search, browse, a store visit: no feed policy). Each
        scans ``organic_scan`` items drawn uniformly from the listed, in-stock catalogue and
        looks at ``organic_items`` of them, drawn without replacement with weights
        ``exp(organic_focus * interest)``; every item looked at is an organic impression
        (position 0, no propensity) with the feed's response model at full examination.
        Returns (user, item, carted, cart_ts, clicked) per impression."""
        cfg, rng = self.cfg, self.organic_rng
        empty = np.zeros(0, np.int64)
        nothing = (empty, empty, np.zeros(0, bool), empty, np.zeros(0, bool))
        if cfg.organic_share <= 0 or cfg.organic_items <= 0:
            return nothing
        eligible = np.flatnonzero((self.item_created <= day_start) & (self.stock > 0))
        users, ts = self._sessions(rng, self.activity * cfg.organic_share, day_start)
        if not len(users) or not len(eligible):
            return nothing
        scan = min(cfg.organic_scan, len(eligible))
        k = min(cfg.organic_items, scan)
        truth = self.world.truth
        picked = []
        for lo in range(0, len(users), ORGANIC_CHUNK):
            u = users[lo : lo + ORGANIC_CHUNK]
            hits = eligible[rng.integers(0, len(eligible), (len(u), scan))]
            key = cfg.organic_focus * truth.interest(u, hits) + rng.gumbel(size=hits.shape)
            top = np.argpartition(-key, k - 1, axis=1)[:, :k]
            picked.append(np.take_along_axis(hits, top, axis=1))
        grid = np.concatenate(picked)
        # the scan draws with replacement: an item drawn twice is looked at once
        session = np.repeat(np.arange(len(users)), k)
        flat = pd.DataFrame({"s": session, "i": grid.ravel()}).drop_duplicates()
        session, items = flat["s"].to_numpy(), flat["i"].to_numpy(np.int64)
        o_users, o_ts = users[session], ts[session]
        n = len(items)
        request_ids = self.next_request + session
        self.next_request += len(users)
        imp_ids = np.arange(self.next_impression, self.next_impression + n, dtype=np.int64)
        self.next_impression += n
        self.log.add(
            C.IMPRESSIONS,
            impression_id=imp_ids,
            request_id=request_ids.astype(np.int64),
            user_id=o_users,
            item_id=items,
            position=np.zeros(n, np.int64),
            surface=np.zeros(n, np.int8),  # HOME
            ts=o_ts,
            policy=np.full(n, ORGANIC_CODE, np.int8),
            propensity=np.full(n, np.nan),
        )
        carted, cart_ts, clicked = self._respond(
            rng, imp_ids, o_users, items, o_ts, np.ones(n), np.full(n, 30.0), None
        )
        return o_users, items, carted, cart_ts, clicked

    def _queue_purchases(self, imp, users, items, ts, qty) -> None:
        for key, values in zip(
            (C.IMPRESSION_ID, C.USER_ID, C.ITEM_ID, C.TS, C.QUANTITY),
            (imp, users, items, ts, qty),
            strict=True,
        ):
            self.pending[key] = np.concatenate([self.pending[key], values])

    def _settle_purchases(self, day_end: int) -> pd.DataFrame:
        """Purchases that happen before ``day_end``, in time order, while stock lasts."""
        due = self.pending[C.TS] < day_end
        now = {k: v[due] for k, v in self.pending.items()}
        self.pending = {k: v[~due] for k, v in self.pending.items()}
        order = np.lexsort((now[C.TS], now[C.ITEM_ID]))
        now = {k: v[order] for k, v in now.items()}
        items, qty = now[C.ITEM_ID], now[C.QUANTITY]
        # cumulative demand per item in time order; a purchase fails once stock runs out
        frame = pd.DataFrame({"item": items, "qty": qty})
        demand = frame.groupby("item")["qty"].cumsum().to_numpy()
        ok = demand <= self.stock[items]
        self.stats["purchases_out_of_stock"] += int((~ok).sum())
        done = {k: v[ok] for k, v in now.items()}
        sold = np.bincount(done[C.ITEM_ID], weights=done[C.QUANTITY], minlength=self.n_items)
        self.stock -= sold.astype(np.int64)
        self.log.add(
            C.PURCHASES,
            impression_id=done[C.IMPRESSION_ID],
            ts=done[C.TS],
            price=self.price[done[C.ITEM_ID]],
            quantity=done[C.QUANTITY],
        )
        changed = np.flatnonzero(sold > 0)
        if len(changed):
            last = pd.Series(done[C.TS]).groupby(done[C.ITEM_ID]).max()
            self.log.add(
                C.INVENTORY,
                item_id=changed,
                ts=last.reindex(changed).to_numpy(np.int64),
                stock=self.stock[changed],
            )
        users = done[C.USER_ID]
        np.add.at(self.spend_sum, users, self.price[done[C.ITEM_ID]])
        np.add.at(self.spend_n, users, 1.0)
        seen = self.spend_n > 0
        mean_paid = np.divide(
            self.spend_sum, self.spend_n, out=np.zeros_like(self.spend_sum), where=seen
        )
        base = COUNTRY_PRICE_CAP[self.world.truth.user_country]
        self.price_cap = np.where(seen, np.maximum(base, 2.5 * mean_paid), base)
        return pd.DataFrame({C.USER_ID: users, C.ITEM_ID: done[C.ITEM_ID]})

    def _restock(self, day_start: int, day_end: int) -> None:
        out = np.flatnonzero(
            (self.stock <= 0)
            & (self.item_created < day_start)
            & (self.rng.random(self.n_items) < self.cfg.restock_probability)
        )
        if not len(out):
            return
        recent_clicks = np.sum(np.stack(self.pop_days), axis=0)[out]
        self.stock[out] = 1 + self.rng.poisson(
            np.exp(self.rng.normal(3.0, 1.0, len(out))) + 2.0 * recent_clicks
        )
        ts = day_end - (self.rng.uniform(0, 3600, len(out)) * NS_PER_S).astype(np.int64)
        self.log.add(C.INVENTORY, item_id=out, ts=ts, stock=self.stock[out])

    def _update_carts(self, users, items, ts, bought: pd.DataFrame, day_end: int) -> None:
        recent = pd.concat(
            [self.recent_carts, pd.DataFrame({C.USER_ID: users, C.ITEM_ID: items, C.TS: ts})],
            ignore_index=True,
        )
        recent = recent[recent[C.TS] >= day_end - CART_DAYS * NS_PER_DAY]
        if len(bought):
            key = recent[C.USER_ID].to_numpy() * self.n_items + recent[C.ITEM_ID].to_numpy()
            gone = bought[C.USER_ID].to_numpy() * self.n_items + bought[C.ITEM_ID].to_numpy()
            recent = recent[~np.isin(key, gone)]
        recent = recent.drop_duplicates([C.USER_ID, C.ITEM_ID], keep="last")
        self.recent_carts = recent
        self.cart.fill(-1)
        last = recent.sort_values(C.TS).groupby(C.USER_ID).tail(CART_SLOTS)
        slot = last.groupby(C.USER_ID).cumcount().to_numpy()
        self.cart[last[C.USER_ID].to_numpy(), slot] = last[C.ITEM_ID].to_numpy()

    # ------------------------------------------------------------------------------------
    def _tables(self) -> dict[str, pd.DataFrame]:
        def ts_cols(df: pd.DataFrame) -> pd.DataFrame:
            if C.TS in df:
                df[C.TS] = from_ns(df[C.TS].to_numpy())
            return df

        lay = C.TABLES
        out = {
            name: ts_cols(self.log.frame(name, list(lay[name])))
            for name in (C.IMPRESSIONS, C.CLICKS, C.ADD_TO_CARTS, C.PURCHASES, C.INVENTORY)
        }
        imp = out[C.IMPRESSIONS]
        imp[C.SURFACE] = SURFACE_NAMES[imp[C.SURFACE].to_numpy(np.int8)]
        imp[C.POLICY] = POLICY_NAMES[imp[C.POLICY].to_numpy(np.int8)]
        out[C.PURCHASES] = out[C.PURCHASES].sort_values(C.TS, kind="stable").reset_index(drop=True)
        out[C.INVENTORY] = (
            out[C.INVENTORY].sort_values([C.TS, C.ITEM_ID], kind="stable").reset_index(drop=True)
        )
        out["checkout_carts"] = self.log.frame("checkout_carts", [C.REQUEST_ID, C.ITEM_ID])
        for name in out:
            for col, kind in lay.get(name, {}).items():
                if kind in ("id", "int"):
                    out[name][col] = out[name][col].astype(np.int64)
                elif kind == "float":
                    out[name][col] = out[name][col].astype(np.float64)
        return out
