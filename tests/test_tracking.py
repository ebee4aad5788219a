"""``--tracking mlflow`` (MONAI's standard bundle experiment tracking) on ``configs/train.json``: a one-epoch run of
a tiny network records its training and validation metrics in a local MLflow store (SQLite file, no server)."""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import numpy as np
from monai.bundle import run
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY_NET = {
    "_target_": "scripts.networks.ClinicalFMamba",
    "spatial_dims": 2,
    "features": [8, 8, 16],
    "depth": 1,
    "decoder_depth": 1,
    "d_state": 4,
    "swap_d_state": 4,
}


def _pairs(root: Path, n: int = 5, size: int = 64) -> Path:
    """``n`` synthetic grey CT-MRI pairs in the Harvard layout, the last one for validation."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        for sub in ("MRI", "CT"):
            (root / "CT-MRI" / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / "CT-MRI" / sub / f"{i}.png")
        split = "val" if i == n - 1 else "train"
        rows.append({"task": "CT-MRI", "pair_id": i, "mri": f"CT-MRI/MRI/{i}.png", "other": f"CT-MRI/CT/{i}.png"})
        rows[-1]["split"] = split
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_mlflow_tracking_records_a_run_with_metrics(tmp_path: Path) -> None:
    uri = f"sqlite:///{(tmp_path / 'mlruns.db').as_posix()}"
    run(
        config_file=str(ROOT / "configs" / "train.json"),
        meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=str(ROOT / "configs" / "logging.conf"),
        bundle_root=str(ROOT),
        datalist=str(_pairs(tmp_path / "data")),
        output_dir=str(tmp_path / "run"),
        network_def=TINY_NET,
        patch_size=[32, 32],
        batch_size=2,
        val_interval=1,
        tracking="mlflow",
        tracking_uri=uri,
        experiment_name="clinicalfmamba_test",
        **{"train#trainer#max_epochs": 1},
    )
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("clinicalfmamba_test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    metrics = runs[0].data.metrics
    assert {"train_loss", "val_qabf", "val_ssim", "val_loss"} <= set(metrics)
    assert np.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert len(history) == 2  # one value per iteration: 4 training pairs, batch 2
    assert runs[0].data.params["max_epochs"] == "1"
    assert (tmp_path / "run" / "training_log.csv").is_file()  # the bundle's own log is still written
