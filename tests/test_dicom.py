"""DICOM round trip: a DICOM series pair built from real samples is fused; the derived series re-reads with the
reference geometry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from dicom_series import GEOMETRY, PATIENT, write_series  # tests/ helper
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from scripts.baselines import MeanFusion
from scripts.dicom import _normalise, fuse_series, fuse_volume_3d, fuse_volumes, load_fusion_network, read_series
from scripts.networks import ClinicalFMamba

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = BUNDLE_ROOT / "docs" / "samples" / "CT-MRI"
TINY = dict(features=(8, 8, 16), depth=1, decoder_depth=1, d_state=4, swap_d_state=4)
SLICE_IDS = ("34012", "34016")  # two real Harvard MRI/CT pairs, at half resolution, stacked as a 2-slice volume


def _volume(modality: str) -> np.ndarray:
    """(2, 128, 128) uint8: the two slices, 2x2 block-averaged (keeps the network tests fast)."""
    slices = [np.asarray(Image.open(SAMPLES / modality / f"{i}.png").convert("L"), dtype=np.float32) for i in SLICE_IDS]
    return np.stack([s.reshape(128, 2, 128, 2).mean((1, 3)).round().astype(np.uint8) for s in slices])


@pytest.fixture
def pair(tmp_path: Path) -> dict:
    study, frame = generate_uid(), generate_uid()
    mri_uid = write_series(tmp_path / "mri", _volume("MRI"), "MR", study, frame, description="T2 axial")
    ct_uid = write_series(tmp_path / "ct", _volume("CT"), "CT", study, frame, description="CT head", series_number=4)
    return dict(
        mri=tmp_path / "mri", other=tmp_path / "ct", study=study, frame=frame, uids=(mri_uid, ct_uid), root=tmp_path
    )


def _sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _assert_same_geometry(image: sitk.Image, reference: sitk.Image) -> None:
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-4)


def test_read_series_sorts_slices_and_applies_rescale(pair):
    series = read_series(pair["mri"])
    ct = read_series(pair["other"])
    assert series.volume.shape == (2, 128, 128)
    assert [int(ds.InstanceNumber) for ds in series.datasets] == [1, 2]  # files were written in reverse order
    np.testing.assert_allclose(series.spacing, (0.8, 0.9, 3.5), atol=1e-3)
    np.testing.assert_array_equal(ct.volume, _volume("CT").astype(np.float32) * 8 - 1024)
    _assert_same_geometry(series.to_sitk(), _sitk_series(pair["mri"]))


def test_fuse_series_round_trip_with_network(pair):
    torch.manual_seed(0)
    net = ClinicalFMamba(**TINY).eval()
    result = fuse_series(
        pair["mri"], pair["other"], pair["root"] / "out", network=net, method="clinicalfmamba", device="cpu"
    )
    mri, ct = read_series(pair["mri"]), read_series(pair["other"])
    expected = fuse_volumes(_normalise(mri.volume, "volume"), _normalise(ct.volume, "volume"), net)
    reference = _sitk_series(pair["mri"])

    nifti = sitk.ReadImage(str(result["nifti"]))  # NIfTI: reference geometry, unquantised values
    _assert_same_geometry(nifti, reference)
    np.testing.assert_allclose(sitk.GetArrayFromImage(nifti), expected, atol=1e-6)

    derived = _sitk_series(result["dicom"])  # DICOM re-read by SimpleITK (GDCM)
    _assert_same_geometry(derived, reference)
    np.testing.assert_allclose(sitk.GetArrayFromImage(derived), np.rint(expected * 4095), atol=0.5)

    sources = sorted((pydicom.dcmread(f) for f in pair["mri"].glob("*.dcm")), key=lambda d: int(d.InstanceNumber))
    ct_uids = {pydicom.dcmread(f).SOPInstanceUID for f in pair["other"].glob("*.dcm")}
    outputs = [pydicom.dcmread(f) for f in result["files"]]
    assert len({d.SeriesInstanceUID for d in outputs}) == 1 and outputs[0].SeriesInstanceUID not in pair["uids"]
    assert result["series_uid"] == outputs[0].SeriesInstanceUID
    new_sops = {d.SOPInstanceUID for d in outputs}
    assert len(new_sops) == 2 and not new_sops & ({d.SOPInstanceUID for d in sources} | ct_uids)
    for out, src in zip(outputs, sources):
        assert out.StudyInstanceUID == pair["study"] and out.FrameOfReferenceUID == pair["frame"]
        assert list(out.ImageType) == ["DERIVED", "SECONDARY", "OTHER", "FUSION"]
        assert out.SOPClassUID == MRImageStorage and out.Modality == "MR"
        for key in (
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
            "SliceThickness",
            "SpacingBetweenSlices",
        ):
            assert out[key].value == src[key].value, key
        for key, value in PATIENT.items():
            assert str(out[key].value) == value, key
        assert "ClinicalFMamba" in out.SeriesDescription and "T2 axial" in out.SeriesDescription
        assert {item.SeriesInstanceUID for item in out.ReferencedSeriesSequence} == set(pair["uids"])
        referenced = {
            i.ReferencedSOPInstanceUID for s in out.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence
        }
        assert referenced == {d.SOPInstanceUID for d in sources} | ct_uids
        assert src.SOPInstanceUID in {i.ReferencedSOPInstanceUID for i in out.SourceImageSequence}
        assert out.SeriesNumber == 1003 and out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert not any(elem.tag.is_private for elem in out)


def test_cli_with_baseline_and_no_silent_overwrite(pair):
    out = pair["root"] / "cli"
    command = [sys.executable, "-m", "scripts.dicom", "fuse", "--mri", str(pair["mri"]), "--other", str(pair["other"])]
    command += ["--output", str(out), "--method", "mean", "--device", "cpu"]
    done = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(summary["nifti"]).is_file() and summary["slices"] == 2
    first = pydicom.dcmread(sorted(Path(summary["dicom"]).glob("*.dcm"))[0])
    assert first.SeriesDescription.startswith("Fused mean")
    again = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already exist" in again.stderr


def test_missing_patient_attributes_are_left_empty_not_invented(tmp_path):
    study, frame = generate_uid(), generate_uid()
    write_series(tmp_path / "mri", _volume("MRI"), "MR", study, frame, patient={"PatientID": "ANON1"})
    write_series(tmp_path / "ct", _volume("CT"), "CT", study, frame, patient={})
    result = fuse_series(tmp_path / "mri", tmp_path / "ct", tmp_path / "out", network=MeanFusion(), method="mean")
    out = pydicom.dcmread(result["files"][0])
    assert out.PatientID == "ANON1"
    assert out.PatientName == "" and out.PatientBirthDate == "" and out.PatientSex == ""
    assert "PatientAge" not in out and "OtherPatientIDsSequence" not in out


def test_different_patients_are_refused(tmp_path):
    study, frame = generate_uid(), generate_uid()
    write_series(tmp_path / "mri", _volume("MRI"), "MR", study, frame)
    write_series(tmp_path / "ct", _volume("CT"), "CT", study, frame, patient={**PATIENT, "PatientID": "P-9999"})
    with pytest.raises(ValueError, match="PatientID differs"):
        fuse_series(tmp_path / "mri", tmp_path / "ct", tmp_path / "out", network=MeanFusion())
    assert not (tmp_path / "out").exists()


def test_other_grid_is_refused_or_resampled(tmp_path):
    study, frame = generate_uid(), generate_uid()
    write_series(tmp_path / "mri", _volume("MRI"), "MR", study, frame)
    coarse = _volume("CT")[:, ::2, ::2]  # same field of view, half the resolution
    geometry = {
        "pixel_spacing": (1.8, 1.6),
        "origin": GEOMETRY["origin"] + 0.45 * GEOMETRY["col"] + 0.4 * GEOMETRY["row"],
    }
    write_series(tmp_path / "ct", coarse, "CT", study, frame, geometry=geometry)
    with pytest.raises(ValueError, match="not on the voxel grid.*--resample"):
        fuse_series(tmp_path / "mri", tmp_path / "ct", tmp_path / "out", network=MeanFusion())
    result = fuse_series(tmp_path / "mri", tmp_path / "ct", tmp_path / "out", network=MeanFusion(), resample=True)
    _assert_same_geometry(sitk.ReadImage(str(result["nifti"])), _sitk_series(tmp_path / "mri"))
    assert len(pydicom.dcmread(result["files"][0]).SourceImageSequence) == 1  # no 1:1 source slice after resampling


def test_read_series_errors_name_the_folder(tmp_path, pair):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no DICOM images"):
        read_series(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for series in (pair["mri"], pair["other"]):
        for f in series.glob("*.dcm"):
            (mixed / f"{series.name}_{f.name}").write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="holds 2 series"):
        read_series(mixed)
    assert read_series(mixed, pair["uids"][1]).volume.shape == (2, 128, 128)


def test_clinicalfmamba_needs_a_checkpoint(pair):
    config = pair["root"] / "tiny.json"
    config.write_text(
        json.dumps(
            {
                "network_def": {
                    "_target_": "scripts.networks.ClinicalFMamba",
                    **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
                }
            }
        )
    )
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        fuse_series(
            pair["mri"], pair["other"], pair["root"] / "out", weights=pair["root"] / "none.pt", config_file=config
        )
    torch.manual_seed(1)
    net = ClinicalFMamba(**TINY)
    torch.save({"model": net.state_dict()}, pair["root"] / "model.pt")
    result = fuse_series(
        pair["mri"],
        pair["other"],
        pair["root"] / "out",
        weights=pair["root"] / "model.pt",
        config_file=config,
        device="cpu",
    )
    mri, ct = read_series(pair["mri"]), read_series(pair["other"])
    expected = fuse_volumes(_normalise(mri.volume, "volume"), _normalise(ct.volume, "volume"), net.eval())
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(result["nifti"]))), expected, atol=1e-6)


TINY_3D = dict(
    spatial_dims=3, features=(4, 8, 8), depth=1, channel_exchange=False, pyramid=False, decoder_depth=0, d_state=4
)


def test_fuse_series_with_the_3d_network(pair):
    """Whole-volume 3D fusion of a DICOM pair: windows padded past the 2-slice volume, geometry kept."""
    torch.manual_seed(0)
    net = ClinicalFMamba(**TINY_3D).eval()
    seen = []
    net.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    result = fuse_series(
        pair["mri"],
        pair["other"],
        pair["root"] / "out3d",
        network=net,
        spatial_dims=3,
        roi_size=(16, 16, 16),
        device="cpu",
    )
    assert seen and all(shape == (1, 2, 16, 16, 16) for shape in seen)  # (B, 2, X, Y, Z) windows
    mri, ct = read_series(pair["mri"]), read_series(pair["other"])
    a, b = _normalise(mri.volume, "percentile"), _normalise(ct.volume, "percentile")
    assert a.min() == 0.0 and a.max() == 1.0
    expected = fuse_volume_3d(a, b, net, (16, 16, 16))
    assert expected.shape == mri.volume.shape
    nifti = sitk.ReadImage(str(result["nifti"]))
    _assert_same_geometry(nifti, _sitk_series(pair["mri"]))
    np.testing.assert_allclose(sitk.GetArrayFromImage(nifti), expected, atol=1e-6)
    assert result["slices"] == mri.volume.shape[0]


def test_3d_fusion_refuses_a_2d_network_config(tmp_path):
    weights = tmp_path / "w.pt"
    torch.save({}, weights)
    with pytest.raises(ValueError, match="is a 2D network, but 3D fusion was asked for"):
        load_fusion_network("clinicalfmamba", weights, BUNDLE_ROOT / "configs" / "inference.json", spatial_dims=3)
