"""``scripts.plot_training``: curves from a training log whose validation columns are empty on some epochs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.plot_training import main, plot_training_log, read_training_log

ROOT = Path(__file__).resolve().parents[1]
HEADER = (
    "epoch,iterations,lr,train_loss,train_intensity,train_gradient,train_ssim,val_qabf,val_loss,val_ssim,"
    "val_mi,val_scd,val_sf,val_en,val_sd,best_metric,best_epoch,epoch_seconds,finished_at"
)
ROWS = [
    "1,10,0.0005,6.5,0.10,0.37,0.55,,,,,,,,,,,12.5,2026-01-01T00:00:00+00:00",
    "2,20,0.0004,4.4,0.08,0.23,0.40,0.55,3.7,1.10,1.73,1.09,24.6,6.26,73.2,0.55,2,12.1,2026-01-01T00:01:00+00:00",
    "3,30,0.0002,3.9,0.07,0.18,0.38,,,,,,,,,0.55,2,12.0,2026-01-01T00:02:00+00:00",
    "4,40,0.0001,3.8,0.07,0.17,0.38,0.58,2.9,1.40,1.72,1.45,25.5,5.00,79.5,0.58,4,12.3,2026-01-01T00:03:00+00:00",
]


def _log(tmp_path: Path) -> Path:
    path = tmp_path / "run" / "training_log.csv"
    path.parent.mkdir()
    path.write_text("\n".join([HEADER, *ROWS]) + "\n")
    return path


def test_read_training_log_keeps_empty_validation_cells_as_nan(tmp_path: Path) -> None:
    log = read_training_log(_log(tmp_path))
    assert log["epoch"] == [1, 2, 3, 4]
    assert log["train_gradient"] == [0.37, 0.23, 0.18, 0.17]
    assert math.isnan(log["val_qabf"][0]) and math.isnan(log["val_qabf"][2])
    assert log["val_qabf"][1::2] == [0.55, 0.58]
    assert "finished_at" not in log  # not numeric: dropped


def test_plot_writes_a_figure_with_one_panel_per_curve_group(tmp_path: Path) -> None:
    out = plot_training_log(_log(tmp_path), tmp_path / "fig" / "curves.png")
    image = np.asarray(Image.open(out).convert("L"))
    # 3 + 7 validation panels = 10 panels on a 4-column grid of 3.6 x 2.8 inch cells at 100 dpi
    assert image.shape == (3 * 280, 4 * 360)
    assert image.std() > 10  # not blank
    assert image[-200:, -360:].min() == 255  # the unused last cells of the grid are empty


def test_plot_command_refuses_to_overwrite_and_names_bad_logs(tmp_path: Path, capsys) -> None:
    log = _log(tmp_path)
    out = tmp_path / "curves.png"
    assert main([str(log), "--output", str(out)]) == 0
    before = out.read_bytes()
    assert main([str(log), "--output", str(out)]) == 1
    assert "curves.png exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main([str(log), "--output", str(out), "--overwrite", "true"]) == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("step,loss\n1,2\n")
    with pytest.raises(ValueError, match=r"bad\.csv: no 'epoch' column"):
        read_training_log(bad)
    bad.write_text(HEADER + "\n")
    with pytest.raises(ValueError, match=r"bad\.csv: the training log has no epochs"):
        read_training_log(bad)
    assert main([str(tmp_path / "missing.csv"), "--output", str(tmp_path / "x.png")]) == 1
    assert "training log not found" in capsys.readouterr().err


def test_the_model_card_embeds_the_shipped_curves() -> None:
    card = (ROOT / "docs" / "README.md").read_text()
    assert "figures/harvard2d_curves.png" in card
    assert (ROOT / "docs" / "figures" / "harvard2d_curves.png").is_file()
    assert "python -m scripts.plot_training training/harvard2d_refine_v2/training_log.csv" in card
