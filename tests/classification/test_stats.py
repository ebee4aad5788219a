"""Statistics of the classification study against known values."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from tumor_classification_scripts.stats import (
    aggregate_scores,
    auc,
    bootstrap_auc,
    choose_threshold,
    delong_components,
    delong_test,
    delong_variance,
    paired_bootstrap_delta,
    threshold_metrics,
)


def _brute_components(y, s):
    """DeLong 1988 structural components by the O(m n) definition (psi = 1, 1/2, 0)."""
    y = np.asarray(y, bool)
    pos, neg = np.asarray(s)[y], np.asarray(s)[~y]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)


def test_delong_hand_example():
    # positives 0.9, 0.8, 0.4; negatives 0.7, 0.3 -> psi = [[1,1],[1,1],[0,1]]
    # AUC = 5/6; V10 = [1, 1, 1/2] (var 1/12); V01 = [2/3, 1] (var 1/18); Var = (1/12)/3 + (1/18)/2 = 1/18
    y = [1, 1, 1, 0, 0]
    s = [0.9, 0.8, 0.4, 0.7, 0.3]
    aucs, v10, v01 = delong_components(y, s)
    assert aucs[0] == pytest.approx(5 / 6)
    np.testing.assert_allclose(v10[0], [1, 1, 0.5])
    np.testing.assert_allclose(v01[0], [2 / 3, 1])
    a, var = delong_variance(y, s)
    assert a[0] == pytest.approx(5 / 6)
    assert var[0, 0] == pytest.approx(1 / 18)


def test_delong_components_match_definition_with_ties():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    s = rng.integers(0, 6, 60) + 0.7 * y  # many ties
    aucs, v10, v01 = delong_components(y, s)
    a, b10, b01 = _brute_components(y, s)
    assert aucs[0] == pytest.approx(a)
    np.testing.assert_allclose(v10[0], b10)
    np.testing.assert_allclose(v01[0], b01)


def test_auc_equals_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 150)
        s = rng.integers(0, 8, 150) + y * rng.random(150)
        assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(auc([1, 1], [0.2, 0.3]))


def test_delong_identical_scores_p_is_one():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 80)
    s = rng.random(80) + 0.3 * y
    r = delong_test(y, s, s)
    assert r["delta"] == 0.0 and r["p"] == 1.0 and r["z"] == 0.0


def test_delong_paired_test_values():
    # two arms: the difference of AUCs, its variance from the covariance matrix, and a sane p
    rng = np.random.default_rng(2)
    y = np.r_[np.ones(40), np.zeros(40)].astype(int)
    a = rng.normal(size=80) + 1.5 * y
    b = rng.normal(size=80) + 0.2 * y
    r = delong_test(y, a, b)
    aucs, cov = delong_variance(y, np.stack([a, b]))
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, a))
    assert r["auc_b"] == pytest.approx(roc_auc_score(y, b))
    assert r["se"] == pytest.approx(np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]))
    assert r["p"] < 0.01
    assert delong_test(y, b, a)["p"] == pytest.approx(r["p"])
    # an order-preserving transform of the scores changes nothing
    assert delong_test(y, np.exp(a), b)["p"] == pytest.approx(r["p"])


def test_bootstrap_point_estimate_and_ci():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 100)
    s = rng.random(100) + 0.5 * y
    r = bootstrap_auc(y, s, n_boot=300, seed=0)
    assert r["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert r["ci_low"] < r["auc"] < r["ci_high"]
    assert r == bootstrap_auc(y, s, n_boot=300, seed=0)  # deterministic for a seed
    # one unit per patient: cluster resampling is the ordinary bootstrap
    assert bootstrap_auc(y, s, groups=[f"p{i:03d}" for i in range(100)], n_boot=300, seed=0) == r
    # perfectly separated scores: every resample has AUC 1
    sep = bootstrap_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], n_boot=200, seed=0)
    assert (sep["auc"], sep["ci_low"], sep["ci_high"]) == (1.0, 1.0, 1.0)


def test_bootstrap_resamples_patients_not_slices():
    # patient-level labels, 10 identical slices per patient: clustering must widen the CI vs slice resampling
    rng = np.random.default_rng(5)
    n_pat = 30
    yp = rng.integers(0, 2, n_pat)
    sp = rng.random(n_pat) + 0.4 * yp
    y = np.repeat(yp, 10)
    s = np.repeat(sp, 10)
    groups = np.repeat([f"p{i}" for i in range(n_pat)], 10)
    clustered = bootstrap_auc(y, s, groups=groups, n_boot=400, seed=0)
    naive = bootstrap_auc(y, s, n_boot=400, seed=0)
    assert clustered["auc"] == naive["auc"]
    assert (clustered["ci_high"] - clustered["ci_low"]) > 2 * (naive["ci_high"] - naive["ci_low"])


def test_paired_bootstrap_delta():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 120)
    s = rng.random(120) + 0.6 * y
    same = paired_bootstrap_delta(y, s, s, n_boot=200, seed=0)
    assert same["delta"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0 and same["p"] == 1.0
    worse = rng.random(120)
    d = paired_bootstrap_delta(y, s, worse, n_boot=300, seed=0)
    assert d["delta"] == pytest.approx(roc_auc_score(y, s) - roc_auc_score(y, worse))
    assert d["ci_low"] > 0 and d["p"] < 0.05


def test_aggregation_and_thresholds():
    agg = aggregate_scores(["a", "a", "b", "b", "b"], [0.2, 0.4, 0.9, 0.5, 0.7])
    assert agg == pytest.approx({"a": 0.3, "b": 0.7})
    assert aggregate_scores(["a", "a"], [0.2, 0.4], "max") == {"a": 0.4}
    with pytest.raises(ValueError):
        aggregate_scores(["a"], [0.1], "mode")
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.6, 0.5, 0.8, 0.9]
    t = choose_threshold(y, s, "youden")
    assert 0.2 < t <= 0.5 or 0.6 < t <= 0.8  # both give J = 2/3; the midpoint rule picks a gap
    assert choose_threshold(y, s, 0.5) == 0.5
    m = threshold_metrics(y, s, 0.55)  # predicted positive: 0.6, 0.8, 0.9
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(2 / 3)
    # perfectly separable training scores: Youden puts the threshold in the gap
    assert 0.3 < choose_threshold([0, 0, 1, 1], [0.1, 0.3, 0.7, 0.9]) < 0.7
