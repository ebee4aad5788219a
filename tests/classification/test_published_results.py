"""The committed LGG study results (``bundle/tumor_classification/docs/results``) are consistent with themselves.

CI does not rerun the studies; instead the published tables are recomputed from the published out-of-fold
predictions with independent code (scikit-learn's AUC) and the bundle's DeLong test, and the model card is
checked to quote them. ``results/`` holds the feature-based classifiers' study (with its external-validation
files absent: the shared cohort has no external set), ``results/cnn/`` the CNN's study with its earlier fixed
recipe, ``results/cnn_recipe/`` the current CNN recipe on the single-sequence arms (one seed).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from tumor_classification_scripts.stats import delong_test

BUNDLE = Path(__file__).resolve().parents[2] / "bundle" / "tumor_classification"
RESULTS = BUNDLE / "docs" / "results"
FOLDERS = [RESULTS, RESULTS / "cnn"]


def _rows(folder: Path, name: str) -> list[dict[str, str]]:
    with open(folder / name, newline="") as f:
        return list(csv.DictReader(f))


def _key(r: dict[str, str]) -> tuple[str, str, str]:
    return r.get("classifier", "cnn"), r["task"], r["arm"]


def pooled(folder: Path) -> dict[tuple[str, str, str], tuple[list[str], np.ndarray, np.ndarray]]:
    """(classifier, task, arm) -> (units, labels, pooled score = mean over seeds of the out-of-fold score)."""
    scores: dict = defaultdict(lambda: defaultdict(list))
    labels: dict = defaultdict(dict)
    for r in _rows(folder, "predictions.csv"):
        scores[_key(r)][r["unit"]].append(float(r["score"]))
        labels[_key(r)][r["unit"]] = int(r["label"])
    out = {}
    for key, per_unit in scores.items():
        units = sorted(per_unit)
        out[key] = (units, np.array([labels[key][u] for u in units]), np.array([np.mean(per_unit[u]) for u in units]))
    return out


@pytest.mark.parametrize("folder", FOLDERS, ids=["features", "cnn"])
def test_every_unit_is_scored_once_per_seed(folder) -> None:
    preds = _rows(folder, "predictions.csv")
    seeds = {r["seed"] for r in preds}
    counts: dict = defaultdict(int)
    for r in preds:
        counts[(*_key(r), r["unit"])] += 1
    assert set(counts.values()) == {len(seeds)} and len(seeds) == 3  # out-of-fold exactly once per seed
    n_units = {
        task: {len(v[0]) for (_, t, _), v in pooled(folder).items() if t == task} for task in ("patient", "slice")
    }
    assert n_units == {"patient": {78}, "slice": {1232}}  # the cohort after exclusions, the same in every arm


@pytest.mark.parametrize("folder", FOLDERS, ids=["features", "cnn"])
def test_pooled_auc_matches_scikit_learn(folder) -> None:
    p = pooled(folder)
    for r in _rows(folder, "results.csv"):
        _, y, s = p[_key(r)]
        assert roc_auc_score(y, s) == pytest.approx(float(r["pooled_auc"]), abs=1e-5), _key(r)
        assert float(r["pooled_auc_ci_low"]) <= float(r["pooled_auc"]) <= float(r["pooled_auc_ci_high"])


@pytest.mark.parametrize("folder", FOLDERS, ids=["features", "cnn"])
def test_comparisons_match_a_fresh_delong_test(folder) -> None:
    p = pooled(folder)
    for c in _rows(folder, "comparisons.csv"):
        clf = c.get("classifier", "cnn")
        units_f, y, s_f = p[(clf, c["task"], c["fused_arm"])]
        units_o, y_o, s_o = p[(clf, c["task"], c["other_arm"])]
        assert units_f == units_o and np.array_equal(y, y_o)  # paired on the same units
        test = delong_test(y, s_f, s_o)
        assert test["delta"] == pytest.approx(float(c["delta_auc"]), abs=1e-5)
        assert test["p"] == pytest.approx(float(c["delong_p"]), rel=1e-4, abs=1e-6)
        significant = test["p"] < 0.05 and (
            float(c["bootstrap_delta_ci_low"]) > 0 or float(c["bootstrap_delta_ci_high"]) < 0
        )
        assert (c["verdict"] != "no significant difference") == significant


def test_model_card_quotes_the_published_numbers() -> None:
    card = (BUNDLE / "docs" / "README.md").read_text()
    for folder in FOLDERS:
        for c in _rows(folder, "comparisons.csv"):
            assert f"{float(c['auc_fused']):.3f}" in card and f"{float(c['auc_other']):.3f}" in card, _key(c)
            assert f"{float(c['delta_auc']):+.3f}" in card, (folder.name, c.get("classifier"), c["other_arm"])
    assert "does not beat" in card  # the plain statement of the outcome


def _check_recomputed_and_quoted(
    folder: Path, rows: list[dict[str, str]], text: str, quoted_arms: set[str] | None
) -> None:
    """Each results row's pooled AUC recomputes from the folder's predictions over the whole cohort, and ``text``
    quotes it as ``AUC [low, high]`` (rows of ``quoted_arms`` only; ``None``: every row)."""
    p = pooled(folder)
    for r in rows:
        units, y, s = p[_key(r)]
        assert len(units) == {"patient": 78, "slice": 1232}[r["task"]]
        assert roc_auc_score(y, s) == pytest.approx(float(r["pooled_auc"]), abs=1e-5), _key(r)
        if quoted_arms is None or r["arm"] in quoted_arms:
            low, high = float(r["pooled_auc_ci_low"]), float(r["pooled_auc_ci_high"])
            quoted = f"{float(r['pooled_auc']):.3f} [{low:.3f}, {high:.3f}]"
            assert quoted in text, (_key(r), quoted)


def test_cnn_recipe_measurement_is_consistent_and_quoted() -> None:
    """``results/cnn_recipe/``: the current CNN recipe on the single-sequence arms (one seed, no fused arm)."""
    folder = RESULTS / "cnn_recipe"
    rows = _rows(folder, "results.csv")
    assert {r["arm"] for r in rows} == {"flair", "t1c", "flair+t1c"}
    assert {r["task"] for r in rows} == {"patient", "slice"}
    _check_recomputed_and_quoted(folder, rows, (BUNDLE / "docs" / "README.md").read_text(), quoted_arms=None)


def test_study_with_the_current_fusion_weights_is_consistent_and_quoted() -> None:
    """``results/fusion_v030_seed0/``: every classifier and arm, one seed, with the fusion bundle's 0.3.0 weights
    (a fusion fingerprint other than the earlier studies'); its pooled AUCs recompute from its predictions, and the
    card quotes the fused arm's and the best single sequence's figures."""
    folder = RESULTS / "fusion_v030_seed0"
    rows = _rows(folder, "results.csv")
    assert {r["arm"] for r in rows} == {"flair", "t1c", "flair+t1c", "clinicalfmamba", "mean", "max"}
    info = json.loads((folder / "run_info.json").read_text())
    fused = next(a for a in info["arms"] if a["arm"] == "clinicalfmamba")
    earlier = next(
        a for a in json.loads((RESULTS / "run_info.json").read_text())["arms"] if a["arm"] == "clinicalfmamba"
    )
    assert info["seeds"] == [0] and fused["weights"] == "trained"
    assert fused["weights_fingerprint"] != earlier["weights_fingerprint"]
    card = (BUNDLE / "docs" / "README.md").read_text()
    section = card.split("### With the current fusion weights", 1)[1].split("\n## ", 1)[0]
    _check_recomputed_and_quoted(folder, rows, section, quoted_arms={"clinicalfmamba", "flair", "t1c"})
    for c in _rows(folder, "comparisons.csv"):
        if c["other_arm"] in ("flair", "t1c"):
            assert f"| {c['verdict']} |" in section, (c["classifier"], c["task"], c["other_arm"], c["verdict"])
