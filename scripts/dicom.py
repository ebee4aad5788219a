"""DICOM in and out: fuse two co-registered DICOM series slice by slice, write NIfTI and a derived DICOM series.

Reading (:func:`read_series`, pydicom): one single-frame series per folder (or the one picked by its
Series Instance UID), slices sorted along the slice normal, modality LUT applied, geometry checked
(one orientation, one pixel spacing, one slice size, evenly spaced slices along the normal).

Fusing (:func:`fuse_volumes`): each slice pair, min-max normalised to [0, 1] per volume (or per
slice), goes through a 2D fusion network (ClinicalFMamba or a baseline); slices whose sides are not
multiples of the network's down-sampling are zero-padded symmetrically and cropped back, as in the
inference workflow. The other series must lie on the reference grid; with ``resample=True`` it is
resampled onto it (SimpleITK, linear), which needs both series to share a frame of reference.

Writing: ``fused.nii.gz`` (float32 in [0, 1], SimpleITK, geometry of the reference series) and
``fused_dicom/`` (:func:`write_derived_series`): a new series in the reference study with

- new Series Instance UID and SOP Instance UIDs, Study Instance UID and Frame of Reference UID kept;
- ImageType ``DERIVED\\SECONDARY\\OTHER\\FUSION``; IOD (:func:`output_iod`): an MR reference gives MR Image
  Storage (Modality MR), any other reference Secondary Capture Image Storage (Modality OT), so that fused
  values are never labelled as CT numbers; the value scale is recorded in a Real World Value Mapping item
  (stored 0..4095 -> fused intensity 0..1, unitless) as well as in DerivationDescription;
- per slice ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness,
  SpacingBetweenSlices and SliceLocation copied from the reference slice;
- SeriesDescription and DerivationDescription naming the method and both sources;
  ReferencedSeriesSequence listing both source series and every source instance (a source in another
  study under StudiesContainingOtherReferencedInstancesSequence), and per slice a
  SourceImageSequence with its source instances;
- patient and study attributes copied from the reference series only when present there (type-2
  attributes the source lacks are written empty, never invented); no private tags;
- pixels: the fused image scaled to 0-4095 as 16-bit unsigned integers (12 bits stored), window
  2048/4096. The NIfTI file keeps the unquantised values.

The derived series adds no error to those of its reference input under ``dciodvfy`` (dicom3tools);
``tests/test_dicom_conformance.py`` checks it for an MR and a CT reference.

Command line (from the bundle root)::

    python -m scripts.dicom fuse --mri DIR --other DIR --output DIR [--method clinicalfmamba|mean|max|laplacian]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from torch import nn

from scripts.baselines import BASELINES

__all__ = [
    "IMAGE_TYPE",
    "METHODS",
    "STORED_MAX",
    "DicomSeries",
    "fuse_series",
    "fuse_volumes",
    "load_fusion_network",
    "main",
    "output_iod",
    "patient_orientation",
    "read_series",
    "value_mapping",
    "write_derived_series",
    "write_nifti",
]

logger = logging.getLogger(__name__)

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
METHODS = ("clinicalfmamba", *BASELINES)
_METHOD_NAMES = {"clinicalfmamba": "ClinicalFMamba", "mean": "mean", "max": "max", "laplacian": "Laplacian pyramid"}
STORED_MAX = 4095  # fused [0, 1] -> 0..4095 (12 bits stored in 16)
# value 3 "OTHER": a defined term of the MR Image IOD (required there); value 4 names the derivation
IMAGE_TYPE = ["DERIVED", "SECONDARY", "OTHER", "FUSION"]

# attributes copied from the reference series: (keyword, written empty when the source lacks it = DICOM type 2)
_PATIENT = [
    ("PatientName", True), ("PatientID", True), ("IssuerOfPatientID", False), ("PatientBirthDate", True),
    ("PatientSex", True), ("PatientAge", False), ("PatientSize", False), ("PatientWeight", False),
    ("OtherPatientIDsSequence", False), ("PatientIdentityRemoved", False), ("DeidentificationMethod", False),
    ("DeidentificationMethodCodeSequence", False),
]  # fmt: skip
_STUDY = [
    ("StudyInstanceUID", False), ("StudyDate", True), ("StudyTime", True), ("ReferringPhysicianName", True),
    ("StudyID", True), ("AccessionNumber", True), ("IssuerOfAccessionNumberSequence", False),
    ("StudyDescription", False),
]  # fmt: skip
_SERIES = [
    ("SpecificCharacterSet", False), ("BodyPartExamined", False), ("PatientPosition", False),
    ("FrameOfReferenceUID", False), ("PositionReferenceIndicator", True),
]  # fmt: skip
# copied as they are in the reference, empty values included, and absent when absent there (type 2C: the
# condition, e.g. a paired body part for Laterality, is the reference's to state)
_AS_IN_SOURCE = ["Laterality", "ImageLaterality"]
_PLANE = [
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "SliceLocation",
]
_ACQUISITION = {
    "MR": [
        ("ScanningSequence", False), ("SequenceVariant", False), ("ScanOptions", True), ("MRAcquisitionType", True),
        ("SequenceName", False), ("RepetitionTime", False), ("EchoTime", True), ("EchoTrainLength", True),
        ("InversionTime", False), ("FlipAngle", False), ("MagneticFieldStrength", False), ("ImagedNucleus", False),
    ],
}  # fmt: skip


@dataclass
class DicomSeries:
    """A single-frame DICOM series as a volume with its geometry.

    Attributes:
        volume: (Z, Y, X) float32, modality LUT applied, slices in ``datasets`` order (ascending along
            the slice normal); Y runs along the column direction (rows), X along the row direction.
        datasets: the slices' headers (no pixel data), same order.
        files: the slices' files, same order.
        orientation: ImageOrientationPatient (row direction cosines, then column direction cosines).
        spacing: (x, y, z) spacing in mm: column spacing, row spacing, slice spacing.
        path: the folder it was read from.
    """

    volume: np.ndarray
    datasets: list[Dataset]
    files: list[Path]
    orientation: np.ndarray
    spacing: tuple[float, float, float]
    path: Path

    @property
    def origin(self) -> np.ndarray:
        """ImagePositionPatient of the first slice (LPS, mm)."""
        return np.asarray(self.datasets[0].ImagePositionPatient, dtype=float)

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the x (row), y (column) and slice-normal directions (LPS)."""
        row, col = self.orientation[:3], self.orientation[3:]
        return np.stack([row, col, np.cross(row, col)], axis=1)

    def header(self, keyword: str, default: Any = None) -> Any:
        return getattr(self.datasets[0], keyword, default)

    @property
    def description(self) -> str:
        return str(self.header("SeriesDescription", "") or self.header("Modality", "") or "series")

    def to_sitk(self, volume: np.ndarray | None = None) -> sitk.Image:
        """``volume`` (default: this series' own, (Z, Y, X)) as a SimpleITK image with this geometry."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.volume if volume is None else volume))
        image.SetSpacing(self.spacing)
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetDirection(tuple(float(v) for v in self.direction.reshape(-1)))
        return image


def _dicom_files(folder: Path) -> list[tuple[Path, Dataset]]:
    """Every DICOM image header (no pixel data) under ``folder``; other files are skipped."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # not DICOM, or a header pydicom cannot parse (InvalidDicomError, struct.error, ...)
            logger.debug("skipping %s: not a DICOM file", path)
            continue
        if "Rows" not in ds or "SeriesInstanceUID" not in ds:
            logger.debug("skipping %s: not an image", path)
            continue
        found.append((path, ds))
    return found


def _pixels(path: Path, ds: Dataset) -> np.ndarray:
    """One slice's pixels (Y, X) as float32 with the modality LUT applied; RGB -> luma, MONOCHROME1 inverted."""
    try:
        full = pydicom.dcmread(path)
        array = full.pixel_array
    except Exception as exc:  # decoders raise many types; name the file
        raise ValueError(f"{path}: cannot decode the pixel data ({exc})") from exc
    photometric = str(getattr(full, "PhotometricInterpretation", "MONOCHROME2"))
    if array.ndim == 3:  # colour; pydicom returns RGB (YBR is converted on decoding)
        array = array.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    else:
        array = pydicom.pixels.apply_modality_lut(array, full).astype(np.float32)
        if photometric == "MONOCHROME1":
            array = -array
    return array


def read_series(folder: str | Path, series_uid: str | None = None) -> DicomSeries:
    """Read one single-frame DICOM series from ``folder`` (searched recursively).

    Args:
        folder: a folder of DICOM files (non-DICOM files are ignored).
        series_uid: the Series Instance UID to read when the folder holds several series.

    Raises:
        FileNotFoundError / ValueError naming the folder or file: no images, several series and no
        ``series_uid``, multi-frame images, missing, unreadable or inconsistent geometry, duplicate or uneven
        slices, undecodable pixel data.
    """
    try:
        return _read_series(Path(folder), series_uid)
    except (ValueError, FileNotFoundError) as e:
        if str(folder) in str(e):
            raise
        raise ValueError(f"{folder}: unreadable DICOM data ({e})") from e
    except Exception as e:  # a corrupt element pydicom only parses on access (KeyError, struct.error, ...)
        raise ValueError(f"{folder}: unreadable DICOM data ({type(e).__name__}: {e})") from e


def _read_series(folder: Path, series_uid: str | None) -> DicomSeries:
    """:func:`read_series` without the error wrapping."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: DICOM series folder not found")
    found = _dicom_files(folder)
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    for path, ds in found:
        series.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    if not series:
        raise FileNotFoundError(f"{folder}: no DICOM images found")
    if series_uid is None:
        if len(series) > 1:
            listing = ", ".join(
                f"{uid} ({len(items)} images, {items[0][1].get('SeriesDescription', '')!r})"
                for uid, items in series.items()
            )
            raise ValueError(f"{folder}: holds {len(series)} series; pick one by its Series Instance UID: {listing}")
        series_uid = next(iter(series))
    if series_uid not in series:
        raise ValueError(f"{folder}: no series with Series Instance UID {series_uid}; found {', '.join(series)}")
    items = series[series_uid]

    for path, ds in items:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise ValueError(f"{path}: multi-frame (enhanced) images are not supported; convert to single-frame slices")
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
        if missing:
            raise ValueError(f"{path}: missing geometry attribute(s) {', '.join(missing)}")
    first_path, first = items[0]
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    pixel_spacing = np.asarray(first.PixelSpacing, dtype=float)
    for path, ds in items[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), orientation, atol=1e-4):
            raise ValueError(
                f"{path}: ImageOrientationPatient differs from {first_path.name}; one orientation per series"
            )
        if not np.allclose(np.asarray(ds.PixelSpacing, dtype=float), pixel_spacing, rtol=1e-4):
            raise ValueError(f"{path}: PixelSpacing differs from {first_path.name}")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise ValueError(
                f"{path}: slice size {ds.Rows}x{ds.Columns} differs from {first.Rows}x{first.Columns} "
                f"in {first_path.name}"
            )

    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=float) for _, ds in items])
    heights = positions @ normal
    order = np.argsort(heights, kind="stable")
    items = [items[i] for i in order]
    positions, heights = positions[order], heights[order]
    duplicates = np.flatnonzero(np.diff(heights) < 1e-4)
    if duplicates.size:
        a, b = items[duplicates[0]][0], items[duplicates[0] + 1][0]
        raise ValueError(
            f"{folder}: {a.name} and {b.name} lie at the same position (several echoes or time points?); "
            "split the series"
        )
    if len(items) > 1:
        steps = np.diff(heights)
        slice_spacing = float(steps.mean())
        if steps.max() - steps.min() > max(1e-3, 1e-2 * slice_spacing):
            raise ValueError(
                f"{folder}: slices are unevenly spaced ({steps.min():.4g} to {steps.max():.4g} mm); "
                "cannot build a volume"
            )
        off_axis = positions - positions[0] - np.outer(heights - heights[0], normal)
        if np.abs(off_axis).max() > max(1e-3, 1e-2 * slice_spacing):
            raise ValueError(
                f"{folder}: slice positions are not along the slice normal (gantry tilt?); resample the series first"
            )
    else:
        slice_spacing = float(first.get("SpacingBetweenSlices", None) or first.get("SliceThickness", None) or 1.0)

    volume = np.stack([_pixels(path, ds) for path, ds in items])
    spacing = (float(pixel_spacing[1]), float(pixel_spacing[0]), slice_spacing)
    return DicomSeries(volume, [ds for _, ds in items], [p for p, _ in items], orientation, spacing, folder)


def _grid_differences(ref: DicomSeries, other: DicomSeries) -> list[str]:
    """How ``other``'s voxel grid differs from ``ref``'s (empty: same grid)."""
    diffs = []
    if ref.volume.shape != other.volume.shape:
        diffs.append(f"shape (Z, Y, X) {other.volume.shape} != {ref.volume.shape}")
    if not np.allclose(ref.orientation, other.orientation, atol=1e-4):
        diffs.append("ImageOrientationPatient differs")
    if not np.allclose(ref.spacing, other.spacing, rtol=1e-3, atol=1e-3):
        diffs.append(f"spacing {other.spacing} != {ref.spacing} mm")
    if not np.allclose(ref.origin, other.origin, atol=1e-2):
        diffs.append(f"first slice position {other.origin.tolist()} != {ref.origin.tolist()}")
    return diffs


def _resample_onto(ref: DicomSeries, other: DicomSeries) -> np.ndarray:
    """``other``'s volume resampled (linear, zeros outside) onto ``ref``'s grid; (Z, Y, X)."""
    moving = other.to_sitk()
    resampled = sitk.Resample(moving, ref.to_sitk(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


NORMALISE_MODES = ("volume", "slice", "percentile")


def _normalise(volume: np.ndarray, mode: str) -> np.ndarray:
    """Min-max to [0, 1] over the whole volume (``volume``) or per slice (``slice``); ``percentile``: minimum -> 0,
    99.9th percentile -> 1, clipped (as ``configs/inference_3d.json`` normalises volumes for the 3D network)."""
    if mode not in NORMALISE_MODES:
        raise ValueError(f"normalise must be one of {NORMALISE_MODES}, got {mode!r}")
    if mode == "percentile":
        low, high = float(volume.min()), float(np.percentile(volume, 99.9))
        return np.clip((volume - low) / max(high - low, 1e-8), 0.0, 1.0).astype(np.float32)
    axes = None if mode == "volume" else (1, 2)
    low, high = volume.min(axis=axes, keepdims=True), volume.max(axis=axes, keepdims=True)
    return ((volume - low) / np.maximum(high - low, 1e-8)).astype(np.float32)


def fuse_volumes(
    mri: np.ndarray,
    other: np.ndarray,
    network: nn.Module,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Fuse two (Z, Y, X) volumes in [0, 1] slice by slice with a 2D fusion network -> (Z, Y, X) float32.

    Slices are zero-padded symmetrically to a multiple of ``network.size_divisor`` (if it has one)
    and the fused slices cropped back, as the inference workflow's ``DivisiblePadd`` does.
    """
    if mri.shape != other.shape or mri.ndim != 3:
        raise ValueError(f"volumes must both be (Z, Y, X) of one shape, got {mri.shape} and {other.shape}")
    divisor = int(getattr(network, "size_divisor", 1))
    pads = [(-size % divisor) for size in mri.shape[1:]]
    padding = [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2]
    height, width = mri.shape[1:]
    network = network.to(device).eval()
    fused = np.empty(mri.shape, dtype=np.float32)
    with torch.no_grad():
        for start in range(0, mri.shape[0], batch_size):
            pair = np.stack([mri[start : start + batch_size], other[start : start + batch_size]], axis=1)
            image = F.pad(torch.from_numpy(pair).to(device), padding)
            out = network(image)[:, 0, padding[2] : padding[2] + height, padding[0] : padding[0] + width]
            fused[start : start + batch_size] = out.float().cpu().numpy()
    return fused


def fuse_volume_3d(
    mri: np.ndarray,
    other: np.ndarray,
    network: nn.Module,
    roi_size: Sequence[int] = (64, 64, 64),
    overlap: float = 0.25,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Fuse two (Z, Y, X) volumes in [0, 1] whole with a 3D fusion network -> (Z, Y, X) float32.

    The network sees the volume as (X, Y, Z), the axis order of the NIfTI workflows it was trained with,
    window by window (MONAI ``SlidingWindowInferer``, Gaussian blending; windows larger than the volume are
    padded and cropped back).
    """
    from monai.inferers import SlidingWindowInferer

    if mri.shape != other.shape or mri.ndim != 3:
        raise ValueError(f"volumes must both be (Z, Y, X) of one shape, got {mri.shape} and {other.shape}")
    network = network.to(device).eval()
    pair = np.stack([mri.transpose(2, 1, 0), other.transpose(2, 1, 0)])[None]  # (1, 2, X, Y, Z)
    inferer = SlidingWindowInferer(roi_size=tuple(roi_size), sw_batch_size=1, overlap=overlap, mode="gaussian")
    with torch.no_grad():
        fused = inferer(torch.from_numpy(np.ascontiguousarray(pair)).to(device), network)
    return fused[0, 0].float().cpu().numpy().transpose(2, 1, 0).astype(np.float32)


def _config_files(spatial_dims: int) -> list[Path]:
    configs = BUNDLE_ROOT / "configs"
    return [configs / "inference.json"] + ([configs / "inference_3d.json"] if spatial_dims == 3 else [])


def load_fusion_network(
    method: str = "clinicalfmamba",
    weights: str | Path | None = None,
    config_file: str | Path | Sequence[str | Path] | None = None,
    spatial_dims: int = 2,
) -> nn.Module:
    """The fusion network for ``method``: 2D (slice-wise fusion) or 3D (whole-volume fusion).

    ``clinicalfmamba``: ``network_def`` of ``config_file`` (default ``configs/inference.json``, for 3D layered
    with ``configs/inference_3d.json``) with the checkpoint ``weights`` (default ``models/model.pt``, 3D
    ``models/model_3d.pt``; plain or ``{"model": state_dict}``) loaded strictly. A missing checkpoint is an error:
    DICOM output is never made with random weights.
    ``mean``, ``max``, ``laplacian``: the classic baselines of :mod:`scripts.baselines`.
    """
    if method in BASELINES:
        return BASELINES[method]()
    if method != "clinicalfmamba":
        raise ValueError(f"unknown fusion method {method!r}; choose one of {', '.join(METHODS)}")
    from monai.bundle import ConfigParser

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if config_file is None:
        config_file = _config_files(spatial_dims)
    configs = [str(f) for f in (config_file if isinstance(config_file, (list, tuple)) else [config_file])]
    weights = Path(weights or BUNDLE_ROOT / "models" / ("model.pt" if spatial_dims == 2 else "model_3d.pt"))
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights}: ClinicalFMamba checkpoint not found (DICOM output is never made with random weights); "
            "pass --weights FILE or use a baseline --method"
        )
    parser = ConfigParser()
    parser.read_config(configs)
    parser["bundle_root"] = str(BUNDLE_ROOT)
    network = parser.get_parsed_content("network_def")
    if getattr(network, "spatial_dims", 2) != spatial_dims:
        raise ValueError(
            f"{', '.join(configs)}: network_def is a {getattr(network, 'spatial_dims', 2)}D network, "
            f"but {spatial_dims}D fusion was asked for (--spatial-dims)"
        )
    from scripts.networks.optimize import optimize_for_inference
    from scripts.weights import load_network_weights

    network = load_network_weights(network, weights).eval()  # weights_only; unreadable or mismatched: a clear error
    return optimize_for_inference(network)  # the inference modules swapped in (docs/inference_rewrites.md)


def write_nifti(volume: np.ndarray, reference: DicomSeries, path: str | Path) -> Path:
    """Write (Z, Y, X) ``volume`` as float32 NIfTI with ``reference``'s geometry (SimpleITK: LPS -> RAS header)."""
    path = Path(path)
    sitk.WriteImage(reference.to_sitk(volume.astype(np.float32)), str(path))
    return path


def _copy(target: Dataset, source: Dataset, keywords: Sequence[tuple[str, bool]]) -> None:
    for keyword, type2 in keywords:
        if keyword in source and source[keyword].value not in (None, ""):
            setattr(target, keyword, source[keyword].value)
        elif type2:
            setattr(target, keyword, "")  # required but unknown: empty, never invented


def output_iod(reference: Dataset) -> tuple[str, str]:
    """(SOP Class UID, Modality) of the derived series for a reference slice header.

    An MR reference gives a derived MR image (MR Image IOD: geometry, MR acquisition attributes of the
    reference); any other reference (CT, PET, ...) gives a Secondary Capture image with Modality ``OT``, so
    that fused values are never labelled as CT numbers (Hounsfield units) or as another modality's quantity.
    """
    if str(reference.get("SOPClassUID", "")) == MRImageStorage:
        return MRImageStorage, "MR"
    return SecondaryCaptureImageStorage, "OT"


def value_mapping(method: str) -> Dataset:
    """One Real World Value Mapping item: stored 0..4095 -> fused intensity 0..1 (unitless, UCUM ``1``)."""
    units = Dataset()
    units.CodeValue, units.CodingSchemeDesignator, units.CodeMeaning = "1", "UCUM", "no units"
    item = Dataset()
    item.RealWorldValueFirstValueMapped, item.RealWorldValueLastValueMapped = 0, STORED_MAX
    item.RealWorldValueIntercept, item.RealWorldValueSlope = 0.0, 1.0 / STORED_MAX
    item.LUTExplanation = f"fused intensity in [0, 1] ({_METHOD_NAMES.get(method, method)})"[:64]
    item.LUTLabel = "FUSED_INTENSITY"
    item.MeasurementUnitsCodeSequence = DicomSequence([units])
    return item


def patient_orientation(orientation: Sequence[float]) -> list[str]:
    """PatientOrientation (row, column direction) from ImageOrientationPatient, e.g. ``["L", "P"]``; an oblique
    direction lists up to three letters, most significant first."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, -x / +y, -y / +z, -z in LPS
    values = []
    for vector in (np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)):
        order = np.argsort(-np.abs(vector), kind="stable")
        values.append("".join(letters[i][0 if vector[i] > 0 else 1] for i in order if abs(vector[i]) > 1e-3)[:3])
    return values


def _instance_refs(datasets: Sequence[Dataset]) -> DicomSequence:
    """(ReferencedSOPClassUID, ReferencedSOPInstanceUID) items, one per dataset."""
    items = []
    for ds in datasets:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        items.append(item)
    return DicomSequence(items)


def _now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")


def _bundle_version() -> str:
    try:
        return str(json.loads((BUNDLE_ROOT / "metadata.json").read_text())["version"])
    except (OSError, KeyError, ValueError):
        return "unknown"


def write_derived_series(
    fused: np.ndarray,
    reference: DicomSeries,
    other: DicomSeries,
    output_dir: str | Path,
    method: str = "clinicalfmamba",
    series_number: int | None = None,
    uid_prefix: str | None = None,
    per_slice_sources: bool = True,
) -> list[Path]:
    """Write the fused (Z, Y, X) volume in [0, 1] as a derived DICOM series in ``reference``'s study.

    Args:
        fused: the fused volume on ``reference``'s grid, slices in ``reference.datasets`` order.
        reference, other: the source series (``reference`` gives geometry, patient, study and, through
            :func:`output_iod`, the output class: MR for an MR reference, Secondary Capture otherwise).
        output_dir: a new or empty folder; one file per slice, ``IM00001.dcm``, ... .
        method: fusion method name, used in SeriesDescription and DerivationDescription.
        series_number: SeriesNumber of the new series; default the reference's + 1000 (empty if it has none).
        uid_prefix: root for the new UIDs (your organisation's); default pydicom's.
        per_slice_sources: reference slice k of ``other`` as a source of slice k (False after resampling).

    Returns:
        the written files, in slice order.
    """
    if fused.shape != reference.volume.shape:
        raise ValueError(f"fused volume {fused.shape} does not match the reference series {reference.volume.shape}")
    sop_class, modality = output_iod(reference.datasets[0])
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir}: output folder is not empty; refusing to mix series")

    series_uid = generate_uid(prefix=uid_prefix) if uid_prefix else generate_uid()
    date, time = _now()
    name = _METHOD_NAMES.get(method, method)
    description = f"Fused {name}: {reference.description} + {other.description}"[:64]
    derivation = (
        f"Slice-wise image fusion ({name}, ClinicalFMamba MONAI bundle {_bundle_version()}) of series "
        f"{reference.header('SeriesInstanceUID')} ({reference.header('Modality', '')}, {reference.description!r}) "
        f"and {other.header('SeriesInstanceUID')} ({other.header('Modality', '')}, {other.description!r}); "
        f"pixel values = fused intensity in [0, 1] x {STORED_MAX}, unitless (Real World Value Mapping)"
    )[:1024]
    if series_number is None:
        ref_number = reference.header("SeriesNumber", None)
        series_number = int(ref_number) + 1000 if ref_number not in (None, "") else None
    lossy = any(s.header("LossyImageCompression", "00") == "01" for s in (reference, other))

    referenced = []
    for source in (reference, other):
        item = Dataset()
        item.SeriesInstanceUID = source.header("SeriesInstanceUID")
        item.ReferencedInstanceSequence = _instance_refs(source.datasets)
        referenced.append(item)
    other_study = other.header("StudyInstanceUID")
    pixels = np.clip(np.rint(fused * STORED_MAX), 0, STORED_MAX).astype(np.uint16)

    files = []
    for index, source in enumerate(reference.datasets):
        ds = Dataset()
        _copy(ds, source, _PATIENT + _STUDY + _SERIES + _ACQUISITION.get(modality, []))
        for keyword in _PLANE + _AS_IN_SOURCE:
            if keyword in source:
                setattr(ds, keyword, source[keyword].value)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid(prefix=uid_prefix) if uid_prefix else generate_uid()
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = "" if series_number is None else int(series_number)
        ds.SeriesDescription = description
        ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
        ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = time
        ds.Manufacturer = ""
        ds.SoftwareVersions = f"ClinicalFMamba MONAI bundle {_bundle_version()}"[:64]
        ds.InstanceNumber = index + 1
        ds.ImageType = IMAGE_TYPE
        if modality == "OT":  # Secondary Capture: SC Equipment and SC Image modules; plane attributes kept as above
            ds.ConversionType = "WSD"  # workstation
            ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = date, time
            ds.PatientOrientation = patient_orientation(reference.orientation)
        ds.DerivationDescription = derivation
        ds.BurnedInAnnotation = "NO"
        if lossy:
            ds.LossyImageCompression = "01"
        sources = [source] + ([other.datasets[index]] if per_slice_sources else [])
        ds.SourceImageSequence = _instance_refs(sources)
        ds.ReferencedSeriesSequence = DicomSequence(referenced)
        if other_study and other_study != reference.header("StudyInstanceUID"):
            study_item = Dataset()
            study_item.StudyInstanceUID = other_study
            study_item.ReferencedSeriesSequence = DicomSequence([referenced[1]])
            ds.StudiesContainingOtherReferencedInstancesSequence = DicomSequence([study_item])
            ds.ReferencedSeriesSequence = DicomSequence([referenced[0]])

        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(pixels.shape[1]), int(pixels.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = (STORED_MAX + 1) // 2, STORED_MAX + 1
        ds.RealWorldValueMappingSequence = DicomSequence([value_mapping(method)])
        ds.PixelData = np.ascontiguousarray(pixels[index]).tobytes()

        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = output_dir / f"IM{index + 1:05d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True, overwrite=False)
        files.append(path)
    return files


def _check_same_patient(mri: DicomSeries, other: DicomSeries) -> None:
    for keyword in ("PatientID", "PatientName"):
        a, b = str(mri.header(keyword, "") or ""), str(other.header(keyword, "") or "")
        if a and b and a != b:
            raise ValueError(
                f"{keyword} differs between {mri.path} ({a!r}) and {other.path} ({b!r}); refusing to fuse two patients"
            )


def fuse_series(
    mri_dir: str | Path,
    other_dir: str | Path,
    output_dir: str | Path,
    method: str = "clinicalfmamba",
    network: nn.Module | None = None,
    weights: str | Path | None = None,
    config_file: str | Path | None = None,
    mri_series: str | None = None,
    other_series: str | None = None,
    normalise: str | None = None,
    resample: bool = False,
    device: str | torch.device | None = None,
    batch_size: int = 4,
    series_number: int | None = None,
    uid_prefix: str | None = None,
    name: str = "fused",
    overwrite: bool = False,
    check_patient: bool = True,
    spatial_dims: int = 2,
    roi_size: Sequence[int] = (64, 64, 64),
    outputs: Sequence[str] = ("nifti", "dicom"),
) -> dict[str, Any]:
    """Fuse a reference (MRI) series with another series; write ``<name>.nii.gz`` and/or ``<name>_dicom/``.

    Args:
        mri_dir, other_dir: folders of the reference series (network channel 0) and the other modality.
        output_dir: where the outputs go (created).
        method: ``clinicalfmamba`` or a baseline (``mean``, ``max``, ``laplacian``); ignored if ``network`` is given.
        network: a fusion module to use instead of ``method``'s: 2D (B, 2, H, W) -> (B, 1, H, W), or 3D with
            ``spatial_dims=3``.
        weights, config_file: checkpoint and config of ``clinicalfmamba`` (see :func:`load_fusion_network`).
        mri_series, other_series: Series Instance UIDs, when a folder holds several series.
        normalise: to [0, 1] before fusion: min-max per ``volume`` or per ``slice``, or ``percentile``
            (see :func:`_normalise`); default ``volume`` in 2D, ``percentile`` in 3D (as the 3D network was trained).
        resample: resample the other series onto the reference grid when the grids differ (same frame of reference
            only).
        device: torch device; default CUDA when available.
        batch_size: slices per forward pass.
        series_number, uid_prefix: see :func:`write_derived_series`.
        name: output file stem.
        overwrite: replace existing outputs of the same name (otherwise an error).
        check_patient: refuse series whose PatientID or PatientName differ.
        spatial_dims: 2 fuses slice by slice with a 2D network; 3 fuses the whole volume with a 3D network
            (``configs/inference_3d.json``, ``models/model_3d.pt``), window by window of ``roi_size``.
        outputs: which outputs to write, ``nifti`` and/or ``dicom``.

    Returns:
        ``{"nifti": Path, "dicom": Path, "files": [Path, ...], "series_uid": str, "slices": int}``; an output
        not asked for is ``None`` (``files`` empty, ``series_uid`` ``None``).
    """
    unknown = set(outputs) - {"nifti", "dicom"}
    if unknown or not outputs:
        raise ValueError(f"outputs must be nifti and/or dicom, got {list(outputs)}")
    output_dir = Path(output_dir)
    nifti_path, dicom_dir = output_dir / f"{name}.nii.gz", output_dir / f"{name}_dicom"
    existing = [p for p, kind in ((nifti_path, "nifti"), (dicom_dir, "dicom")) if kind in outputs and p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exist(s); pass overwrite=True (--overwrite) to replace"
        )

    mri = read_series(mri_dir, mri_series)
    other = read_series(other_dir, other_series)
    if check_patient:
        _check_same_patient(mri, other)
    differences = _grid_differences(mri, other)
    other_volume = other.volume
    if differences:
        same_frame = mri.header("FrameOfReferenceUID") and mri.header("FrameOfReferenceUID") == other.header(
            "FrameOfReferenceUID"
        )
        if not resample:
            raise ValueError(
                f"{other.path} is not on the voxel grid of {mri.path}: {'; '.join(differences)}. "
                "Pass resample=True (--resample) to resample it onto the reference grid (same frame of reference only)"
            )
        if not same_frame:
            raise ValueError(
                f"{other.path} and {mri.path} have different frames of reference; register them before fusing"
            )
        logger.info("resampling %s onto the grid of %s (%s)", other.path, mri.path, "; ".join(differences))
        other_volume = _resample_onto(mri, other)
    elif mri.header("FrameOfReferenceUID") != other.header("FrameOfReferenceUID"):
        logger.warning(
            "%s and %s share a voxel grid but not a frame of reference; assuming they are co-registered",
            mri.path,
            other.path,
        )

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    normalise = normalise or ("volume" if spatial_dims == 2 else "percentile")
    if network is None:
        network = load_fusion_network(method, weights, config_file, spatial_dims=spatial_dims)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    a, b = _normalise(mri.volume, normalise), _normalise(other_volume, normalise)
    if spatial_dims == 3:
        fused = fuse_volume_3d(a, b, network, roi_size, device=device)
    else:
        fused = fuse_volumes(a, b, network, batch_size, device)

    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=f".{name}.partial-") as tmp:
        staged = Path(tmp)
        files = []
        if "nifti" in outputs:
            write_nifti(fused, mri, staged / nifti_path.name)
        if "dicom" in outputs:
            files = write_derived_series(
                fused, mri, other, staged / dicom_dir.name, method, series_number, uid_prefix, not differences
            )
        if overwrite:
            if dicom_dir.exists() and "dicom" in outputs:
                shutil.rmtree(dicom_dir)
            if "nifti" in outputs:
                nifti_path.unlink(missing_ok=True)
        if "nifti" in outputs:
            (staged / nifti_path.name).replace(nifti_path)
        if "dicom" in outputs:
            (staged / dicom_dir.name).replace(dicom_dir)
    files = [dicom_dir / f.name for f in files]
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID) if files else None
    written = [str(p) for p, kind in ((nifti_path, "nifti"), (dicom_dir, "dicom")) if kind in outputs]
    logger.info("fused %d slices with %s -> %s (series %s)", fused.shape[0], method, " and ".join(written), series_uid)
    return {
        "nifti": nifti_path if "nifti" in outputs else None,
        "dicom": dicom_dir if "dicom" in outputs else None,
        "files": files,
        "series_uid": series_uid,
        "slices": int(fused.shape[0]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scripts.dicom fuse --mri DIR --other DIR --output DIR [options]``."""
    parser = argparse.ArgumentParser(prog="python -m scripts.dicom", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fuse = commands.add_parser(
        "fuse", help="fuse two co-registered DICOM series; write NIfTI and a derived DICOM series"
    )
    fuse.add_argument("--mri", required=True, help="folder of the reference series (MRI; network channel 0)")
    fuse.add_argument("--other", required=True, help="folder of the other series (CT, PET, SPECT, second MRI sequence)")
    fuse.add_argument("--output", required=True, help="output folder: <name>.nii.gz and <name>_dicom/")
    fuse.add_argument("--method", default="clinicalfmamba", choices=METHODS)
    fuse.add_argument("--weights", help="ClinicalFMamba checkpoint (default models/model.pt; 3D models/model_3d.pt)")
    fuse.add_argument(
        "--config",
        nargs="+",
        help="bundle config file(s) with network_def (default configs/inference.json, + inference_3d.json in 3D)",
    )
    fuse.add_argument("--mri-series", help="Series Instance UID, when --mri holds several series")
    fuse.add_argument("--other-series", help="Series Instance UID, when --other holds several series")
    fuse.add_argument("--normalise", choices=NORMALISE_MODES, help="default: volume (2D), percentile (3D)")
    fuse.add_argument(
        "--spatial-dims",
        type=int,
        default=2,
        choices=(2, 3),
        help="2: slice-wise 2D network; 3: whole-volume 3D network",
    )
    fuse.add_argument(
        "--roi-size", type=int, nargs=3, default=(64, 64, 64), help="3D sliding-window size (default 64 64 64)"
    )
    fuse.add_argument("--resample", action="store_true", help="resample --other onto the reference grid if they differ")
    fuse.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    fuse.add_argument("--batch-size", type=int, default=4)
    fuse.add_argument("--series-number", type=int)
    fuse.add_argument("--uid-prefix", help="UID root for the new series and instances (default pydicom's)")
    fuse.add_argument("--name", default="fused", help="output file stem")
    fuse.add_argument("--overwrite", action="store_true")
    fuse.add_argument("--allow-patient-mismatch", action="store_true", help="do not check PatientID/PatientName")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(message)s")
    from scripts.cli import traceback_wanted, user_message

    try:
        result = _run_fuse(args)
    except Exception as exc:
        message = user_message(exc)
        if message is None or traceback_wanted():
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in result.items() if k != "files"}))
    return 0


def _run_fuse(args: argparse.Namespace) -> dict[str, Any]:
    return fuse_series(
        args.mri,
        args.other,
        args.output,
        method=args.method,
        weights=args.weights,
        config_file=args.config,
        mri_series=args.mri_series,
        other_series=args.other_series,
        normalise=args.normalise,
        spatial_dims=args.spatial_dims,
        roi_size=args.roi_size,
        resample=args.resample,
        device=args.device,
        batch_size=args.batch_size,
        series_number=args.series_number,
        uid_prefix=args.uid_prefix,
        name=args.name,
        overwrite=args.overwrite,
        check_patient=not args.allow_patient_mismatch,
    )


if __name__ == "__main__":
    sys.exit(main())
