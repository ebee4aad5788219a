"""Rebuild the Harvard training / evaluation folder from a local copy of the public curated atlas pairs.

The bundle ships the split (``docs/data/harvard_pairs.csv``: ``task, pair_id, series, split`` per pair, no
images). The images come from the public curated copy of the Harvard Whole Brain Atlas named in
``docs/data_license.txt`` ("Havard-Medical-Image-Fusion-Datasets"), cloned or downloaded by the user::

    python -m scripts.prepare_harvard PATH/TO/Havard-Medical-Image-Fusion-Datasets --output data/harvard

writes the layout that ``configs/train.json`` and ``scripts.evaluate`` read (``--dataset_dir data/harvard``)::

    data/harvard/pairs.csv                         task, pair_id, series, mri, other, other_modality, split
    data/harvard/<task>/MRI/<pair_id>.png          e.g. CT-MRI/MRI/2004.png
    data/harvard/<task>/<modality>/<pair_id>.png   e.g. CT-MRI/CT/2004.png (modality CT, PET or SPECT)

Images are copied byte for byte. The source layout is ``--source_layout``, a pattern with ``{task}``,
``{modality}`` and ``{pair_id}`` (default ``{task}/{modality}/{pair_id}.png``, the curated copy's folders
``CT-MRI/CT``, ``CT-MRI/MRI``, ``PET-MRI/PET``, ...); change it if your copy is laid out otherwise. Every file of
the split is checked before anything is written; pairs of the copy that the split does not list are left out.
An existing ``pairs.csv`` in the output is never overwritten unless ``--overwrite true``.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["FIELDS", "SOURCE_LAYOUT", "SPLIT_FILE", "prepare_harvard", "read_split"]

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SPLIT_FILE = BUNDLE_ROOT / "docs" / "data" / "harvard_pairs.csv"
SOURCE_LAYOUT = "{task}/{modality}/{pair_id}.png"
FIELDS = ["task", "pair_id", "series", "mri", "other", "other_modality", "split"]
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_split(path: str | Path = SPLIT_FILE) -> list[dict[str, str]]:
    """Rows of a split file (``task, pair_id, series, split``; ``task`` is ``<modality>-MRI``).

    Raises:
        ValueError: naming the file and the problem (missing column, bad task, duplicate pair).
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("task", "pair_id", "series", "split") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (expected task, pair_id, series, split)")
        rows = list(reader)
    seen = set()
    for line, row in enumerate(rows, start=2):
        if not row["task"].endswith("-MRI") or row["task"] == "-MRI":
            raise ValueError(f"{path}, line {line}: task {row['task']!r} is not '<modality>-MRI' (e.g. CT-MRI)")
        key = (row["task"], row["pair_id"])
        if key in seen:
            raise ValueError(f"{path}, line {line}: pair {row['task']}/{row['pair_id']} listed twice")
        seen.add(key)
    return rows


def prepare_harvard(
    source: str | Path,
    output: str | Path,
    split_file: str | Path = SPLIT_FILE,
    source_layout: str = SOURCE_LAYOUT,
    tasks: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Copy the split's pairs from ``source`` into the bundle's layout under ``output``; returns ``pairs.csv``.

    Raises:
        FileNotFoundError: naming the missing source files (up to ten) and how many there are; nothing is written.
        ValueError: when a source file is not a PNG, or the split file is malformed.
        FileExistsError: when ``output/pairs.csv`` exists and ``overwrite`` is false.
    """
    source, output = Path(source), Path(output)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: not a folder (give the local copy of the curated Harvard pairs)")
    rows = [r for r in read_split(split_file) if tasks is None or r["task"] in tasks]
    if not rows:
        raise ValueError(f"{split_file}: no pairs of tasks {list(tasks or [])}")
    pairs_csv = output / "pairs.csv"
    if pairs_csv.exists() and not overwrite:
        raise FileExistsError(f"{pairs_csv} exists; choose another --output or pass --overwrite true")
    plan: list[tuple[Path, Path]] = []
    table = []
    for row in rows:
        other_modality = row["task"][: -len("-MRI")]
        out_row = {"task": row["task"], "pair_id": row["pair_id"], "series": row["series"], "split": row["split"]}
        for key, modality in (("mri", "MRI"), ("other", other_modality)):
            src = source / source_layout.format(task=row["task"], modality=modality, pair_id=row["pair_id"])
            rel = f"{row['task']}/{modality}/{row['pair_id']}.png"
            plan.append((src, output / rel))
            out_row[key] = rel
        table.append({**out_row, "other_modality": other_modality})
    missing = [str(src) for src, _ in plan if not src.is_file()]
    if missing:
        shown = "\n  ".join(missing[:10])
        raise FileNotFoundError(
            f"{len(missing)} of {len(plan)} source images not found under {source} with layout '{source_layout}' "
            f"(set --source_layout to your copy's layout):\n  {shown}"
        )
    for src, _ in plan:
        with open(src, "rb") as f:
            if f.read(8) != _PNG_SIGNATURE:
                raise ValueError(f"{src}: not a PNG file")
    for src, dst in plan:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    tmp = pairs_csv.with_name("pairs.csv.partial")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
    tmp.replace(pairs_csv)  # written last: a pairs.csv means a complete folder
    return pairs_csv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="local copy of the curated Harvard pairs (Havard-Medical-Image-Fusion-Datasets)")
    parser.add_argument("--output", required=True, help="folder to write (pairs.csv and <task>/<modality>/<id>.png)")
    parser.add_argument("--split_file", default=str(SPLIT_FILE), help="task, pair_id, series, split per pair")
    parser.add_argument("--source_layout", default=SOURCE_LAYOUT, help="source file pattern, relative to SOURCE")
    parser.add_argument("--tasks", nargs="+", default=None, help="only these tasks (e.g. CT-MRI)")
    parser.add_argument("--overwrite", default="false", choices=["true", "false"], help="replace an existing pairs.csv")
    args = parser.parse_args(argv)
    try:
        path = prepare_harvard(
            args.source, args.output, args.split_file, args.source_layout, args.tasks, args.overwrite == "true"
        )
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    with open(path, newline="", encoding="utf-8") as f:
        n = sum(1 for _ in csv.DictReader(f))
    print(f"{n} pairs written under {path.parent} ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
