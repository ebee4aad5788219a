"""The shipped 2D weights: they load strictly into the inference config's network and, fed in the bundle's
orientation, fuse the embedded Harvard test samples with the Q^AB/F and SF (``cddfuse`` profile) pinned in
``tests/pinned_outputs.json``, with a spatial frequency above the max rule's, as the model card reports for the
test split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.metrics.profiles import compute_metrics
from scripts.networks import ClinicalFMamba
from scripts.pin_outputs import PINNED, SCORED
from scripts.transforms import rgb_to_ycbcr
from scripts.weights import load_network_weights

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = BUNDLE_ROOT / "models" / "model.pt"
SAMPLES = BUNDLE_ROOT / "docs" / "samples"
TASKS = {"CT-MRI": "CT", "PET-MRI": "PET", "SPECT-MRI": "SPECT"}


def _luma(path: Path) -> np.ndarray:
    """Grey image, or the BT.601 Y of a colour one, min-max normalised to [0, 1] (the network's input)."""
    image = Image.open(path)
    if image.mode == "L":
        x = np.asarray(image, dtype=np.float64)
    else:
        x = rgb_to_ycbcr(torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64)).permute(2, 0, 1))[
            0
        ].numpy()
    x = x - x.min()
    return x / max(x.max(), 1e-8)


def _bundle_network() -> ClinicalFMamba:
    """A freshly initialised 2D network with the options of ``configs/inference.json``'s ``network_def``."""
    definition = json.loads((BUNDLE_ROOT / "configs" / "inference.json").read_text())["network_def"]
    options = {k: v for k, v in definition.items() if not k.startswith("_") and k != "spatial_dims"}
    return ClinicalFMamba(spatial_dims=2, **options)


@pytest.fixture(scope="module")
def shipped() -> ClinicalFMamba:
    return load_network_weights(_bundle_network(), WEIGHTS).eval()


def test_weights_file_is_float32_and_small():
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    floats = [v for v in state.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)
    assert WEIGHTS.stat().st_size < 25 * 2**20


def test_shipped_weights_are_trained_not_the_initialisation(shipped):
    torch.manual_seed(0)
    fresh = _bundle_network()
    differ = [
        k
        for k, v in fresh.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, shipped.state_dict()[k])
    ]
    assert len(differ) > 0.9 * sum(v.is_floating_point() for v in fresh.state_dict().values())
    assert shipped.refine.out.weight.abs().max() > 0.01  # the zero-initialised refinement output has learned


@pytest.fixture(scope="module")
def pinned_scores() -> dict:
    return json.loads(PINNED.read_text())["scores"]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_shipped_weights_score_as_pinned_and_sharper_than_the_max_rule(shipped, pinned_scores, task):
    """Fed as the bundle feeds it (width-first arrays, docs/export.md), the network's mean Q^AB/F and SF on the
    task's samples equal the values pinned from the bundle's own outputs (``python -m scripts.pin_outputs``), and
    its spatial frequency is above the max rule's (its Q^AB/F is not: below max on PET, as on the test split)."""
    folder = SAMPLES / task
    names = sorted(p.name for p in (folder / "MRI").glob("*.png"))
    assert len(names) == 2, f"sample pairs in {folder}: {names}"
    scores = []
    for name in names:
        mri, other = _luma(folder / "MRI" / name), _luma(folder / TASKS[task] / name)
        pair = torch.from_numpy(np.stack([mri, other]).transpose(0, 2, 1).copy())[None].float()  # (1, 2, W, H)
        with torch.inference_mode():
            fused = shipped(pair)[0, 0].double().numpy().T  # back to (H, W)
        scores.append(compute_metrics(fused, mri, other, "cddfuse", list(SCORED)))
    network = {m: float(np.mean([s[m] for s in scores])) for m in SCORED}
    pinned = pinned_scores[task]
    # the pinned values come from the 8-bit output files: rounding moves them by far less than these tolerances
    assert network["Qabf"] == pytest.approx(pinned["network"]["Qabf"], abs=0.005), (network, pinned)
    assert network["SF"] == pytest.approx(pinned["network"]["SF"], rel=0.01), (network, pinned)
    assert network["SF"] > pinned["max"]["SF"], (network, pinned["max"])


def test_pinned_max_rule_scores_are_those_of_the_samples(pinned_scores):
    """The max-rule reference values are recomputed here from the samples, so a stale record cannot hide."""
    for task, modality in TASKS.items():
        scores = []
        for path in sorted((SAMPLES / task / "MRI").glob("*.png")):
            mri, other = _luma(path), _luma(SAMPLES / task / modality / path.name)
            scores.append(compute_metrics(np.maximum(mri, other), mri, other, "cddfuse", list(SCORED)))
        for m in SCORED:
            assert np.mean([s[m] for s in scores]) == pytest.approx(pinned_scores[task]["max"][m], abs=1e-3)
