"""Pair transforms: loading, checks, colour, normalisation, padding and the writer."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor
from monai.transforms import Compose, ConcatItemsd, DivisiblePadd, Invertd, ScaleIntensityd
from PIL import Image

from scripts.transforms import (
    AttachChromad,
    CheckSameShaped,
    EnsureSpatialDimsd,
    FusionSummary,
    LoadPaird,
    SaveFusedd,
    SplitLumaChromad,
    rgb_to_ycbcr,
    ycbcr_to_rgb,
)

SAMPLES = Path(__file__).resolve().parents[1] / "docs" / "samples"
KEYS = ["mri", "other"]


def _rgb(seed: int, shape=(3, 16, 12)) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, shape).astype(np.float32))


def _pair_pipeline(k: int = 8) -> Compose:
    return Compose(
        [
            LoadPaird(keys=KEYS),
            EnsureSpatialDimsd(keys=KEYS, spatial_dims=2),
            CheckSameShaped(keys=KEYS),
            SplitLumaChromad(keys=KEYS),
            ScaleIntensityd(keys=KEYS, minv=0.0, maxv=1.0),
            ConcatItemsd(keys=KEYS, name="image", dim=0),
            DivisiblePadd(keys="image", k=k),
        ]
    )


# --- colour -------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), h=st.integers(1, 9), w=st.integers(1, 9))
def test_rgb_ycbcr_round_trip_within_one_grey_level(seed: int, h: int, w: int) -> None:
    rgb = _rgb(seed, (3, h, w))
    back = ycbcr_to_rgb(rgb_to_ycbcr(rgb))
    assert (back.round() - rgb).abs().max() <= 1.0
    # also when the YCbCr image is stored in 8 bits, as a PNG/JPEG would
    back_q = ycbcr_to_rgb(rgb_to_ycbcr(rgb).round().clamp(0, 255)).round().clamp(0, 255)
    assert (back_q - rgb).abs().max() <= 2.0


def test_ycbcr_matches_pil_bt601() -> None:
    rgb = _rgb(0, (3, 32, 24))
    pil = Image.fromarray(rgb.permute(1, 2, 0).numpy().astype(np.uint8), "RGB").convert("YCbCr")
    expected = torch.from_numpy(np.asarray(pil).astype(np.float32)).permute(2, 0, 1)
    assert (rgb_to_ycbcr(rgb) - expected).abs().max() <= 1.0


def test_split_luma_chroma_colour_grey_and_meta() -> None:
    colour = MetaTensor(_rgb(1), meta={"filename_or_obj": "pet.png"})
    grey_rgb = MetaTensor(_rgb(2, (1, 16, 12)).repeat(3, 1, 1), meta={"filename_or_obj": "mri.png"})
    out = SplitLumaChromad(keys=KEYS)({"mri": grey_rgb, "other": colour})
    assert out["mri"].shape == (1, 16, 12) and "mri_ycbcr" not in out
    assert torch.equal(out["mri"].as_tensor(), grey_rgb[0:1].as_tensor())
    assert out["other"].shape == (1, 16, 12) and out["other_ycbcr"].shape == (3, 16, 12)
    assert out["other"].meta["filename_or_obj"] == "pet.png"
    assert torch.allclose(out["other"].as_tensor(), rgb_to_ycbcr(colour.as_tensor())[0:1])


def test_split_luma_chroma_rejects_odd_channel_count() -> None:
    img = MetaTensor(torch.zeros(5, 4, 4), meta={"filename_or_obj": "odd.tif"})
    with pytest.raises(ValueError, match="odd.tif"):
        SplitLumaChromad(keys="other")({"other": img})


def test_attach_chroma_identity_fusion_restores_source_colour() -> None:
    """Fusing a colour image with nothing (pred = its own normalised Y) gives the source back."""
    rgb = _rgb(3, (3, 20, 10))
    ycbcr = rgb_to_ycbcr(rgb)
    y = ycbcr[0:1]
    pred = (y - y.min()) / (y.max() - y.min())
    out = AttachChromad(y_range="source")({"pred": pred, "other_ycbcr": ycbcr})
    # clipping to [0, 255] of out-of-gamut values is the only loss
    assert (out["pred_rgb"] - ycbcr_to_rgb(ycbcr).clamp(0, 255)).abs().max() <= 1e-3
    full = AttachChromad(y_range="full")({"pred": pred, "other_ycbcr": ycbcr})["pred_rgb"]
    expected = ycbcr_to_rgb(torch.cat([255 * pred, ycbcr[1:]])).clamp(0, 255)  # Y = 255 * pred, same chroma
    assert torch.allclose(full, expected, atol=1e-3)


def test_attach_chroma_leaves_grey_pairs_alone() -> None:
    out = AttachChromad()({"pred": torch.rand(1, 4, 4)})
    assert "pred_rgb" not in out


# --- normalisation, shapes, padding --------------------------------------------------------------


def test_constant_image_normalises_to_zeros() -> None:
    out = ScaleIntensityd(keys="mri", minv=0.0, maxv=1.0)({"mri": torch.full((1, 5, 5), 7.0)})
    assert torch.count_nonzero(out["mri"]) == 0 and torch.isfinite(out["mri"]).all()


def test_check_same_shape_names_both_files() -> None:
    a = MetaTensor(torch.zeros(1, 8, 8), meta={"filename_or_obj": "/data/MRI/1.png"})
    b = MetaTensor(torch.zeros(1, 8, 9), meta={"filename_or_obj": "/data/CT/1.png"})
    with pytest.raises(ValueError) as err:
        CheckSameShaped(keys=KEYS)({"mri": a, "other": b})
    assert "/data/MRI/1.png" in str(err.value) and "/data/CT/1.png" in str(err.value)


def test_ensure_spatial_dims_squeezes_slices_and_names_volumes() -> None:
    t = EnsureSpatialDimsd(keys="mri", spatial_dims=2)
    img = MetaTensor(torch.rand(1, 6, 7, 1), meta={"filename_or_obj": "slice.nii.gz"})
    out = t({"mri": img})["mri"]
    assert out.shape == (1, 6, 7) and out.meta["filename_or_obj"] == "slice.nii.gz"
    with pytest.raises(ValueError, match="vol.nii.gz"):
        t({"mri": MetaTensor(torch.rand(1, 6, 7, 3), meta={"filename_or_obj": "vol.nii.gz"})})


@pytest.mark.parametrize("size", [(13, 11), (17, 8), (1, 31), (255, 257)])
def test_pad_then_invert_restores_odd_sizes(size: tuple[int, int]) -> None:
    pre = Compose([ConcatItemsd(keys=KEYS, name="image", dim=0), DivisiblePadd(keys="image", k=8)])
    mri = MetaTensor(torch.rand(1, *size), meta={"filename_or_obj": "mri.png"})
    d = pre({"mri": mri, "other": MetaTensor(torch.rand(1, *size))})
    assert all(s % 8 == 0 for s in d["image"].shape[1:])
    assert d["image"].meta["filename_or_obj"] == "mri.png"
    d["pred"] = d["image"][0:1].clone()
    out = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(d)
    assert out["pred"].shape == (1, *size)
    assert torch.equal(out["pred"].as_tensor(), mri.as_tensor())


# --- loading ---------------------------------------------------------------------------------------


def _nifti(path: Path, arr: np.ndarray, affine: np.ndarray | None = None) -> Path:
    affine = np.diag([0.8, 0.9, 2.5, 1.0]) if affine is None else affine
    affine[:3, 3] = [-10.0, 12.5, 40.0]
    nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), path)
    return path


def test_load_pair_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "MRI" / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        LoadPaird()({"mri": str(missing), "other": str(missing)})


def test_load_pair_unreadable_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="bad.png"):
        LoadPaird().load(bad)


def test_load_pair_from_one_two_channel_nifti(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).random((9, 7, 1, 2))
    path = _nifti(tmp_path / "pair.nii.gz", arr)
    d = LoadPaird()({"image": str(path)})
    assert d["mri"].shape == (1, 9, 7, 1) and d["other"].shape == (1, 9, 7, 1)
    assert np.allclose(d["mri"][0].numpy(), arr[..., 0]) and np.allclose(d["other"][0].numpy(), arr[..., 1])
    three = _nifti(tmp_path / "three.nii.gz", np.zeros((4, 4, 1, 3)))
    with pytest.raises(ValueError, match="three.nii.gz"):
        LoadPaird()({"image": str(three)})


def test_pipeline_on_a_colour_sample_pair() -> None:
    item = {"mri": str(SAMPLES / "SPECT-MRI/MRI/3025.png"), "other": str(SAMPLES / "SPECT-MRI/SPECT/3025.png")}
    d = _pair_pipeline()(item)
    assert d["image"].shape == (2, 256, 256)
    assert float(d["image"].min()) == 0.0 and float(d["image"].max()) == 1.0
    assert d["other_ycbcr"].shape == (3, 256, 256) and "mri_ycbcr" not in d
    # width-first (MONAI PILReader) order: element [x, y] is pixel (row y, column x)
    mri = np.asarray(Image.open(item["mri"]), dtype=np.float32)
    assert np.allclose(d["image"][0].numpy() * (mri.max() - mri.min()) + mri.min(), mri.T, atol=1e-3)


# --- writer ------------------------------------------------------------------------------------------


def _run_pair(item: dict, tmp_out: Path, overwrite: bool = False, summary: FusionSummary | None = None) -> dict:
    """Pre-process, mean-fuse, invert and write one pair."""
    pre = _pair_pipeline()
    d = pre(item)
    d["pred"] = d["image"].mean(dim=0, keepdim=True)
    post = Compose(
        [
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False),
            AttachChromad(keys="pred"),
            SaveFusedd(keys="pred", output_dir=tmp_out, overwrite=overwrite, summary=summary),
        ]
    )
    return post(d)


@pytest.mark.parametrize("shape", [(15, 9, 1), (15, 9)])
def test_nifti_output_keeps_reference_affine_and_shape(tmp_path: Path, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    affine = np.array([[0.0, -0.9, 0.0, 0.0], [0.8, 0.0, 0.0, 0.0], [0.0, 0.0, 2.5, 0.0], [0, 0, 0, 1.0]])
    mri = _nifti(tmp_path / "flair.nii.gz", rng.random(shape), affine.copy())
    other = _nifti(tmp_path / "t1c.nii.gz", rng.random(shape), affine.copy())
    ref = nib.load(mri)
    _run_pair({"mri": str(mri), "other": str(other), "task": "T1c-FLAIR", "id": "case1"}, tmp_path / "out")
    out = nib.load(tmp_path / "out" / "T1c-FLAIR" / "case1_fused.nii.gz")
    assert out.shape == ref.shape
    assert np.array_equal(out.affine, ref.affine)
    assert out.header.get_sform(coded=True)[1] == ref.header.get_sform(coded=True)[1]
    assert out.get_data_dtype() == np.float32
    norm = [(a - a.min()) / (a.max() - a.min()) for a in (ref.get_fdata(), nib.load(other).get_fdata())]
    assert np.allclose(out.get_fdata(), (norm[0] + norm[1]) / 2, atol=1e-6)


def test_nifti_sample_output_geometry(tmp_path: Path) -> None:
    folder = SAMPLES / "BraTS-FLAIR-T1c"
    name = "brats_2013_pat0001_1_z063.nii.gz"
    mri, other = folder / "FLAIR" / name, folder / "T1c" / name
    _run_pair({"mri": str(mri), "other": str(other), "id": "b"}, tmp_path)
    out, ref = nib.load(tmp_path / "b_fused.nii.gz"), nib.load(mri)
    assert out.shape == ref.shape == (141, 179, 1) and np.array_equal(out.affine, ref.affine)


@pytest.mark.parametrize("task,modality,pair_id", [("PET-MRI", "PET", "30045"), ("SPECT-MRI", "SPECT", "3025")])
def test_colour_pair_writes_colour_png_and_grey_y(tmp_path: Path, task: str, modality: str, pair_id: str) -> None:
    item = {
        "mri": str(SAMPLES / task / "MRI" / f"{pair_id}.png"),
        "other": str(SAMPLES / task / modality / f"{pair_id}.png"),
        "task": task,
        "id": pair_id,
    }
    _run_pair(item, tmp_path)
    colour = Image.open(tmp_path / task / f"{pair_id}_fused.png")
    grey = Image.open(tmp_path / task / f"{pair_id}_fused_y.png")
    assert colour.mode == "RGB" and grey.mode == "L" and colour.size == grey.size == (256, 256)
    # the expected images computed by hand in (H, W) order: BT.601 YCbCr of the source, mean of the normalised
    # MRI and source Y as the fused Y, mapped onto the source's Y range, back to RGB with the source's Cb/Cr
    src = np.asarray(Image.open(item["other"]).convert("RGB"), dtype=np.float64)
    to_ycbcr = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    ycbcr = src @ to_ycbcr.T + np.array([0.0, 128.0, 128.0])
    mri = np.asarray(Image.open(item["mri"]).convert("L"), dtype=np.float64)
    unit = [(x - x.min()) / (x.max() - x.min()) for x in (mri, ycbcr[..., 0])]
    fused = (unit[0] + unit[1]) / 2
    y = ycbcr[..., 0].min() + fused * (ycbcr[..., 0].max() - ycbcr[..., 0].min())
    rgb = np.stack([y, ycbcr[..., 1] - 128, ycbcr[..., 2] - 128], axis=-1) @ np.linalg.inv(to_ycbcr).T
    assert np.abs(np.asarray(grey, dtype=np.float64) - np.rint(255 * fused)).max() <= 1
    assert np.abs(np.asarray(colour, dtype=np.float64) - np.rint(np.clip(rgb, 0, 255))).max() <= 1
    assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 50  # really coloured


def test_grey_png_output_matches_direct_mean_fusion(tmp_path: Path) -> None:
    item = {"mri": str(SAMPLES / "CT-MRI/MRI/34012.png"), "other": str(SAMPLES / "CT-MRI/CT/34012.png"), "id": "x"}
    _run_pair(item, tmp_path)
    out = np.asarray(Image.open(tmp_path / "x_fused.png")).astype(float)
    a, b = (np.asarray(Image.open(item[k])).astype(float) for k in ("mri", "other"))
    norm = [(x - x.min()) / (x.max() - x.min()) for x in (a, b)]
    assert out.shape == a.shape and np.abs(out - np.rint((norm[0] + norm[1]) / 2 * 255)).max() <= 1


def test_existing_outputs_are_never_overwritten_unless_asked(tmp_path: Path) -> None:
    item = {"mri": str(SAMPLES / "PET-MRI/MRI/30075.png"), "other": str(SAMPLES / "PET-MRI/PET/30075.png"), "id": "p"}
    target = tmp_path / "p_fused.png"
    target.write_bytes(b"precious")
    summary = FusionSummary()
    _run_pair(item, tmp_path, summary=summary)
    assert target.read_bytes() == b"precious" and not (tmp_path / "p_fused_y.png").exists()
    assert (len(summary.written), len(summary.skipped)) == (0, 1)
    _run_pair(item, tmp_path, overwrite=True, summary=summary)
    assert Image.open(target).mode == "RGB" and (tmp_path / "p_fused_y.png").exists()
    assert len(summary.written) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    assert "1 pairs written, 1 skipped, 0 failed" in summary.log()
