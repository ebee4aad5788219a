"""``optimize_for_inference`` on the shipped networks: the inference config applies it, the weights load strictly
before and after, and the optimised network computes what the plain one computes on real sample pairs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from scripts.networks import ClinicalFMamba
from scripts.networks.optimize import FastClinicalFMamba, FastUpStage, FusedDirectionalMamba, optimize_for_inference
from scripts.weights import load_network_weights

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
SAMPLES = BUNDLE_ROOT / "docs" / "samples"


def parsed(*configs: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / c) for c in configs])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    parser["device"] = "$torch.device('cpu')"
    return parser


def grey(path: Path) -> np.ndarray:
    x = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    return (x - x.min()) / max(float(x.max() - x.min()), 1e-8)


def pair(task: str, other: str, name: str) -> torch.Tensor:
    """A real sample pair (1, 2, H, W) in [0, 1]."""
    return torch.from_numpy(np.stack([grey(SAMPLES / task / "MRI" / name), grey(SAMPLES / task / other / name)]))[None]


@pytest.fixture(scope="module")
def networks_2d() -> tuple[ClinicalFMamba, ClinicalFMamba]:
    """The plain network with the shipped weights (strict), and the inference config's ``network``."""
    definition = parsed("inference.json").get_parsed_content("network_def")
    plain = load_network_weights(definition, BUNDLE_ROOT / "models" / "model.pt")
    return plain.eval(), parsed("inference.json").get_parsed_content("network").eval()


def test_inference_config_applies_the_optimisation_and_keeps_the_state_dict(networks_2d):
    plain, fast = networks_2d
    assert type(plain) is ClinicalFMamba and type(fast) is FastClinicalFMamba
    assert all(isinstance(m, FastUpStage) for m in fast.up_stages)
    assert any(isinstance(m, FusedDirectionalMamba) for m in fast.modules())
    assert plain.state_dict().keys() == fast.state_dict().keys()
    assert all(torch.equal(v, fast.state_dict()[k]) for k, v in plain.state_dict().items())  # the shipped weights
    fast.load_state_dict(plain.state_dict(), strict=True)  # loads strictly into the optimised network too


@pytest.mark.parametrize(
    "task,other,name,crop",
    [("CT-MRI", "CT", "34012.png", None), ("PET-MRI", "PET", None, (slice(40, 232), slice(48, 208)))],
    ids=["256x256", "192x160"],
)
def test_optimised_network_equals_the_plain_one_on_real_pairs(networks_2d, task, other, name, crop):
    plain, fast = networks_2d
    name = name or sorted(p.name for p in (SAMPLES / task / "MRI").glob("*.png"))[0]
    x = pair(task, other, name)
    if crop is not None:
        x = x[:, :, crop[0], crop[1]].contiguous()
        assert tuple(x.shape[2:]) == (192, 160)
    else:
        assert tuple(x.shape[2:]) == (256, 256)
    with torch.inference_mode():
        expected, out = plain(x), fast(x)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert (out - expected).abs().max() <= 1e-5


def test_shipped_3d_weights_load_strictly_and_the_optimised_3d_network_agrees():
    parser = parsed("inference.json", "inference_3d.json")
    definition = parser.get_parsed_content("network_def")
    plain = load_network_weights(definition, BUNDLE_ROOT / "models" / "model_3d.pt").eval()
    fast = optimize_for_inference(copy.deepcopy(plain))
    x = torch.rand(1, 2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert (fast(x) - plain(x)).abs().max() <= 1e-5


def test_optimised_network_still_trains_with_the_plain_layers():
    torch.manual_seed(0)
    tiny = dict(features=(4, 8), dilations=(1, 2), depth=1, decoder_depth=1, d_state=4, swap_d_state=4)
    plain = ClinicalFMamba(**tiny)
    fast = optimize_for_inference(copy.deepcopy(plain)).train()
    x = torch.rand(2, 2, 16, 16)
    torch.testing.assert_close(fast(x), plain.train()(x))  # training mode: the same plain forward
    fast(x).mean().backward()
    assert fast.stem.weight.grad is not None and fast.up_stages[0].conv.weight.grad is not None
