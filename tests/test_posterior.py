"""The history-limited Oracle (training.simulate.posterior) on the tiny marketplace."""

from __future__ import annotations

import numpy as np
import pytest

from training.simulate import load_config
from training.simulate.posterior import Histories, History, HistoryOracle, Posterior
from training.simulate.world import world_categories

PARTICLES = 8_000


@pytest.fixture(scope="module")
def bayes(tiny_sim):
    cfg = load_config("tiny")
    cat_pop, cat_centroid = world_categories(cfg.seed, cfg.categories, cfg.latent_dim)
    oracle = HistoryOracle(
        tiny_sim.truth, cat_pop, cat_centroid, cfg.organic_focus, cfg.organic_scan, PARTICLES
    )
    return oracle, Histories(tiny_sim.tables, tiny_sim.truth)


def test_world_categories_are_the_worlds_own(tiny_sim):
    cfg = load_config("tiny")
    _, centroid = world_categories(cfg.seed, cfg.categories, cfg.latent_dim)
    truth = tiny_sim.truth
    for cat in range(cfg.categories):
        mean = truth.item_latent[truth.item_category == cat].mean(axis=0)
        assert mean @ centroid[cat] / np.linalg.norm(mean) > 0.9
    other, _ = world_categories(cfg.seed + 1, cfg.categories, cfg.latent_dim)
    assert not np.allclose(other, world_categories(cfg.seed, cfg.categories, cfg.latent_dim)[0])


def test_response_with_a_users_own_parameters_is_probabilities(tiny_sim):
    truth = tiny_sim.truth
    users = np.array([3, 3, 40, 41])
    items = np.array([5, 9, 100, 7])
    affinity = np.einsum("ij,ij->i", truth.user_taste[users], truth.item_latent[items])
    got = truth.response(
        affinity, truth.user_price_sensitivity[users], truth.user_budget[users], users, items, 0
    )
    for a, b in zip(got, truth.probabilities(users, items, 0), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def heavy(tiny_sim, bayes):
    """The eight users with the most clicks: their posteriors at the window's end, and the
    prior (no history) with their country and device."""
    oracle, histories = bayes
    clicks = {u: int(h.clicked.sum()) for u, h in histories._by_user.items()}
    end = int(tiny_sim.truth.params["end_ns"])
    prior = oracle.posterior(0, histories.of(-1, 0))
    users = sorted(clicks, key=lambda u: -clicks[u])[:8]
    return end, prior, {u: oracle.posterior(u, histories.of(u, end)) for u in users}


def test_history_pulls_the_posterior_towards_the_true_taste(tiny_sim, bayes, heavy):
    oracle, _ = bayes
    truth = tiny_sim.truth
    _, prior, posteriors = heavy

    def cosine(post: Posterior, user: int) -> float:
        mean = post.weights @ oracle.taste[post.particles]
        return float(mean @ truth.user_taste[user] / np.linalg.norm(mean))

    with_history = [cosine(post, user) for user, post in posteriors.items()]
    prior_only = [cosine(prior, user) for user in posteriors]
    assert np.median(with_history) > 0.85
    assert np.median(with_history) > np.median(prior_only) + 0.2
    assert prior.ess == pytest.approx(PARTICLES)
    assert all(post.ess < PARTICLES / 2 for post in posteriors.values())


def test_history_limited_pages_earn_more_than_prior_pages_and_less_than_the_oracle(
    tiny_sim, bayes, heavy
):
    oracle, _ = bayes
    truth = tiny_sim.truth
    end, prior, posteriors = heavy
    rng = np.random.default_rng(0)
    exam = truth.examination(np.arange(1, 21))
    earned = {"history": 0.0, "prior": 0.0, "oracle": 0.0}
    for user, post in posteriors.items():
        items = rng.choice(len(truth.item_price), 300, replace=False)
        true = tiny_sim.oracle.item_values(user, items)["margin"]
        for name, belief in (("history", post), ("prior", prior)):
            value = oracle.expected_values(user, belief.thinned(2000), items, end)
            earned[name] += exam @ true[np.argsort(-value)[:20]]
        earned["oracle"] += exam @ np.sort(true)[::-1][:20]
    assert earned["prior"] < earned["history"] <= earned["oracle"]
    assert earned["history"] > 0.8 * earned["oracle"]


def test_history_stops_at_the_moment_asked():
    never = np.iinfo(np.int64).max
    ts = np.array([10, 20, 20, 30])
    clicks = np.array([12, never, 25, 31])
    purchases = np.array([40, never, never, never])
    h = History(np.arange(4), np.arange(4), ts, clicks, clicks, purchases, np.zeros(4))
    assert h.before(11).clicked.tolist() == [False]  # shown at 10, clicked at 12
    assert h.before(20).clicked.tolist() == [True]
    assert h.before(21).clicked.tolist() == [True, False, False]
    assert h.before(99).clicked.tolist() == [True, False, True, True]
    assert h.before(35).purchased.tolist() == [False] * 4  # bought after the request
    assert h.before(41).purchased.tolist() == [True, False, False, False]


def test_thinning_keeps_the_weights_in_expectation():
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.full(1000, 0.3))
    posterior = Posterior(np.arange(1000), w, 1.0 / np.square(w).sum())
    thinned = posterior.thinned(200)
    assert len(thinned.particles) == 200 and thinned.ess == posterior.ess
    # each particle is kept about w * 200 times: systematic resampling is off by < 1
    kept = np.bincount(thinned.particles, minlength=1000)
    assert np.abs(kept - 200 * w).max() < 1.0
    assert posterior.thinned(10_000) is posterior


def test_purchase_delay_cdf_is_the_samplers():
    from training.simulate.engine import _purchase_delay_ns, purchase_delay_cdf

    hours = _purchase_delay_ns(np.random.default_rng(0), 200_000) / 3.6e12
    for h in (1.0, 24.0, 100.0, 168.0, 200.0, 400.0):
        assert purchase_delay_cdf(np.array(h)) == pytest.approx((hours <= h).mean(), abs=0.005)
    assert purchase_delay_cdf(np.array(-1.0)) == 0.0


def test_believed_appeal_follows_the_logs_and_keeps_the_prior_for_unseen_items(tiny_sim, bayes):
    from training.simulate.posterior import believed_appeal

    _, histories = bayes
    truth = tiny_sim.truth
    sd = load_config("tiny").appeal_sd
    middle = int(truth.params["start_ns"] + truth.params["end_ns"]) // 2
    believed = believed_appeal(truth, histories, middle, sd)
    shown = np.bincount(histories.all_before(middle)[1], minlength=len(believed))
    unseen = shown == 0
    np.testing.assert_allclose(believed[unseen], sd**2 / 2, atol=1e-3)
    often = shown >= 200
    assert often.sum() > 20
    assert np.corrcoef(believed[often], truth.item_appeal[often])[0, 1] > 0.5
    # more evidence, a belief further from the prior
    assert (
        np.abs(believed[often] - sd**2 / 2).mean()
        > np.abs(believed[(shown > 0) & (shown < 5)] - sd**2 / 2).mean()
    )


def test_particle_response_is_the_ground_truths(tiny_sim, bayes):
    oracle, _ = bayes
    truth = tiny_sim.truth
    rows = np.arange(0, PARTICLES, 97)
    items = np.random.default_rng(1).choice(len(truth.item_price), 60, replace=False)
    at = np.full(60, int(truth.params["end_ns"]) - 10**15)
    match = (np.arange(60) % 3 == 0).astype(float)
    users = np.full(60, 5)
    want = truth.response(
        oracle.taste[rows] @ truth.item_latent[items].T,
        oracle.sensitivity[rows, None],
        oracle.budget[rows, None],
        users,
        items,
        at,
        match,
    )
    logits = oracle._item_logits(5, items, at, match)
    got = oracle._response(rows, items, logits)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9)
    some = np.arange(60) % 4 == 1
    pc, pa, pb = oracle._response(rows, items, logits, clicks_only=some)
    np.testing.assert_allclose(pa, want[1][:, some], rtol=1e-9)
    assert pc.shape == (len(rows), 60) and pb.shape == (len(rows), some.sum())
