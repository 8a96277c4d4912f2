"""The auto threshold (``stages/score/calibrate.py``): the grid, the null, the mixture, the choice.

Mixtures with a known truth: a normal null and a shifted matched distribution, in known shares.
Tolerances are stated where they are used: the mismatched share within 0.03 when the two
distributions barely overlap (Storey's estimator is then nearly unbiased), within [-0.01, +0.06]
when they overlap (it overestimates: matched pairs below the null's median count as mismatched),
and the chosen threshold's true precision at least the target minus 0.01.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from wit_pipeline.config import ScoreConfig
from wit_pipeline.stages.score import calibrate as cal

TARGET = 0.95


def mixture(seed: int, *, m: int, pi0: float, shift: float, n_null: int = 10_000, sd=0.05):
    """Pool scores (mismatched ~ N(0.1, sd), matched ~ N(0.1 + shift, sd)), truth labels, null."""
    rng = np.random.default_rng(seed)
    n_bad = round(pi0 * m)
    bad = rng.normal(0.1, sd, n_bad)
    good = rng.normal(0.1 + shift, sd, m - n_bad)
    pool = np.concatenate([bad, good])
    truth = np.concatenate([np.zeros(n_bad, bool), np.ones(m - n_bad, bool)])
    null = rng.normal(0.1, sd, n_null)
    return pool, truth, null


def true_precision_recall(pool, truth, t):
    kept = pool >= t
    return truth[kept].mean(), kept[truth].mean()


# ---------------------------------------------------------------------------------------------
# The grid


def test_bins_follow_float_comparisons_exactly():
    rng = np.random.default_rng(0)
    scores = np.concatenate(
        [rng.uniform(-1, 1, 5000), cal.edge(rng.integers(0, cal.FINE_BINS, 500)), [-1.0, 0.3]]
    )
    j = cal.bin_index(scores)
    assert np.all(cal.edge(j) <= scores) and np.all(scores < cal.edge(j + 1))
    hist = cal.histogram(scores)
    assert hist.sum() == len(scores)
    above = cal.at_or_above(hist)
    for k in [0, 1, 7000, 13000, 19999, *rng.integers(0, cal.FINE_BINS, 20)]:
        assert above[k] == int((scores >= cal.edge(k)).sum())
    assert cal.edge(13000) == 0.3 and cal.bin_index([0.3])[0] == 13000
    assert cal.bin_index([1.0, 1.0000001, -1.0000001]).tolist() == [19999, 19999, 0]


def test_document_histogram_spans_the_scores_on_at_most_100_bins():
    pool = cal.histogram([0.31, 0.35, 0.35, 0.8])
    null = cal.histogram([0.05, 0.1])
    doc = cal.doc_histogram(pool, null)
    assert sum(doc["pool"]) == 4 and sum(doc["null"]) == 2
    assert len(doc["edges"]) == len(doc["pool"]) + 1 == len(doc["null"]) + 1 <= 101
    assert doc["edges"][0] <= 0.05 and doc["edges"][-1] > 0.8
    assert all(round(e, 4) == e for e in doc["edges"])
    widths = np.diff(doc["edges"])
    assert np.allclose(widths, widths[0])
    assert cal.doc_histogram(cal.histogram([]), cal.histogram([])) == {
        "edges": [],
        "pool": [],
        "null": [],
    }


# ---------------------------------------------------------------------------------------------
# Mixtures with a known truth


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pi0", [0.2, 0.5, 0.8])
def test_separated_mixture_share_and_threshold(seed, pi0):
    pool, truth, null = mixture(seed, m=20_000, pi0=pi0, shift=0.3)
    p, n = cal.histogram(pool), cal.histogram(null)
    est = cal.storey_pi0(p, n)
    assert abs(est - pi0) <= 0.03
    choice = cal.choose_threshold(p, n, est, TARGET)
    assert choice.met
    precision, recall = true_precision_recall(pool, truth, choice.threshold)
    assert precision >= TARGET - 0.01
    exp_p, exp_r = cal.estimates_at(p, n, est, choice.threshold)
    assert exp_p >= TARGET and abs(exp_r - recall) <= 0.03
    # the lowest such threshold: one grid step lower misses the target
    lower = cal.curve(p, n, est).precision[choice.index - 1]
    assert lower < TARGET


@pytest.mark.parametrize("seed", [0, 1])
def test_overlapping_mixture_is_estimated_conservatively(seed):
    pi0 = 0.4
    pool, truth, null = mixture(seed, m=20_000, pi0=pi0, shift=0.1)  # 2 sd apart
    p, n = cal.histogram(pool), cal.histogram(null)
    est = cal.storey_pi0(p, n)
    assert pi0 - 0.01 <= est <= pi0 + 0.06
    choice = cal.choose_threshold(p, n, est, TARGET)
    precision, _ = true_precision_recall(pool, truth, choice.threshold)
    assert choice.met and precision >= TARGET - 0.01


def test_no_mismatched_pairs_keeps_every_pair():
    pool, _, null = mixture(0, m=5000, pi0=0.0, shift=0.5)
    p, n = cal.histogram(pool), cal.histogram(null)
    assert cal.storey_pi0(p, n) == 0.0
    choice = cal.choose_threshold(p, n, 0.0, TARGET)
    assert choice.met and choice.threshold <= pool.min()
    assert cal.estimates_at(p, n, 0.0, choice.threshold) == (1.0, 1.0)


def test_all_mismatched_pairs_miss_the_target_with_a_warning(caplog):
    pool, _, null = mixture(0, m=5000, pi0=1.0, shift=0.5)
    cfg = ScoreConfig(threshold="auto")
    with caplog.at_level(logging.WARNING, logger="wit_pipeline.score"):
        d = cal.decide(cfg, cal.histogram(pool), null)
    doc = d.doc
    assert doc["mismatched_share"] >= 0.97
    assert doc["target_met"] is False and doc["mode"] == "auto"
    assert doc["expected_precision"] < 0.5
    assert "no threshold reaches the expected precision 0.950" in caplog.text
    # the threshold of the highest expected precision
    curve = cal.curve(cal.histogram(pool), cal.histogram(null), doc["mismatched_share"])
    seen = np.nonzero(cal.histogram(pool))[0]
    best = np.nanmax(curve.precision[seen[0] : seen[-1] + 1])
    assert d.threshold == cal.edge(seen[0] + int(np.nanargmax(curve.precision[seen[0] :])))
    assert doc["expected_precision"] == pytest.approx(best, abs=1e-6)


def test_tiny_pool_exactly():
    # pool 0.05, 0.5, 0.6; null 0.0, 0.1 (n = 2). p-values (k + 1) / 3: 2/3, 1/3, 1/3:
    # pi0 = 1 / (0.5 * 3). Precision with F = (k + 1) / 3: 5/9 at 0.05, 1/3 up to 0.1,
    # 2/3 up to 0.5, 1/3 up to 0.6: the target is missed, the best is just above 0.1.
    p, n = cal.histogram([0.05, 0.5, 0.6]), cal.histogram([0.0, 0.1])
    pi0 = cal.storey_pi0(p, n)
    assert pi0 == pytest.approx(2 / 3)
    choice = cal.choose_threshold(p, n, pi0, TARGET)
    assert (choice.threshold, choice.met) == (0.1001, False)
    prec, rec = cal.estimates_at(p, n, pi0, choice.threshold)
    assert prec == pytest.approx(2 / 3) and rec == 1.0  # (2 - 2/3) / (1/3 * 3), capped
    assert cal.estimates_at(p, n, pi0, 0.05)[0] == pytest.approx(5 / 9)
    assert cal.estimates_at(p, n, pi0, None)[0] == pytest.approx(1 / 3)  # 1 - pi0: keep all
    # above every null score the pool is clean: a target it reaches is met there
    p2 = cal.histogram([0.5, 0.6, 0.7])
    assert cal.storey_pi0(p2, n) == 0.0
    choice = cal.choose_threshold(p2, n, 0.0, TARGET)
    assert (choice.threshold, choice.met) == (0.5, True)


def test_ties_between_pool_and_null():
    p, n = cal.histogram([0.3] * 10), cal.histogram([0.3] * 10)
    pi0 = cal.storey_pi0(p, n)
    assert pi0 == 1.0  # capped
    choice = cal.choose_threshold(p, n, pi0, TARGET)
    assert (choice.threshold, choice.met) == (0.3, False)  # keeps the tied scores (>=)


def test_decide_without_a_null_keeps_every_pair(caplog):
    cfg = ScoreConfig(threshold="auto", null_samples=2)
    with caplog.at_level(logging.WARNING, logger="wit_pipeline.score"):
        d = cal.decide(cfg, cal.histogram([0.2, 0.3]), [0.1])
    assert d.threshold is None
    assert d.doc["target_met"] is False and d.doc["mismatched_share"] is None
    assert d.doc["null_size"] == 1 and "no auto threshold" in caplog.text
    empty = cal.decide(cfg, cal.histogram([]), [0.1, 0.2])
    assert empty.threshold is None and empty.doc["pool_pairs"] == 0


def test_decide_reports_the_estimates_of_every_mode():
    pool, _, null = mixture(3, m=4000, pi0=0.5, shift=0.3)
    hist = cal.histogram(pool)
    fixed = cal.decide(ScoreConfig(threshold=0.2), hist, null)
    assert fixed.threshold == 0.2 and fixed.doc["mode"] == "fixed"
    assert fixed.doc["target_met"] is None
    expected = cal.estimates_at(hist, cal.histogram(null), fixed.doc["mismatched_share"], 0.2)
    assert fixed.doc["expected_precision"] == pytest.approx(expected[0], abs=1e-6)
    kth = cal.top_fraction_threshold(pool, 0.3)
    top = cal.decide(ScoreConfig(keep_fraction=0.3), hist, null, kth)
    assert top.threshold == kth and top.doc["mode"] == "keep_fraction"
    nothing = cal.decide(ScoreConfig(), hist, null)
    assert nothing.threshold is None and nothing.doc["mode"] == "none"
    assert nothing.doc["expected_recall"] == 1.0
    assert nothing.doc["expected_precision"] == pytest.approx(
        1 - nothing.doc["mismatched_share"], abs=1e-6
    )
    zero = cal.decide(ScoreConfig(keep_fraction=0.0), hist, null, math.inf)
    assert zero.threshold == math.inf and zero.doc["threshold"] is None
    for d in (fixed, top, nothing):
        assert d.doc["pool_pairs"] == 4000 and d.doc["null_size"] == 10_000
        assert sum(d.doc["histogram"]["pool"]) == 4000
        assert sum(d.doc["histogram"]["null"]) == 10_000


def test_top_fraction_threshold():
    scores = [0.1, 0.5, 0.3, 0.9, 0.7, 0.2, 0.4, 0.8, 0.6, 0.0]
    assert cal.top_fraction_threshold(scores, 0.3) == pytest.approx(0.7)  # keeps 0.9, 0.8, 0.7
    assert cal.top_fraction_threshold(scores, 1.0) == pytest.approx(0.0)
    assert cal.top_fraction_threshold(scores, 0.04) == math.inf  # round(0.4) = 0 kept
    assert cal.top_fraction_threshold(scores, 0.05) == pytest.approx(0.9)  # round(0.5) = 1
    assert cal.top_fraction_threshold([], 0.5) == math.inf
    assert cal.top_fraction_threshold([0.2, 0.5, 0.5, 0.1], 0.25) == 0.5  # ties all kept


# ---------------------------------------------------------------------------------------------
# The null: chosen and paired by keys, never by position


def _candidate(iid, uid, img, txt, seed=0):
    return cal.NullCandidate(
        iid, cal.null_rank(seed, iid), uid, np.asarray(img, np.float32), np.asarray(txt, np.float32)
    )


def test_null_selection_depends_on_the_keys_only():
    ids = [f"k{i:03d}" for i in range(50)]
    chosen = cal.select_null(ids, 10, seed=0)
    assert chosen == cal.select_null(list(reversed(ids)) + ids[:5], 10, seed=0)
    ranks = [cal.null_rank(0, i) for i in chosen]
    assert ranks == sorted(ranks) and len(chosen) == 10
    assert max(ranks) < min(cal.null_rank(0, i) for i in set(ids) - set(chosen))
    assert cal.select_null(ids, 10, seed=1) != chosen
    assert sorted(cal.select_null(ids[:3], 10, seed=0)) == ids[:3]  # all when fewer


def test_null_pairs_each_image_with_the_next_images_first_caption():
    e = np.eye(4)
    cands = [
        _candidate(f"i{k}", f"u{k}", e[k], e[k] * 0.5 + e[(k + 2) % 4] * 0.5) for k in range(4)
    ]
    order = sorted(cands, key=lambda c: (c.rank, c.image_id))
    got = cal.null_scores(reversed(cands))
    want = [float(np.float32(np.dot(order[i].image, order[(i + 1) % 4].text))) for i in range(4)]
    assert got.tolist() == want
    # a second sample of an image (dedup.collapse = false) with a smaller uid gives the caption
    text = np.array([0.8, 0.6, 0.0, 0.0])
    extra = _candidate(order[1].image_id, "a-first", order[1].image, text)
    again = cal.null_scores([*cands, extra])
    assert again[0] == pytest.approx(float(np.dot(order[0].image, extra.text)))
    assert again[1:].tolist() == want[1:]
    assert cal.null_scores(cands[:1]).size == 0
