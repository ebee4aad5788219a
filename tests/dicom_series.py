"""Synthetic single-frame DICOM series for the DICOM tests: any (Z, Y, X) volume written as an MR or CT series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

__all__ = ["GEOMETRY", "PATIENT", "write_series"]

# an oblique, anisotropic grid: rotation about two axes, row/column spacing 0.9/0.8 mm, slices 3.5 mm apart
_a, _b = np.deg2rad(12.0), np.deg2rad(-7.0)
_R = np.array([[np.cos(_a), -np.sin(_a), 0], [np.sin(_a), np.cos(_a), 0], [0, 0, 1]]) @ np.array(
    [[1, 0, 0], [0, np.cos(_b), -np.sin(_b)], [0, np.sin(_b), np.cos(_b)]]
)
GEOMETRY = dict(
    row=_R[:, 0], col=_R[:, 1], origin=np.array([-100.5, -120.25, 30.0]), pixel_spacing=(0.9, 0.8), step=3.5
)
PATIENT = dict(PatientName="Doe^Jane", PatientID="P-0042", PatientBirthDate="19700101", PatientSex="F")


def write_series(
    folder: Path,
    volume: np.ndarray,
    modality: str,
    study_uid: str,
    frame_uid: str,
    patient: dict | None = None,
    geometry: dict | None = None,
    description: str = "",
    series_number: int = 3,
) -> str:
    """Write (Z, Y, X) ``volume`` as a single-frame MR or CT series (files in reverse slice order); returns its UID."""
    g = {**GEOMETRY, **(geometry or {})}
    normal = np.cross(g["row"], g["col"])
    series_uid = generate_uid()
    folder.mkdir(parents=True)
    for k, plane in enumerate(volume):
        ds = Dataset()
        for key, value in (PATIENT if patient is None else patient).items():
            setattr(ds, key, value)
        ds.SOPClassUID = MRImageStorage if modality == "MR" else CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240102", "101010", "ACC1", "S1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = (
            modality,
            series_number,
            k + 1,
            description,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*g["row"], *g["col"])]
        ds.ImagePositionPatient = [round(float(v), 4) for v in g["origin"] + k * g["step"] * normal]
        ds.PixelSpacing = list(g["pixel_spacing"])
        ds.SliceThickness, ds.SpacingBetweenSlices = 3.0, g["step"]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = plane.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        if modality == "MR":
            ds.ScanningSequence, ds.SequenceVariant, ds.EchoTime, ds.RepetitionTime = "SE", "NONE", 20, 500
            stored = plane.astype(np.uint16) * 4
        else:  # CT: stored values with a -1024 intercept
            ds.RescaleIntercept, ds.RescaleSlope, ds.KVP = -1024, 1, 120
            stored = plane.astype(np.uint16) * 8
        ds.PixelData = stored.astype(np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
            ds.SOPClassUID,
            ds.SOPInstanceUID,
        )
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        pydicom.dcmwrite(folder / f"slice_{len(volume) - k}.dcm", ds, enforce_file_format=True)
    (folder / "README.txt").write_text("not DICOM; must be skipped")
    return series_uid
