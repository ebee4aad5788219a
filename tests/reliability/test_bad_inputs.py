"""One case per class of bad input, through the workflows that meet it (issue #8, item 1).

Each case builds a tiny input in ``tmp_path``, runs a workflow (inference, evaluate, train, or the
tumour-classification bundle) and checks three things: the outcome (refused with an error, the pair set aside
and reported, or -- for inputs the bundle handles by design -- fused correctly), the message (it names the
file and the problem), and the output folder (no file at all after a failure: no partial, temporary or
overwritten output).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from reliability_helpers import (
    BUNDLE_ROOT,
    TINY_KW,
    TINY_NET,
    chain,
    cohort_csv,
    files_under,
    good_pair,
    messages,
    nifti,
    png,
    run_classification,
    run_evaluate,
    run_inference,
    run_train,
    texture,
    truncated,
    write_datalist,
)

from scripts.cli import RunFailedError


class Pickled:
    """A non-tensor object: a weights file holding it must never be unpickled."""


@dataclass
class Case:
    """A bad input: ``build(tmp)`` writes it and returns the workflow overrides; ``outcome`` is ``"raises"``
    (the run stops with ``message``), ``"set_aside"`` (the pair is reported as failed with ``message``, the run
    goes on) or ``"ok"`` (handled by design; ``check(tmp, out)`` verifies the result)."""

    name: str
    workflow: str
    build: Callable[[Path], dict[str, Any]]
    outcome: str
    message: str = ""
    check: Callable[[Path, Path], None] | None = None


# --- builders -------------------------------------------------------------------------------------------------


def _csv(tmp: Path, rows: list[dict], name: str = "pairs.csv") -> dict[str, Any]:
    return {"datalist": str(write_datalist(tmp / "data" / name, rows))}


def _pair(tmp: Path, mri: Callable[[Path], Path], other: Callable[[Path], Path], **extra) -> dict[str, Any]:
    """A one-pair datalist of the files written by ``mri(path)`` / ``other(path)`` (path without extension)."""
    data = tmp / "data"
    m, o = mri(data / "MRI" / "p"), other(data / "OTHER" / "p")
    row = {"task": "X-MRI", "id": "p", "mri": str(m.relative_to(data)), "other": str(o.relative_to(data))}
    return _csv(tmp, [{**row, **extra}])


def _png(size=(16, 12), seed=1, arr=None):
    return lambda stem: png(stem.with_suffix(".png"), arr=arr, size=size, seed=seed)


def _nii(arr=None, affine=None, shape=(12, 10, 1), seed=1):
    return lambda stem: nifti(stem.with_name(stem.name + ".nii.gz"), arr=arr, affine=affine, shape=shape, seed=seed)


def _raw(suffix: str, content: bytes | Callable[[], bytes]):
    def write(stem: Path) -> Path:
        path = stem.with_name(stem.name + suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content() if callable(content) else content)
        return path

    return write


def _truncated_png(stem: Path) -> Path:
    full = png(stem.with_name("full.png"), size=(64, 48), seed=3)
    path = truncated(stem.with_suffix(".png"), full, 0.6)
    full.unlink()
    return path


def _truncated_nifti(stem: Path) -> Path:
    full = nifti(stem.with_name("full.nii.gz"), shape=(32, 30, 1), seed=3)
    path = truncated(stem.with_name(stem.name + ".nii.gz"), full, 0.5)
    full.unlink()
    return path


def _with(arr_fn: Callable[[np.ndarray], np.ndarray], shape=(12, 10, 1)) -> np.ndarray:
    return arr_fn(texture(shape, 4))


def _nan(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[3, 4, 0] = np.nan
    return a


def _inf(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[0, 0, 0] = np.inf
    return a


def _affine(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), flip_x: bool = False) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    if flip_x:
        a[0, 0] = -a[0, 0]
    a[:3, 3] = origin
    return a


def _weights(kind: str) -> Callable[[Path], dict[str, Any]]:
    """A good pair and a weights file of ``kind`` for the tiny ClinicalFMamba."""
    from scripts.networks import ClinicalFMamba

    def build(tmp: Path) -> dict[str, Any]:
        path = tmp / "weights" / f"{kind}.pt"
        path.parent.mkdir(parents=True)
        if kind == "other_config":
            torch.save(ClinicalFMamba(**{**TINY_KW, "features": [4, 8, 32]}).state_dict(), path)
        elif kind == "truncated":
            torch.save(ClinicalFMamba(**TINY_KW).state_dict(), path)
            path.write_bytes(path.read_bytes()[:2000])
        elif kind == "pickled":
            torch.save({"model": Pickled()}, path)
        return {
            **_csv(tmp, [good_pair(tmp / "data")]),
            "network_def": TINY_NET,
            "load_pretrain": True,
            "ckpt_path": str(path),
        }

    return build


def _folder_with_nothing(tmp: Path) -> dict[str, Any]:
    (tmp / "data" / "CT-MRI" / "MRI").mkdir(parents=True)
    return {"dataset_dir": str(tmp / "data")}


def _mixed_tasks(tmp: Path) -> dict[str, Any]:
    rows = [good_pair(tmp / "data", "a", "CT-MRI"), good_pair(tmp / "data", "b", "PET-MRI")]
    return {**_csv(tmp, rows), "expected_tasks": "CT-MRI"}


def _one_good_one_bad(tmp: Path) -> dict[str, Any]:
    bad = good_pair(tmp / "data", "bad")
    png(tmp / "data" / "CT" / "bad.png", size=(16, 14))
    return {**_csv(tmp, [good_pair(tmp / "data", "good"), bad]), "on_error": "raise"}


def _existing_output(tmp: Path) -> dict[str, Any]:
    out = tmp / "out" / "CT-MRI"
    out.mkdir(parents=True)
    (out / "p_fused.png").write_bytes(b"precious")
    return _csv(tmp, [good_pair(tmp / "data")])


def _output_dir_is_a_file(tmp: Path) -> dict[str, Any]:
    (tmp / "out").write_bytes(b"not a folder")
    return _csv(tmp, [good_pair(tmp / "data")])


# --- checks of the cases handled by design ---------------------------------------------------------------------


def _fused(out: Path) -> list[str]:
    return [f for f in files_under(out) if "_fused" in f]


def _check_fused(out: Path, expected: list[str]) -> None:
    assert _fused(out) == expected, files_under(out)


def _check_resampled(tmp: Path, out: Path) -> None:
    import nibabel as nib

    assert _fused(out) == ["X-MRI/p_fused.nii.gz"]
    ref, fused = nib.load(next((tmp / "data" / "MRI").iterdir())), nib.load(out / "X-MRI" / "p_fused.nii.gz")
    assert fused.shape == ref.shape and np.allclose(fused.affine, ref.affine)
    assert np.isfinite(fused.get_fdata()).all()


def _check_grey_output(size: tuple[int, int]) -> Callable[[Path, Path], None]:
    def check(tmp: Path, out: Path) -> None:
        assert _fused(out) == ["X-MRI/p_fused.png"], files_under(out)
        img = Image.open(out / "X-MRI" / "p_fused.png")
        assert img.mode == "L" and img.size == size[::-1]  # PIL size is (W, H)

    return check


def _check_constant(tmp: Path, out: Path) -> None:
    _check_grey_output((16, 12))(tmp, out)
    fused = np.asarray(Image.open(out / "X-MRI" / "p_fused.png"), dtype=float)
    other = np.asarray(Image.open(tmp / "data" / "OTHER" / "p.png"), dtype=float)
    # mean fusion of zeros (the constant image, normalised) and the normalised other image
    expected = np.rint((other - other.min()) / (other.max() - other.min()) / 2 * 255)
    assert np.abs(fused - expected).max() <= 1


def _check_not_overwritten(tmp: Path, out: Path) -> None:
    assert (out / "CT-MRI" / "p_fused.png").read_bytes() == b"precious"
    assert files_under(out) == ["CT-MRI/p_fused.png"]


def _check_nothing_written(tmp: Path, out: Path) -> None:
    assert out.read_bytes() == b"not a folder"


def _check_reports_kept(tmp: Path, out: Path) -> None:
    assert files_under(out) == ["metrics_cddfuse.csv"] and (out / "metrics_cddfuse.csv").read_text() == "precious"


def _check_metrics_rows(out: Path, n: int) -> None:
    import csv

    with open(out / "metrics_cddfuse.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == n


def _check_constant_metrics(tmp: Path, out: Path) -> None:
    import csv

    with open(out / "metrics_cddfuse.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and all(np.isfinite(float(rows[0][m])) for m in ("SD", "Qabf"))


# --- the table -------------------------------------------------------------------------------------------------

INFERENCE = [
    # geometry of the pair
    Case(
        "shape_differs",
        "inference",
        lambda t: _pair(t, _png((16, 12)), _png((16, 14))),
        "set_aside",
        r"differ in size: .*MRI/p\.png is \(12, 16\), .*OTHER/p\.png is \(14, 16\)",
    ),
    Case(
        "spacing_differs",
        "inference",
        lambda t: _pair(t, _nii(), _nii(affine=_affine((2.0, 2.0, 1.0)))),
        "set_aside",
        r"not on the same voxel grid \(voxel spacing \(1, 1, 1\) vs \(2, 2, 1\).*--resample true",
    ),
    Case(
        "orientation_differs",
        "inference",
        lambda t: _pair(t, _nii(), _nii(affine=_affine(flip_x=True))),
        "set_aside",
        r"not on the same voxel grid \(orientation.*OTHER/p\.nii\.gz",
    ),
    Case(
        "origin_differs",
        "inference",
        lambda t: _pair(t, _nii(), _nii(affine=_affine(origin=(5.0, 0, 0)))),
        "set_aside",
        r"not on the same voxel grid \(origin \(0, 0, 0\) vs \(5, 0, 0\) mm\)",
    ),
    Case(
        "origin_within_grid_tolerance",
        "inference",
        lambda t: {**_pair(t, _nii(), _nii(affine=_affine(origin=(0.05, 0, 0)))), "grid_tolerance": 0.1},
        "ok",
        check=lambda t, o: _check_fused(o, ["X-MRI/p_fused.nii.gz"]),
    ),
    Case(
        "grid_differs_resampled_on_request",
        "inference",
        lambda t: {**_pair(t, _nii(), _nii(affine=_affine((2.0, 2.0, 1.0)), shape=(6, 5, 1))), "resample": True},
        "ok",
        check=_check_resampled,
    ),
    Case(
        "png_sizes_cannot_be_resampled",
        "inference",
        lambda t: {**_pair(t, _png((16, 12)), _png((8, 6))), "resample": True},
        "set_aside",
        "resampling needs NIfTI images with a world geometry",
    ),
    # dimensionality for the network
    Case(
        "volume_into_2d_network",
        "inference",
        lambda t: _pair(t, _nii(shape=(8, 8, 6)), _nii(shape=(8, 8, 6))),
        "set_aside",
        r"MRI/p\.nii\.gz: a 2D workflow needs 2D images .* \(8, 8, 6\); fuse volumes with the 3D configuration",
    ),
    Case(
        "image_into_3d_network",
        "inference",
        lambda t: {**_pair(t, _png(), _png()), "spatial_dims": 3},
        "set_aside",
        r"MRI/p\.png: a 3D workflow needs 3D images .* \(12, 16\); fuse 2D images with the 2D configuration",
    ),
    # channels
    Case(
        "rgb_reference_becomes_grey",
        "inference",
        lambda t: _pair(t, _png(arr=np.stack([texture((16, 12), s) for s in (1, 2, 3)], -1)), _png()),
        "ok",
        check=_check_grey_output((16, 12)),
    ),
    Case(
        "five_channels",
        "inference",
        lambda t: _pair(t, _nii(), _nii(arr=np.stack([texture((12, 10, 1), s) for s in range(5)], -1))),
        "set_aside",
        r"OTHER/p\.nii\.gz: expected 1 \(grey\), 3 \(RGB\) or 4 \(RGBA\) channels, got 5",
    ),
    Case(
        "two_channel_file_as_one_image",
        "inference",
        lambda t: _pair(t, _nii(), _nii(arr=np.stack([texture((12, 10, 1), s) for s in range(2)], -1))),
        "set_aside",
        r"OTHER/p\.nii\.gz: expected 1 .* got 2; .*goes under 'image'",
    ),
    # voxel values
    Case(
        "nan_voxels",
        "inference",
        lambda t: _pair(t, _nii(arr=_with(_nan)), _nii()),
        "set_aside",
        r"MRI/p\.nii\.gz: 1 of 120 voxels are NaN or infinite",
    ),
    Case(
        "inf_voxels",
        "inference",
        lambda t: _pair(t, _nii(), _nii(arr=_with(_inf))),
        "set_aside",
        r"OTHER/p\.nii\.gz: 1 of 120 voxels are NaN or infinite",
    ),
    Case(
        "constant_image",
        "inference",
        lambda t: _pair(t, _png(arr=np.full((16, 12), 77)), _png()),
        "ok",
        check=_check_constant,
    ),
    # sizes the network cannot take directly: padded, then cropped back
    Case(
        "odd_size_padded_and_cropped_back",
        "inference",
        lambda t: {
            **_pair(t, _png((13, 11)), _png((13, 11), seed=2)),
            "network_def": TINY_NET,
            "allow_untrained": True,
        },
        "ok",
        check=_check_grey_output((13, 11)),
    ),
    # files
    Case(
        "missing_file",
        "inference",
        lambda t: _csv(t, [{"mri": "MRI/absent.png", "other": "CT/absent.png"}]),
        "set_aside",
        r"entry 0: 'mri' file not found: .*absent\.png",
    ),
    Case(
        "missing_file_on_error_raise",
        "inference",
        lambda t: {**_csv(t, [{"mri": "MRI/absent.png", "other": "CT/absent.png"}]), "on_error": "raise"},
        "raises",
        r"entry 0: 'mri' file not found: .*absent\.png",
    ),
    Case(
        "empty_file",
        "inference",
        lambda t: _pair(t, _png(), _raw(".png", b"")),
        "set_aside",
        r"image file is empty \(0 bytes\): .*OTHER/p\.png",
    ),
    Case(
        "truncated_png",
        "inference",
        lambda t: _pair(t, _png((64, 48)), _truncated_png),
        "set_aside",
        r"cannot read image file .*OTHER/p\.png",
    ),
    Case(
        "truncated_nifti",
        "inference",
        lambda t: _pair(t, _truncated_nifti, _nii(shape=(32, 30, 1))),
        "set_aside",
        r"cannot read image file .*MRI/p\.nii\.gz",
    ),
    Case(
        "corrupt_png",
        "inference",
        lambda t: _pair(t, _png(), _raw(".png", np.random.default_rng(0).bytes(300))),
        "set_aside",
        r"cannot read image file .*OTHER/p\.png",
    ),
    Case(
        "numpy_file_refused",
        "inference",
        lambda t: _pair(
            t, _png(), _raw(".npy", b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (1,), }")
        ),
        "set_aside",
        r"unsupported image format '\.npy' of .*OTHER/p\.npy",
    ),
    Case(
        "dicom_file_refused",
        "inference",
        lambda t: _pair(t, _raw(".dcm", b"\x00" * 128 + b"DICM"), _png()),
        "set_aside",
        r"unsupported image format '\.dcm'.*python -m scripts\.dicom",
    ),
    # datalists
    Case(
        "empty_datalist",
        "inference",
        lambda t: _csv(t, []),
        "raises",
        r"empty datalist: .*pairs\.csv lists no image pairs",
    ),
    Case("empty_dataset_folder", "inference", _folder_with_nothing, "raises", r"no image pairs found under .*data"),
    Case(
        "datalist_without_columns",
        "inference",
        lambda t: _csv(t, [{"a": "x.png", "b": "y.png"}]),
        "raises",
        r"pairs\.csv: needs columns 'mri' and 'other'",
    ),
    Case(
        "datalist_mixes_tasks",
        "inference",
        _mixed_tasks,
        "raises",
        r"mixes tasks: it holds pairs of \{'PET-MRI': 1\} .*expects only \['CT-MRI'\]",
    ),
    # weights
    Case(
        "weights_of_another_configuration",
        "inference",
        _weights("other_config"),
        "raises",
        r"other_config\.pt do not match the configured ClinicalFMamba: .*other shapes",
    ),
    Case(
        "weights_truncated",
        "inference",
        _weights("truncated"),
        "raises",
        r"truncated\.pt is not a readable PyTorch weights file",
    ),
    Case(
        "weights_with_pickled_objects",
        "inference",
        _weights("pickled"),
        "raises",
        r"pickled\.pt is not a readable PyTorch weights file .*never unpickled",
    ),
    Case(
        "weights_missing",
        "inference",
        lambda t: {
            **_csv(t, [good_pair(t / "data")]),
            "network_def": TINY_NET,
            "load_pretrain": True,
            "ckpt_path": str(t / "modle.pt"),
        },
        "raises",
        r"weights file not found: .*modle\.pt; the network would fuse with random weights.*--allow_untrained true",
    ),
    Case(
        "weights_not_loaded_for_a_learnable_network",
        "inference",
        lambda t: {**_csv(t, [good_pair(t / "data")]), "network_def": TINY_NET},
        "raises",
        r"load_pretrain is false, so ClinicalFMamba would fuse with random weights",
    ),
    # outputs
    Case(
        "on_error_raise_stops_before_fusing",
        "inference",
        _one_good_one_bad,
        "raises",
        r"differ in size: .*MRI/bad\.png",
    ),
    Case("existing_output_is_kept", "inference", _existing_output, "ok", check=_check_not_overwritten),
    Case(
        "unwritable_output_is_reported",
        "inference",
        _output_dir_is_a_file,
        "raises",
        r"cannot create the output folder .*out: FileExistsError",
        check=_check_nothing_written,
    ),
]


def _eval_missing_ckpt(tmp: Path) -> dict[str, Any]:
    return {
        **_csv(tmp, [good_pair(tmp / "data")]),
        "method": "clinicalfmamba",
        "clinicalfmamba_def": TINY_NET,
        "ckpt_path": str(tmp / "absent.pt"),
    }


def _eval_other_weights(tmp: Path) -> dict[str, Any]:
    override = {k: v for k, v in _weights("other_config")(tmp).items() if k not in ("network_def", "load_pretrain")}
    return {**override, "method": "clinicalfmamba", "clinicalfmamba_def": TINY_NET}


def _eval_existing_reports(tmp: Path) -> dict[str, Any]:
    (tmp / "out").mkdir()
    (tmp / "out" / "metrics_cddfuse.csv").write_text("precious")
    return _csv(tmp, [good_pair(tmp / "data")])


EVALUATE = [
    Case(
        "eval_missing_checkpoint",
        "evaluate",
        _eval_missing_ckpt,
        "raises",
        r"needs trained weights, but the checkpoint .*absent\.pt was not found.*--method",
    ),
    Case(
        "eval_weights_of_another_configuration",
        "evaluate",
        _eval_other_weights,
        "raises",
        r"do not match the configured ClinicalFMamba",
    ),
    Case(
        "eval_shape_differs",
        "evaluate",
        lambda t: _pair(t, _png((16, 12)), _png((16, 14))),
        "raises",
        r"no valid pairs to evaluate \(1 set aside: the two images of pair 'p' differ in size",
    ),
    Case(
        "eval_nan_voxels",
        "evaluate",
        lambda t: _pair(t, _nii(), _nii(arr=_with(_nan))),
        "raises",
        r"no valid pairs to evaluate \(1 set aside: .*OTHER/p\.nii\.gz: 1 of 120 voxels are NaN",
    ),
    Case(
        "eval_missing_file_set_aside",
        "evaluate",
        lambda t: _csv(
            t, [good_pair(t / "data"), {"task": "CT-MRI", "id": "gone", "mri": "MRI/gone.png", "other": "CT/p.png"}]
        ),
        "set_aside",
        r"entry 1: 'mri' file not found: .*gone\.png",
        check=lambda t, o: _check_metrics_rows(o, 1),
    ),
    Case(
        "eval_no_pairs_of_the_tasks",
        "evaluate",
        lambda t: {**_csv(t, [good_pair(t / "data")]), "tasks": ["PET-MRI"]},
        "raises",
        r"no pairs of tasks \['PET-MRI'\]",
    ),
    Case(
        "eval_reports_are_not_overwritten",
        "evaluate",
        _eval_existing_reports,
        "raises",
        r"evaluation reports exist and are not replaced: .*metrics_cddfuse\.csv.*--overwrite true",
        check=_check_reports_kept,
    ),
    Case(
        "eval_constant_image_scores_finite",
        "evaluate",
        lambda t: _pair(t, _png(arr=np.full((48, 48), 9)), _png((48, 48))),
        "ok",
        check=_check_constant_metrics,
    ),
]


def _train_rows(tmp: Path, bad: Callable[[Path], dict] | None = None) -> dict[str, Any]:
    data = tmp / "data"
    rows = [good_pair(data, f"t{i}", split="train", size=(16, 16)) for i in range(2)]
    rows.append(good_pair(data, "v0", split="val", size=(16, 16)))
    if bad is not None:
        rows.append({**bad(data), "split": "train"})
    return _csv(tmp, rows)


def _bad_row(mri: Callable[[Path], Path], other: Callable[[Path], Path]) -> Callable[[Path], dict]:
    def row(data: Path) -> dict:
        m, o = mri(data / "MRI" / "bad"), other(data / "OTHER" / "bad")
        return {"task": "CT-MRI", "id": "bad", "mri": str(m.relative_to(data)), "other": str(o.relative_to(data))}

    return row


def _train_resume_other_config(tmp: Path) -> dict[str, Any]:
    from scripts.networks import ClinicalFMamba

    ckpt = tmp / "elsewhere" / "checkpoint_epoch=3.pt"
    ckpt.parent.mkdir()
    torch.save(
        {"model": ClinicalFMamba(**{**TINY_KW, "features": [4, 8, 32]}).state_dict(), "trainer": {"epoch": 3}}, ckpt
    )
    return {**_train_rows(tmp), "resume_from": str(ckpt)}


TRAIN = [
    Case(
        "train_resume_from_another_configuration",
        "train",
        _train_resume_other_config,
        "raises",
        r"checkpoint_epoch=3\.pt do not match the configured ClinicalFMamba: .*other shapes",
    ),
    Case(
        "train_no_training_pairs",
        "train",
        lambda t: _csv(t, [good_pair(t / "data", split="val")]),
        "raises",
        r"empty datalist: .*pairs\.csv lists no image pairs",
    ),
    Case(
        "train_no_pairs_of_the_tasks",
        "train",
        lambda t: {**_train_rows(t), "tasks": ["PET-MRI"]},
        "raises",
        r"empty datalist: no pairs of tasks \['PET-MRI'\] in split 'train'",
    ),
    Case(
        "train_shape_differs",
        "train",
        lambda t: _train_rows(t, _bad_row(_png((16, 16)), _png((16, 8)))),
        "raises",
        r"differ in size: .*MRI/bad\.png is \(16, 16\)",
    ),
    Case(
        "train_nan_voxels",
        "train",
        lambda t: _train_rows(
            t, _bad_row(_nii(arr=_with(_nan, (16, 16, 1)), shape=(16, 16, 1)), _nii(shape=(16, 16, 1)))
        ),
        "raises",
        r"MRI/bad\.nii\.gz: 1 of 256 voxels are NaN or infinite",
    ),
    Case(
        "train_corrupt_file",
        "train",
        lambda t: _train_rows(t, _bad_row(_png((64, 48)), _truncated_png)),
        "raises",
        r"cannot read image file .*OTHER/bad\.png",
    ),
    Case(
        "train_volume_into_2d_network",
        "train",
        lambda t: _train_rows(t, _bad_row(_nii(shape=(16, 16, 4)), _nii(shape=(16, 16, 4)))),
        "raises",
        r"a 2D workflow needs 2D images",
    ),
]


def _cohort(hook=None) -> Callable[[Path], dict[str, Any]]:
    return lambda tmp: {"dataset_dir": str(cohort_csv(tmp / "cohort", rows_hook=hook))}


def _resize_b(folder: Path, rows: list[dict]) -> list[dict]:
    png(folder / rows[0]["seq_b"], size=(16, 8))
    return rows


def _drop_file(folder: Path, rows: list[dict]) -> list[dict]:
    (folder / rows[1]["seq_a"]).unlink()
    return rows


def _corrupt_file(folder: Path, rows: list[dict]) -> list[dict]:
    (folder / rows[2]["seq_b"]).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    return rows


def _nan_nifti(folder: Path, rows: list[dict]) -> list[dict]:
    arr = texture((16, 16), 0)
    arr[2, 2] = np.nan
    nifti(folder / "nan.nii.gz", arr=arr)
    rows[0]["seq_a"] = "nan.nii.gz"
    return rows


def _bad_channel(folder: Path, rows: list[dict]) -> list[dict]:
    rgb = np.stack([texture((16, 16), s) for s in range(3)], -1)
    png(folder / "rgb.png", arr=rgb)
    for r in rows:
        r["seq_a_channel"] = ""
    rows[0]["seq_a"], rows[0]["seq_a_channel"] = "rgb.png", 5
    return rows


def _no_rows(folder: Path, rows: list[dict]) -> list[dict]:
    return []


def _cls_fusion_weights(tmp: Path) -> dict[str, Any]:
    from scripts.networks import ClinicalFMamba

    ckpt = tmp / "fusion.pt"
    torch.save(
        ClinicalFMamba(
            features=[4, 16], dilations=[1, 3], depth=1, decoder_depth=1, d_state=4, swap_d_state=4
        ).state_dict(),
        ckpt,
    )
    return {**_cohort()(tmp), "fusion_ckpt": str(ckpt), "require_fusion_weights": True}


def _cls_existing_results(tmp: Path) -> dict[str, Any]:
    (tmp / "out").mkdir()
    (tmp / "out" / "results.csv").write_text("precious")
    return _cohort()(tmp)


def _check_results_kept(tmp: Path, out: Path) -> None:
    assert (out / "results.csv").read_text() == "precious" and files_under(out) == ["results.csv"]


def _cls_no_masks_for_radiomics(tmp: Path) -> dict[str, Any]:
    return {**_cohort()(tmp), "classifiers": ["@radiomics"]}


CLASSIFICATION = [
    Case(
        "cls_cohort_table_missing",
        "study",
        lambda t: {"dataset_dir": str(t / "absent.csv")},
        "raises",
        r"cohort table not found: .*absent\.csv",
    ),
    Case(
        "cls_cohort_table_empty", "study", _cohort(_no_rows), "raises", r"cohort\.csv: the cohort table lists no slices"
    ),
    Case(
        "cls_cohort_table_without_columns",
        "study",
        lambda t: {"dataset_dir": str(write_datalist(t / "c.csv", [{"patient": "A", "x": 1}]))},
        "raises",
        r"c\.csv: missing column\(s\) \['label', 'seq_a', 'seq_b'\]",
    ),
    Case(
        "cls_sequences_differ_in_size",
        "study",
        _cohort(_resize_b),
        "raises",
        r"slice P0/0: the two sequences differ in size .*P0_0_b\.png is \(16, 8\)",
    ),
    Case("cls_missing_image", "study", _cohort(_drop_file), "raises", r"image file not found: .*P0_1_a\.png"),
    Case("cls_corrupt_image", "study", _cohort(_corrupt_file), "raises", r"cannot read image file .*P1_0_b\.png"),
    Case(
        "cls_nan_pixels", "study", _cohort(_nan_nifti), "raises", r"nan\.nii\.gz: 1 of 256 pixels are NaN or infinite"
    ),
    Case(
        "cls_channel_out_of_range",
        "study",
        _cohort(_bad_channel),
        "raises",
        r"rgb\.png has 3 channels; channel 5 does not exist",
    ),
    Case(
        "cls_missing_fusion_weights",
        "study",
        lambda t: {**_cohort()(t), "allow_untrained": False},
        "raises",
        r"trained fusion weights not found at .*no_fusion_weights\.pt.*--allow_untrained true",
    ),
    Case(
        "cls_fusion_weights_of_another_configuration",
        "study",
        _cls_fusion_weights,
        "raises",
        r"fusion weights .*fusion\.pt do not match the network of .*inference\.json",
    ),
    Case(
        "cls_study_keeps_existing_results",
        "study",
        _cls_existing_results,
        "raises",
        r"already holds study results \(results\.csv\); pass --overwrite true",
        check=_check_results_kept,
    ),
    Case(
        "cls_radiomics_without_masks",
        "study",
        _cls_no_masks_for_radiomics,
        "raises",
        r"slice P0/1 has no tumour mask; the radiomics classifiers need a 'mask' column",
    ),
]

CASES = INFERENCE + EVALUATE + TRAIN + CLASSIFICATION


def _run(case: Case, tmp: Path, out: Path):
    override = case.build(tmp)
    if case.workflow == "inference":
        return run_inference(out, **override)
    if case.workflow == "evaluate":
        return run_evaluate(out, **override)
    if case.workflow == "train":
        return run_train(out, **override)
    if case.workflow == "study":
        return run_classification(["study.json"], out, **override)
    raise AssertionError(case.workflow)


def test_the_table_covers_every_workflow_and_enough_cases() -> None:
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)
    assert {c.workflow for c in CASES} >= {"inference", "evaluate", "train", "study"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    wf, err = _run(case, tmp_path, out)
    if case.outcome == "raises":
        assert err is not None, f"{case.name}: the run should have stopped"
        assert re.search(case.message, messages(err), re.S), messages(err)[-3000:]
    elif case.outcome == "set_aside":  # the run goes on, then ends with an error naming the failed pair
        assert any(isinstance(e, RunFailedError) for e in chain(err)), messages(err)[-3000:]
        assert re.search(r"RunFailedError: 1 of \d pairs failed: ", messages(err)), messages(err)[-3000:]
        failed = wf.parser.get_parsed_content("summary").failed
        assert len(failed) == 1 and re.search(case.message, failed[0][1], re.S), failed
    else:
        assert err is None, messages(err)[-3000:]
    if case.check is not None:
        case.check(tmp_path, out)
    elif case.outcome != "ok":
        assert files_under(out) == [], f"{case.name}: a failed run left files behind"


def test_resampling_moves_the_other_image_onto_the_reference_grid(tmp_path: Path) -> None:
    """An origin shift of two voxels, undone by ``resample=True`` (exactly: the shift is a whole number of voxels)."""
    from scripts.transforms import validate_pair

    ref = texture((8, 6, 1), 5)
    shifted = np.zeros_like(ref)
    shifted[:-2] = ref[2:]  # other voxel i holds the reference voxel i + 2 ...
    mri = nifti(tmp_path / "ref.nii.gz", arr=ref)
    other = nifti(tmp_path / "other.nii.gz", arr=shifted, affine=_affine(origin=(2.0, 0.0, 0.0)))  # ... and lies there
    item = {"mri": str(mri), "other": str(other)}
    with pytest.raises(ValueError, match=r"origin \(0, 0, 0\) vs \(2, 0, 0\) mm.*--resample true"):
        validate_pair(item, spatial_dims=2)
    d = validate_pair(item, spatial_dims=2, resample=True)
    moved = d["other"][0].numpy()
    assert d["other"].shape == d["mri"].shape == (1, 8, 6)
    assert np.allclose(moved[2:], ref[2:, :, 0], atol=1e-4) and np.allclose(moved[:2], 0.0)
    assert d["other"].meta["filename_or_obj"] == str(other)


# the row of docs/troubleshooting.md that explains each failure (message, cause, fix)
DOCUMENTED = {
    "shape_differs": "the two images of pair 'ID' differ in size",
    "spacing_differs": "are not on the same voxel grid (voxel spacing ... / orientation ... / origin ...)",
    "orientation_differs": "are not on the same voxel grid (voxel spacing ... / orientation ... / origin ...)",
    "origin_differs": "are not on the same voxel grid (voxel spacing ... / orientation ... / origin ...)",
    "png_sizes_cannot_be_resampled": "(resampling needs NIfTI images with a world geometry)",
    "volume_into_2d_network": "PATH: a 2D workflow needs 2D images (or single slices)",
    "image_into_3d_network": "PATH: a 3D workflow needs 3D images (or single slices)",
    "five_channels": "PATH: expected 1 (grey), 3 (RGB) or 4 (RGBA) channels, got N",
    "two_channel_file_as_one_image": "PATH: expected 1 (grey), 3 (RGB) or 4 (RGBA) channels, got N",
    "nan_voxels": "PATH: N of M voxels are NaN or infinite",
    "inf_voxels": "PATH: N of M voxels are NaN or infinite",
    "missing_file": "'other' file not found: PATH",
    "missing_file_on_error_raise": "'other' file not found: PATH",
    "empty_file": "image file is empty (0 bytes): PATH",
    "truncated_png": (
        "cannot read image file PATH: TYPE: ... (truncated, corrupt, or not the format its extension says)"
    ),
    "truncated_nifti": (
        "cannot read image file PATH: TYPE: ... (truncated, corrupt, or not the format its extension says)"
    ),
    "corrupt_png": "cannot read image file PATH: TYPE: ... (truncated, corrupt, or not the format its extension says)",
    "numpy_file_refused": "unsupported image format '.EXT' of PATH",
    "dicom_file_refused": "unsupported image format '.EXT' of PATH",
    "empty_datalist": "empty datalist: SOURCE lists no image pairs (after filtering)",
    "empty_dataset_folder": "no image pairs found under DIR",
    "datalist_without_columns": "needs columns 'mri' and 'other' (or 'image')",
    "datalist_mixes_tasks": "SOURCE mixes tasks: it holds pairs of {...}, but this workflow expects only [...]",
    "weights_of_another_configuration": "weights in PATH do not match the configured ClinicalFMamba",
    "weights_missing": (
        "weights file not found: PATH (from CWD: ABSOLUTE PATH); the network would fuse with random weights"
    ),
    "weights_not_loaded_for_a_learnable_network": (
        "load_pretrain is false, so ClinicalFMamba would fuse with random weights"
    ),
    "eval_missing_file_set_aside": "datalist ..., entry N: 'other' file not found: PATH",
    "cls_missing_fusion_weights": "trained fusion weights not found at PATH",
    "weights_truncated": "PATH is not a readable PyTorch weights file",
    "weights_with_pickled_objects": "PATH is not a readable PyTorch weights file",
    "on_error_raise_stops_before_fusing": "`--on_error skip\\|raise`",
    "unwritable_output_is_reported": "cannot create the output folder DIR",
    "eval_missing_checkpoint": "method 'clinicalfmamba' needs trained weights, but the checkpoint PATH was not found",
    "eval_weights_of_another_configuration": "weights in PATH do not match the configured ClinicalFMamba",
    "eval_shape_differs": "no valid pairs to evaluate (N set aside: REASON; ...)",
    "eval_nan_voxels": "no valid pairs to evaluate (N set aside: REASON; ...)",
    "eval_no_pairs_of_the_tasks": "no pairs of tasks [...] in SOURCE",
    "eval_reports_are_not_overwritten": "evaluation reports exist and are not replaced",
    "train_resume_from_another_configuration": "weights in PATH do not match the configured ClinicalFMamba",
    "train_no_training_pairs": "empty datalist: SOURCE lists no image pairs (after filtering)",
    "train_no_pairs_of_the_tasks": "empty datalist: no pairs of tasks [...] in split 'train'",
    "train_shape_differs": "the two images of pair 'ID' differ in size",
    "train_nan_voxels": "PATH: N of M voxels are NaN or infinite",
    "train_corrupt_file": "cannot read image file PATH",
    "train_volume_into_2d_network": "PATH: a 2D workflow needs 2D images (or single slices)",
    "cls_cohort_table_missing": "cohort table not found: PATH",
    "cls_cohort_table_empty": "PATH: the cohort table lists no slices",
    "cls_cohort_table_without_columns": "PATH: missing column(s) [...]",
    "cls_sequences_differ_in_size": "slice P/S: the two sequences differ in size",
    "cls_missing_image": "image file not found",
    "cls_corrupt_image": "cannot read image file PATH",
    "cls_nan_pixels": "PATH: N of M pixels are NaN or infinite",
    "cls_channel_out_of_range": "PATH has N channels; channel K does not exist",
    "cls_fusion_weights_of_another_configuration": "fusion weights PATH do not match the network of CONFIG",
    "cls_study_keeps_existing_results": "DIR already holds study results (...); pass --overwrite true",
    "cls_radiomics_without_masks": "slice P/S has no tumour mask; the radiomics classifiers need a 'mask' column",
    # handled by design: documented as such
    "grid_differs_resampled_on_request": "`--resample true\\|false`",
    "origin_within_grid_tolerance": "`--grid_tolerance T`",
    "rgb_reference_becomes_grey": "(none: RGB where grey is expected)",
    "constant_image": "warning `PATH is constant (every voxel V): it normalises to zeros and adds nothing`",
    "odd_size_padded_and_cropped_back": "(none: size not divisible by 8)",
    "existing_output_is_kept": "N of M pairs already fused in DIR (outputs exist): skipped without computing them",
    "eval_constant_image_scores_finite": "metrics stay finite",
}


def test_every_case_is_explained_in_the_troubleshooting_table() -> None:
    text = (BUNDLE_ROOT / "docs" / "troubleshooting.md").read_text()
    assert set(DOCUMENTED) == {c.name for c in CASES}
    missing = {name: phrase for name, phrase in DOCUMENTED.items() if phrase not in text}
    assert not missing, missing
