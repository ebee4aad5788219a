"""Pinned outputs of the shipped network on the embedded samples, for ``tests/test_pinned_outputs.py``.

    python -m scripts.pin_outputs            # after replacing models/model.pt: rewrite tests/pinned_outputs.json
    python -m scripts.pin_outputs --check    # compare a fresh run with the pinned values, exit 1 on a difference

Runs ``configs/inference.json`` as shipped (``models/model.pt``, default input ``docs/samples``) into a temporary
folder and records, for every output file, its shape, the mean of its values on the 0-255 scale and the means of
an 8 x 8 grid of blocks (:func:`image_signature`), and per task the mean Q^AB/F and SF of the fused samples and of
the max rule (:func:`sample_scores`, read by ``tests/test_shipped_weights.py``). Block means, not checksums: the
selective-scan kernels round
differently on other CPUs (vector width, thread count), which can move a pixel of an 8-bit output by one grey
level; that moves a block mean by far less than :data:`TOLERANCE`, a wrong orientation, weight file or
pre-processing step by far more.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BLOCKS",
    "PINNED",
    "TOLERANCE",
    "compare",
    "image_signature",
    "read_output",
    "run_samples",
    "sample_scores",
    "signatures",
]

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
PINNED = BUNDLE_ROOT / "tests" / "pinned_outputs.json"
BLOCKS = 8
#: largest accepted difference of a block mean (and of the image mean), in grey levels of the 0-255 scale
TOLERANCE = 0.5


def read_output(path: str | Path) -> np.ndarray:
    """An output file as a float64 array on the 0-255 scale: PNG as stored (H, W[, 3]), NIfTI ``255 * values``."""
    path = Path(path)
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        return 255.0 * np.asarray(nib.load(str(path)).get_fdata(), dtype=np.float64)
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.float64)


def image_signature(arr: np.ndarray, blocks: int = BLOCKS) -> dict[str, Any]:
    """Shape, mean and the ``blocks`` x ``blocks`` grid of block means (over the first two axes, all channels)."""
    rows = np.array_split(np.arange(arr.shape[0]), blocks)
    cols = np.array_split(np.arange(arr.shape[1]), blocks)
    grid = [[round(float(arr[r[0] : r[-1] + 1, c[0] : c[-1] + 1].mean()), 3) for c in cols] for r in rows]
    return {"shape": list(arr.shape), "mean": round(float(arr.mean()), 3), "blocks": grid}


def run_samples(output_dir: str | Path, **override: Any) -> None:
    """Run ``configs/inference.json`` as shipped into ``output_dir`` (``override``: extra config values)."""
    from monai.bundle import ConfigWorkflow

    configs = BUNDLE_ROOT / "configs"
    wf = ConfigWorkflow(
        config_file=str(configs / "inference.json"),
        meta_file=str(BUNDLE_ROOT / "metadata.json"),
        logging_file=str(configs / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(BUNDLE_ROOT),
        output_dir=str(output_dir),
        **override,
    )
    wf.initialize()
    wf.run()
    wf.finalize()


def signatures(output_dir: str | Path) -> dict[str, dict[str, Any]]:
    """:func:`image_signature` of every file under ``output_dir``, by relative path."""
    root = Path(output_dir)
    return {str(p.relative_to(root)): image_signature(read_output(p)) for p in sorted(root.rglob("*")) if p.is_file()}


def compare(
    found: dict[str, dict[str, Any]], pinned: dict[str, dict[str, Any]], tolerance: float = TOLERANCE
) -> list[str]:
    """The differences between two sets of signatures beyond ``tolerance`` grey levels (empty: they agree)."""
    problems = []
    if sorted(found) != sorted(pinned):
        problems.append(f"output files {sorted(found)} differ from the pinned {sorted(pinned)}")
    for name in sorted(set(found) & set(pinned)):
        a, b = found[name], pinned[name]
        if a["shape"] != b["shape"]:
            problems.append(f"{name}: shape {a['shape']} vs pinned {b['shape']}")
            continue
        worst = float(np.abs(np.asarray(a["blocks"]) - np.asarray(b["blocks"])).max())
        if abs(a["mean"] - b["mean"]) > tolerance or worst > tolerance:
            problems.append(
                f"{name}: mean {a['mean']} vs pinned {b['mean']}, largest block-mean difference {worst:.3f}"
            )
    return problems


SCORED = ("Qabf", "SF")


def _luma(path: Path) -> np.ndarray:
    """A sample image as (H, W) on 0-255: grey as stored, colour as its BT.601 luma Y (the bundle's convention)."""
    from PIL import Image

    image = Image.open(path)
    if image.mode == "L":
        return np.asarray(image, dtype=np.float64)
    return np.asarray(image.convert("RGB"), dtype=np.float64) @ np.array([0.299, 0.587, 0.114])


def _unit(a: np.ndarray) -> np.ndarray:
    span = float(a.max() - a.min())
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


def sample_scores(output_dir: str | Path) -> dict[str, dict[str, dict[str, float]]]:
    """Per task, the mean Q^AB/F and SF (``cddfuse`` profile) of the fused PNG samples in ``output_dir`` and of
    the max rule on the same pairs: ``{task: {"network": {...}, "max": {...}}}``."""
    from scripts.metrics import compute_metrics

    items = json.loads((BUNDLE_ROOT / "docs" / "samples" / "datalist.json").read_text())["testing"]
    per_task: dict[str, dict[str, list[dict[str, float]]]] = {}
    for item in items:
        if not item["mri"].endswith(".png"):
            continue
        a, b = (_unit(_luma(BUNDLE_ROOT / "docs" / "samples" / item[k])) for k in ("mri", "other"))
        folder = Path(output_dir) / item["task"]
        grey = folder / f"{item['id']}_fused_y.png"
        fused = read_output(grey if grey.exists() else folder / f"{item['id']}_fused.png") / 255.0
        scores = per_task.setdefault(item["task"], {"network": [], "max": []})
        scores["network"].append(compute_metrics(fused, a, b, "cddfuse", list(SCORED)))
        scores["max"].append(compute_metrics(np.maximum(a, b), a, b, "cddfuse", list(SCORED)))
    return {
        task: {rule: {m: round(float(np.mean([s[m] for s in rows])), 4) for m in SCORED} for rule, rows in v.items()}
        for task, v in sorted(per_task.items())
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the pinned values instead of rewriting them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_samples(tmp)
        found = signatures(tmp)
        scores = sample_scores(tmp)
    if args.check:
        problems = compare(found, json.loads(PINNED.read_text())["outputs"])
        print("\n".join(problems) or f"all {len(found)} outputs agree with {PINNED.name} (tolerance {TOLERANCE})")
        sys.exit(1 if problems else 0)
    import hashlib

    weights = BUNDLE_ROOT / "models" / "model.pt"
    record = {
        "_desc_": "signatures of configs/inference.json's outputs on docs/samples with models/model.pt; "
        "regenerate with `python -m scripts.pin_outputs` when the weights change",
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "tolerance": TOLERANCE,
        "scores": scores,
        "outputs": found,
    }
    text = json.dumps(record, indent=1)
    # number lists (block rows, shapes) on one line each
    text = re.sub(r"\[\s+([-0-9.,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    PINNED.write_text(text + "\n")
    print(f"pinned {len(found)} outputs in {PINNED}")


if __name__ == "__main__":
    main()
