"""The committed LGG study (``bundle/tumor_classification/docs/results``) is consistent with itself, with the
shipped fusion weights, and with the model card.

CI does not rerun the study; instead the published tables are recomputed from the published out-of-fold
predictions with independent code (scikit-learn's AUC) and the bundle's DeLong test, the fused arm's weights
fingerprint is recomputed from the fusion bundle's ``models/model.pt``, and the card's results block must be
the one ``python -m scripts.card`` renders from the records.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from tumor_classification_scripts.card import BEGIN, END, render
from tumor_classification_scripts.stats import delong_test

BUNDLE = Path(__file__).resolve().parents[2] / "bundle" / "tumor_classification"
RESULTS = BUNDLE / "docs" / "results"
FOLDERS = [RESULTS]


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


@pytest.mark.parametrize("folder", FOLDERS, ids=["study"])
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


@pytest.mark.parametrize("folder", FOLDERS, ids=["study"])
def test_pooled_auc_matches_scikit_learn(folder) -> None:
    p = pooled(folder)
    for r in _rows(folder, "results.csv"):
        _, y, s = p[_key(r)]
        assert roc_auc_score(y, s) == pytest.approx(float(r["pooled_auc"]), abs=1e-5), _key(r)
        assert float(r["pooled_auc_ci_low"]) <= float(r["pooled_auc"]) <= float(r["pooled_auc_ci_high"])


@pytest.mark.parametrize("folder", FOLDERS, ids=["study"])
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


def test_the_study_is_complete_and_made_with_the_shipped_fusion_weights() -> None:
    from tumor_classification_scripts.arms import FusionArm
    from tumor_classification_scripts.fusion import load_fusion_bundle

    info = json.loads((RESULTS / "run_info.json").read_text())
    assert info["seeds"] == [0, 1, 2] and info["n_folds"] == 5 and info["folds_run"] == 5
    rows = _rows(RESULTS, "results.csv")
    expected = {"radiomics", "radiomics_image", "wholeslice", "cnn"}
    assert {r["classifier"] for r in rows} == expected
    assert {r["task"] for r in rows if r["classifier"] == "cnn"} == {"patient", "slice"}
    assert {r["arm"] for r in rows} == {"flair", "t1c", "flair+t1c", "clinicalfmamba", "mean", "max"}
    fused = next(a for a in info["arms"] if a["arm"] == info["fused_arm"])
    assert fused["weights"] == "trained" and fused["ckpt_path"] == "../../models/model.pt"
    shipped = FusionArm("shipped", load_fusion_bundle(BUNDLE.parents[1]))  # configs/inference.json + models/model.pt
    assert shipped.fingerprint == fused["weights_fingerprint"], "rerun the study with the shipped fusion weights"
    assert info["seconds"]["total"] < 2 * 3600  # the whole study inside the 2-hour budget on 2 CPU cores
    assert not any("/work/" in json.dumps(v) or "/home/" in json.dumps(v) for v in info.values())  # no machine paths


def test_card_block_is_rendered_from_the_records() -> None:
    card = (BUNDLE / "docs" / "README.md").read_text()
    assert f"{BEGIN}\n{render(RESULTS)}\n{END}" in card, "run python -m scripts.card in bundle/tumor_classification"
    assert "does not beat" in card or "**beats** both" in card  # the plain statement of the outcome


def test_card_renderer_states_the_targets_and_verdicts_it_reads(tmp_path) -> None:
    """The renderer's statements follow the records: a copy with a grade AUC raised to the target flips the
    grade target line to met and a comparison's verdict to the fused arm winning."""
    import shutil

    for name in ("results.csv", "comparisons.csv", "run_info.json"):
        shutil.copy(RESULTS / name, tmp_path / name)
    rows = _rows(tmp_path, "results.csv")
    for r in rows:
        if r["classifier"] == "radiomics" and r["task"] == "patient" and r["arm"] == "t1c":
            r.update(pooled_auc="0.9", pooled_auc_ci_low="0.8", pooled_auc_ci_high="0.95")
    comps = _rows(tmp_path, "comparisons.csv")
    for c in comps:
        if c["classifier"] == "cnn" and c["task"] == "slice" and c["other_arm"] in ("flair", "t1c"):
            c["verdict"] = "fused better"
    for name, table in (("results.csv", rows), ("comparisons.csv", comps)):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
    text = render(tmp_path)
    assert "`radiomics` on `t1c`, 0.900 [0.800, 0.950] — **met**" in text
    assert "- `cnn`, tumour vs none: the fused arm **beats** both single sequences." in text


def test_resolution_is_the_median_half_width_of_the_delta_ci() -> None:
    from tumor_classification_scripts.card import _resolution_lines

    comps = [
        {"task": "patient", "bootstrap_delta_ci_low": lo, "bootstrap_delta_ci_high": hi}
        for lo, hi in (("-0.1", "0.1"), ("-0.3", "0.1"), ("0.0", "0.6"))
    ] + [{"task": "slice", "bootstrap_delta_ci_low": "-0.01", "bootstrap_delta_ci_high": "0.03"}]
    lines = _resolution_lines(comps)  # half-widths 0.1, 0.2, 0.3 -> median 0.2; slice: 0.02
    assert "± 0.200" in lines[0] and "over 3 comparisons" in lines[0] and lines[0].startswith("- grade III vs II")
    assert "± 0.020" in lines[1] and lines[1].startswith("- tumour vs none")
