"""Study-folder CLI (scripts/batch.py) on synthetic studies built from the shared data: DICOM studies from Harvard
MRI/CT slices (good ones, one with a missing series, one with mismatched geometry, one needing a description
pattern) and a NIfTI study from a BraTS crop; continue-on-error, summary CSV, resumption after an interruption."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from dicom_series import write_series  # tests/ helper
from PIL import Image
from pydicom.uid import generate_uid

from scripts.baselines import MeanFusion
from scripts.batch import PairingRules, find_dicom_pair, fuse_nifti, main, run_batch
from scripts.dicom import read_series
from scripts.networks import ClinicalFMamba

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(features=(8, 8, 16), depth=1, decoder_depth=1, d_state=4, swap_d_state=4)
PAIR_IDS = (("2004", "2005"), ("2010", "2011"), ("2020", "2021"))  # consecutive Harvard CT-MRI slices


def _volume(harvard: Path, modality: str, ids: tuple[str, ...]) -> np.ndarray:
    """(len(ids), 64, 64) uint8: Harvard CT-MRI slices, 4x4 block-averaged (small, so the tests stay fast)."""
    slices = [np.asarray(Image.open(harvard / "CT-MRI" / modality / f"{i}.png").convert("L"), np.float32) for i in ids]
    return np.stack([s.reshape(64, 4, 64, 4).mean((1, 3)).round().astype(np.uint8) for s in slices])


def _dicom_study(
    root: Path,
    harvard: Path,
    ids: tuple[str, ...],
    other: bool = True,
    other_geometry: dict | None = None,
    extra_mr: bool = False,
) -> Path:
    """One study folder: an MR series 'T2 axial' and (unless ``other`` is False) a CT series 'CT head'."""
    study, frame = generate_uid(), generate_uid()
    write_series(root / "series_01", _volume(harvard, "MRI", ids), "MR", study, frame, description="T2 axial")
    if extra_mr:  # a second MR series: the reference is then picked by its SeriesDescription
        write_series(
            root / "series_03",
            _volume(harvard, "MRI", ids)[:, ::-1],
            "MR",
            study,
            frame,
            description="T1 sag",
            series_number=5,
        )
    if other:
        volume = _volume(harvard, "CT", ids)
        if other_geometry:
            volume = volume[:, ::2, ::2]
        write_series(
            root / "series_02",
            volume,
            "CT",
            study,
            frame,
            geometry=other_geometry,
            description="CT head",
            series_number=4,
        )
    return root


def _nifti_study(root: Path, brats: Path) -> Path:
    """A 64x64x4 crop of a BraTS case: T1c (reference) and FLAIR, with their NIfTI geometry."""
    root.mkdir(parents=True)
    for name in ("T1c", "Flair"):
        image = sitk.ReadImage(str(brats / f"{name}_subtrMeanDivStd.nii.gz"))
        sitk.WriteImage(image[88:152, 88:152, 70:74], str(root / f"{name}_crop.nii.gz"))
    return root


@pytest.fixture
def studies(tmp_path: Path, shared_data: Path) -> Path:
    harvard = shared_data / "harvard"
    root = tmp_path / "studies"
    _dicom_study(root / "study_a", harvard, PAIR_IDS[0])
    _dicom_study(root / "study_b", harvard, PAIR_IDS[1], extra_mr=True)
    _dicom_study(root / "study_c_missing", harvard, PAIR_IDS[2], other=False)
    coarse = {"pixel_spacing": (1.8, 1.6)}  # half the resolution: not on the reference grid
    _dicom_study(root / "study_d_geometry", harvard, PAIR_IDS[2], other_geometry=coarse)
    brats = next(p for p in sorted((shared_data / "brats2015_sample" / "train").iterdir()) if p.is_dir())
    _nifti_study(root / "study_e_nifti", brats)
    return root


RULES = PairingRules(
    reference_descriptions=("*T2*",), other_modalities=("CT",), reference_files=("t1c*",), other_files=("flair*",)
)


def _summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["study", "inputs", "outputs", "status", "error"]
    return {row["study"]: row for row in rows}


def _partials(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if ".partial-" in p.name]


def test_mixed_good_and_bad_studies_then_resume(studies, tmp_path):
    out = tmp_path / "out"
    (out / ".study_a.partial-stale").mkdir(parents=True)  # left by a killed run
    (out / ".study_a.partial-stale" / "fused.nii.gz").write_bytes(b"partial")
    torch.manual_seed(0)
    net = ClinicalFMamba(**TINY).eval()
    results = run_batch(studies, out, RULES, network=net, method="clinicalfmamba", device="cpu", progress=False)

    assert [r.status for r in results] == ["done", "done", "failed", "failed", "done"]
    rows = _summary(out)
    assert {k: v["status"] for k, v in rows.items()} == {r.study: r.status for r in results}
    assert "no other series (Modality CT" in rows["study_c_missing"]["error"]
    assert "series found: MR 'T2 axial'" in rows["study_c_missing"]["error"]
    assert (
        "is not on the voxel grid" in rows["study_d_geometry"]["error"]
        and "--resample" in rows["study_d_geometry"]["error"]
    )
    assert "'T2 axial'" in rows["study_b"]["inputs"] and "'CT head'" in rows["study_b"]["inputs"]
    assert rows["study_e_nifti"]["inputs"] == "reference: T1c_crop.nii.gz; other: Flair_crop.nii.gz"
    assert rows["study_a"]["outputs"] == "study_a/fused.nii.gz; study_a/fused_dicom"
    assert rows["study_e_nifti"]["outputs"] == "study_e_nifti/fused.nii.gz"
    assert sorted(p.name for p in out.iterdir()) == [
        "study_a",
        "study_b",
        "study_e_nifti",
        "summary.csv",
    ]  # stale partial gone

    # study_b: the T2 series (not the T1 one) is the reference of the derived series, on its grid
    derived = read_series(out / "study_b" / "fused_dicom")
    reference_uid, other_uid, _ = find_dicom_pair(studies / "study_b", RULES)
    assert {item.SeriesInstanceUID for item in derived.datasets[0].ReferencedSeriesSequence} == {
        reference_uid,
        other_uid,
    }
    t2 = read_series(studies / "study_b", reference_uid)
    np.testing.assert_allclose(derived.origin, t2.origin, atol=1e-3)
    np.testing.assert_allclose(derived.spacing, t2.spacing, atol=1e-4)
    fused = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "study_b" / "fused.nii.gz")))
    assert fused.shape == (2, 64, 64) and 0.0 <= fused.min() and fused.max() <= 1.0

    # NIfTI study: same values as fusing the pair directly, reference geometry kept
    expected = fuse_nifti(
        studies / "study_e_nifti" / "T1c_crop.nii.gz",
        studies / "study_e_nifti" / "Flair_crop.nii.gz",
        tmp_path / "direct.nii.gz",
        net,
    )
    got, ref = sitk.ReadImage(str(out / "study_e_nifti" / "fused.nii.gz")), sitk.ReadImage(str(expected))
    np.testing.assert_allclose(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(ref), atol=1e-6)
    source = sitk.ReadImage(str(studies / "study_e_nifti" / "T1c_crop.nii.gz"))
    np.testing.assert_allclose(got.GetOrigin(), source.GetOrigin(), atol=1e-4)
    assert got.GetSize() == source.GetSize()

    # re-run through the CLI entry point: finished studies are skipped (untouched), failed ones fail again -> exit 1
    first_uid = pydicom.dcmread(out / "study_a" / "fused_dicom" / "IM00001.dcm").SeriesInstanceUID
    argv = [
        str(studies),
        "--output_dir",
        str(out),
        "--method",
        "mean",
        "--device",
        "cpu",
        "--no-progress",
        "--reference-description",
        "*T2*",
        "--other-modality",
        "CT",
        "--reference-file",
        "t1c*",
        "--other-file",
        "flair*",
    ]
    assert main(argv) == 1
    rows = _summary(out)
    assert {k: v["status"] for k, v in rows.items()} == {
        "study_a": "skipped",
        "study_b": "skipped",
        "study_c_missing": "failed",
        "study_d_geometry": "failed",
        "study_e_nifti": "skipped",
    }
    assert pydicom.dcmread(out / "study_a" / "fused_dicom" / "IM00001.dcm").SeriesInstanceUID == first_uid

    # with --resample the mismatched study goes through on the next run; the others stay as they were
    assert main(argv + ["--resample"]) == 1  # study_c_missing still has no CT series
    assert _summary(out)["study_d_geometry"]["status"] == "done"
    assert read_series(out / "study_d_geometry" / "fused_dicom").volume.shape == (2, 64, 64)


def test_ambiguous_series_and_nifti_to_dicom_are_named(studies, tmp_path):
    with pytest.raises(ValueError, match=r"study_b: 2 candidate reference series .*T1 sag.*--reference-description"):
        find_dicom_pair(studies / "study_b", PairingRules())
    results = run_batch(
        studies, tmp_path / "out", RULES, outputs=["dicom"], network=MeanFusion(), progress=False, fail_fast=True
    )
    assert [r.status for r in results] == ["done", "done", "failed"]  # fail-fast stops at the first failure
    assert sorted(p.name for p in (tmp_path / "out" / "study_a").iterdir()) == ["fused_dicom"]
    nifti = run_batch(studies, tmp_path / "out", RULES, outputs=["dicom"], network=MeanFusion(), progress=False)
    assert "a NIfTI study cannot give a DICOM series" in nifti[-1].error


# runs the CLI with fuse_series slowed down after study_b's outputs are staged, so that a signal lands mid-study
_SLOW_CLI = textwrap.dedent(
    """
    import signal, sys, time
    import scripts.batch as batch
    # Ctrl-C as in a foreground shell: a runner started in the background hands its children SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    original = batch.fuse_series
    def slow(study, *args, **kwargs):
        result = original(study, *args, **kwargs)
        if study.name == "study_b":
            print("STAGED", flush=True)
            time.sleep(300)
        return result
    batch.fuse_series = slow
    sys.exit(batch.main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_leaves_no_partial_study_and_resumes(tmp_path, shared_data, signum):
    harvard = shared_data / "harvard"
    studies = tmp_path / "studies"
    for name, ids in zip(("study_a", "study_b", "study_c"), PAIR_IDS):
        _dicom_study(studies / name, harvard, ids)
    out = tmp_path / "out"
    argv = [str(studies), "--output_dir", str(out), "--method", "mean", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CLI, *argv],
        cwd=BUNDLE_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(240, process.kill)  # a hung child must not hang the test run
    watchdog.start()
    try:
        assert process.stdout.readline().strip() == "STAGED", process.stderr.read()
        staged = _partials(out)
        assert len(staged) == 1 and staged[0].name.startswith(".study_b.partial-")
        assert (staged[0] / "fused.nii.gz").is_file()  # outputs exist, but only in the hidden staging folder
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "run the same command again to resume" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["study_a", "summary.csv"]  # no study_b, no partial folder
    assert {k: v["status"] for k, v in _summary(out).items()} == {"study_a": "done", "study_b": "interrupted"}
    uid_a = pydicom.dcmread(out / "study_a" / "fused_dicom" / "IM00001.dcm").SeriesInstanceUID

    with_bar = [a for a in argv if a != "--no-progress"]
    again = subprocess.run(
        [sys.executable, "-m", "scripts.batch", *with_bar], cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert {k: v["status"] for k, v in _summary(out).items()} == {
        "study_a": "skipped",
        "study_b": "done",
        "study_c": "done",
    }
    assert pydicom.dcmread(out / "study_a" / "fused_dicom" / "IM00001.dcm").SeriesInstanceUID == uid_a
    assert not _partials(out)
    assert "3 studies: 2 done, 1 skipped, 0 failed" in again.stderr
    assert "studies: 100%" in again.stderr and "3/3" in again.stderr  # tqdm progress bar


TINY_3D = dict(
    spatial_dims=3, features=(4, 8, 8), depth=1, channel_exchange=False, pyramid=False, decoder_depth=0, d_state=4
)


def test_3d_fusion_of_dicom_and_nifti_studies(tmp_path, shared_data):
    studies = tmp_path / "studies"
    _dicom_study(studies / "dicom", shared_data / "harvard", PAIR_IDS[0])
    brats = next(p for p in sorted((shared_data / "brats2015_sample" / "train").iterdir()) if p.is_dir())
    _nifti_study(studies / "nifti", brats)
    torch.manual_seed(0)
    net = ClinicalFMamba(**TINY_3D).eval()
    results = run_batch(
        studies, tmp_path / "out", RULES, network=net, spatial_dims=3, roi_size=(64, 64, 8), progress=False
    )
    assert [(r.study, r.status) for r in results] == [("dicom", "done"), ("nifti", "done")], [r.error for r in results]
    expected = fuse_nifti(
        studies / "nifti" / "T1c_crop.nii.gz",
        studies / "nifti" / "Flair_crop.nii.gz",
        tmp_path / "direct.nii.gz",
        net,
        spatial_dims=3,
        roi_size=(64, 64, 8),
    )
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "nifti" / "fused.nii.gz")))
    np.testing.assert_allclose(got, sitk.GetArrayFromImage(sitk.ReadImage(str(expected))), atol=1e-6)
    assert got.shape == (4, 64, 64)
    assert read_series(tmp_path / "out" / "dicom" / "fused_dicom").volume.shape == (2, 64, 64)


def test_output_folder_inside_the_studies_folder_is_refused(tmp_path):
    (tmp_path / "studies" / "s1").mkdir(parents=True)
    with pytest.raises(ValueError, match="must not be inside the studies folder"):
        run_batch(tmp_path / "studies", tmp_path / "studies" / "out", network=MeanFusion(), progress=False)
    assert main([str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o"), "--method", "mean"]) == 1


def test_nifti_study_with_nan_voxels_fails_alone(tmp_path, shared_data):
    brats = next(p for p in sorted((shared_data / "brats2015_sample" / "train").iterdir()) if p.is_dir())
    studies = tmp_path / "studies"
    _nifti_study(studies / "bad", brats)
    _nifti_study(studies / "good", brats)
    image = sitk.ReadImage(str(studies / "bad" / "Flair_crop.nii.gz"))
    array = sitk.GetArrayFromImage(image)
    array[0, 0, :3] = np.nan
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    sitk.WriteImage(broken, str(studies / "bad" / "Flair_crop.nii.gz"))
    results = run_batch(studies, tmp_path / "out", RULES, network=MeanFusion(), progress=False)
    assert [(r.study, r.status) for r in results] == [("bad", "failed"), ("good", "done")]
    assert "bad/Flair_crop.nii.gz: 3 of 16384 voxels are NaN or infinite" in results[0].error
