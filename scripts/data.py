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

Missing files and empty datalists raise errors naming the file. :func:`scripts.pair_check.check_pairs` then
checks every pair before any compute is spent: first from the file headers (empty or unsupported files, channel counts,
dimensionality, sizes, NIfTI voxel grids), then, with ``read_pixels``, by decoding the pixels with the
bundle's own loading transforms (truncated or corrupt files, NaN/Inf voxels). Pairs that cannot be fused
are set aside with a reason naming the file(s), or stop the run (``on_error="raise"``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "brats_datalist",
    "IMAGE_EXTENSIONS",
    "NIFTI_EXTENSIONS",
    "channels_message",
    "check_nifti_frames",
    "check_nifti_size",
    "check_tasks",
    "datalist_from_csv",
    "datalist_from_folder",
    "datalist_from_json",
    "dims_message",
    "geometry_differences",
    "harvard_datalist",
    "has_split_field",
    "header_problem",
    "load_datalist",
    "series_of",
    "series_split",
    "nifti_frames_message",
    "split_extension",
    "unsupported_format_message",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_ALL_EXTENSIONS = NIFTI_EXTENSIONS + IMAGE_EXTENSIONS
REFERENCE_DIRS = ("MRI", "FLAIR")
_PAIR_KEYS = ("mri", "other")
_SINGLE_KEY = "image"
SUPPORTED_FORMATS = "PNG, JPEG, TIFF or BMP (2D), NIfTI .nii / .nii.gz (2D or 3D)"


def split_extension(path: PathLike) -> tuple[str, str]:
    """Split a file name into ``(stem, extension)``, keeping double extensions: ``a.nii.gz -> (a, .nii.gz)``."""
    name = Path(path).name
    for ext in _ALL_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)], name[-len(ext) :]
    stem, ext = os.path.splitext(name)
    return stem, ext


def unsupported_format_message(path: PathLike) -> str:
    """The error text for a file whose format the fusion workflows do not read."""
    ext = split_extension(path)[1] or "(no extension)"
    return (
        f"unsupported image format '{ext}' of {path}: use {SUPPORTED_FORMATS}; DICOM series are fused with "
        "`python -m scripts.dicom fuse` (docs/dicom.md); other formats: convert to NIfTI first"
    )


def geometry_differences(affine_a: Any, affine_b: Any, tolerance: float = 1e-3) -> list[str]:
    """How the voxel grid of ``affine_b`` differs from ``affine_a`` (empty list: the same grid).

    Compares voxel spacing (relative difference), orientation (direction cosines, absolute difference) and
    origin (difference in voxels of ``affine_a``), each against ``tolerance``.
    """
    import numpy as np

    a, b = np.asarray(affine_a, dtype=np.float64), np.asarray(affine_b, dtype=np.float64)
    if a.shape != b.shape:
        return [f"affines of different sizes {a.shape} and {b.shape}"]
    n = a.shape[0] - 1
    spacing_a, spacing_b = np.linalg.norm(a[:n, :n], axis=0), np.linalg.norm(b[:n, :n], axis=0)
    diffs = []

    def fmt(values: Any) -> str:
        return "(" + ", ".join(f"{x:.4g}" for x in values) + ")"

    if np.any(np.abs(spacing_a - spacing_b) > tolerance * np.maximum(spacing_a, spacing_b)):
        diffs.append(f"voxel spacing {fmt(spacing_a)} vs {fmt(spacing_b)} mm")
    dir_a = a[:n, :n] / np.where(spacing_a > 0, spacing_a, 1.0)
    dir_b = b[:n, :n] / np.where(spacing_b > 0, spacing_b, 1.0)
    if np.abs(dir_a - dir_b).max() > tolerance:
        diffs.append(f"orientation (direction cosines) {fmt(dir_a.T.ravel())} vs {fmt(dir_b.T.ravel())}")
    if np.any(np.abs(a[:n, n] - b[:n, n]) > tolerance * max(float(spacing_a.min()), 1e-6)):
        diffs.append(f"origin {fmt(a[:n, n])} vs {fmt(b[:n, n])} mm")
    return diffs


def check_nifti_size(path: PathLike) -> None:
    """Refuse a NIfTI file whose header declares more voxel data than the file holds, before reading it.

    A truncated file, or a corrupt header declaring a huge image, would otherwise make the reader allocate the
    declared size first (possibly many GB). ``.nii``: compared with the file size; ``.nii.gz``: the stream is
    decompressed (without keeping it) up to the declared size.
    """
    import gzip
    import zlib
    from math import prod

    import nibabel as nib

    path = os.fspath(path)
    header = nib.load(path).header
    shape = tuple(int(s) for s in header.get_data_shape())
    declared = prod(shape) * header.get_data_dtype().itemsize
    offset = int(header.get_data_offset())
    needed = offset + declared
    if path.lower().endswith(".gz"):
        available = 0
        try:
            with gzip.open(path, "rb") as f:
                while available < needed:
                    chunk = f.read(min(1 << 22, needed - available))
                    if not chunk:
                        break
                    available += len(chunk)
        except (EOFError, OSError, zlib.error):
            pass  # truncated or corrupt stream: ``available`` is what could be read
    else:
        available = os.path.getsize(path)
    if available < needed:
        raise ValueError(
            f"{path} is truncated or its header is corrupt: the header declares {declared} bytes of voxel data "
            f"(shape {shape}, {header.get_data_dtype()}) from byte {offset}, "
            f"the file holds {max(available - offset, 0)}"
        )


def _supported(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and split_extension(path)[1].lower() in _ALL_EXTENSIONS


def datalist_from_folder(
    root: PathLike,
    reference_dirs: Sequence[str] = REFERENCE_DIRS,
    strict: bool = True,
    errors: list[tuple[dict[str, str], str]] | None = None,
) -> list[dict[str, str]]:
    """Pairs found under ``root`` in the Harvard layout.

    Every file ``<id>.<ext>`` in a folder named like one of ``reference_dirs`` (case-insensitive; default
    ``MRI`` and ``FLAIR``) is paired with the file of the same id in each sibling folder. A reference file
    with no partner raises ``FileNotFoundError`` naming it (``strict=False``: a warning, and it is skipped).

    Args:
        root: folder to search recursively.
        reference_dirs: names of the folders that hold the reference (channel 0) images.
        strict: raise on a reference image without a partner instead of skipping it.
        errors: if given, a reference image without a partner is appended here as ``(entry, reason)`` instead
            (and the folder may hold no complete pair).

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
                if errors is not None:
                    errors.append(({"mri": str(ref_file.resolve()), "id": pair_id, "task": ""}, msg))
                elif strict:
                    raise FileNotFoundError(msg)
                else:
                    logger.warning("%s; skipped", msg)
    if not items and not errors:
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


def _finish(
    rows: Iterable[Mapping[str, Any]],
    base_dir: Path,
    source: str,
    errors: list[tuple[dict[str, str], str]] | None = None,
) -> list[dict[str, str]]:
    """Normalised entries; with ``errors`` a bad entry (missing file or path) is appended there as ``(entry,
    reason)`` instead of raising, like a bad pair."""
    items = []
    rows = list(rows)
    for i, r in enumerate(rows):
        try:
            items.append(_normalise_item(r, base_dir, source, i))
        except (FileNotFoundError, ValueError) as e:
            if errors is None:
                raise
            entry = {str(k): str(v) for k, v in r.items()} if isinstance(r, Mapping) else {"entry": str(r)}
            errors.append(({**entry, "id": str(entry.get("id") or entry.get("pair_id") or f"entry {i}")}, str(e)))
    if not rows:
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
    cases = (
        [root_path]
        if any(root_path.glob(f"{reference}*.nii*"))
        else sorted(p for p in root_path.iterdir() if p.is_dir())
    )
    rows = []
    for case in cases:
        refs, others = sorted(case.glob(f"{reference}*.nii*")), sorted(case.glob(f"{other}*.nii*"))
        if len(refs) != 1 or len(others) != 1:
            raise ValueError(
                f"{case}: expected one {reference}*.nii(.gz) and one {other}*.nii(.gz), "
                f"found {len(refs)} and {len(others)}"
            )
        rows.append({"mri": str(refs[0]), "other": str(others[0]), "task": f"{other}-{reference}", "id": case.name})
    if not rows:
        raise ValueError(f"empty datalist: {root_path} has no case folders with {reference} and {other} volumes")
    return rows


def datalist_from_csv(
    path: PathLike, split: str | Sequence[str] | None = None, errors: list[tuple[dict[str, str], str]] | None = None
) -> list[dict[str, str]]:
    """Pairs from a CSV file: columns ``mri``, ``other`` (or ``image``), optional ``task``, ``id``, ``split``.

    ``pair_id`` is accepted for ``id`` (the Harvard ``pairs.csv`` column).

    Args:
        path: the CSV file; relative paths inside it are resolved against its folder.
        split: keep only rows whose ``split`` column equals this value (or one of these values).
        errors: collect bad rows (missing files) here instead of raising (see :func:`load_datalist`).
    """
    csv_path = Path(path).expanduser()
    if not csv_path.is_file():
        raise FileNotFoundError(f"datalist CSV not found: {csv_path}")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            if not ({"mri", "other"} <= set(columns) or _SINGLE_KEY in columns):
                raise ValueError(f"{csv_path}: needs columns 'mri' and 'other' (or 'image'); found {columns}")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{csv_path}: not a readable UTF-8 CSV datalist ({e})") from e
    return _finish(_filter_split(rows, split, str(csv_path)), csv_path.parent, str(csv_path), errors)


def datalist_from_json(
    path: PathLike,
    key: str = "testing",
    split: str | Sequence[str] | None = None,
    errors: list[tuple[dict[str, str], str]] | None = None,
) -> list[dict[str, str]]:
    """Pairs from a JSON file: a list of dicts, or a Decathlon-style dict whose ``key`` entry is that list.

    Args:
        path: the JSON file; relative paths inside it are resolved against its folder.
        key: the list to read from a Decathlon-style dict (default ``"testing"``).
        split: keep only entries whose ``split`` field equals this value (or one of these values).
        errors: collect bad entries (missing files) here instead of raising (see :func:`load_datalist`).
    """
    json_path = Path(path).expanduser()
    if not json_path.is_file():
        raise FileNotFoundError(f"datalist JSON not found: {json_path}")
    try:
        with open(json_path, encoding="utf-8") as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from e
    if isinstance(content, Mapping):
        if key not in content:
            raise ValueError(f"{json_path}: no '{key}' list in this datalist; its keys are {sorted(content)}")
        content = content[key]
    if not isinstance(content, list):
        raise ValueError(f"{json_path}: expected a list of pairs, got {type(content).__name__}")
    return _finish(_filter_split(content, split, str(json_path)), json_path.parent, str(json_path), errors)


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


def has_split_field(source: PathLike | Sequence[Mapping[str, Any]]) -> bool:
    """Whether a datalist source carries a ``split`` field (CSV column, JSON/list entry key); a folder has none."""
    if isinstance(source, (list, tuple)):
        return any(isinstance(d, Mapping) and "split" in d for d in source)
    path = Path(str(source)).expanduser()
    if path.suffix.lower() == ".csv" and path.is_file():
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
        return "split" in [c.strip() for c in header]
    if path.suffix.lower() == ".json" and path.is_file():
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
        entries = content.get("testing", []) if isinstance(content, Mapping) else content
        return isinstance(entries, list) and any(isinstance(d, Mapping) and "split" in d for d in entries)
    return False


_SLICE_SUFFIX = re.compile(r"^(.+?)[_\-. ]+(?:z|slice|sl|s)?\d+$", re.IGNORECASE)


def series_of(item: Mapping[str, Any]) -> str:
    """The series (one acquisition, or one patient) a pair belongs to, for splits that never separate slices of
    one series: its ``series`` or ``patient`` field when present, else derived from its id:

    - ``<name><sep><slice number>`` (``brats_2013_pat0001_1_z063``, ``TCGA_CS_4941_19960909_12``, ``case7-slice3``):
      the part before the last separator ``_ - . `` and the slice number (``z``/``slice``/``sl``/``s`` prefix allowed);
    - an all-digit id of 4 or more digits (the Harvard atlas numbering, ``34012``): all but its last 3 digits (``34``);
    - anything else: the id itself (each pair its own series).
    """
    for key in ("series", "patient"):
        if item.get(key) not in (None, ""):
            return str(item[key])
    pair_id = str(item.get("id") or split_extension(str(item.get("mri") or item.get("image") or ""))[0])
    if pair_id.isdigit() and len(pair_id) >= 4:
        return pair_id[:-3]
    match = _SLICE_SUFFIX.match(pair_id)
    return match.group(1) if match else pair_id


def series_split(
    items: Sequence[Mapping[str, Any]], val_fraction: float = 0.2, source: Any = "datalist"
) -> list[dict[str, Any]]:
    """Assign every pair a ``split`` (``"train"`` or ``"val"``) by whole series (:func:`series_of`), per task.

    For each task the series are ordered by a hash of their name (deterministic, independent of file order) and
    taken into ``"val"`` until about ``val_fraction`` of the task's pairs are there; at least one series of each
    task stays in ``"train"``. A task with a single series stays entirely in ``"train"`` (with a warning); when no
    task can spare a series the split is refused, naming the fix (a ``split`` column). The sizes are logged.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    by_task: dict[str, dict[str, list[int]]] = {}
    for i, item in enumerate(items):
        by_task.setdefault(str(item.get("task", "")), {}).setdefault(series_of(item), []).append(i)
    val: set[int] = set()
    for task, groups in sorted(by_task.items()):
        if len(groups) < 2:
            logger.warning(
                "task '%s' of %s: all %d pairs are one series; none can be held out for validation",
                task or "(none)",
                source,
                sum(map(len, groups.values())),
            )
            continue
        total = sum(map(len, groups.values()))
        order = sorted(groups, key=lambda g: (zlib.crc32(f"{task}/{g}".encode()), g))
        taken = 0
        for name in order[:-1]:
            if taken >= val_fraction * total:
                break
            val.update(groups[name])
            taken += len(groups[name])
    if not val:
        raise ValueError(
            f"{source} has no split and its pairs cannot be split by series (every task's pairs are one series), so "
            "training would validate on its own training pairs; give the datalist a 'split' column (train / val) "
            "with whole series or patients in each"
        )
    out = [{**item, "split": "val" if i in val else "train"} for i, item in enumerate(items)]
    n_series = {s: len({(d.get("task"), series_of(d)) for d in out if d["split"] == s}) for s in ("train", "val")}
    logger.info(
        "%s has no split: split by series (docs/troubleshooting.md): %d train pairs (%d series), %d val pairs "
        "(%d series)",
        source,
        len(out) - len(val),
        n_series["train"],
        len(val),
        n_series["val"],
    )
    return out


def load_datalist(
    source: PathLike | Sequence[Mapping[str, Any]],
    split: str | Sequence[str] | None = None,
    errors: list[tuple[dict[str, str], str]] | None = None,
) -> list[dict[str, str]]:
    """Datalist from a folder, a ``.csv`` or ``.json`` file, or an already built list of dicts.

    Args:
        source: folder (Harvard layout), CSV or JSON datalist file, or a list of pair dicts (relative paths
            resolved against the current directory).
        split: for CSV/JSON sources, keep only entries of this split.
        errors: if given, entries that name a missing file (or no file), and reference images without a partner
            in a folder, are appended here as ``(entry, reason)`` and left out, instead of stopping with an error
            (``on_error="skip"`` of :func:`scripts.pair_check.check_pairs`). A source that cannot be read at all
            still raises.
    """
    if isinstance(source, (list, tuple)):
        return _finish(_filter_split(list(source), split, "datalist"), Path.cwd(), "datalist", errors)
    path = Path(str(source)).expanduser()
    if path.is_dir():
        return datalist_from_folder(path, errors=errors)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return datalist_from_csv(path, split=split, errors=errors)
    if suffix == ".json":
        return datalist_from_json(path, split=split, errors=errors)
    if not path.exists():
        raise FileNotFoundError(f"datalist source not found: {path} (expected a folder, a .csv or a .json file)")
    raise ValueError(f"unsupported datalist source {path}: expected a folder, a .csv or a .json file")


@dataclass
class _Header:
    """What a file header tells without reading the pixels."""

    shape: tuple[int, ...]  # spatial shape in MONAI order (PNG: width first)
    channels: int
    affine: Any = None  # 4x4 world affine of a NIfTI file, else None
    intent: str = ""  # NIfTI intent name ("rgb vector", ...); "" for other formats


def _read_header(path: str) -> _Header:
    """Spatial shape, channels and (NIfTI) affine from the file header; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"image file is empty (0 bytes): {path}; re-export or re-download it")
    ext = split_extension(path)[1].lower()
    if ext in NIFTI_EXTENSIONS:
        import nibabel as nib

        try:
            img = nib.load(path)
            shape = tuple(int(s) for s in img.shape)
            affine = img.affine
            intent = str(img.header.get_intent()[0]) if hasattr(img.header, "get_intent") else ""
            if ext == ".nii":  # cheap for uncompressed files; .nii.gz streams are checked when read
                check_nifti_size(path)
        except Exception as e:
            raise ValueError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e
        if len(shape) >= 4:  # (X, Y, Z, C) or NIfTI vector (X, Y, Z, 1, C)
            return _Header(shape[:3], shape[-1], affine, intent)
        return _Header(shape, 1, affine, intent)
    if ext in IMAGE_EXTENSIONS:
        from PIL import Image

        try:
            with Image.open(path) as im:
                width, height = im.size
                bands = len(im.getbands()) if im.mode not in ("P", "PA") else (4 if im.mode == "PA" else 3)
        except Exception as e:
            raise ValueError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e
        return _Header((width, height), bands)  # MONAI's PILReader puts width first
    raise ValueError(unsupported_format_message(path))


def _header_shape(path: str) -> tuple[tuple[int, ...], int]:
    """``(spatial shape in MONAI order, channels)`` from the file header, without reading the pixels."""
    header = _read_header(path)
    return header.shape, header.channels


def _squeeze_trailing(shape: tuple[int, ...], keep: int = 2) -> tuple[int, ...]:
    while len(shape) > keep and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def dims_message(path: str, spatial_dims: int, shape: Sequence[int]) -> str:
    """The error text for an image of the wrong dimensionality for a ``spatial_dims`` workflow."""
    fix = (
        "fuse volumes with the 3D configuration (configs/inference_3d.json, spatial_dims=3) or extract 2D slices"
        if spatial_dims == 2
        else "fuse 2D images with the 2D configuration (configs/inference.json, spatial_dims=2)"
    )
    return (
        f"{path}: a {spatial_dims}D workflow needs {spatial_dims}D images (or single slices), this image has "
        f"spatial shape {tuple(shape)}; {fix}"
    )


RGB_INTENTS = {"rgb vector": 3, "rgba vector": 4}


def nifti_frames_message(path: str, frames: int, intent: str) -> str | None:
    """Why a NIfTI image with ``frames`` values per voxel (its 4th/5th dimension) cannot be one image of a pair.

    One value per voxel is a grey image. 3 or 4 values, which would read as RGB(A), are accepted as colour only
    when the header says so: intent ``"rgb vector"`` (NIfTI code 2003) with 3 values or ``"rgba vector"`` (2004)
    with 4; a time series or several echoes or sequences in one file are refused instead of being read as colour.
    Returns ``None`` when the image is accepted here (other counts are left to :func:`channels_message`).
    """
    if frames not in (3, 4) or RGB_INTENTS.get(intent) == frames:
        return None
    return (
        f"{path}: a {frames}-frame 4D NIfTI (intent '{intent or 'none'}') is not one image: pass one 3D volume or 2D "
        "slice per file (extract the frame you mean, e.g. with nibabel or `fslroi`); a colour NIfTI must say so in "
        "its header (intent code 'rgb vector' with 3 values per voxel or 'rgba vector' with 4: "
        "`img.header.set_intent('rgb vector')` in nibabel); both images of a pair in one file go under 'image' "
        "(2 frames)"
    )


def check_nifti_frames(path: PathLike) -> None:
    """Raise :func:`nifti_frames_message`'s error for a multi-frame NIfTI file that is not marked as colour."""
    header = _read_header(os.fspath(path))
    if header.affine is None:
        return
    message = nifti_frames_message(os.fspath(path), header.channels, header.intent)
    if message:
        raise ValueError(message)


def channels_message(path: str, channels: int) -> str:
    """The error text for an image with a channel count the fusion workflows do not read."""
    return (
        f"{path}: expected 1 (grey), 3 (RGB) or 4 (RGBA) channels, got {channels}; pass single-channel images "
        "(a 2-channel file holding both images of a pair goes under 'image')"
    )


def header_problem(item: Mapping[str, str], spatial_dims: int | None, resample: bool, tolerance: float) -> str | None:
    """Why a pair cannot be fused, from the file headers only; ``None`` when the headers look fine."""
    if _SINGLE_KEY in item and "mri" not in item:
        header = _read_header(item[_SINGLE_KEY])
        if header.channels != 2:
            return (
                f"{item[_SINGLE_KEY]}: a single-file pair needs 2 channels (reference, other), this file has "
                f"{header.channels}; list the two images under 'mri' and 'other' instead"
            )
        if spatial_dims is not None and len(_squeeze_trailing(header.shape, spatial_dims)) != spatial_dims:
            return dims_message(item[_SINGLE_KEY], spatial_dims, header.shape)
        return None
    headers = {}
    for key in _PAIR_KEYS:
        header = _read_header(item[key])
        pil = split_extension(item[key])[1].lower() in IMAGE_EXTENSIONS
        if header.affine is not None:
            frames = nifti_frames_message(item[key], header.channels, header.intent)
            if frames:
                return frames
        if header.channels not in (1, 3, 4) and not (pil and header.channels == 2):  # PIL "LA": grey + alpha
            return channels_message(item[key], header.channels)
        if spatial_dims is not None and len(_squeeze_trailing(header.shape, spatial_dims)) != spatial_dims:
            return dims_message(item[key], spatial_dims, header.shape)
        headers[key] = header
    ref, other = headers["mri"], headers["other"]
    with_geometry = ref.affine is not None and other.affine is not None
    same_size = _squeeze_trailing(ref.shape) == _squeeze_trailing(other.shape)
    if with_geometry and not resample:
        diffs = geometry_differences(ref.affine, other.affine, tolerance)
        if diffs or not same_size:
            detail = "; ".join(diffs + ([] if same_size else [f"size {ref.shape} vs {other.shape}"]))
            return (
                f"the two images of pair '{item.get('id', '')}' are not on the same voxel grid ({detail}): "
                f"{item['mri']} (reference) and {item['other']}; register / resample the other image onto the "
                "reference first, or pass --resample true to resample it onto the reference grid"
            )
    elif not with_geometry and not same_size:
        hint = " (resampling needs NIfTI images with a world geometry)" if resample else ""
        return (
            f"the two images of pair '{item.get('id', '')}' differ in size: {item['mri']} is {ref.shape}, "
            f"{item['other']} is {other.shape}; resize or register the other image onto the reference{hint}"
        )
    return None


def check_tasks(
    datalist: Sequence[Mapping[str, Any]], expected_tasks: str | Sequence[str] | None, source: Any = "datalist"
) -> None:
    """Refuse a datalist holding pairs of tasks other than ``expected_tasks`` (``None``: any task)."""
    if expected_tasks is None:
        return
    wanted = {expected_tasks} if isinstance(expected_tasks, str) else {str(t) for t in expected_tasks}
    found: dict[str, int] = {}
    for d in datalist:
        found[str(d.get("task", ""))] = found.get(str(d.get("task", "")), 0) + 1
    other = {t or "(no task)": n for t, n in sorted(found.items()) if t not in wanted}
    if other:
        where = source if isinstance(source, (str, os.PathLike)) else "the datalist"
        raise ValueError(
            f"{where} mixes tasks: it holds pairs of {other} (pairs per task), but this workflow expects only "
            f"{sorted(wanted)}; filter the datalist to those tasks (evaluate.json / train.json: --tasks), or set "
            "--expected_tasks null to fuse every pair"
        )
