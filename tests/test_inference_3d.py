"""3D inference config on a small synthetic NIfTI volume pair in BraTS case-folder layout."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from scripts.data import brats_datalist

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
TINY_3D = {
    "_target_": "scripts.networks.ClinicalFMamba",
    "spatial_dims": 3,
    "channel_exchange": False,
    "pyramid": False,
    "decoder_depth": 0,
    "features": [4, 8, 8],
    "depth": 1,
    "d_state": 4,
}


def _write_case(root: Path, shape=(20, 26, 13)) -> np.ndarray:
    case = root / "case_001"
    case.mkdir(parents=True)
    affine = np.array([[-1.0, 0, 0, 90], [0, -1.2, 0, 126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
    rng = np.random.default_rng(0)
    for name in ("Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"):
        nib.save(nib.Nifti1Image(rng.standard_normal(shape).astype(np.float32), affine), case / name)
    return affine


def _run_3d(tmp_path, **override) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=[str(BUNDLE_ROOT / "configs" / name) for name in ("inference.json", "inference_3d.json")],
        meta_file=str(BUNDLE_ROOT / "metadata.json"),
        logging_file=str(BUNDLE_ROOT / "configs" / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(BUNDLE_ROOT),
        dataset_dir=str(tmp_path / "data"),
        output_dir=str(tmp_path / "out"),
        load_pretrain=False,
        allow_untrained=True,
        roi_size=[16, 16, 16],
        **override,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def _scaled_inputs(root) -> np.ndarray:
    """The two volumes as the 3D config normalises them: minimum -> 0, 99.9th percentile -> 1, clipped; (2, X, Y, Z)."""
    case = root / "case_001"
    out = []
    for name in ("Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"):
        x = nib.load(case / name).get_fdata()
        low, high = np.percentile(x, 0.0), np.percentile(x, 99.9)
        out.append(np.clip((x - low) / (high - low), 0.0, 1.0))
    return np.stack(out)


def test_3d_config_fuses_a_volume_with_the_reference_geometry(tmp_path):
    """With the mean rule the fused volume is known voxel by voxel: the mean of the two normalised volumes, written
    on the reference grid through the sliding windows (16^3, overlap 0.25) and the foreground crop."""
    affine = _write_case(tmp_path / "data")
    _run_3d(tmp_path, network_def={"_target_": "scripts.baselines.MeanFusion"})
    outputs = list((tmp_path / "out").rglob("*_fused.nii.gz"))
    assert [p.relative_to(tmp_path / "out").as_posix() for p in outputs] == ["T1c-Flair/case_001_fused.nii.gz"]
    img = nib.load(outputs[0])
    assert img.shape == (20, 26, 13)
    assert np.allclose(img.affine, affine)
    expected = _scaled_inputs(tmp_path / "data").mean(axis=0)
    np.testing.assert_allclose(img.get_fdata(), expected, atol=1e-5)


def test_3d_config_runs_the_network_window_by_window(tmp_path):
    """The tiny 3D network through the config equals the same network run by hand on the normalised pair with
    MONAI's sliding-window inferer: nothing is transposed or scaled on the way. The foreground crop (voxels above 0:
    here the whole volume) adds its 4-voxel margin as zeros around the volume, which the windows see."""
    from monai.inferers import SlidingWindowInferer

    _write_case(tmp_path / "data")
    wf = _run_3d(tmp_path, network_def=TINY_3D)
    fused = nib.load(next((tmp_path / "out").rglob("*_fused.nii.gz"))).get_fdata()
    net = wf.parser.get_parsed_content("network").eval()
    inferer = SlidingWindowInferer(roi_size=[16, 16, 16], sw_batch_size=1, overlap=0.25, mode="gaussian")
    padded = np.pad(_scaled_inputs(tmp_path / "data"), [(0, 0)] + [(4, 4)] * 3)
    with torch.no_grad():
        expected = inferer(torch.from_numpy(padded).float()[None], net)[0, 0, 4:-4, 4:-4, 4:-4].numpy()
    assert fused.shape == expected.shape == (20, 26, 13)
    np.testing.assert_allclose(fused, expected, atol=1e-4)
    assert fused.std() > 1e-3  # not a constant image


def test_brats_datalist_errors_name_the_folder(tmp_path):
    (tmp_path / "case_x").mkdir()
    (tmp_path / "case_x" / "Flair_a.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="case_x: expected one Flair"):
        brats_datalist(tmp_path)
    with pytest.raises(FileNotFoundError, match="BraTS folder not found"):
        brats_datalist(tmp_path / "nowhere")
