"""Builders of tiny (good and bad) inputs and runners of the bundle workflows for the reliability tests."""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, settings
from PIL import Image

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = BUNDLE_ROOT / "configs"
META = CONFIGS / "metadata.json"
LOGGING = CONFIGS / "logging.conf"
CLASSIFICATION = BUNDLE_ROOT / "bundle" / "tumor_classification"
MEAN = {"_target_": "scripts.baselines.MeanFusion"}
TINY_KW = {"features": [4, 8, 16], "depth": 1, "decoder_depth": 1, "d_state": 4, "swap_d_state": 4}
TINY_NET = {"_target_": "scripts.networks.ClinicalFMamba", **TINY_KW}

# the hypothesis profile of the property and fuzz tests: few, reproducible examples, no deadline
settings.register_profile(
    "reliability",
    max_examples=12,
    deadline=None,  # the first example pays for imports and caches
    derandomize=True,  # the same examples on every run: a CI failure reproduces locally
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
RELIABILITY = settings.get_profile("reliability")


def examples(n: int) -> int:
    """``n`` examples, scaled by the environment variable ``RELIABILITY_EXAMPLES`` (e.g. 20 for a long fuzzing run)."""
    return max(1, round(n * float(os.environ.get("RELIABILITY_EXAMPLES", "1"))))


# --- images ------------------------------------------------------------------------------------------


def texture(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A smooth, non-constant test image on 0..255 (float64)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    base = sum(np.sin((3 + i) * g + seed) for i, g in enumerate(grids))
    return np.clip(127 + 80 * base / len(shape) + 20 * rng.random(shape), 0, 255)


def png(path: Path, arr: np.ndarray | None = None, size: tuple[int, int] = (16, 12), seed: int = 0) -> Path:
    """Write an 8-bit PNG; ``arr`` is (H, W) grey or (H, W, 3|4) colour; default: a (H, W) = size texture."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = texture(size, seed) if arr is None else arr
    Image.fromarray(np.asarray(arr).astype(np.uint8)).save(path)
    return path


def nifti(
    path: Path, arr: np.ndarray | None = None, affine: np.ndarray | None = None, shape=(12, 10, 1), seed=0
) -> Path:
    """Write a float32 NIfTI (default: a texture of ``shape`` on a 1 mm grid)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = texture(shape, seed) if arr is None else arr
    affine = np.eye(4) if affine is None else affine
    nib.save(nib.Nifti1Image(np.asarray(arr, dtype=np.float32), affine), str(path))
    return path


def truncated(path: Path, source: Path, keep: float = 0.5) -> Path:
    """``path`` holding the first ``keep`` fraction of ``source``'s bytes."""
    data = source.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def nifti_bytes(arr: np.ndarray, affine: np.ndarray | None = None, gz: bool = False) -> bytes:
    """The bytes of a NIfTI-1 file (``.nii``, or gzipped ``.nii.gz``) of ``arr``."""
    img = nib.Nifti1Image(np.asarray(arr, dtype=np.float32), np.eye(4) if affine is None else affine)
    raw = img.to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_datalist(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """A CSV datalist; relative paths in ``rows`` are relative to its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or ["mri", "other"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def good_pair(folder: Path, pair_id: str = "p", task: str = "CT-MRI", size=(16, 12), split: str | None = None) -> dict:
    """A valid grey PNG pair written under ``folder``; returns its datalist row (relative paths)."""
    png(folder / "MRI" / f"{pair_id}.png", size=size, seed=1)
    png(folder / "CT" / f"{pair_id}.png", size=size, seed=2)
    row = {"task": task, "id": pair_id, "mri": f"MRI/{pair_id}.png", "other": f"CT/{pair_id}.png"}
    return {**row, "split": split} if split else row


# --- outputs and messages ------------------------------------------------------------------------------


def files_under(folder: Path) -> list[str]:
    """Every file (temporary ones included) under ``folder``, relative; ``[]`` if it does not exist."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def chain(err: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def messages(err: BaseException | None) -> str:
    """Every message of an exception chain (MONAI wraps config and transform errors)."""
    return "\n".join(f"{type(e).__name__}: {e}" for e in chain(err))


# --- workflows -------------------------------------------------------------------------------------------


def run_workflow(config_files: Sequence[Path], workflow_type: str, meta: Path = META, **override: Any):
    """Initialise and run a bundle workflow; returns ``(workflow, exception or None)``."""
    from monai.bundle import ConfigWorkflow

    wf = None
    try:
        wf = ConfigWorkflow(
            config_file=[str(c) for c in config_files],
            meta_file=str(meta),
            logging_file=str(LOGGING),
            workflow_type=workflow_type,
            **override,
        )
        wf.initialize()
        wf.run()
        wf.finalize()
    except Exception as e:  # noqa: BLE001 - the tests inspect it
        return wf, e
    return wf, None


def run_inference(out: Path, **override: Any):
    override = {"bundle_root": str(BUNDLE_ROOT), "network_def": MEAN, "load_pretrain": False, **override}
    return run_workflow([CONFIGS / "inference.json"], "infer", output_dir=str(out), **override)


def run_evaluate(out: Path, **override: Any):
    override = {
        "bundle_root": str(BUNDLE_ROOT),
        "method": "mean",
        "profile": "cddfuse",
        "metrics": ["SD", "Qabf"],
        "figure_cases": 0,
        "split": None,
        **override,
    }
    return run_workflow(
        [CONFIGS / "inference.json", CONFIGS / "evaluate.json"], "infer", output_dir=str(out), **override
    )


def run_train(out: Path, **override: Any):
    override = {
        "bundle_root": str(BUNDLE_ROOT),
        "network_def": {**TINY_NET, "spatial_dims": 2},
        "patch_size": [16, 16],
        "batch_size": 2,
        "val_interval": 1,
        "cache_rate": 0.0,
        "train#trainer#max_epochs": 1,
        **override,
    }
    return run_workflow([CONFIGS / "train.json"], "train", output_dir=str(out), **override)


def run_classification(config_names: Sequence[str], out: Path, **override: Any):
    """The companion bundle's config in this process: its own ``scripts`` package is imported in isolation (both
    bundles name their package ``scripts``), the fusion bundle (this repository) is given as ``fusion_bundle_dir``
    with a tiny untrained fusion network, and the CNN is the only classifier (the generic cohorts have no masks)."""
    from tumor_classification_scripts.fusion import bundle_imports

    files = [CLASSIFICATION / "configs" / n for n in config_names]
    override = {
        "bundle_root": str(CLASSIFICATION),
        "output_dir": str(out),
        "cache_dir": str(out.parent / "cache"),
        "n_folds": 2,
        "folds_to_run": 1,
        "seeds": [0],
        "epochs": 1,
        "batch_size": 4,
        "image_size": 16,
        "n_boot": 20,
        "classifiers": ["@cnn"],
        "classifier_def#block_inplanes": [4, 4, 4, 4],
        "fusion_bundle_dir": str(BUNDLE_ROOT),
        "fusion_ckpt": str(out.parent / "no_fusion_weights.pt"),
        "allow_untrained": True,
        "fusion_overrides": {
            "network_def#features": [4, 8],
            "network_def#dilations": [1, 3],
            "network_def#depth": 1,
            "network_def#decoder_depth": 1,
            "network_def#d_state": 4,
            "network_def#swap_d_state": 4,
        },
        **override,
    }
    with bundle_imports(CLASSIFICATION):
        return run_workflow(files, "infer", meta=CLASSIFICATION / "metadata.json", **override)


def cohort_csv(folder: Path, n_patients: int = 4, slices: int = 2, size: int = 16, rows_hook=None) -> Path:
    """A generic classification cohort CSV (two PNG sequences per slice, labels alternating 0/1)."""
    rows = []
    for p in range(n_patients):
        for k in range(slices):
            a = png(folder / f"P{p}_{k}_a.png", size=(size, size), seed=10 * p + k)
            b = png(folder / f"P{p}_{k}_b.png", size=(size, size), seed=10 * p + k + 5)
            rows.append({"patient": f"P{p}", "label": p % 2, "seq_a": a.name, "seq_b": b.name, "tumour": k % 2})
    if rows_hook is not None:
        rows = rows_hook(folder, rows)
    path = folder / "cohort.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["patient", "label", "seq_a", "seq_b"])
        writer.writeheader()
        writer.writerows(rows)
    return path
