"""3D inference config on a small synthetic NIfTI volume pair in BraTS case-folder layout."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
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


def test_3d_config_fuses_a_volume_with_the_reference_geometry(tmp_path):
    affine = _write_case(tmp_path / "data")
    wf = ConfigWorkflow(
        config_file=[str(BUNDLE_ROOT / "configs" / "inference.json"), str(BUNDLE_ROOT / "configs" / "inference_3d.json")],
        meta_file=str(BUNDLE_ROOT / "metadata.json"),
        logging_file=str(BUNDLE_ROOT / "configs" / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(BUNDLE_ROOT),
        dataset_dir=str(tmp_path / "data"),
        output_dir=str(tmp_path / "out"),
        network_def=TINY_3D,
        load_pretrain=False,
        allow_untrained=True,
        roi_size=[16, 16, 16],
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    outputs = list((tmp_path / "out").rglob("*_fused.nii.gz"))
    assert len(outputs) == 1
    img = nib.load(outputs[0])
    assert img.shape == (20, 26, 13)
    assert np.allclose(img.affine, affine)
    data = img.get_fdata()
    assert np.isfinite(data).all() and data.min() >= 0 and data.max() <= 1


def test_brats_datalist_errors_name_the_folder(tmp_path):
    (tmp_path / "case_x").mkdir()
    (tmp_path / "case_x" / "Flair_a.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="case_x: expected one Flair"):
        brats_datalist(tmp_path)
    with pytest.raises(FileNotFoundError, match="BraTS folder not found"):
        brats_datalist(tmp_path / "nowhere")
