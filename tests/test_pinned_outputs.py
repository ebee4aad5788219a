"""The shipped network through ``configs/inference.json`` on the embedded samples, with its outputs pinned.

``tests/pinned_outputs.json`` holds, for every output file, its mean and an 8 x 8 grid of block means on the
0-255 scale, recorded by ``python -m scripts.pin_outputs`` (rerun it when ``models/model.pt`` changes). A run
must agree within ``scripts.pin_outputs.TOLERANCE`` (0.5 grey levels) everywhere. The same run checks the
recipe of docs/export.md for calling the model with ordinary height-by-width arrays.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.pin_outputs import PINNED, TOLERANCE, compare, image_signature, read_output, run_samples, signatures

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = BUNDLE_ROOT / "docs" / "samples"
WEIGHTS = BUNDLE_ROOT / "models" / "model.pt"


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> Path:
    """The output folder of one run of ``configs/inference.json`` as shipped (samples, weights)."""
    out = tmp_path_factory.mktemp("pinned") / "fused"
    run_samples(out)
    return out


@pytest.fixture(scope="module")
def pinned() -> dict:
    return json.loads(PINNED.read_text())


def test_the_pinned_values_belong_to_the_shipped_weights(pinned):
    digest = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert pinned["weights_sha256"] == digest, "models/model.pt changed: run `python -m scripts.pin_outputs`"


def test_the_shipped_network_reproduces_the_pinned_outputs(fused, pinned):
    found = signatures(fused)
    assert len(found) == 11  # 7 pairs, 4 of them colour (+ their grey Y image)
    assert compare(found, pinned["outputs"]) == []


def test_the_comparison_catches_a_small_change(fused, pinned):
    """A change of one grey level in a 64 x 64 corner of one image (a wrong crop, a stray mask) is caught."""
    name = "CT-MRI/34012_fused.png"
    arr = read_output(fused / name)
    arr[:64, :64] = np.clip(arr[:64, :64] + 1 + TOLERANCE * 4, 0, 255)
    problems = compare({**signatures(fused), name: image_signature(arr)}, pinned["outputs"])
    assert len(problems) == 1 and problems[0].startswith(name)


def _export_recipe() -> dict:
    """The code block of docs/export.md's orientation section, executed."""
    text = (BUNDLE_ROOT / "docs" / "export.md").read_text()
    section = text.split("## Array orientation", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/export.md", "exec"), namespace)  # noqa: S102 - the documented recipe itself
    return namespace


@pytest.fixture(scope="module")
def exportable():
    """The shipped weights in the exportable network (what models/model.ts traces; equal to it to 1e-4)."""
    from scripts.export import ExportableClinicalFMamba
    from scripts.weights import load_network_weights

    definition = json.loads((BUNDLE_ROOT / "configs" / "inference.json").read_text())["network_def"]
    options = {k: v for k, v in definition.items() if not k.startswith("_") and k != "spatial_dims"}
    return load_network_weights(ExportableClinicalFMamba(**options), WEIGHTS).eval()


@pytest.mark.parametrize(("task", "modality", "pair_id"), [("CT-MRI", "CT", "34012"), ("PET-MRI", "PET", "30045")])
def test_the_documented_hw_recipe_gives_the_bundle_output(fused, exportable, task, modality, pair_id):
    recipe = _export_recipe()
    mri = recipe["luma"](SAMPLES / task / "MRI" / f"{pair_id}.png")
    other = recipe["luma"](SAMPLES / task / modality / f"{pair_id}.png")
    assert mri.shape == (256, 256) and other.shape == mri.shape
    out = np.rint(255 * recipe["fuse_hw"](exportable, mri, other)).clip(0, 255)
    name = f"{pair_id}_fused.png" if modality == "CT" else f"{pair_id}_fused_y.png"
    bundle = read_output(fused / task / name)
    assert out.shape == bundle.shape
    assert np.abs(out - bundle).max() <= 1.0
    # the orientation matters: the same arrays fed height-first give another image
    with torch.no_grad():
        wrong = exportable(torch.from_numpy(np.stack([recipe["unit"](mri), recipe["unit"](other)]))[None])[0, 0]
    assert np.abs(np.rint(255 * wrong.numpy()) - bundle).max() > 10
