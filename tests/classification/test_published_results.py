"""The committed LGG study results (``bundle/tumor_classification/docs/results``) are consistent with themselves.

The full study takes about 70 minutes, so CI does not rerun it; instead the published tables are recomputed
from the published out-of-fold predictions with independent code (scikit-learn's AUC) and the bundle's DeLong
test, and the model card is checked to quote them.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tumor_classification_scripts.stats import delong_test

BUNDLE = Path(__file__).resolve().parents[2] / "bundle" / "tumor_classification"
RESULTS = BUNDLE / "docs" / "results"


def _rows(name: str) -> list[dict[str, str]]:
    with open(RESULTS / name, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def pooled() -> dict[tuple[str, str], tuple[list[str], np.ndarray, np.ndarray]]:
    """(task, arm) -> (units, labels, pooled score = mean over seeds of the out-of-fold probability)."""
    scores: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    labels: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for r in _rows("predictions.csv"):
        key = (r["task"], r["arm"])
        scores[key][r["unit"]].append(float(r["score"]))
        labels[key][r["unit"]] = int(r["label"])
    out = {}
    for key, per_unit in scores.items():
        units = sorted(per_unit)
        out[key] = (units, np.array([labels[key][u] for u in units]), np.array([np.mean(per_unit[u]) for u in units]))
    return out


def test_every_unit_is_scored_once_per_seed(pooled) -> None:
    seeds = {r["seed"] for r in _rows("predictions.csv")}
    counts = defaultdict(int)
    for r in _rows("predictions.csv"):
        counts[(r["task"], r["arm"], r["unit"])] += 1
    assert set(counts.values()) == {len(seeds)}  # out-of-fold exactly once per seed
    n_units = {task: {len(v[0]) for (t, _), v in pooled.items() if t == task} for task in ("patient", "slice")}
    assert n_units == {"patient": {78}, "slice": {1232}}  # the cohort after exclusions, the same in every arm


def test_pooled_auc_matches_scikit_learn(pooled) -> None:
    for r in _rows("results.csv"):
        _, y, s = pooled[(r["task"], r["arm"])]
        assert roc_auc_score(y, s) == pytest.approx(float(r["pooled_auc"]), abs=1e-5), (r["task"], r["arm"])
        assert float(r["pooled_auc_ci_low"]) <= float(r["pooled_auc"]) <= float(r["pooled_auc_ci_high"])


def test_comparisons_match_a_fresh_delong_test(pooled) -> None:
    for c in _rows("comparisons.csv"):
        units_f, y, s_f = pooled[(c["task"], c["fused_arm"])]
        units_o, y_o, s_o = pooled[(c["task"], c["other_arm"])]
        assert units_f == units_o and np.array_equal(y, y_o)  # paired on the same units
        test = delong_test(y, s_f, s_o)
        assert test["delta"] == pytest.approx(float(c["delta_auc"]), abs=1e-5)
        assert test["p"] == pytest.approx(float(c["delong_p"]), rel=1e-4, abs=1e-6)
        significant = test["p"] < 0.05 and (float(c["bootstrap_delta_ci_low"]) > 0 or float(c["bootstrap_delta_ci_high"]) < 0)
        assert (c["verdict"] != "no significant difference") == significant


def test_model_card_quotes_the_published_numbers() -> None:
    card = (BUNDLE / "docs" / "README.md").read_text()
    for c in _rows("comparisons.csv"):
        assert f"{float(c['auc_fused']):.3f}" in card and f"{float(c['auc_other']):.3f}" in card
        assert f"{float(c['delta_auc']):+.3f}" in card, c["other_arm"]
    assert "does not beat" in card  # the plain statement of the outcome
