"""Fuse a folder of studies: per study subfolder, pair the reference MRI with the other modality and fuse them.

Each subfolder of ``STUDIES_DIR`` is one study, either DICOM or NIfTI:

- DICOM: the series are found by their headers (recursively, any file names). The reference series is the
  one whose Modality is in ``reference_modalities`` (default MR) and whose SeriesDescription matches one of
  ``reference_descriptions`` (shell patterns, case-insensitive; default ``*``); the other series likewise
  with ``other_modalities`` (default CT, PT, NM, MR) and ``other_descriptions``. Derived fused series
  (ImageType value FUSION) are never picked. No match, or several, is an error naming the candidates.
- NIfTI: ``.nii`` / ``.nii.gz`` files whose names match ``reference_files`` (default ``*mri*``) and
  ``other_files`` (default ``*ct*``, ``*pet*``, ``*spect*``), one of each.

Each pair is fused by :func:`scripts.dicom.fuse_series` (DICOM) or by the same pieces on NIfTI volumes
(:func:`fuse_nifti`): 2D slice-wise or 3D, one network loaded once for all studies. Per study the outputs
go to ``OUTPUT_DIR/<study>/``: ``fused.nii.gz`` and, for DICOM studies, ``fused_dicom/`` (a derived series).

A study is written into a hidden ``OUTPUT_DIR/.<study>.partial-*`` folder and renamed into place when it is
complete, so ``OUTPUT_DIR/<study>/`` exists only for finished studies: a re-run skips them, and an interrupted
or failed study leaves nothing behind (a stale partial folder of a killed run is removed on the next run).
A failing study is recorded and the run goes on (``--fail-fast`` stops instead). ``OUTPUT_DIR/summary.csv``
(columns study, inputs, outputs, status, error; status done, skipped, failed or interrupted) is rewritten after
every study.

Command line (from the bundle root)::

    python -m scripts.batch STUDIES_DIR --output_dir OUT [--method clinicalfmamba|mean|max|laplacian] [options]

Exit status: 0 all studies done or skipped, 1 a study failed (or a usage error), 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

from scripts.dicom import (
    METHODS,
    NORMALISE_MODES,
    _dicom_files,
    _normalise,
    fuse_series,
    fuse_volume_3d,
    fuse_volumes,
    load_fusion_network,
)

__all__ = [
    "SUMMARY_COLUMNS",
    "PairingRules",
    "StudyResult",
    "find_dicom_pair",
    "find_nifti_pair",
    "fuse_nifti",
    "main",
    "run_batch",
]

logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("study", "inputs", "outputs", "status", "error")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
_PARTIAL = ".partial-"


@dataclass
class PairingRules:
    """How a study's two inputs are recognised (shell patterns, case-insensitive).

    Attributes:
        reference_modalities, other_modalities: DICOM Modality values of the reference (MRI) and other series.
        reference_descriptions, other_descriptions: SeriesDescription patterns of the two series.
        reference_files, other_files: NIfTI file-name patterns of the two volumes.
    """

    reference_modalities: Sequence[str] = ("MR",)
    other_modalities: Sequence[str] = ("CT", "PT", "NM", "MR")
    reference_descriptions: Sequence[str] = ("*",)
    other_descriptions: Sequence[str] = ("*",)
    reference_files: Sequence[str] = ("*mri*",)
    other_files: Sequence[str] = ("*ct*", "*pet*", "*spect*")


@dataclass
class StudyResult:
    """One row of the summary: the study, its inputs, its outputs (relative to the output folder), the outcome."""

    study: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    status: str = ""
    error: str = ""

    def row(self) -> dict[str, str]:
        return {
            "study": self.study,
            "inputs": "; ".join(self.inputs),
            "outputs": "; ".join(self.outputs),
            "status": self.status,
            "error": self.error,
        }


def _matches(text: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(text.lower(), p.lower()) for p in patterns)


def _series_label(items: list[tuple[Path, Any]]) -> str:
    ds = items[0][1]
    description = str(ds.get("SeriesDescription", "") or "")
    return f"{ds.get('Modality', '?')} {description!r} ({ds.SeriesInstanceUID}, {len(items)} images)"


def find_dicom_pair(study: Path, rules: PairingRules) -> tuple[str, str, dict[str, str]]:
    """(reference Series Instance UID, other Series Instance UID, labels) of one DICOM study folder.

    Raises:
        ValueError naming the study folder: no DICOM series, no or several reference / other candidates.
    """
    series: dict[str, list[tuple[Path, Any]]] = {}
    for path, ds in _dicom_files(study):
        if "FUSION" in [str(v).upper() for v in (ds.get("ImageType", None) or [])]:
            continue  # a derived fused series, e.g. an earlier output copied back
        series.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    if not series:
        raise ValueError(f"{study}: no DICOM image series found")

    def pick(role: str, modalities: Sequence[str], descriptions: Sequence[str], exclude: str | None) -> str:
        candidates = [
            uid
            for uid, items in series.items()
            if uid != exclude
            and str(items[0][1].get("Modality", "")).upper() in {m.upper() for m in modalities}
            and _matches(str(items[0][1].get("SeriesDescription", "") or ""), descriptions)
        ]
        wanted = (
            f"Modality {'/'.join(modalities)} and SeriesDescription matching {' or '.join(map(repr, descriptions))}"
        )
        if len(candidates) == 1:
            return candidates[0]
        listing = "; ".join(_series_label(items) for items in series.values())
        if not candidates:
            raise ValueError(f"{study}: no {role} series ({wanted}); series found: {listing}")
        option = "--reference-description" if role == "reference" else "--other-description / --other-modality"
        found = "; ".join(_series_label(series[uid]) for uid in candidates)
        raise ValueError(
            f"{study}: {len(candidates)} candidate {role} series ({wanted}): {found}; narrow them with {option}"
        )

    reference = pick("reference", rules.reference_modalities, rules.reference_descriptions, None)
    other = pick("other", rules.other_modalities, rules.other_descriptions, reference)
    return reference, other, {"reference": _series_label(series[reference]), "other": _series_label(series[other])}


def _nifti_files(study: Path) -> list[Path]:
    return sorted(p for p in study.rglob("*") if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES))


def find_nifti_pair(study: Path, rules: PairingRules) -> tuple[Path, Path]:
    """(reference file, other file) of one NIfTI study folder, by file-name patterns.

    Raises:
        ValueError naming the study folder: no or several files match a role, or one file matches both.
    """
    files = _nifti_files(study)

    def pick(role: str, patterns: Sequence[str]) -> Path:
        found = [p for p in files if _matches(p.name, patterns)]
        if len(found) != 1:
            names = (
                ", ".join(p.name for p in found)
                if found
                else f"none (NIfTI files: {', '.join(p.name for p in files) or 'none'})"
            )
            option = "--reference-file" if role == "reference" else "--other-file"
            raise ValueError(
                f"{study}: expected one {role} NIfTI file matching {' or '.join(map(repr, patterns))}, found {names}; "
                f"set {option}"
            )
        return found[0]

    reference, other = pick("reference", rules.reference_files), pick("other", rules.other_files)
    if reference == other:
        raise ValueError(
            f"{study}: {reference.name} matches both the reference and the other patterns; make them distinct"
        )
    return reference, other


def _load_volume(loader: Any, path: Path) -> Any:
    """One NIfTI file as a ``(1, X, Y, Z)`` MetaTensor through the workflows' own loader (errors name the file)."""
    image = loader.load(path)
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(
            f"{path}: a single-channel 3D volume is needed, got shape {tuple(image.shape[1:])} with {image.shape[0]} "
            "channel(s)"
        )
    return image


def fuse_nifti(
    reference: Path,
    other: Path,
    output: Path,
    network: nn.Module,
    spatial_dims: int = 2,
    normalise: str | None = None,
    resample: bool = False,
    roi_size: Sequence[int] = (64, 64, 64),
    batch_size: int = 4,
    device: str | torch.device = "cpu",
) -> Path:
    """Fuse two NIfTI volumes on one voxel grid (or resampled onto the reference's) -> ``output`` (float32 in [0, 1]).

    Reading, grid check and resampling are the inference workflow's (:class:`scripts.transforms.LoadPaird`:
    truncated files and NaN/Inf voxels are refused; :func:`scripts.data.geometry_differences`; MONAI
    ``ResampleToMatch``). Then the DICOM path's steps: per-volume scaling to [0, 1] (``normalise``, default
    ``volume`` in 2D and ``percentile`` in 3D) and :func:`scripts.dicom.fuse_volumes` (2D, slice by slice along
    the third voxel axis) or :func:`scripts.dicom.fuse_volume_3d`. The output has the reference's header and affine.
    """
    import nibabel as nib

    from scripts.data import geometry_differences
    from scripts.transforms import LoadPaird, _resample_onto

    loader = LoadPaird(("reference", "other"))
    ref_image, other_image = _load_volume(loader, reference), _load_volume(loader, other)
    differences = geometry_differences(ref_image.affine, other_image.affine)
    if ref_image.shape != other_image.shape:
        differences.insert(0, f"size {tuple(other_image.shape[1:])} != {tuple(ref_image.shape[1:])}")
    if differences:
        if not resample:
            raise ValueError(
                f"{other} is not on the voxel grid of {reference}: {'; '.join(differences)}. "
                "Pass --resample to resample it onto the reference grid"
            )
        other_image = _resample_onto(other_image, ref_image)
    normalise = normalise or ("volume" if spatial_dims == 2 else "percentile")
    a, b = (_normalise(img[0].numpy().transpose(2, 1, 0), normalise) for img in (ref_image, other_image))  # (Z, Y, X)
    if spatial_dims == 3:
        fused = fuse_volume_3d(a, b, network, roi_size, device=device)
    else:
        fused = fuse_volumes(a, b, network, batch_size, device)
    source = nib.load(reference)
    image = nib.Nifti1Image(fused.transpose(2, 1, 0).astype(np.float32), source.affine, header=source.header.copy())
    image.set_data_dtype(np.float32)
    image.header.set_slope_inter(None, None)
    nib.save(image, str(output))
    return output


def _study_format(study: Path, input_format: str) -> str:
    if input_format != "auto":
        return input_format
    return "nifti" if _nifti_files(study) else "dicom"


def _write_summary(path: Path, results: Sequence[StudyResult]) -> None:
    """Write the summary CSV atomically (a temporary file renamed over it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(r.row() for r in results)
    os.replace(tmp, path)


def _outputs(folder: Path, output_dir: Path) -> list[str]:
    found = sorted(folder.glob("*.nii.gz")) + sorted(p for p in folder.iterdir() if p.is_dir())
    return [str(p.relative_to(output_dir)) for p in found]


def _fuse_study(
    study: Path,
    staging: Path,
    result: StudyResult,
    rules: PairingRules,
    fmt: str,
    outputs: Sequence[str],
    network: nn.Module,
    options: dict[str, Any],
) -> None:
    """Fuse one study into ``staging``; fills ``result.inputs``."""
    if fmt == "dicom":
        reference_uid, other_uid, labels = find_dicom_pair(study, rules)
        result.inputs = [f"reference: {labels['reference']}", f"other: {labels['other']}"]
        fuse_series(
            study,
            study,
            staging,
            network=network,
            mri_series=reference_uid,
            other_series=other_uid,
            outputs=outputs,
            **options,
        )
    else:
        if "dicom" in outputs:
            raise ValueError(
                f"{study}: a NIfTI study cannot give a DICOM series (outputs {', '.join(outputs)}); use --outputs nifti"
            )
        reference, other = find_nifti_pair(study, rules)
        result.inputs = [f"reference: {reference.relative_to(study)}", f"other: {other.relative_to(study)}"]
        nifti_options = {
            k: options[k] for k in ("spatial_dims", "normalise", "resample", "roi_size", "batch_size", "device")
        }
        fuse_nifti(reference, other, staging / "fused.nii.gz", network, **nifti_options)


def run_batch(
    studies_dir: str | Path,
    output_dir: str | Path,
    rules: PairingRules | None = None,
    input_format: str = "auto",
    outputs: Sequence[str] | None = None,
    method: str = "clinicalfmamba",
    network: nn.Module | None = None,
    weights: str | Path | None = None,
    config_file: str | Path | Sequence[str | Path] | None = None,
    spatial_dims: int = 2,
    roi_size: Sequence[int] = (64, 64, 64),
    normalise: str | None = None,
    resample: bool = False,
    device: str | torch.device | None = None,
    batch_size: int = 4,
    uid_prefix: str | None = None,
    check_patient: bool = True,
    fail_fast: bool = False,
    progress: bool = True,
) -> list[StudyResult]:
    """Fuse every study subfolder of ``studies_dir`` into ``output_dir/<study>/``; see the module docstring.

    Args:
        rules: how the two inputs of a study are found (:class:`PairingRules`).
        input_format: ``auto`` (NIfTI if the study holds ``.nii``/``.nii.gz`` files, else DICOM), ``dicom`` or
            ``nifti``.
        outputs: ``nifti`` and/or ``dicom``; default both for DICOM studies, NIfTI for NIfTI studies.
        method, network, weights, config_file, spatial_dims, roi_size, normalise, resample, device, batch_size,
            uid_prefix, check_patient: as in :func:`scripts.dicom.fuse_series`; the network is loaded once.
        fail_fast: stop at the first failed study (it is still recorded) instead of going on.
        progress: show a tqdm progress bar.

    Returns:
        one :class:`StudyResult` per study, in name order (also written to ``output_dir/summary.csv``).
    """
    from tqdm.auto import tqdm

    studies_dir, output_dir = Path(studies_dir), Path(output_dir)
    if not studies_dir.is_dir():
        raise FileNotFoundError(f"{studies_dir}: studies folder not found")
    if input_format not in ("auto", "dicom", "nifti"):
        raise ValueError(f"input_format must be auto, dicom or nifti, got {input_format!r}")
    for name in outputs or ():
        if name not in ("nifti", "dicom"):
            raise ValueError(f"unknown output {name!r}; choose nifti and/or dicom")
    studies = sorted(p for p in studies_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not studies:
        raise FileNotFoundError(f"{studies_dir}: no study subfolders found")
    resolved = output_dir.resolve()
    if resolved == studies_dir.resolve() or studies_dir.resolve() in resolved.parents:
        raise ValueError(f"{output_dir}: the output folder must not be inside the studies folder {studies_dir}")
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(f".*{_PARTIAL}*"):  # left by a killed run: incomplete by construction
        if stale.is_dir():
            logger.info("removing %s, the partial output of an interrupted run", stale)
            shutil.rmtree(stale)
    for stale in output_dir.glob(".summary.csv.*.tmp"):
        stale.unlink()
    rules = rules or PairingRules()
    if network is None:
        network = load_fusion_network(method, weights, config_file, spatial_dims=spatial_dims)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = dict(
        method=method,
        spatial_dims=spatial_dims,
        roi_size=roi_size,
        normalise=normalise,
        resample=resample,
        device=device,
        batch_size=batch_size,
        uid_prefix=uid_prefix,
        check_patient=check_patient,
    )

    results: list[StudyResult] = []
    summary = output_dir / "summary.csv"
    bar = tqdm(studies, desc="studies", unit="study", disable=not progress)
    for study in bar:
        bar.set_postfix_str(study.name)
        result = StudyResult(study.name)
        results.append(result)
        final = output_dir / study.name
        if final.exists():
            result.status, result.outputs = "skipped", _outputs(final, output_dir)  # fused by an earlier run
            _write_summary(summary, results)
            continue
        staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=f".{study.name}{_PARTIAL}"))
        try:
            fmt = _study_format(study, input_format)
            wanted = tuple(outputs or (("nifti", "dicom") if fmt == "dicom" else ("nifti",)))
            _fuse_study(study, staging, result, rules, fmt, wanted, network, options)
            staging.rename(final)
            result.status, result.outputs = "done", _outputs(final, output_dir)
            logger.info("study %s done: %s", study.name, ", ".join(result.outputs))
        except KeyboardInterrupt:
            result.status, result.error = "interrupted", "interrupted; nothing written (run again to resume)"
            raise
        except Exception as exc:  # continue-on-error: any study's failure is recorded with its message
            result.status = "failed"
            result.error = str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
            logger.error("study %s failed: %s", study.name, result.error)
            if fail_fast:
                break
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            _write_summary(summary, results)
    bar.close()
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    logger.info("%d studies: %d done, %d skipped, %d failed; summary %s", len(results), *counts.values(), summary)
    return results


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scripts.batch STUDIES_DIR --output_dir OUT [options]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m scripts.batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("studies_dir", help="folder with one subfolder per study (DICOM series or NIfTI volumes)")
    parser.add_argument("--output_dir", "--output-dir", required=True, help="OUT/<study>/ per study, OUT/summary.csv")
    parser.add_argument(
        "--format", default="auto", choices=("auto", "dicom", "nifti"), help="input format of the studies"
    )
    parser.add_argument(
        "--outputs", nargs="+", choices=("nifti", "dicom"), help="default: nifti and dicom (DICOM studies)"
    )
    rules = PairingRules()
    parser.add_argument("--reference-modality", nargs="+", default=list(rules.reference_modalities))
    parser.add_argument("--other-modality", nargs="+", default=list(rules.other_modalities))
    parser.add_argument(
        "--reference-description",
        nargs="+",
        default=list(rules.reference_descriptions),
        help="SeriesDescription pattern(s) of the reference series (shell patterns, case-insensitive)",
    )
    parser.add_argument("--other-description", nargs="+", default=list(rules.other_descriptions))
    parser.add_argument(
        "--reference-file",
        nargs="+",
        default=list(rules.reference_files),
        help="NIfTI file-name pattern(s) of the reference volume",
    )
    parser.add_argument("--other-file", nargs="+", default=list(rules.other_files))
    parser.add_argument("--method", default="clinicalfmamba", choices=METHODS)
    parser.add_argument("--weights", help="ClinicalFMamba checkpoint (default models/model.pt; 3D models/model_3d.pt)")
    parser.add_argument("--config", nargs="+", help="bundle config file(s) with network_def")
    parser.add_argument("--spatial-dims", type=int, default=2, choices=(2, 3))
    parser.add_argument("--roi-size", type=int, nargs=3, default=(64, 64, 64))
    parser.add_argument("--normalise", choices=NORMALISE_MODES)
    parser.add_argument("--resample", action="store_true", help="resample the other input onto the reference grid")
    parser.add_argument("--device")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--uid-prefix")
    parser.add_argument("--allow-patient-mismatch", action="store_true")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed study")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(message)s")
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop: like Ctrl-C (no partial study left)
    rules = PairingRules(
        args.reference_modality,
        args.other_modality,
        args.reference_description,
        args.other_description,
        args.reference_file,
        args.other_file,
    )
    try:
        with logging_redirect_tqdm():  # log lines above the progress bar, not through it
            results = run_batch(
                args.studies_dir,
                args.output_dir,
                rules,
                args.format,
                args.outputs,
                method=args.method,
                weights=args.weights,
                config_file=args.config,
                spatial_dims=args.spatial_dims,
                roi_size=args.roi_size,
                normalise=args.normalise,
                resample=args.resample,
                device=args.device,
                batch_size=args.batch_size,
                uid_prefix=args.uid_prefix,
                check_patient=not args.allow_patient_mismatch,
                fail_fast=args.fail_fast,
                progress=not args.no_progress,
            )
    except KeyboardInterrupt:
        print(
            f"interrupted: finished studies are kept; run the same command again to resume ({args.output_dir})",
            file=sys.stderr,
        )
        return 130
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        print(f"failed: {r.study}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
