"""TorchScript / ONNX export: the exported models match eager outputs on real sample pairs at other sizes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from scripts.export import (
    ExportableClinicalFMamba,
    export_onnx,
    export_torchscript,
    prepare_export,
    traced_scan_orders,
)
from scripts.networks import ClinicalFMamba, scan_orders
from scripts.ssm import resolve_backend, selective_scan, selective_scan_time_major

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = BUNDLE_ROOT / "docs" / "samples"
TINY = dict(features=(8, 8, 16), depth=1, decoder_depth=1, d_state=4, swap_d_state=4)
TOL = 1e-4
# the shipped architecture's options (refinement, source selection) as configs/inference.json sets them
SHIPPED = {
    k: v
    for k, v in json.loads((BUNDLE_ROOT / "configs" / "inference.json").read_text())["network_def"].items()
    if k in ("refine", "source_selection")
}


def _unit(x: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(np.squeeze(x), dtype=np.float32))
    return (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)


def _pair(kind: str) -> torch.Tensor:
    """A real embedded sample pair as a (1, 2, H, W) network input in [0, 1]."""
    if kind == "ct-mri":  # Harvard atlas, 256 x 256
        load = lambda m: np.asarray(Image.open(SAMPLES / "CT-MRI" / m / "34012.png").convert("L"))  # noqa: E731
        mri, other = load("MRI"), load("CT")
    else:  # BraTS FLAIR / T1c slice, 141 x 179 (not a multiple of 8)
        load = lambda m: nib.load(SAMPLES / "BraTS-FLAIR-T1c" / m / "brats_2013_pat0001_1_z063.nii.gz").get_fdata()  # noqa: E731
        mri, other = load("FLAIR"), load("T1c")
    return torch.stack([_unit(mri), _unit(other)])[None]


def _eager_reference(net: ClinicalFMamba, image: torch.Tensor) -> torch.Tensor:
    """What the inference workflow computes: DivisiblePadd(8) (symmetric zeros), the network, crop back."""
    pads, crops = [], []
    for size in image.shape[2:]:
        total = -size % net.size_divisor
        pads.append((total // 2, total - total // 2))
        crops.append(slice(total // 2, total // 2 + size))
    with torch.no_grad():
        fused = net(F.pad(image, [p for pair in reversed(pads) for p in pair]))
    return fused[(..., *crops)]


@pytest.fixture(scope="module")
def tiny_nets() -> tuple[ClinicalFMamba, ExportableClinicalFMamba]:
    torch.manual_seed(0)
    net = ClinicalFMamba(**TINY, **SHIPPED).eval()
    with torch.no_grad():  # the zero-initialised output layers get weights, so their paths are exercised
        outputs = (net.refine.out if net.refine else None, net.selection.logits if net.selection else None)
        for module in [m for m in outputs if m is not None]:
            module.weight.normal_(0, 0.1)
    exportable = ExportableClinicalFMamba(**TINY, **SHIPPED).eval()
    exportable.load_state_dict(net.state_dict())
    return net, exportable


@pytest.fixture(scope="module")
def pairs() -> dict[str, torch.Tensor]:
    return {"ct-mri": _pair("ct-mri"), "brats": _pair("brats")}


def _make_scan_inputs(length: int, dtype=torch.float64) -> dict:
    g = torch.Generator().manual_seed(length)
    batch, groups, per_group, n = 2, 3, 4, 5
    dim = groups * per_group
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        u=rand(batch, dim, length),
        delta=rand(batch, dim, length),
        A=-torch.rand(dim, n, generator=g, dtype=dtype) * 2,
        B=rand(batch, groups, n, length),
        C=rand(batch, groups, n, length),
        D=rand(dim),
        z=rand(batch, dim, length),
        delta_bias=rand(dim),
        delta_softplus=True,
    )


@pytest.mark.parametrize("length", [1, 31, 32, 33, 70])
def test_export_backend_matches_reference(length):
    inputs = _make_scan_inputs(length)
    y_ref = selective_scan(**inputs, backend="reference")
    assert torch.allclose(selective_scan(**inputs, backend="export"), y_ref, atol=1e-12, rtol=1e-10)
    # the mixers' time-major entry point
    u, delta = inputs["u"], inputs["delta"]
    groups = inputs["B"].shape[1]

    def time_major(x):
        return x.permute(2, 0, 1).reshape(length, x.shape[0], groups, -1)

    args = (time_major(u), time_major(delta), inputs["A"].reshape(groups, -1, 5))
    args += (inputs["B"].permute(3, 0, 1, 2), inputs["C"].permute(3, 0, 1, 2), inputs["D"].reshape(groups, -1))
    kwargs = dict(delta_bias=inputs["delta_bias"].reshape(groups, -1), delta_softplus=True)
    y_tm = selective_scan_time_major(*args, **kwargs, backend="export")
    y_fast = selective_scan_time_major(*args, **kwargs, backend="fast")
    assert torch.allclose(y_tm, y_fast, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(
    "name, grid",
    [("identity", (7,)), ("identity", (3, 5)), ("cross2d", (3, 5)), ("cross2d", (1, 4)), ("triplane", (2, 3, 4))],
)
def test_traced_scan_orders_equal_network_orders(name, grid):
    assert torch.equal(traced_scan_orders(name, grid), scan_orders(name, grid))


def test_tracing_the_plain_network_fails_with_a_clear_error():
    net = ClinicalFMamba(**TINY).eval()
    with pytest.raises(RuntimeError, match="prepare_export"):
        torch.jit.trace(net, torch.rand(1, 2, 32, 32))


def test_trace_example_too_small_is_refused(tiny_nets):
    with pytest.raises(ValueError, match="too small"):
        export_torchscript(tiny_nets[1], None, torch.rand(1, 2, 8, 8))
    assert resolve_backend(None, "cpu") == resolve_backend(
        "auto", "cpu"
    )  # preparing one network changes no process default


def test_exportable_network_keeps_weights_and_eager_outputs(tiny_nets, pairs):
    net, exportable = tiny_nets
    assert list(net.state_dict()) == list(exportable.state_dict())
    for image in pairs.values():
        with torch.no_grad():
            assert (exportable(image) - _eager_reference(net, image)).abs().max() <= TOL


def test_torchscript_matches_eager_on_real_pairs_at_other_sizes(tiny_nets, pairs, tmp_path):
    net, exportable = tiny_nets
    path = tmp_path / "model.ts"
    export_torchscript(exportable, path, torch.rand(1, 2, 64, 64))  # the example size is not baked in
    loaded = torch.jit.load(str(path))
    batch = torch.cat([pairs["ct-mri"], pairs["ct-mri"].flip(-1)])  # batch size 2 as well
    for image in (pairs["ct-mri"], pairs["brats"], batch):
        with torch.no_grad():
            out = loaded(image)
        assert out.shape == (image.shape[0], 1, *image.shape[2:])
        assert (out - _eager_reference(net, image)).abs().max() <= TOL


def test_traced_graph_has_no_device_constants(tiny_nets):
    """Indices and masks are made on the input's device, so a model traced on CPU runs after ``.to("cuda")``."""
    traced = export_torchscript(tiny_nets[1], None, torch.rand(1, 2, 32, 32))
    assert not [line for line in str(traced.inlined_graph).splitlines() if "Device = prim::Constant" in line]


def test_onnx_matches_eager_on_real_pairs_at_other_sizes(tiny_nets, pairs, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    net, exportable = tiny_nets
    path = tmp_path / "model.onnx"
    export_onnx(exportable, path, torch.rand(1, 2, 64, 64))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == ["pred"]
    for image in (pairs["ct-mri"], pairs["brats"]):
        (out,) = session.run(None, {"image": image.numpy()})
        assert out.shape == (1, 1, *image.shape[2:])
        assert np.abs(out - _eager_reference(net, image).numpy()).max() <= TOL


def test_3d_network_traces_with_dynamic_sizes():
    """The tri-plane 3D network exports the same way (random input; no 3D sample pair is embedded)."""
    cfg = dict(TINY, spatial_dims=3)
    torch.manual_seed(0)
    net = ClinicalFMamba(**cfg).eval()
    exportable = ExportableClinicalFMamba(**cfg).eval()
    exportable.load_state_dict(net.state_dict())
    traced = export_torchscript(exportable, None, torch.rand(1, 2, 32, 32, 32))
    for shape in ((1, 2, 16, 24, 32), (1, 2, 13, 17, 9)):
        image = torch.rand(*shape)
        with torch.no_grad():
            assert (traced(image) - _eager_reference(net, image)).abs().max() <= TOL


def test_bundle_export_commands_with_a_checkpoint(tiny_nets, pairs, tmp_path):
    """``monai.bundle ckpt_export`` / ``onnx_export`` (the functions the CLI calls) with configs/export.json."""
    from monai.bundle import ckpt_export, onnx_export

    net, _ = tiny_nets
    ckpt = tmp_path / "model.pt"
    torch.save({"model": net.state_dict()}, ckpt)  # the training workflow's checkpoint layout
    common = dict(
        net_id="network_def",
        ckpt_file=str(ckpt),
        key_in_ckpt="model",
        meta_file=str(BUNDLE_ROOT / "metadata.json"),
        config_file=[str(BUNDLE_ROOT / "configs" / "inference.json"), str(BUNDLE_ROOT / "configs" / "export.json")],
        use_trace=True,
        input_shape=[1, 2, 64, 64],
        bundle_root=str(BUNDLE_ROOT),
        **{f"network_def#{k}": list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
    )
    ckpt_export(filepath=str(tmp_path / "model.ts"), **common)
    image = pairs["brats"]
    with torch.no_grad():
        out = torch.jit.load(str(tmp_path / "model.ts"))(image)
    assert (out - _eager_reference(net, image)).abs().max() <= TOL

    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    axes = {0: "batch", 2: "height", 3: "width"}
    converter = dict(dynamo=False, opset_version=17, input_names=["image"], output_names=["pred"])
    onnx_export(
        filepath=str(tmp_path / "model.onnx"),
        converter_kwargs={**converter, "dynamic_axes": {"image": axes, "pred": axes}},
        **common,
    )
    (out,) = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": image.numpy()}
    )
    assert np.abs(out - _eager_reference(net, image).numpy()).max() <= TOL


def test_full_default_network_exports(pairs, tmp_path):
    """The default ClinicalFMamba (random weights), traced at 64 x 64, on a real pair resized to 96 x 96."""
    torch.manual_seed(0)
    net = ClinicalFMamba().eval()
    image = F.interpolate(pairs["ct-mri"], size=(96, 96), mode="area")
    expected = _eager_reference(net, image)
    traced = export_torchscript(prepare_export(net), None, torch.rand(1, 2, 64, 64))
    with torch.no_grad():
        assert (traced(image) - expected).abs().max() <= TOL
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime"):
        import onnxruntime as ort

        export_onnx(traced, tmp_path / "full.onnx", torch.rand(1, 2, 64, 64))  # from the traced module
        session = ort.InferenceSession(str(tmp_path / "full.onnx"), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {"image": image.numpy()})
        assert np.abs(out - expected.numpy()).max() <= TOL
