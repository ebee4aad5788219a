"""Cohorts for the classification study: the LGG (TCGA) table and a generic "bring your own cohort" CSV.

A cohort is a list of 2-D slices, each with two co-registered sequences (A = channel 0 of the fusion input,
B = channel 1), grouped by patient, plus one binary label per patient and an optional tumour / no-tumour label
per slice.

Generic CSV (``format="csv"``), one row per slice; paths are relative to the CSV's folder unless absolute:

=================== ========== ==================================================================================
column              required   meaning
=================== ========== ==================================================================================
``patient``         yes        patient id; folds and bootstrap resample patients, never slices
``label``           yes        patient-level label 0/1 (e.g. grade III = 1), the same on every row of the patient;
                               blank = unlabelled (the patient is excluded and counted)
``seq_a``           yes        image of sequence A (e.g. FLAIR): PNG/JPEG/TIFF/BMP, or anything MONAI
                               ``LoadImage`` reads (NIfTI, ...), 2-D
``seq_b``           yes        image of sequence B (e.g. post-contrast T1), same size as ``seq_a``
``seq_a_channel``   no         channel index when ``seq_a`` is a multi-channel file (blank = single channel)
``seq_b_channel``   no         the same for ``seq_b``
``tumour``          no         slice label 0/1 for the slice-level task; where given, the patient-level score is
                               aggregated over the ``tumour == 1`` slices only; blank on every row = no slice task
``slice``           no         slice id (default: row number within the patient)
``exclude``         no         non-empty = exclude the patient (the text is the reason, e.g. "T1c missing")
``mask``            no         tumour mask of the slice (non-zero = tumour), same size as ``seq_a``; needed by the
                               radiomics classifiers (features inside the tumour)
=================== ========== ==================================================================================

LGG adapter (``format="lgg_tcga"``): ``../shared/data/lgg_tcga`` (``patients.csv``, ``slices.csv``,
``images/<case>/<case>_<slice>.png`` with RGB = pre-contrast T1, FLAIR, post-contrast T1). Sequence A is FLAIR
(channel 1), sequence B post-contrast T1 (channel 2) by default; patients whose sequence B was replaced by a
FLAIR copy (``post_contrast_missing`` / ``pre_contrast_missing``) or who have no grade are excluded with the
reason recorded. The patient label is ``grade_G3`` (WHO grade III = 1, grade II = 0) and the slice label is
``tumour``; the slice's ``mask`` (FLAIR abnormality) is the radiomics ROI.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LGG_SEQUENCES",
    "Cohort",
    "SliceRecord",
    "csv_cohort",
    "lgg_tcga_cohort",
    "load_cohort",
    "load_sequence",
    "read_image",
    "select_channel",
]

logger = logging.getLogger(__name__)

#: channel index of each sequence in the LGG RGB PNGs, and the flag telling that it is a FLAIR copy
LGG_SEQUENCES: dict[str, tuple[int, str | None]] = {
    "t1": (0, "pre_contrast_missing"),
    "flair": (1, None),
    "t1c": (2, "post_contrast_missing"),
}
_PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class SliceRecord:
    """One slice: two sequence images (file + optional channel), its patient and optional tumour label."""

    patient: str
    slice_id: str
    seq_a: str
    seq_b: str
    seq_a_channel: int | None = None
    seq_b_channel: int | None = None
    tumour: int | None = None
    mask: str | None = None


@dataclass
class Cohort:
    """Slices of the eligible patients, their labels and the excluded patients with reasons."""

    name: str
    slices: list[SliceRecord]
    labels: dict[str, int]
    excluded: dict[str, str] = field(default_factory=dict)
    sequence_names: tuple[str, str] = ("A", "B")
    label_name: str = "label"
    slice_label_name: str = "tumour"

    def __post_init__(self) -> None:
        have = {s.patient for s in self.slices}
        for p in sorted(set(self.labels) - have):  # labelled patients without slices cannot be evaluated
            self.excluded[p] = "no slices"
            del self.labels[p]
        self.slices = [s for s in self.slices if s.patient in self.labels]

    @property
    def patients(self) -> list[str]:
        return sorted(self.labels)

    @property
    def has_slice_labels(self) -> bool:
        return any(s.tumour is not None for s in self.slices)

    def summary(self) -> dict[str, Any]:
        reasons: dict[str, int] = {}
        for r in self.excluded.values():
            reasons[r] = reasons.get(r, 0) + 1
        y = np.asarray([self.labels[p] for p in self.patients])
        return {
            "cohort": self.name,
            "sequences": list(self.sequence_names),
            "n_patients": len(self.patients),
            "n_positive": int(y.sum()),
            "n_negative": int(len(y) - y.sum()),
            "n_slices": len(self.slices),
            "n_tumour_slices": sum(1 for s in self.slices if s.tumour == 1),
            "n_excluded": len(self.excluded),
            "excluded_reasons": reasons,
        }

    def fingerprint(self) -> str:
        """Hash of the slice list and labels (used as a cache key for the loaded / fused images)."""
        payload = json.dumps(
            {"slices": [asdict(s) for s in self.slices], "labels": self.labels}, sort_keys=True, default=str
        ).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def subset(self, max_patients: int | None = None, max_slices_per_patient: int | None = None) -> Cohort:
        """A smaller cohort for smoke tests: about ``max_patients`` patients (both classes kept in proportion,
        lowest ids first) and at most ``max_slices_per_patient`` slices each (tumour and tumour-free slices
        alternated so that both stay present)."""
        patients = self.patients
        if max_patients is not None and max_patients < len(patients):
            pos = [p for p in patients if self.labels[p] == 1]
            neg = [p for p in patients if self.labels[p] == 0]
            n_pos = min(len(pos), max(1, round(max_patients * len(pos) / len(patients))))
            n_neg = min(len(neg), max(1, max_patients - n_pos))
            patients = sorted(pos[:n_pos] + neg[:n_neg])
        keep = set(patients)
        slices: list[SliceRecord] = []
        for p in patients:
            own = [s for s in self.slices if s.patient == p]
            if max_slices_per_patient is not None and len(own) > max_slices_per_patient:
                t = [s for s in own if s.tumour == 1]
                o = [s for s in own if s.tumour != 1]
                mixed = [x for pair in zip(t, o) for x in pair] + t[len(o) :] + o[len(t) :]
                own = mixed[:max_slices_per_patient]
            slices.extend(own)
        excluded = dict(self.excluded)
        return Cohort(
            name=f"{self.name} (subset of {len(keep)} patients)",
            slices=slices,
            labels={p: self.labels[p] for p in patients},
            excluded=excluded,
            sequence_names=self.sequence_names,
            label_name=self.label_name,
            slice_label_name=self.slice_label_name,
        )


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"cohort table not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(f)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a readable UTF-8 CSV table ({e})") from e


def lgg_tcga_cohort(root: str | os.PathLike, sequences: Sequence[str] = ("flair", "t1c")) -> Cohort:
    """The LGG (TCGA) table as a cohort: patient label ``grade_G3``, slice label ``tumour``.

    Args:
        root: the ``lgg_tcga`` folder.
        sequences: names of sequence A and B among ``t1`` (pre-contrast), ``flair``, ``t1c`` (post-contrast).
    """
    root = Path(root)
    if len(sequences) != 2 or any(s not in LGG_SEQUENCES for s in sequences):
        raise ValueError(f"sequences must be two of {sorted(LGG_SEQUENCES)}, got {sequences}")
    (ch_a, flag_a), (ch_b, flag_b) = (LGG_SEQUENCES[s] for s in sequences)
    names = {"t1": "T1", "flair": "FLAIR", "t1c": "T1c"}
    labels: dict[str, int] = {}
    excluded: dict[str, str] = {}
    for row in _read_csv(root / "patients.csv"):
        patient = row["patient"]
        reasons = [
            f"{names[name]} missing (a FLAIR copy)"
            for name, flag in zip(sequences, (flag_a, flag_b))
            if flag and row.get(flag) == "1"
        ]
        if row.get("grade_G3", "") not in ("0", "1"):
            reasons.append("no grade label")
        if reasons:
            excluded[patient] = "; ".join(reasons)
        else:
            labels[patient] = int(row["grade_G3"])
    slices = [
        SliceRecord(
            patient=row["patient"],
            slice_id=row["slice"],
            seq_a=str(root / row["image"]),
            seq_b=str(root / row["image"]),
            seq_a_channel=ch_a,
            seq_b_channel=ch_b,
            tumour=int(row["tumour"]),
            mask=str(root / row["mask"]) if row.get("mask") else None,
        )
        for row in _read_csv(root / "slices.csv")
        if row["patient"] in labels
    ]
    return Cohort(
        name="lgg_tcga",
        slices=slices,
        labels=labels,
        excluded=excluded,
        sequence_names=(names[sequences[0]], names[sequences[1]]),
        label_name="WHO grade III (vs II)",
        slice_label_name="tumour (vs no tumour)",
    )


def _opt_int(value: str | None) -> int | None:
    return None if value in (None, "") else int(float(value))


def csv_cohort(
    path: str | os.PathLike,
    sequence_names: Sequence[str] = ("A", "B"),
    label_name: str = "label",
) -> Cohort:
    """A cohort from the generic per-slice CSV described in the module docstring."""
    path = Path(path)
    rows = _read_csv(path)
    if not rows:
        raise ValueError(f"{path}: the cohort table lists no slices (one row per slice: patient, label, seq_a, seq_b)")
    missing = {"patient", "label", "seq_a", "seq_b"} - set(rows[0])
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
    base = path.parent
    labels: dict[str, int] = {}
    excluded: dict[str, str] = {}
    seen: dict[str, int] = {}
    slices: list[SliceRecord] = []
    for i, row in enumerate(rows):
        p = row["patient"]
        if not p:
            raise ValueError(f"{path}: row {i + 2} has no patient id")
        if row.get("exclude"):
            excluded[p] = row["exclude"]
        lab = row["label"]
        if lab == "":
            excluded.setdefault(p, "no label")
        elif lab not in ("0", "1", "0.0", "1.0"):
            raise ValueError(f"{path}: row {i + 2}: label must be 0, 1 or blank, got {lab!r}")
        else:
            if p in labels and labels[p] != int(float(lab)):
                raise ValueError(f"{path}: patient {p} has conflicting labels")
            labels[p] = int(float(lab))
        seen[p] = seen.get(p, 0) + 1

        def _abs(x: str) -> str:
            return x if os.path.isabs(x) else str(base / x)

        slices.append(
            SliceRecord(
                patient=p,
                slice_id=row.get("slice") or str(seen[p] - 1),
                seq_a=_abs(row["seq_a"]),
                seq_b=_abs(row["seq_b"]),
                seq_a_channel=_opt_int(row.get("seq_a_channel")),
                seq_b_channel=_opt_int(row.get("seq_b_channel")),
                tumour=_opt_int(row.get("tumour")),
                mask=_abs(row["mask"]) if row.get("mask") else None,
            )
        )
    for p in excluded:
        labels.pop(p, None)
    return Cohort(
        name=path.stem,
        slices=[s for s in slices if s.patient in labels],
        labels=labels,
        excluded=excluded,
        sequence_names=(str(sequence_names[0]), str(sequence_names[1])),
        label_name=label_name,
    )


def load_cohort(
    source: str | os.PathLike,
    format: str = "auto",
    sequences: Sequence[str] = ("flair", "t1c"),
    max_patients: int | None = None,
    max_slices_per_patient: int | None = None,
    label_name: str = "label",
) -> Cohort:
    """Load a cohort: ``format`` ``"lgg_tcga"`` (a folder with ``patients.csv`` and ``slices.csv``), ``"csv"``
    (the generic per-slice CSV) or ``"auto"`` (LGG if ``source`` is such a folder, else CSV). ``sequences``
    names the two sequences (LGG: which channels; CSV: display names). ``max_patients`` /
    ``max_slices_per_patient`` take a small deterministic subset (smoke tests)."""
    source = Path(source)
    if format == "auto":
        format = "lgg_tcga" if (source.is_dir() and (source / "patients.csv").is_file()) else "csv"
    if format == "lgg_tcga":
        cohort = lgg_tcga_cohort(source, sequences)
    elif format == "csv":
        cohort = csv_cohort(source, sequence_names=sequences, label_name=label_name)
    else:
        raise ValueError(f"unknown cohort format {format!r}; use 'lgg_tcga', 'csv' or 'auto'")
    if max_patients is not None or max_slices_per_patient is not None:
        cohort = cohort.subset(max_patients, max_slices_per_patient)
    return cohort


def read_image(path: str) -> np.ndarray:
    """The stored array of a 2-D image file: ``(H, W)`` or ``(H, W, C)`` (rows first, as stored).

    PNG / JPEG / TIFF / BMP are read with PIL, NIfTI with MONAI's ``NibabelReader``; other formats are refused
    (nothing is unpickled). Missing, empty or unreadable files raise errors naming the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"image file is empty (0 bytes): {path}")
    if path.lower().endswith(_PIL_EXTENSIONS):
        from PIL import Image

        try:
            with Image.open(path) as im:
                return np.asarray(im)
        except Exception as e:
            raise ValueError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e
    if not path.lower().endswith((".nii", ".nii.gz")):
        raise ValueError(f"unsupported image format of {path}: use PNG, JPEG, TIFF, BMP or NIfTI")
    from monai.data import NibabelReader
    from monai.transforms import LoadImage

    try:
        arr = np.squeeze(np.asarray(LoadImage(reader=NibabelReader(), image_only=True)(path)))
    except Exception as e:
        raise ValueError(f"cannot read image file {path}: {type(e).__name__}: {str(e).strip()[-300:]}") from e
    if arr.ndim == 3 and arr.shape[-1] > 4 and arr.shape[0] <= 4:  # channel-first reader output -> channel-last
        arr = np.moveaxis(arr, 0, -1)
    return np.swapaxes(arr, 0, 1) if arr.ndim >= 2 else arr  # MONAI readers are (W, H) for 2-D files


def select_channel(arr: np.ndarray, channel: int | None, path: str = "") -> np.ndarray:
    """One 2-D float32 image: the array itself, or its ``channel`` (last axis) for a multi-channel image."""
    if arr.ndim == 3:
        if channel is None:
            if arr.shape[2] != 1:
                raise ValueError(f"{path} has {arr.shape[2]} channels: give the channel column")
            channel = 0
        if not 0 <= channel < arr.shape[2]:
            raise ValueError(f"{path} has {arr.shape[2]} channels; channel {channel} does not exist")
        arr = arr[..., channel]
    elif channel not in (None, 0):
        raise ValueError(f"{path} is single-channel; channel {channel} does not exist")
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D image, got shape {arr.shape}")
    arr = arr.astype(np.float32)
    non_finite = int((~np.isfinite(arr)).sum())
    if non_finite:
        raise ValueError(f"{path}: {non_finite} of {arr.size} pixels are NaN or infinite; fix the image")
    return arr


def load_sequence(path: str, channel: int | None = None) -> np.ndarray:
    """One 2-D float32 image: a whole single-channel file, or one channel of a multi-channel file."""
    return select_channel(read_image(path), channel, path)
