"""Fuzzing the loaders with random, truncated and bit-flipped bytes (hypothesis profile ``reliability``).

Targets: the pair loader of the workflows (:class:`scripts.transforms.LoadPaird`: PNG through MONAI's
``PILReader``, NIfTI through its ``NibabelReader``), the header check of :func:`scripts.pair_check.check_pairs`, the
DICOM series reader of :mod:`scripts.dicom` (pydicom), the classification bundle's :func:`read_image` and the
weights reader. Contract: a loader either returns a finite image or raises ``ValueError`` /
``FileNotFoundError`` naming the file (or the DICOM folder) -- never another exception, a hang or a huge
allocation. The number of cases is bounded (``examples``); ``RELIABILITY_EXAMPLES=20`` fuzzes longer.
"""

from __future__ import annotations

import gzip
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from reliability_helpers import RELIABILITY, examples, nifti_bytes, png_bytes, texture
from tumor_classification_scripts.cohort import read_image

from scripts.dicom import read_series
from scripts.pair_check import check_pairs
from scripts.transforms import LoadPaird
from scripts.weights import read_state_dict

SEEDS = st.integers(0, 2**32 - 1)
MUTATIONS = st.tuples(st.sampled_from(["random", "truncate", "flip", "flip_inner"]), SEEDS, st.floats(0.0, 1.0))


def _dicom_bytes() -> bytes:
    """A small, valid single-frame MR slice (8 x 8, 16-bit)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "FUZZ", "MR"
    ds.ImageOrientationPatient, ds.ImagePositionPatient, ds.PixelSpacing = [1, 0, 0, 0, 1, 0], [0, 0, 0], [1, 1]
    ds.SliceThickness = 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", 8, 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = (np.arange(64, dtype=np.uint16) * 7).tobytes()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "slice.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path.read_bytes()


VALID: dict[str, Callable[[], bytes]] = {
    ".png": lambda: png_bytes(texture((16, 12), 1)),
    ".nii": lambda: nifti_bytes(texture((12, 10, 3), 2)),
    ".nii.gz": lambda: nifti_bytes(texture((12, 10, 3), 2), gz=True),
    ".dcm": _dicom_bytes,
}


def mutate(data: bytes, kind: str, seed: int, fraction: float, gz: bool = False) -> bytes:
    """Random bytes, a truncation at ``fraction``, or 1-8 flipped bytes (inside the gzip stream for ``flip_inner``)."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.bytes(int(fraction * 1500))
    if kind == "truncate":
        return data[: int(fraction * len(data))]
    inner = kind == "flip_inner" and gz
    buf = bytearray(gzip.decompress(data) if inner else data)
    # the first 400 bytes hold the headers: flip there as often as in the rest of the file
    for _ in range(int(rng.integers(1, 9))):
        pos = int(rng.integers(0, min(len(buf), 400))) if rng.random() < 0.5 else int(rng.integers(0, len(buf)))
        buf[pos] = int(rng.integers(0, 256))
    return gzip.compress(bytes(buf), mtime=0) if inner else bytes(buf)


def _expect_clean(call: Callable[[], object], name: str) -> object | None:
    """``call()``'s result, or ``None`` after an error that names ``name``; any other exception fails the test."""
    try:
        return call()
    except (ValueError, FileNotFoundError) as e:
        assert name in str(e), f"the error does not name {name}: {type(e).__name__}: {e}"
        return None


@pytest.mark.parametrize("ext", [".png", ".nii", ".nii.gz"])
def test_pair_loader_and_header_check_survive_fuzzed_files(ext: str) -> None:
    valid = VALID[ext]()

    @settings(RELIABILITY, max_examples=examples(25))
    @given(mutation=MUTATIONS)
    def check(mutation) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"fuzzed{ext}"
            path.write_bytes(mutate(valid, *mutation, gz=ext.endswith(".gz")))
            good = Path(folder) / f"good{ext}"
            good.write_bytes(valid)
            img = _expect_clean(lambda: LoadPaird().load(path), path.name)
            if img is not None:
                assert img.ndim >= 3 and torch.isfinite(img).all()
            result = check_pairs([{"mri": str(good), "other": str(path)}])  # never raises with on_error="skip"
            assert len(result.valid) + len(result.failed) == 1
            if result.failed:
                assert path.name in result.failed[0][1]
            elif img is None:
                pytest.fail(f"check_pairs accepted a file the loader refuses: {mutation}")

    check()


def test_dicom_reader_survives_fuzzed_files() -> None:
    valid = VALID[".dcm"]()

    @settings(RELIABILITY, max_examples=examples(25))
    @given(mutation=MUTATIONS)
    def check(mutation) -> None:
        with tempfile.TemporaryDirectory() as folder:
            series = Path(folder) / "series"
            series.mkdir()
            (series / "slice.dcm").write_bytes(mutate(valid, *mutation))
            volume = _expect_clean(lambda: read_series(series), "series")
            if volume is not None:
                assert np.isfinite(volume.volume).all() and volume.volume.ndim == 3

    check()


@pytest.mark.parametrize("ext", [".png", ".nii.gz"])
def test_classification_reader_survives_fuzzed_files(ext: str) -> None:
    valid = VALID[ext]()

    @settings(RELIABILITY, max_examples=examples(15))
    @given(mutation=MUTATIONS)
    def check(mutation) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"fuzzed{ext}"
            path.write_bytes(mutate(valid, *mutation, gz=ext.endswith(".gz")))
            _expect_clean(lambda: read_image(str(path)), path.name)

    check()


def test_weights_reader_survives_fuzzed_files() -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "w.pt"
        torch.save({"conv.weight": torch.ones(2, 2), "conv.bias": torch.zeros(2)}, path)
        valid = path.read_bytes()

    @settings(RELIABILITY, max_examples=examples(15))
    @given(mutation=st.tuples(st.sampled_from(["random", "truncate", "flip"]), SEEDS, st.floats(0.0, 1.0)))
    def check(mutation) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "fuzzed.pt"
            path.write_bytes(mutate(valid, *mutation))
            state = _expect_clean(lambda: read_state_dict(path), path.name)
            if state is not None:
                assert all(isinstance(v, torch.Tensor) for v in state.values())

    check()
