"""Datalist builders for image-fusion pairs.

A datalist is a list of dicts, one per co-registered pair, with absolute file paths:

- ``{"mri": path, "other": path, "task": str, "id": str}``: two files, ``mri`` is the anatomical
  reference (network channel 0), ``other`` the second modality (CT, PET, SPECT, a second MRI sequence);
- ``{"image": path, "task": str, "id": str}``: one 2-channel file (channel 0 reference, 1 other), e.g. a
  4-D NIfTI ``(X, Y, Z, 2)`` as MONAI Label stores multi-modal images.

Sources understood by :func:`load_datalist`:

- a folder in the Harvard atlas layout: ``DIR/**/MRI/<id>.<ext>`` with a sibling modality folder (``CT/``,
  ``PET/``, ``SPECT/``, ...) holding ``<id>.<ext>``; the task is ``"<other folder>-<reference folder>"``
  (``CT-MRI``, ``PET-MRI``, ``T1c-FLAIR``), the id is the file name without extension;
- a CSV file with columns ``mri`` and ``other`` (or ``image``), optional ``task``, ``id`` (or ``pair_id``)
  and ``split``; relative paths are resolved against the CSV's folder. The Harvard ``pairs.csv`` is one;
- a JSON file holding a list of such dicts or a Decathlon-style ``{"testing": [...]}``; relative paths are
  resolved against the JSON file's folder.

Missing files and empty datalists raise errors naming the file. :func:`check_pairs` then reads only the
image headers to set aside pairs that cannot be fused (unreadable file, different sizes) before any
compute is spent.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

__all__ = [
    "brats_datalist",
    "IMAGE_EXTENSIONS",
    "NIFTI_EXTENSIONS",
    "PairCheck",
    "check_pairs",
    "datalist_from_csv",
    "datalist_from_folder",
    "datalist_from_json",
    "harvard_datalist",
    "load_datalist",
    "split_extension",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_ALL_EXTENSIONS = NIFTI_EXTENSIONS + IMAGE_EXTENSIONS
REFERENCE_DIRS = ("MRI", "FLAIR")
_PAIR_KEYS = ("mri", "other")
_SINGLE_KEY = "image"


def split_extension(path: PathLike) -> tuple[str, str]:
    """Split a file name into ``(stem, extension)``, keeping double extensions: ``a.nii.gz -> (a, .nii.gz)``."""
    name = Path(path).name
    for ext in _ALL_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)], name[-len(ext) :]
    stem, ext = os.path.splitext(name)
    return stem, ext


def _supported(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and split_extension(path)[1].lower() in _ALL_EXTENSIONS


def datalist_from_folder(
    root: PathLike, reference_dirs: Sequence[str] = REFERENCE_DIRS, strict: bool = True
) -> list[dict[str, str]]:
    """Pairs found under ``root`` in the Harvard layout.

    Every file ``<id>.<ext>`` in a folder named like one of ``reference_dirs`` (case-insensitive; default
    ``MRI`` and ``FLAIR``) is paired with the file of the same id in each sibling folder. A reference file
    with no partner raises ``FileNotFoundError`` naming it (``strict=False``: a warning, and it is skipped).

    Args:
        root: folder to search recursively.
        reference_dirs: names of the folders that hold the reference (channel 0) images.
        strict: raise on a reference image without a partner instead of skipping it.

    Returns:
        list of ``{"mri", "other", "task", "id"}`` dicts sorted by task then id.
    """
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root_path}")
    wanted = {name.lower() for name in reference_dirs}
    ref_dirs = sorted(p for p in root_path.rglob("*") if p.is_dir() and p.name.lower() in wanted)
    items: list[dict[str, str]] = []
    for ref_dir in ref_dirs:
        siblings = sorted(p for p in ref_dir.parent.iterdir() if p.is_dir() and p != ref_dir)
        for ref_file in sorted(p for p in ref_dir.iterdir() if _supported(p)):
            pair_id = split_extension(ref_file)[0]
            found = 0
            for sib in siblings:
                partners = sorted(p for p in sib.iterdir() if _supported(p) and split_extension(p)[0] == pair_id)
                if len(partners) > 1:
                    raise ValueError(f"{ref_file}: several partner files in {sib}: {[p.name for p in partners]}")
                if partners:
                    found += 1
                    items.append(
                        {
                            "mri": str(ref_file.resolve()),
                            "other": str(partners[0].resolve()),
                            "task": f"{sib.name}-{ref_dir.name}",
                            "id": pair_id,
                        }
                    )
            if not found:
                msg = f"{ref_file}: no partner file '{pair_id}.*' in the sibling folders {[s.name for s in siblings]}"
                if strict:
                    raise FileNotFoundError(msg)
                logger.warning("%s; skipped", msg)
    if not items:
        raise ValueError(
            f"no image pairs found under {root_path}: expected <dir>/**/{'|'.join(reference_dirs)}/<id>.<ext> with a "
            f"sibling modality folder holding <id>.<ext> (extensions {', '.join(_ALL_EXTENSIONS)})"
        )
    return sorted(items, key=lambda d: (d["task"], d["id"]))


def _normalise_item(item: Mapping[str, Any], base_dir: Path, source: str, index: int) -> dict[str, str]:
    """Resolve paths against ``base_dir``, check the files exist, fill ``task``/``id``; keep only known keys."""
    where = f"{source}, entry {index}"
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: expected a dict with keys 'mri' and 'other' (or 'image'), got {type(item)}")
    keys = _PAIR_KEYS if all(item.get(k) not in (None, "") for k in _PAIR_KEYS) else None
    if keys is None:
        if item.get(_SINGLE_KEY) in (None, ""):
            raise ValueError(f"{where}: needs file paths under 'mri' and 'other' (or one 2-channel 'image'): {item}")
        keys = (_SINGLE_KEY,)
    out: dict[str, str] = {}
    for key in keys:
        path = Path(str(item[key])).expanduser()
        if not path.is_absolute():
            path = base_dir / path
        if not path.is_file():
            raise FileNotFoundError(f"{where}: '{key}' file not found: {path}")
        out[key] = str(path.resolve())
    pair_id = item.get("id", item.get("pair_id"))
    out["id"] = str(pair_id) if pair_id not in (None, "") else split_extension(out[keys[0]])[0]
    out["task"] = str(item.get("task") or "")
    return out


def _filter_split(rows: list[dict[str, Any]], split: str | Sequence[str] | None, source: str) -> list[dict[str, Any]]:
    if split is None:
        return rows
    splits = {split} if isinstance(split, str) else set(split)
    if rows and "split" not in rows[0]:
        raise ValueError(f"{source}: a split filter {sorted(splits)} was given but the datalist has no 'split' field")
    return [r for r in rows if str(r.get("split", "")).strip() in splits]


def _finish(rows: Iterable[Mapping[str, Any]], base_dir: Path, source: str) -> list[dict[str, str]]:
    items = [_normalise_item(r, base_dir, source, i) for i, r in enumerate(rows)]
    if not items:
        raise ValueError(f"empty datalist: {source} lists no image pairs (after filtering)")
    return items


def brats_datalist(root: PathLike, reference: str = "Flair", other: str = "T1c") -> list[dict[str, str]]:
    """Pairs from BraTS-style case folders: ``root/<case>/<reference>*.nii.gz`` + ``<other>*.nii.gz``.

    ``root`` may also be a single case folder. Each pair gets ``task`` ``"<other>-<reference>"`` and the
    case folder's name as ``id``. Folders missing one of the two files are an error naming the folder.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"BraTS folder not found: {root_path}")
    cases = [root_path] if any(root_path.glob(f"{reference}*.nii*")) else sorted(p for p in root_path.iterdir() if p.is_dir())
    rows = []
    for case in cases:
        refs, others = sorted(case.glob(f"{reference}*.nii*")), sorted(case.glob(f"{other}*.nii*"))
        if len(refs) != 1 or len(others) != 1:
            raise ValueError(f"{case}: expected one {reference}*.nii(.gz) and one {other}*.nii(.gz), found {len(refs)} and {len(others)}")
        rows.append({"mri": str(refs[0]), "other": str(others[0]), "task": f"{other}-{reference}", "id": case.name})
    if not rows:
        raise ValueError(f"empty datalist: {root_path} has no case folders with {reference} and {other} volumes")
    return rows


def datalist_from_csv(path: PathLike, split: str | Sequence[str] | None = None) -> list[dict[str, str]]:
    """Pairs from a CSV file: columns ``mri``, ``other`` (or ``image``), optional ``task``, ``id``, ``split``.

    ``pair_id`` is accepted for ``id`` (the Harvard ``pairs.csv`` column).

    Args:
        path: the CSV file; relative paths inside it are resolved against its folder.
        split: keep only rows whose ``split`` column equals this value (or one of these values).
    """
    csv_path = Path(path).expanduser()
    if not csv_path.is_file():
        raise FileNotFoundError(f"datalist CSV not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if not ({"mri", "other"} <= set(columns) or _SINGLE_KEY in columns):
            raise ValueError(f"{csv_path}: needs columns 'mri' and 'other' (or 'image'); found {columns}")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    return _finish(_filter_split(rows, split, str(csv_path)), csv_path.parent, str(csv_path))


def datalist_from_json(
    path: PathLike, key: str = "testing", split: str | Sequence[str] | None = None
) -> list[dict[str, str]]:
    """Pairs from a JSON file: a list of dicts, or a Decathlon-style dict whose ``key`` entry is that list.

    Args:
        path: the JSON file; relative paths inside it are resolved against its folder.
        key: the list to read from a Decathlon-style dict (default ``"testing"``).
        split: keep only entries whose ``split`` field equals this value (or one of these values).
    """
    json_path = Path(path).expanduser()
    if not json_path.is_file():
        raise FileNotFoundError(f"datalist JSON not found: {json_path}")
    try:
        with open(json_path, encoding="utf-8") as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from e
    if isinstance(content, Mapping):
        if key not in content:
            raise ValueError(f"{json_path}: no '{key}' list in this datalist; its keys are {sorted(content)}")
        content = content[key]
    if not isinstance(content, list):
        raise ValueError(f"{json_path}: expected a list of pairs, got {type(content).__name__}")
    return _finish(_filter_split(content, split, str(json_path)), json_path.parent, str(json_path))


def harvard_datalist(
    root: PathLike, split: str | Sequence[str] | None = "test", tasks: Sequence[str] | None = None
) -> list[dict[str, str]]:
    """Pairs of the Harvard atlas copy from its ``pairs.csv``.

    Args:
        root: the folder holding ``pairs.csv`` (e.g. ``../shared/data/harvard``).
        split: ``"train"``, ``"val"``, ``"test"``, a list of them, or ``None`` for all.
        tasks: keep only these tasks (``"CT-MRI"``, ``"PET-MRI"``, ``"SPECT-MRI"``); ``None`` for all.
    """
    items = datalist_from_csv(Path(root) / "pairs.csv", split=split)
    if tasks is not None:
        items = [d for d in items if d["task"] in set(tasks)]
        if not items:
            raise ValueError(f"empty datalist: {Path(root) / 'pairs.csv'} has no pairs of tasks {list(tasks)}")
    return items


def load_datalist(
    source: PathLike | Sequence[Mapping[str, Any]], split: str | Sequence[str] | None = None
) -> list[dict[str, str]]:
    """Datalist from a folder, a ``.csv`` or ``.json`` file, or an already built list of dicts.

    Args:
        source: folder (Harvard layout), CSV or JSON datalist file, or a list of pair dicts (relative paths
            resolved against the current directory).
        split: for CSV/JSON sources, keep only entries of this split.
    """
    if isinstance(source, (list, tuple)):
        return _finish(_filter_split(list(source), split, "datalist"), Path.cwd(), "datalist")
    path = Path(str(source)).expanduser()
    if path.is_dir():
        return datalist_from_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return datalist_from_csv(path, split=split)
    if suffix == ".json":
        return datalist_from_json(path, split=split)
    if not path.exists():
        raise FileNotFoundError(f"datalist source not found: {path} (expected a folder, a .csv or a .json file)")
    raise ValueError(f"unsupported datalist source {path}: expected a folder, a .csv or a .json file")


def _header_shape(path: str) -> tuple[tuple[int, ...], int]:
    """``(spatial shape in MONAI order, channels)`` from the file header, without reading the pixels."""
    ext = split_extension(path)[1].lower()
    if ext in NIFTI_EXTENSIONS:
        import nibabel as nib

        shape = tuple(int(s) for s in nib.load(path).shape)
        if len(shape) >= 4:  # (X, Y, Z, C) or NIfTI vector (X, Y, Z, 1, C)
            return shape[:3], shape[-1]
        return shape, 1
    if ext in IMAGE_EXTENSIONS:
        from PIL import Image

        with Image.open(path) as im:
            width, height = im.size
            return (width, height), len(im.getbands())  # MONAI's PILReader puts width first
    raise ValueError(f"unsupported image format '{ext}'")


def _squeeze_trailing(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


@dataclass
class PairCheck:
    """Result of :func:`check_pairs`: pairs that can be fused and ``(pair, reason)`` for those that cannot."""

    valid: list[dict[str, str]] = field(default_factory=list)
    failed: list[tuple[dict[str, str], str]] = field(default_factory=list)


def check_pairs(
    datalist: PathLike | Sequence[Mapping[str, Any]], on_error: str = "skip", split: str | Sequence[str] | None = None
) -> PairCheck:
    """Check each pair from the image headers: readable, supported format, same spatial size.

    Args:
        datalist: a datalist or any source :func:`load_datalist` reads (folder, CSV, JSON).
        on_error: ``"skip"``: log an error naming the file(s) and set the pair aside in ``failed``;
            ``"raise"``: raise ``ValueError`` at the first bad pair.
        split: for CSV/JSON sources, keep only entries of this split.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    result = PairCheck()
    for item in load_datalist(datalist, split=split):
        reason = None
        try:
            if _SINGLE_KEY in item and "mri" not in item:
                _, channels = _header_shape(item[_SINGLE_KEY])
                if channels != 2:
                    reason = f"{item[_SINGLE_KEY]}: a single-file pair needs 2 channels, this file has {channels}"
            else:
                shapes = {}
                for key in _PAIR_KEYS:
                    try:
                        shapes[key] = _squeeze_trailing(_header_shape(item[key])[0])
                    except Exception as e:  # unreadable or unsupported file
                        raise ValueError(f"cannot read {key} image {item[key]}: {e}") from e
                if shapes["mri"] != shapes["other"]:
                    reason = (
                        f"the two images of pair '{item.get('id', '')}' differ in size: "
                        f"{item['mri']} is {shapes['mri']}, {item['other']} is {shapes['other']}"
                    )
        except Exception as e:
            reason = str(e)
        if reason is None:
            result.valid.append(dict(item))
            continue
        if on_error == "raise":
            raise ValueError(reason)
        logger.error("skipping pair: %s", reason)
        result.failed.append((dict(item), reason))
    return result
