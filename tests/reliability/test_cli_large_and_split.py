"""Whole-run reliability at the command line (issue #24, items 7 and 9), run as a user would.

7. an image above ``tile_above_pixels`` is fused in blended windows, and the result stays close to the
   whole-image pass;
9. training on a datalist without a split holds out whole series for validation and logs the sizes, or refuses
   when it cannot.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from reliability_helpers import TINY_KW, good_pair, write_datalist
from test_cli import _one_error_line, bundle_run

# a tiny network with the seeded random weights of inference.json's initialize (the same in every run)
TINY = json.dumps({"_target_": "scripts.networks.ClinicalFMamba", **TINY_KW})


def _fused(folder: Path) -> np.ndarray:
    (path,) = list(folder.rglob("*.png"))
    return np.asarray(Image.open(path), dtype=np.float64)


def test_a_large_image_is_fused_in_windows_close_to_the_whole_pass(tmp_path: Path) -> None:
    """Item 7: 64 x 64 with --tile_above_pixels 1024 and 32 x 32 windows against --tile_above_pixels 0."""
    data = tmp_path / "data"
    datalist = write_datalist(data / "pairs.csv", [good_pair(data, size=(64, 64))])
    untrained = ("--ckpt_path", str(tmp_path / "none.pt"), "--allow_untrained", "true")
    common = ("--datalist", str(datalist), "--network_def", TINY, *untrained)
    status, out, err = bundle_run(
        *common, "--output_dir", str(tmp_path / "tiled"), "--tile_above_pixels", "1024", "--tile_size", "[32, 32]"
    )
    assert status == 0, err[-3000:]
    assert "image of 64x64 pixels is above max_pixels=1024: fused in 32x32 windows" in out + err
    status, out, err = bundle_run(*common, "--output_dir", str(tmp_path / "whole"), "--tile_above_pixels", "0")
    assert status == 0, err[-3000:]
    assert "windows" not in out + err
    tiled, whole = _fused(tmp_path / "tiled"), _fused(tmp_path / "whole")
    assert tiled.shape == whole.shape == (64, 64)
    difference = np.abs(tiled - whole)
    assert difference.max() > 0  # the windows saw less context: not the same computation
    assert difference.mean() < 6.0, difference.mean()  # but close (grey levels of the 8-bit output)


def test_training_without_a_split_holds_out_whole_series_or_refuses(tmp_path: Path) -> None:
    """Item 9: two series of two slices each -> one series in val, logged; one series only -> refused."""
    data = tmp_path / "data"
    rows = [good_pair(data, pair_id=f"{s}_{i}", size=(16, 16)) for s in ("caseA", "caseB") for i in (1, 2)]
    datalist = write_datalist(data / "pairs.csv", rows)
    args = (
        "--datalist",
        str(datalist),
        "--network_def",
        TINY,
        "--patch_size",
        "[16, 16]",
        "--batch_size",
        "2",
        "--val_interval",
        "1",
        "--max_epochs",
        "1",
        "--cache_rate",
        "0.0",
    )
    status, out, err = bundle_run(*args, "--output_dir", str(tmp_path / "run"), config="configs/train.json")
    assert status == 0, err[-3000:]
    assert "has no split: split by series" in out + err
    assert "2 train pairs (1 series), 2 val pairs (1 series)" in out + err
    assert "2 train / 2 validation pairs" in out + err
    assert (tmp_path / "run" / "resume.pt").is_file()

    one = write_datalist(data / "one.csv", rows[:2])
    status, out, err = bundle_run(
        *args[:1], str(one), *args[2:], "--output_dir", str(tmp_path / "refused"), config="configs/train.json"
    )
    assert status == 1
    line = _one_error_line(err)
    assert "cannot be split by series" in line and "'split' column" in line
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
