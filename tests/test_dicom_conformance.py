"""The derived DICOM series passes an independent validator (``dciodvfy``, Debian's dicom3tools) with no error that
its reference input did not already have, and a fused series is never labelled as CT values."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_series import write_series  # tests/ helper
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import MRImageStorage, SecondaryCaptureImageStorage, generate_uid

from scripts.baselines import MeanFusion
from scripts.dicom import STORED_MAX, fuse_series, patient_orientation

DCIODVFY = shutil.which("dciodvfy")
SAMPLES = Path(__file__).resolve().parents[1] / "docs" / "samples" / "CT-MRI"


def _errors(path: Path) -> set[str]:
    """dciodvfy's ``Error`` lines for one file (the tool writes its findings to stderr)."""
    if DCIODVFY is None:
        pytest.fail("dciodvfy not found: install Debian's dicom3tools (apt-get install dicom3tools); .ci/run does")
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    assert any(line.endswith("Image") for line in lines), f"dciodvfy did not name an IOD for {path}: {lines}"
    return {line.strip() for line in lines if line.startswith("Error")}


def _two_series(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    """pydicom's test file ``name`` as the reference series, and a copy under new UIDs as the other series."""
    source = Path(get_testdata_file(name))
    reference, other = tmp_path / "reference", tmp_path / "other"
    reference.mkdir()
    other.mkdir()
    shutil.copy(source, reference / source.name)
    ds = pydicom.dcmread(source)
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(other / source.name)
    return reference / source.name, reference, other


@pytest.mark.parametrize(
    "name, sop_class, modality",
    [("MR_small.dcm", MRImageStorage, "MR"), ("CT_small.dcm", SecondaryCaptureImageStorage, "OT")],
)
def test_derived_series_adds_no_dciodvfy_error(tmp_path, name, sop_class, modality):
    source, reference, other = _two_series(tmp_path, name)
    result = fuse_series(reference, other, tmp_path / "out", network=MeanFusion(), method="mean")
    (derived,) = result["files"]
    introduced = _errors(derived) - _errors(source)
    assert not introduced, f"the writer introduced dciodvfy errors: {sorted(introduced)}"

    out = pydicom.dcmread(derived)
    assert out.SOPClassUID == sop_class and out.Modality == modality
    assert list(out.ImageType)[:3] == ["DERIVED", "SECONDARY", "OTHER"]
    assert "RescaleType" not in out and "RescaleSlope" not in out  # no Hounsfield (or any modality) scale claimed
    (mapping,) = out.RealWorldValueMappingSequence
    assert (mapping.RealWorldValueFirstValueMapped, mapping.RealWorldValueLastValueMapped) == (0, STORED_MAX)
    assert mapping.RealWorldValueIntercept == 0.0 and mapping.RealWorldValueSlope == pytest.approx(1 / STORED_MAX)
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    assert mapping.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
    src = pydicom.dcmread(source)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "FrameOfReferenceUID"):
        assert out[keyword].value == src[keyword].value, keyword
    assert ("Laterality" in out) == ("Laterality" in src)


@pytest.mark.parametrize("reference", ["MR", "CT"])
def test_oblique_multi_slice_series_adds_no_dciodvfy_error(tmp_path, reference):
    """An oblique two-slice MR/CT pair (built from the embedded samples): every derived slice, MR or CT reference."""
    study, frame = generate_uid(), generate_uid()
    for modality, folder in (("MR", "MRI"), ("CT", "CT")):
        planes = [
            np.asarray(Image.open(p).convert("L"))[::4, ::4] for p in sorted((SAMPLES / folder).glob("*.png"))[:2]
        ]
        write_series(tmp_path / modality, np.stack(planes), modality, study, frame, description=f"{modality} series")
    other = "CT" if reference == "MR" else "MR"
    result = fuse_series(tmp_path / reference, tmp_path / other, tmp_path / "out", network=MeanFusion(), method="mean")
    inputs = {str(pydicom.dcmread(f).SOPInstanceUID): f for f in (tmp_path / reference).glob("*.dcm")}
    assert len(result["files"]) == 2
    for derived in result["files"]:
        source = inputs[str(pydicom.dcmread(derived).SourceImageSequence[0].ReferencedSOPInstanceUID)]
        assert not _errors(derived) - _errors(source), derived


def test_patient_orientation_letters():
    assert patient_orientation([1, 0, 0, 0, 1, 0]) == ["L", "P"]
    assert patient_orientation([0, 1, 0, 0, 0, -1]) == ["P", "F"]
    assert patient_orientation([0.8, -0.6, 0, 0, 0, -1]) == ["LA", "F"]
