"""End to end: ``configs/inference.json`` on the embedded samples with a mean-fusion network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from PIL import Image

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
CONFIG = BUNDLE_ROOT / "configs" / "inference.json"
SAMPLES = BUNDLE_ROOT / "docs" / "samples"
MEAN = {"_target_": "scripts.baselines.MeanFusion"}

# one main output per sample pair; colour (PET/SPECT) pairs add the grey Y fusion
EXPECTED = [
    "CT-MRI/34012_fused.png",
    "CT-MRI/34016_fused.png",
    "PET-MRI/30045_fused.png",
    "PET-MRI/30075_fused.png",
    "SPECT-MRI/3025_fused.png",
    "SPECT-MRI/40030_fused.png",
    "T1c-FLAIR/brats_2013_pat0001_1_z063_fused.nii.gz",
]
EXPECTED_Y = [
    "PET-MRI/30045_fused_y.png",
    "PET-MRI/30075_fused_y.png",
    "SPECT-MRI/3025_fused_y.png",
    "SPECT-MRI/40030_fused_y.png",
]


def _meta_file(tmp_path: Path) -> str:
    meta = BUNDLE_ROOT / "configs" / "metadata.json"
    if meta.exists():
        return str(meta)
    stub = tmp_path / "metadata.json"  # until the bundle ships its metadata
    stub.write_text('{"version": "0.0.1", "monai_version": "1.6.1", "pytorch_version": "2.13", "numpy_version": "2"}')
    return str(stub)


def _workflow(tmp_path: Path, **override) -> ConfigWorkflow:
    override = {"bundle_root": str(BUNDLE_ROOT), "network_def": MEAN, "load_pretrain": False, **override}
    wf = ConfigWorkflow(
        config_file=str(CONFIG),
        meta_file=_meta_file(tmp_path),
        logging_file=str(BUNDLE_ROOT / "configs" / "logging.conf"),
        workflow_type="infer",
        **override,
    )
    wf.initialize()
    return wf


def _outputs(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_inference_config_fuses_every_sample_pair(tmp_path: Path) -> None:
    out_dir = tmp_path / "fused"
    wf = _workflow(tmp_path, output_dir=str(out_dir))
    assert not wf.check_properties()
    assert type(wf.parser.get_parsed_content("network_def")).__name__ == "MeanFusion"
    assert json.loads(CONFIG.read_text())["network_def"]["_target_"] == "scripts.networks.ClinicalFMamba"
    wf.run()
    wf.finalize()
    assert _outputs(out_dir) == sorted(EXPECTED + EXPECTED_Y)
    summary = wf.parser.get_parsed_content("summary")
    assert (len(summary.written), len(summary.skipped), len(summary.failed)) == (7, 0, 0)
    for name in EXPECTED[2:6]:
        assert Image.open(out_dir / name).mode == "RGB"
    for name in EXPECTED[:2] + EXPECTED_Y:
        img = Image.open(out_dir / name)
        assert img.mode == "L" and img.size == (256, 256)
    ref = nib.load(SAMPLES / "BraTS-FLAIR-T1c" / "FLAIR" / "brats_2013_pat0001_1_z063.nii.gz")
    fused = nib.load(out_dir / EXPECTED[-1])
    assert fused.shape == ref.shape and np.array_equal(fused.affine, ref.affine)

    # a second run writes nothing and reports every pair as skipped
    stamps = {p: (out_dir / p).stat().st_mtime_ns for p in _outputs(out_dir)}
    wf2 = _workflow(tmp_path, output_dir=str(out_dir))
    wf2.run()
    summary2 = wf2.parser.get_parsed_content("summary")
    assert (len(summary2.written), len(summary2.skipped)) == (0, 7)
    assert stamps == {p: (out_dir / p).stat().st_mtime_ns for p in _outputs(out_dir)}


def test_dataset_dir_override_and_failed_pairs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for sub in ("CT-MRI/MRI", "CT-MRI/CT"):
        (data / sub).mkdir(parents=True)
    for name in ("34012.png", "34016.png"):
        (data / "CT-MRI" / "MRI" / name).write_bytes((SAMPLES / "CT-MRI" / "MRI" / name).read_bytes())
    (data / "CT-MRI" / "CT" / "34012.png").write_bytes((SAMPLES / "CT-MRI" / "CT" / "34012.png").read_bytes())
    Image.new("L", (128, 128)).save(data / "CT-MRI" / "CT" / "34016.png")  # wrong size: set aside, not fatal
    wf = _workflow(tmp_path, dataset_dir=str(data), output_dir=str(tmp_path / "out"))
    wf.run()
    summary = wf.parser.get_parsed_content("summary")
    assert _outputs(tmp_path / "out") == ["CT-MRI/34012_fused.png"]
    assert len(summary.failed) == 1 and "34016.png" in summary.failed[0][1]


def test_cli_run_with_datalist_and_output_dir(tmp_path: Path) -> None:
    out_dir = tmp_path / "cli"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", "configs/inference.json",
        "--meta_file", _meta_file(tmp_path),
        "--datalist", str(SAMPLES / "datalist.json"),
        "--output_dir", str(out_dir),
        "--network_def", '{"_target_": "scripts.baselines.MeanFusion"}',
        "--load_pretrain", "False",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=300, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert _outputs(out_dir) == sorted(EXPECTED + EXPECTED_Y)
    assert "selective-scan backend" in log and ("fusing 7 pairs (0 skipped: outputs exist) on c" in log)
    assert "7 pairs written, 0 skipped, 0 failed" in log


@pytest.mark.parametrize("bad", ["missing.csv", "empty.json"])
def test_bad_datalist_override_is_a_clear_error(tmp_path: Path, bad: str) -> None:
    if bad == "empty.json":
        (tmp_path / bad).write_text('{"testing": []}')
    wf = _workflow(tmp_path, datalist=str(tmp_path / bad), output_dir=str(tmp_path / "o"))
    with pytest.raises(Exception) as err:
        wf.run()
    assert bad in str(err.value) or bad in repr(err.value.__cause__)


TINY_NET = {
    "_target_": "scripts.networks.ClinicalFMamba",
    "features": [8, 8, 16],
    "depth": 1,
    "decoder_depth": 1,
    "d_state": 4,
    "swap_d_state": 4,
}


def test_network_weights_are_loaded_and_mismatched_weights_are_a_clear_error(tmp_path: Path) -> None:
    import torch

    from scripts.networks import ClinicalFMamba

    good = tmp_path / "good.pt"
    reference = ClinicalFMamba(**{k: v for k, v in TINY_NET.items() if k != "_target_"})
    torch.save({"model": reference.state_dict()}, good)
    wf = _workflow(
        tmp_path, network_def=TINY_NET, load_pretrain=True, ckpt_path=str(good), output_dir=str(tmp_path / "out")
    )
    loaded = wf.parser.get_parsed_content("network")
    assert all(torch.equal(a, b.cpu()) for a, b in zip(reference.state_dict().values(), loaded.state_dict().values()))

    other = tmp_path / "other.pt"
    torch.save(
        ClinicalFMamba(features=(8, 8, 32), depth=1, decoder_depth=1, d_state=4, swap_d_state=4).state_dict(), other
    )
    with pytest.raises(Exception) as err:
        wf = _workflow(
            tmp_path, network_def=TINY_NET, load_pretrain=True, ckpt_path=str(other), output_dir=str(tmp_path / "out2")
        )
        wf.run()
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__
    assert any("other.pt do not match the configured ClinicalFMamba" in m for m in chain)
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").rglob("*_fused*"))
