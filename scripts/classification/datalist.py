"""Datalists and an evaluation handler for the companion bundle's MONAI ``train.json`` / ``evaluate.json``.

Those configs train or evaluate **one** classifier (one arm, one task, one fold) with MONAI engines
(``SupervisedTrainer`` / ``SupervisedEvaluator``), using the cohort, arms and recipe defined in ``study.json``
(they are layered on it). :class:`ArmData` prepares the arm's images once (fused images come from the same
cache as the study) and hands out MONAI datalists of in-memory items::

    {"image": (C, S, S) float tensor in [0, 1], "label": (1,) float tensor, "patient": str, "unit": str}
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from .arms import Arm, load_pairs
from .cohort import Cohort
from .folds import stratified_patient_folds
from .stats import aggregate_scores, bootstrap_auc, threshold_metrics

__all__ = ["ArmData", "PredictionWriter", "refuse_existing_outputs"]

logger = logging.getLogger(__name__)


class ArmData:
    """The images of one arm for one task, split by the patient folds of one seed.

    Args:
        cohort: the cohort.
        arms: the study's arms; ``arm`` picks one by name.
        arm: name of the arm.
        task: ``"patient"`` (slices with tumour, labelled with the patient label) or ``"slice"`` (all slices,
            tumour label).
        image_size: the study's image size.
        n_folds, seed: the fold assignment (identical to the study's for the same values).
        cache_dir: the study's fused-image cache.
    """

    def __init__(
        self,
        cohort: Cohort,
        arms: Sequence[Arm],
        arm: str,
        task: str = "patient",
        image_size: int = 128,
        n_folds: int = 5,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        by_name = {a.name: a for a in arms}
        if arm not in by_name:
            raise ValueError(f"unknown arm {arm!r}; choose one of {sorted(by_name)}")
        if task not in ("patient", "slice"):
            raise ValueError(f"task must be 'patient' or 'slice', got {task!r}")
        self.cohort, self.arm, self.task = cohort, by_name[arm], task
        self.image_size, self.cache_dir = int(image_size), cache_dir
        self.n_folds, self.seed = int(n_folds), int(seed)
        self._folds: dict[str, int] | None = None
        self._images: torch.Tensor | None = None

    @property
    def folds(self) -> dict[str, int]:
        """patient -> test fold (the study's assignment for the same ``n_folds`` and ``seed``)."""
        if self._folds is None:
            self._folds = stratified_patient_folds(self.cohort.labels, self.n_folds, self.seed)
        return self._folds

    @property
    def in_channels(self) -> int:
        return self.arm.in_channels

    @property
    def images(self) -> torch.Tensor:
        if self._images is None:
            pairs = load_pairs(self.cohort, self.image_size)
            self._images = self.arm.build(pairs, cache_dir=self.cache_dir, cache_key=self.cohort.fingerprint())
        return self._images

    def _selected(self, split: str, fold: int | None) -> list[int]:
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        use_tumour = self.cohort.has_slice_labels
        out = []
        for i, s in enumerate(self.cohort.slices):
            if self.task == "patient" and use_tumour and s.tumour != 1:
                continue
            if self.task == "slice" and s.tumour is None:
                continue
            if split != "all" and fold is not None and int(fold) >= 0:
                in_test = self.folds[s.patient] == int(fold)
                if (split == "test") != in_test:
                    continue
            out.append(i)
        return out

    def _label(self, i: int) -> int:
        s = self.cohort.slices[i]
        return int(self.cohort.labels[s.patient]) if self.task == "patient" else int(s.tumour)

    def datalist(self, split: str = "train", fold: int | None = 0) -> list[dict[str, Any]]:
        """Items of the ``split`` (``train`` = patients outside test fold ``fold``, ``test`` = inside it, ``all``;
        ``fold`` ``None`` or negative means all patients)."""
        images = self.images
        return [
            {
                "image": images[i].clone(),
                "label": torch.tensor([float(self._label(i))]),
                "patient": self.cohort.slices[i].patient,
                "unit": f"{self.cohort.slices[i].patient}/{self.cohort.slices[i].slice_id}",
            }
            for i in self._selected(split, fold)
        ]

    def pos_weight(self, split: str = "train", fold: int | None = 0) -> float:
        """``n_negative / n_positive`` of the split's slices (the study's class balance)."""
        y = np.asarray([self._label(i) for i in self._selected(split, fold)])
        n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
        return n_neg / n_pos if n_pos > 0 and n_neg > 0 else 1.0


def refuse_existing_outputs(paths: Sequence[str | os.PathLike], overwrite: bool = False) -> None:
    """Raise ``FileExistsError`` naming the outputs of ``paths`` that exist, unless ``overwrite``.

    Called by ``train.json`` / ``evaluate.json`` before anything runs, so that an earlier classifier or
    evaluation is never replaced silently.
    """
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"outputs exist and are not replaced: {', '.join(existing)}; pass --overwrite true to replace them, "
            "or choose another --ckpt_dir / --output_dir"
        )


class PredictionWriter:
    """Evaluator handler: collects slice probabilities, writes ``predictions.csv`` and ``summary.json``.

    The summary has the slice-level AUC and, for the ``patient`` task, the patient-level AUC of the aggregated
    scores (``aggregation`` of a patient's slice probabilities), each with a patient-resampled bootstrap CI,
    and F1 / accuracy at ``threshold``.
    """

    def __init__(self, output_dir: str | os.PathLike, task: str = "patient", aggregation: str = "mean", threshold: float = 0.5, n_boot: int = 2000, seed: int = 0) -> None:
        self.output_dir = Path(output_dir)
        self.task, self.aggregation, self.threshold = task, aggregation, float(threshold)
        self.n_boot, self.seed = int(n_boot), int(seed)
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        for b, o in zip(batch, output):
            self.rows.append(
                {
                    "unit": b["unit"],
                    "patient": b["patient"],
                    "label": int(float(torch.as_tensor(b["label"]).reshape(-1)[0])),
                    "score": float(torch.as_tensor(o["pred"]).reshape(-1)[0]),
                }
            )

    def summary(self) -> dict[str, Any]:
        y = np.asarray([r["label"] for r in self.rows])
        s = np.asarray([r["score"] for r in self.rows])
        g = [r["patient"] for r in self.rows]
        out: dict[str, Any] = {"task": self.task, "n_slices": len(self.rows), "n_patients": len(set(g)), "threshold": self.threshold}
        if len(np.unique(y)) == 2:
            out["slice_auc"] = bootstrap_auc(y, s, groups=g, n_boot=self.n_boot, seed=self.seed)
        if self.task == "patient":
            agg = aggregate_scores(g, s, self.aggregation)
            lab = {r["patient"]: r["label"] for r in self.rows}
            pats = sorted(agg)
            yp, sp = np.asarray([lab[p] for p in pats]), np.asarray([agg[p] for p in pats])
            out["aggregation"] = self.aggregation
            if len(np.unique(yp)) == 2:
                out["patient_auc"] = bootstrap_auc(yp, sp, n_boot=self.n_boot, seed=self.seed)
            out["patient_metrics"] = threshold_metrics(yp, sp, self.threshold)
        else:
            out["slice_metrics"] = threshold_metrics(y, s, self.threshold)
        return out

    def _write(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        summ = self.summary()  # before writing anything: a failure here leaves no file
        tmp = self.output_dir / f".predictions.csv.{os.getpid()}.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["unit", "patient", "label", "score"])
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.output_dir / "predictions.csv")
        tmp = self.output_dir / f".summary.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(summ, indent=2))
        os.replace(tmp, self.output_dir / "summary.json")
        logger.info("evaluation summary: %s", json.dumps(summ))
