"""The model card's protocol results are generated from the committed records (``scripts.results_card``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.model_selection import RANK_METRICS
from scripts.results_card import BEGIN, END, main, render, render_selection, selected_run_readme, update_card

BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def test_card_agrees_with_the_committed_records() -> None:
    assert main(["--check"]) == 0, "docs/README.md is out of date: run python -m scripts.results_card"


def test_the_selected_run_folder_carries_the_selection_table() -> None:
    readme = selected_run_readme(BUNDLE_ROOT / "docs" / "results")
    assert readme is not None and readme.is_file(), "the validation selection names a run folder without README.md"
    assert (readme.parent / "command.txt").is_file() and (readme.parent / "training_log.csv").is_file()
    assert BEGIN in readme.read_text() and "**Selected: `" in readme.read_text()


def _summary(profile: str, metrics, methods: dict[str, float], split: str) -> dict:
    return {
        "split": split,
        "profile": profile,
        "metrics": list(metrics),
        "methods": {
            m: {t: {"n": 3, **{k: {"mean": v + i, "std": 0.5} for i, k in enumerate(metrics)}} for t in ("CT-MRI",)}
            for m, v in methods.items()
        },
    }


def _records(root: Path, with_test: bool) -> Path:
    (root / "val").mkdir(parents=True)
    methods = {"paper": 1.0, "selection": 2.0, "mean": 0.25, "max": 1.5, "laplacian": 0.75}
    (root / "val" / "summary_cddfuse.json").write_text(json.dumps(_summary("cddfuse", RANK_METRICS, methods, "val")))
    targets = {"CT-MRI": {"beats_max": ["SF"], "beats_mean": list(RANK_METRICS), "reaches_cddfuse": [], "met": False}}
    selection = {
        "mean_ranks": {"paper": 3.0, "selection": 1.0, "mean": 5.0, "max": 2.0, "laplacian": 4.0},
        "selected": "selection",
        "candidates": {
            "paper": {
                "description": "the paper's network",
                "best_epoch": 57,
                "epochs_run": 60,
                "best_val_qabf": 0.61,
                "targets": targets,
            },
            "selection": {
                "description": "with additions",
                "best_epoch": 60,
                "epochs_run": 60,
                "best_val_qabf": 0.7,
                "targets": targets,
            },
        },
    }
    (root / "val" / "selection.json").write_text(json.dumps(selection))
    if with_test:
        (root / "test").mkdir()
        for profile, metrics in (
            ("cddfuse", RANK_METRICS),
            ("characterisation", ("copy_source", "copy_max", "abs_to_max", "edge_overshoot")),
        ):
            (root / "test" / f"summary_{profile}.json").write_text(
                json.dumps(_summary(profile, metrics, methods, "test"))
            )
    return root


def test_render_from_records(tmp_path: Path) -> None:
    root = _records(tmp_path / "results", with_test=False)
    text = render(root)
    assert "**Selected: `selection`**" in text and "`selection` 1.00, `max` 2.00, `paper` 3.00" in text
    assert "`paper`: epoch 57 of 60 (validation Q^AB/F 0.610)" in text
    assert "| CT-MRI | **selection: with additions** | 3 | 2.000 ± 0.500 | 3.000 ± 0.500 |" in text
    assert "Not scored yet" in text
    expected = "CT-MRI: targets missed (above max on 1/2 of Q^AB/F, SF; above mean on 8/8; at or above CDDFuse on 0/8)"
    assert expected in text

    _records(tmp_path / "full", with_test=True)
    text = render(tmp_path / "full")
    assert "Test split (scored once)" in text and "Not scored yet" not in text
    assert "The same targets on the test split" in text
    assert "| CT-MRI | CDDFuse (published) | 0 | 4.880 ± – | 79.17 ± – |" in text  # the reference row
    assert "| CT-MRI | mean | 3 | 0.250 ± 0.500 | 1.250 ± 0.500 | 2.250 ± 0.500 | 3.250 ± 0.500 |" in text


def test_check_detects_a_stale_card(tmp_path: Path) -> None:
    root = _records(tmp_path / "results", with_test=False)
    card = tmp_path / "card.md"
    card.write_text(f"# Card\n\n{BEGIN}\nold numbers\n{END}\n\nrest\n")
    assert update_card(card, root, check=True) is False and "old numbers" in card.read_text()
    assert update_card(card, root) is False
    assert update_card(card, root, check=True) is True
    text = card.read_text()
    assert text.startswith("# Card\n\n" + BEGIN) and text.endswith(f"{END}\n\nrest\n") and "old numbers" not in text
    with pytest.raises(ValueError, match="no generated results block"):
        update_card(tmp_path / "results" / "val" / "selection.json", root)


def test_the_run_folder_block_is_the_validation_part(tmp_path: Path) -> None:
    root = _records(tmp_path / "full", with_test=True)
    block = render_selection(root)
    assert "**Selected: `selection`**" in block and "| CT-MRI | mean | 3 |" in block
    assert "Test split" not in block and "CDDFuse (published)" not in block
    (root / "val" / "selection.json").write_text(
        (root / "val" / "selection.json")
        .read_text()
        .replace('"with additions",', '"with additions", "run_dir": "runs/x",')
    )
    assert selected_run_readme(root, bundle_root=tmp_path) == tmp_path / "runs" / "x" / "README.md"
