"""The MONAI Label app's pure-Python pieces, in the project venv (no ``monailabel`` import).

``scripts/monailabel/fusion_app/lib/pipeline.py`` holds what the server runs besides MONAI Label itself: the bundle's
pre-/post-processing as MONAI Label receives it (minus ``SaveFusedd``), the float32 NIfTI writer, the 2-channel
input builder and the integration checks. The chain is driven here the way ``BasicInferTask`` drives it (each
pre-transform on the request dict, batched network call, ``outputs[0]``, post-transforms, writer). The server
itself is tested by ``scripts/monailabel_integration.sh`` (separate environment; see docs/monailabel.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.baselines import MeanFusion
from scripts.monailabel.fusion_app.lib import pipeline as P

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
APP = BUNDLE_ROOT / "scripts" / "monailabel" / "fusion_app"
SAMPLE = BUNDLE_ROOT / "docs" / "samples" / "BraTS-FLAIR-T1c"
NAME = "brats_2013_pat0001_1_z063.nii.gz"


@pytest.fixture
def pair(tmp_path: Path) -> Path:
    return Path(P.stack_pair(SAMPLE / "FLAIR" / NAME, SAMPLE / "T1c" / NAME, tmp_path / "pair.nii.gz"))


def _run_like_monailabel(image: Path, network: torch.nn.Module, out: Path, request: dict | None = None) -> dict:
    """The server's chain for one request, without MONAI Label: pre -> network -> post -> writer."""
    parser = P.load_bundle_config(BUNDLE_ROOT)
    data = {"image": str(image), "image_path": str(image), "device": "cpu", **(request or {})}
    for t in P.bundle_preprocessing(BUNDLE_ROOT, parser):
        data = t(data)
    with P.bundle_on_path(BUNDLE_ROOT):
        inferer = parser.get_parsed_content("inferer", instantiate=True)
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    for t in P.bundle_postprocessing(BUNDLE_ROOT, parser):
        data = t(data)
    P.write_fused_nifti(data["pred"], data["mri"], out, BUNDLE_ROOT)
    return data


def _minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min())


def test_stack_pair_builds_a_two_channel_nifti(pair: Path) -> None:
    img = nib.load(pair)
    flair, t1c = (nib.load(SAMPLE / m / NAME) for m in ("FLAIR", "T1c"))
    assert img.shape == (*flair.shape, 2) == (141, 179, 1, 2)
    assert img.get_data_dtype() == np.float32
    assert np.array_equal(img.affine, flair.affine)
    data = np.asarray(img.dataobj)
    np.testing.assert_array_equal(data[..., 0], np.asarray(flair.dataobj, dtype=np.float32))
    np.testing.assert_array_equal(data[..., 1], np.asarray(t1c.dataobj, dtype=np.float32))


def test_stack_pair_rejects_pairs_that_do_not_match(tmp_path: Path) -> None:
    flair = nib.load(SAMPLE / "FLAIR" / NAME)
    arr = np.asarray(flair.dataobj)
    moved = tmp_path / "moved.nii.gz"
    shifted = flair.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(arr, shifted), moved)
    with pytest.raises(ValueError, match="co-registered"):
        P.stack_pair(SAMPLE / "FLAIR" / NAME, moved, tmp_path / "x.nii.gz")
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(arr[:100], flair.affine), small)
    with pytest.raises(ValueError, match="differs in size"):
        P.stack_pair(SAMPLE / "FLAIR" / NAME, small, tmp_path / "y.nii.gz")


def test_bundle_postprocessing_drops_only_the_file_writer() -> None:
    pre = [type(t).__name__ for t in P.bundle_preprocessing(BUNDLE_ROOT)]
    post = [type(t).__name__ for t in P.bundle_postprocessing(BUNDLE_ROOT)]
    assert pre[0] == "LoadPaird" and pre[-1] == "DivisiblePadd"
    assert post == ["EnsureTyped", "Invertd", "AttachChromad"]

    class SaveFusedd:  # a re-imported class: same name, different identity
        pass

    class SaveImaged:
        pass

    class Keep:
        pass

    kept = P.drop_by_name([SaveFusedd(), Keep(), SaveImaged()])
    assert [type(t).__name__ for t in kept] == ["Keep"]


def test_served_chain_writes_float32_fusion_in_the_input_geometry(pair: Path, tmp_path: Path) -> None:
    out = tmp_path / "fused.nii.gz"
    data = _run_like_monailabel(pair, MeanFusion().eval(), out, {"result_dtype": "uint8", "result_extension": ".nrrd"})
    assert tuple(data["pred"].shape) == (1, 141, 179)  # padding to 144 x 184 undone
    fused, src, flair = nib.load(out), nib.load(pair), nib.load(SAMPLE / "FLAIR" / NAME)
    assert fused.get_data_dtype() == np.float32
    assert fused.shape == (141, 179, 1)
    assert np.array_equal(fused.affine, src.affine)
    assert (int(fused.header["sform_code"]), int(fused.header["qform_code"])) == (
        int(flair.header["sform_code"]),
        int(flair.header["qform_code"]),
    )
    np.testing.assert_allclose(fused.header.get_zooms(), flair.header.get_zooms())
    # mean fusion of the min-max normalised channels: the exact expected image
    raw = np.asarray(src.dataobj, dtype=np.float64)
    expected = (_minmax(raw[..., 0]) + _minmax(raw[..., 1])) / 2
    np.testing.assert_allclose(np.asarray(fused.dataobj), expected, atol=1e-6)
    assert all(ok for _, ok, _ in P.check_fused(out, pair))


def test_served_chain_with_the_clinicalfmamba_network(pair: Path, tmp_path: Path) -> None:
    """The real network class from the bundle's ``network_def`` (tiny widths for speed): output in [0, 1]."""
    from scripts.networks import ClinicalFMamba

    torch.manual_seed(0)
    net = ClinicalFMamba(spatial_dims=2, features=(8, 16, 16), depth=1, decoder_depth=1, d_state=4, swap_d_state=4)
    out = tmp_path / "fused.nii"
    _run_like_monailabel(pair, net.eval(), out)
    checks = {name: (ok, detail) for name, ok, detail in P.check_fused(out, pair)}
    assert all(ok for ok, _ in checks.values()), checks


def test_writer_without_a_nifti_source_uses_the_loaded_affine(tmp_path: Path) -> None:
    from monai.data import MetaTensor

    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    affine[:3, 3] = (10, -20, 30)
    ref = MetaTensor(torch.zeros(1, 6, 5), meta={"affine": torch.as_tensor(affine), "spatial_shape": (6, 5, 1)})
    pred = torch.linspace(0, 1, 30, dtype=torch.float64).reshape(1, 6, 5)
    out = tmp_path / "f.nii.gz"
    P.write_fused_nifti(pred, ref, out, BUNDLE_ROOT)
    img = nib.load(out)
    assert img.get_data_dtype() == np.float32 and img.shape == (6, 5, 1)
    np.testing.assert_allclose(img.affine, affine)
    with pytest.raises(ValueError, match="padding"):
        P.write_fused_nifti(torch.zeros(1, 8, 8), ref, tmp_path / "g.nii.gz", BUNDLE_ROOT)


def test_check_fused_catches_wrong_outputs(pair: Path, tmp_path: Path) -> None:
    src = nib.load(pair)
    good = np.linspace(0, 1, 141 * 179, dtype=np.float32).reshape(141, 179, 1)

    def failed(arr: np.ndarray, affine: np.ndarray) -> set[str]:
        path = tmp_path / "c.nii.gz"
        nib.save(nib.Nifti1Image(arr, affine), path)
        return {name for name, ok, _ in P.check_fused(path, pair) if not ok}

    assert failed(good, src.affine) == set()
    assert failed((good * 255).astype(np.uint8), src.affine) == {"dtype float32", "value range [0, 1]"}
    shifted = src.affine.copy()
    shifted[0, 3] += 1.0
    assert failed(good, shifted) == {"affine"}
    assert failed(good[:, :-1], src.affine) == {"shape"}
    assert failed(np.full_like(good, 0.5), src.affine) == {"not constant"}
    assert failed(good + 0.5, src.affine) == {"value range [0, 1]"}
    assert P.check_fused(tmp_path / "missing.nii.gz", pair)[0][:2] == ("readable NIfTI", False)


@pytest.mark.parametrize(
    ("requested", "written"),
    [(None, ".nii.gz"), ("", ".nii.gz"), (".nii.gz", ".nii.gz"), (".nii", ".nii"), ("nii", ".nii"),
     (".nrrd", ".nii.gz"), (".seg.nrrd", ".nii.gz"), (".NII.GZ", ".nii.gz")],
)  # fmt: skip
def test_result_extension(requested: str | None, written: str) -> None:
    assert P.resolve_result_extension(requested) == written


def test_bundle_root_and_weights_resolution(tmp_path: Path) -> None:
    assert P.default_bundle_root(APP) == BUNDLE_ROOT
    assert P.default_bundle_root() == BUNDLE_ROOT
    (tmp_path / "models").mkdir()
    assert P.resolve_weights(tmp_path, {}) == (None, "none")
    (tmp_path / "models" / "model.ts").write_bytes(b"")
    assert P.resolve_weights(tmp_path, {})[1] == "bundle TorchScript models/model.ts"
    (tmp_path / "models" / "model.pt").write_bytes(b"")
    assert P.resolve_weights(tmp_path, {}) == (
        str((tmp_path / "models" / "model.pt").resolve()),
        "bundle checkpoint models/model.pt",
    )
    other = tmp_path / "runs" / "best.pt"
    other.parent.mkdir()
    other.write_bytes(b"")
    assert P.resolve_weights(tmp_path, {"weights": "runs/best.pt"})[0] == str(other.resolve())
    assert P.resolve_weights(tmp_path, {"weights": str(other)})[0] == str(other.resolve())
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        P.resolve_weights(tmp_path, {"weights": "runs/missing.pt"})


def test_app_modules_declare_an_others_task_without_trainers() -> None:
    """The monailabel-importing modules cannot be imported here; check what they declare."""
    main = ast.parse((APP / "main.py").read_text())
    task = ast.parse((APP / "lib" / "infer_fusion.py").read_text())
    app_cls = next(n for n in main.body if isinstance(n, ast.ClassDef) and n.name == "FusionApp")
    assert [b.id for b in app_cls.bases] == ["MONAILabelApp"]  # what MONAI Label looks for in main.py
    trainers = next(f for f in app_cls.body if isinstance(f, ast.FunctionDef) and f.name == "init_trainers")
    assert ast.unparse(trainers.body[-1]) == "return {}"
    calls = [n for n in ast.walk(task) if isinstance(n, ast.Call) and ast.unparse(n.func) == "super().__init__"]
    kwargs = {k.arg: ast.unparse(k.value) for c in calls for k in c.keywords}
    assert kwargs["type"] == "InferType.OTHERS"
    assert kwargs["add_post_restore"] == "False" and kwargs["load_strict"] == "True"


def test_app_serves_the_network_with_the_inference_modules_swapped_in():
    from scripts.networks import ClinicalFMamba
    from scripts.networks.optimize import FastClinicalFMamba

    torch.manual_seed(0)
    net = ClinicalFMamba(features=(4, 8), dilations=(1, 2), depth=1, decoder_depth=1, d_state=4, swap_d_state=4).eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(1, 2, 16, 16)
    with torch.inference_mode():
        expected = net(x)
        served = P.optimize_network(BUNDLE_ROOT, net)
        assert type(served) is FastClinicalFMamba
        assert all(torch.equal(v, served.state_dict()[k]) for k, v in state.items())
        assert (served(x) - expected).abs().max() <= 1e-5
    baseline = MeanFusion()
    assert P.optimize_network(BUNDLE_ROOT, baseline) is baseline and type(baseline) is MeanFusion
    infer_source = (APP / "lib" / "infer_fusion.py").read_text()  # the server's task calls it on the loaded network
    assert "optimize_network(self.bundle_path, super()._get_network(device, data))" in infer_source
