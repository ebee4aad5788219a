"""Datalist builders: folder layout, CSV, JSON, Harvard pairs.csv, and the header-level pair check."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.data import (
    datalist_from_csv,
    datalist_from_folder,
    datalist_from_json,
    harvard_datalist,
    load_datalist,
    split_extension,
)
from scripts.pair_check import check_pairs

SAMPLES = Path(__file__).resolve().parents[1] / "docs" / "samples"


def _png(path: Path, size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros(size[::-1], np.uint8)).save(path)
    return path


def test_split_extension_keeps_double_suffix() -> None:
    assert split_extension("/a/b/case.nii.gz") == ("case", ".nii.gz")
    assert split_extension("3025.png") == ("3025", ".png")


def test_folder_datalist_of_the_samples_matches_the_shipped_datalist_json() -> None:
    items = datalist_from_folder(SAMPLES)
    assert [(d["task"], d["id"]) for d in items] == [
        ("CT-MRI", "34012"),
        ("CT-MRI", "34016"),
        ("PET-MRI", "30045"),
        ("PET-MRI", "30075"),
        ("SPECT-MRI", "3025"),
        ("SPECT-MRI", "40030"),
        ("T1c-FLAIR", "brats_2013_pat0001_1_z063"),
    ]
    assert all(Path(d["mri"]).parent.name in ("MRI", "FLAIR") and Path(d["other"]).is_file() for d in items)
    assert datalist_from_json(SAMPLES / "datalist.json") == items


def test_samples_stay_small() -> None:
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert total < 2 * 1024 * 1024


def test_folder_with_unpaired_reference_names_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _png(tmp_path / "CT-MRI" / "MRI" / "1.png")
    _png(tmp_path / "CT-MRI" / "CT" / "1.png")
    lonely = _png(tmp_path / "CT-MRI" / "MRI" / "2.png")
    with pytest.raises(FileNotFoundError, match=str(lonely)):
        datalist_from_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        items = datalist_from_folder(tmp_path, strict=False)
    assert [d["id"] for d in items] == ["1"] and "2.png" in caplog.text


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no image pairs found"):
        datalist_from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        datalist_from_folder(tmp_path / "missing_dir")


def test_csv_relative_paths_split_filter_and_ids(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "m1.png"), _png(tmp_path / "imgs" / "c1.png"), _png(tmp_path / "imgs" / "m2.png")
    csv_file = tmp_path / "lists" / "pairs.csv"
    csv_file.parent.mkdir()
    csv_file.write_text(
        "mri,other,task,split\r\n../imgs/m1.png,../imgs/c1.png,CT-MRI,test\r\n../imgs/m2.png,../imgs/c1.png,,train\r\n"
    )
    items = datalist_from_csv(csv_file)
    assert items[0] == {
        "mri": str((tmp_path / "imgs" / "m1.png").resolve()),
        "other": str((tmp_path / "imgs" / "c1.png").resolve()),
        "id": "m1",
        "task": "CT-MRI",
    }
    assert [d["id"] for d in datalist_from_csv(csv_file, split="train")] == ["m2"]
    with pytest.raises(ValueError, match="empty datalist"):
        datalist_from_csv(csv_file, split="val")


def test_csv_errors_name_the_file(tmp_path: Path) -> None:
    _png(tmp_path / "m1.png")
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("mri,other\nm1.png,gone.png\n")
    with pytest.raises(FileNotFoundError, match="gone.png"):
        datalist_from_csv(csv_file)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="bad.csv"):
        datalist_from_csv(bad)
    with pytest.raises(FileNotFoundError, match="nothere.csv"):
        load_datalist(tmp_path / "nothere.csv")


def test_json_list_and_decathlon_forms(tmp_path: Path) -> None:
    _png(tmp_path / "m.png"), _png(tmp_path / "o.png")
    entry = {"mri": "m.png", "other": "o.png", "task": "X-MRI", "id": "7"}
    (tmp_path / "list.json").write_text(json.dumps([entry]))
    (tmp_path / "dec.json").write_text(json.dumps({"name": "demo", "testing": [entry]}))
    assert load_datalist(tmp_path / "list.json") == load_datalist(tmp_path / "dec.json")
    assert load_datalist(tmp_path / "list.json")[0]["mri"] == str((tmp_path / "m.png").resolve())
    with pytest.raises(ValueError, match="'validation'"):
        datalist_from_json(tmp_path / "dec.json", key="validation")
    (tmp_path / "empty.json").write_text(json.dumps({"testing": []}))
    with pytest.raises(ValueError, match="empty.json"):
        load_datalist(tmp_path / "empty.json")


def test_single_two_channel_file_entries(tmp_path: Path) -> None:
    shutil.copy(SAMPLES / "CT-MRI" / "MRI" / "34012.png", tmp_path / "stack.png")
    items = load_datalist([{"image": str(tmp_path / "stack.png")}])
    assert items == [{"image": str((tmp_path / "stack.png").resolve()), "id": "stack", "task": ""}]
    result = check_pairs(items)
    assert not result.valid and "2 channels" in result.failed[0][1]


def test_check_pairs_sets_aside_mismatched_sizes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a, b = _png(tmp_path / "a.png", (8, 6)), _png(tmp_path / "b.png", (8, 7))
    good = [{"mri": str(a), "other": str(a), "id": "ok"}]
    bad = [{"mri": str(a), "other": str(b), "id": "bad"}]
    with caplog.at_level(logging.ERROR):
        result = check_pairs(good + bad)
    assert [d["id"] for d in result.valid] == ["ok"]
    reason = result.failed[0][1]
    assert str(a) in reason and str(b) in reason and str(b) in caplog.text
    with pytest.raises(ValueError, match="b.png"):
        check_pairs(bad, on_error="raise")


def test_harvard_pairs_csv_test_split(shared_data: Path) -> None:
    items = harvard_datalist(shared_data / "harvard", split="test")
    counts = {t: sum(d["task"] == t for d in items) for t in ("CT-MRI", "PET-MRI", "SPECT-MRI")}
    assert counts == {"CT-MRI": 21, "PET-MRI": 82, "SPECT-MRI": 73}
    assert all(Path(d["mri"]).is_file() and Path(d["other"]).is_file() for d in items)
    ct = harvard_datalist(shared_data / "harvard", split=["val"], tasks=["CT-MRI"])
    assert len(ct) == 20 and {d["task"] for d in ct} == {"CT-MRI"}
    # the embedded samples are test-split pairs
    test_ids = {(d["task"], d["id"]) for d in items}
    assert {(d["task"], d["id"]) for d in datalist_from_folder(SAMPLES) if d["task"].endswith("MRI")} <= test_ids
