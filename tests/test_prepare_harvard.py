"""The shipped Harvard split file and ``scripts.prepare_harvard`` (rebuild the data folder from the curated copy)."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.data import harvard_datalist
from scripts.prepare_harvard import FIELDS, SPLIT_FILE, main, prepare_harvard, read_split

ROOT = Path(__file__).resolve().parents[1]
HARVARD = ROOT.parent / "shared" / "data" / "harvard"
SPLIT = [
    ("CT-MRI", "2004", "2", "train"),
    ("CT-MRI", "34012", "34", "test"),
    ("PET-MRI", "25015", "25", "val"),
    ("SPECT-MRI", "3025", "3", "test"),
]


def _fake_curated_copy(root: Path, layout: str = "{task}/{modality}/{pair_id}.png") -> Path:
    """The curated repository's layout (CT-MRI/CT/2004.png, CT-MRI/MRI/2004.png, ...) with one unlisted pair."""
    rng = np.random.default_rng(0)
    for task, pair_id, _, _ in [*SPLIT, ("CT-MRI", "9999", "9", "train")]:
        modality = task.split("-")[0]
        for mod, mode in (("MRI", "L"), (modality, "L" if modality == "CT" else "RGB")):
            path = root / layout.format(task=task, modality=mod, pair_id=pair_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            shape = (16, 16) if mode == "L" else (16, 16, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return root


def _split_file(path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "pair_id", "series", "split"])
        writer.writerows(SPLIT)
    return path


def test_shipped_split_file_has_ids_and_splits_only() -> None:
    rows = read_split(SPLIT_FILE)
    with open(SPLIT_FILE, newline="") as f:
        assert next(csv.reader(f)) == ["task", "pair_id", "series", "split"]
    counts = Counter((r["task"], r["split"]) for r in rows)
    assert len(rows) == 711
    assert [counts[(t, s)] for t in ("CT-MRI", "PET-MRI", "SPECT-MRI") for s in ("train", "val", "test")] == [
        108,
        20,
        21,
        155,
        32,
        82,
        183,
        37,
        73,
    ]
    # a series never crosses train and test
    by_series = {}
    for r in rows:
        by_series.setdefault((r["task"], r["series"]), set()).add(r["split"])
    assert not [k for k, splits in by_series.items() if {"train", "test"} <= splits]


def test_shipped_split_file_is_the_data_folders_split() -> None:
    if not (HARVARD / "pairs.csv").is_file():
        pytest.skip(f"{HARVARD} not found (CI has ../shared/data beside the clone)")
    with open(HARVARD / "pairs.csv", newline="") as f:
        data = [(r["task"], r["pair_id"], r["series"], r["split"]) for r in csv.DictReader(f)]
    assert [(r["task"], r["pair_id"], r["series"], r["split"]) for r in read_split(SPLIT_FILE)] == data


def test_prepare_rebuilds_the_layout_from_a_curated_copy(tmp_path: Path) -> None:
    source = _fake_curated_copy(tmp_path / "Havard-Medical-Image-Fusion-Datasets")
    out = tmp_path / "harvard"
    assert main([str(source), "--output", str(out), "--split_file", str(_split_file(tmp_path / "split.csv"))]) == 0
    with open(out / "pairs.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == FIELDS
        rows = list(reader)
    assert [(r["task"], r["pair_id"], r["series"], r["split"]) for r in rows] == SPLIT
    assert rows[2]["mri"] == "PET-MRI/MRI/25015.png" and rows[2]["other"] == "PET-MRI/PET/25015.png"
    assert rows[2]["other_modality"] == "PET"
    for r in rows:
        for key in ("mri", "other"):
            assert (out / r[key]).read_bytes() == (source / r[key]).read_bytes()
    assert not (out / "CT-MRI" / "CT" / "9999.png").exists()  # in the copy, not in the split
    assert [d["id"] for d in harvard_datalist(out, split="test")] == ["34012", "3025"]


def test_prepare_takes_another_source_layout(tmp_path: Path) -> None:
    layout = "images/{modality}_{task}_{pair_id}.png"
    source = _fake_curated_copy(tmp_path / "copy", layout)
    pairs = prepare_harvard(source, tmp_path / "out", _split_file(tmp_path / "split.csv"), layout, tasks=["CT-MRI"])
    with open(pairs, newline="") as f:
        assert [r["pair_id"] for r in csv.DictReader(f)] == ["2004", "34012"]
    assert (tmp_path / "out" / "CT-MRI" / "CT" / "34012.png").read_bytes() == (
        source / "images" / "CT_CT-MRI_34012.png"
    ).read_bytes()


def test_prepare_names_missing_files_and_writes_nothing(tmp_path: Path, capsys) -> None:
    source = _fake_curated_copy(tmp_path / "copy")
    (source / "SPECT-MRI" / "SPECT" / "3025.png").unlink()
    out = tmp_path / "out"
    assert main([str(source), "--output", str(out), "--split_file", str(_split_file(tmp_path / "split.csv"))]) == 1
    err = capsys.readouterr().err
    assert "1 of 8 source images not found" in err and "SPECT-MRI/SPECT/3025.png" in err and "--source_layout" in err
    assert not out.exists()


def test_prepare_refuses_to_overwrite_and_rejects_bad_files(tmp_path: Path) -> None:
    source = _fake_curated_copy(tmp_path / "copy")
    split = _split_file(tmp_path / "split.csv")
    prepare_harvard(source, tmp_path / "out", split)
    with pytest.raises(FileExistsError, match=r"pairs\.csv exists"):
        prepare_harvard(source, tmp_path / "out", split)
    prepare_harvard(source, tmp_path / "out", split, overwrite=True)
    (source / "CT-MRI" / "CT" / "2004.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"2004\.png: not a PNG"):
        prepare_harvard(source, tmp_path / "out2", split)
    bad = tmp_path / "bad.csv"
    bad.write_text("task,pair_id,split\nCT-MRI,1,train\n")
    with pytest.raises(ValueError, match=r"bad\.csv: missing column\(s\) series"):
        read_split(bad)
    bad.write_text("task,pair_id,series,split\nCT-MRI,1,1,train\nCT-MRI,1,1,test\n")
    with pytest.raises(ValueError, match=r"line 3: pair CT-MRI/1 listed twice"):
        read_split(bad)


def test_prepare_from_the_shared_copy_reproduces_its_folder(tmp_path: Path) -> None:
    """The shared Harvard folder has the curated copy's layout: rebuilding CT-MRI from it gives the same pairs.csv."""
    if not (HARVARD / "pairs.csv").is_file():
        pytest.skip(f"{HARVARD} not found (CI has ../shared/data beside the clone)")
    pairs = prepare_harvard(HARVARD, tmp_path / "harvard", tasks=["CT-MRI"])
    with open(pairs, newline="") as f:
        rebuilt = list(csv.DictReader(f))
    with open(HARVARD / "pairs.csv", newline="") as f:
        original = [r for r in csv.DictReader(f) if r["task"] == "CT-MRI"]
    assert rebuilt == original
    assert (tmp_path / "harvard" / rebuilt[5]["other"]).read_bytes() == (HARVARD / rebuilt[5]["other"]).read_bytes()
