"""The classification study: does a classifier do better on fused images than on either sequence alone?

:class:`ClassificationStudy` runs the whole protocol (``bundle/tumor_classification/configs/study.json``):

1. cohort: eligible patients (labelled, both sequences real), the excluded ones counted with reasons;
2. folds: stratified patient-level k-fold for each seed, computed once and shared by every arm and task;
3. arms: FLAIR alone, T1c alone, both as two channels, ClinicalFMamba-fused, mean- and max-fused (any list);
4. for each arm, seed, fold and task: a classifier trained with the fixed recipe (:mod:`.training`) on the
   training patients' slices, then scored on the test patients (out-of-fold) and on the training patients
   (only to fix the decision threshold);
5. statistics (:mod:`.stats`) and the report (:mod:`.report`).

Tasks:

- ``patient`` — the patient label (LGG: WHO grade III vs II). The classifier is trained on the tumour slices
  (``tumour == 1``; all slices when the cohort has no slice labels), every slice carrying its patient's label.
  A patient's score is the **mean of its tumour slices' probabilities** (``aggregation``: mean, median or max).
  Unit of analysis = patient.
- ``slice`` — tumour vs no tumour per slice, trained and scored on all slices. Unit of analysis = slice; the
  bootstrap still resamples patients.

Statistics per task and arm: ROC AUC of each test fold (mean ± sd over folds and seeds); per-seed pooled
out-of-fold AUC (mean ± sd over seeds); the **pooled out-of-fold score** of a unit = mean over seeds of its
out-of-fold probability, whose AUC gets a 95% percentile bootstrap CI (patients resampled); DeLong's paired test
and a paired patient-bootstrap CI of the AUC difference, fused arm vs each other arm, on the pooled scores;
F1, accuracy, sensitivity and specificity of each test fold at the threshold fixed on that fold's training
patients (``threshold_rule``: Youden's J by default, computed on the trained classifier's scores of its own
training units), mean ± sd over folds and seeds.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .arms import Arm, FusionArm, load_pairs
from .cohort import Cohort
from .folds import fold_assignment
from .report import write_report, write_roc_figure
from .stats import (
    aggregate_scores,
    auc,
    bootstrap_auc,
    choose_threshold,
    delong_test,
    paired_bootstrap_delta,
    threshold_metrics,
)
from .training import build_classifier, fit_classifier, predict_proba

__all__ = ["TASKS", "ClassificationStudy", "summarise"]

logger = logging.getLogger(__name__)

TASKS = ("patient", "slice")
RESULT_FILES = ("report.md", "results.csv", "comparisons.csv", "fold_metrics.csv", "predictions.csv", "folds.csv", "roc_curves.png", "run_info.json")


def _mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    if not rows:
        path.write_text("")
        return
    fields: list[str] = []
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def summarise(
    predictions: Sequence[Mapping[str, Any]],
    fold_metrics: Sequence[Mapping[str, Any]],
    arms: Sequence[str],
    fused_arm: str | None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Statistics from the out-of-fold predictions and per-fold metrics (pure function, no training).

    Args:
        predictions: rows ``task, arm, seed, fold, unit, patient, label, score`` (one per out-of-fold unit).
        fold_metrics: rows ``task, arm, seed, fold, auc, f1, accuracy, sensitivity, specificity``.
        arms: arm names in display order.
        fused_arm: the arm compared with every other (``None``: no comparisons).

    Returns:
        ``{"results": [...], "comparisons": [...], "roc": {task: {arm: (y, pooled_scores)}}}``.
    """
    results: list[dict[str, Any]] = []
    comparisons: list[dict[str, Any]] = []
    roc: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    tasks = [t for t in TASKS if any(r["task"] == t for r in predictions)]
    for task in tasks:
        pooled: dict[str, tuple[list[str], np.ndarray, np.ndarray, list[str]]] = {}
        for arm in arms:
            rows = [r for r in predictions if r["task"] == task and r["arm"] == arm]
            if not rows:
                continue
            seeds = sorted({int(r["seed"]) for r in rows})
            per_unit: dict[str, dict[int, float]] = {}
            meta: dict[str, tuple[int, str]] = {}
            for r in rows:
                per_unit.setdefault(str(r["unit"]), {})[int(r["seed"])] = float(r["score"])
                meta[str(r["unit"])] = (int(r["label"]), str(r["patient"]))
            units = sorted(u for u, d in per_unit.items() if len(d) == len(seeds))
            y = np.asarray([meta[u][0] for u in units])
            s = np.asarray([np.mean(list(per_unit[u].values())) for u in units])
            groups = [meta[u][1] for u in units]
            pooled[arm] = (units, y, s, groups)
            seed_aucs = []
            for sd in seeds:
                ys = [(int(r["label"]), float(r["score"])) for r in rows if int(r["seed"]) == sd]
                seed_aucs.append(auc([a for a, _ in ys], [b for _, b in ys]))
            fm = [r for r in fold_metrics if r["task"] == task and r["arm"] == arm]
            boot = bootstrap_auc(y, s, groups=groups, n_boot=n_boot, alpha=alpha, seed=seed)
            row: dict[str, Any] = {"task": task, "arm": arm, "n_patients": len(set(groups)), "n_units": len(units)}
            for key in ("auc", "f1", "accuracy", "sensitivity", "specificity"):
                m, sdv, n = _mean_sd([float(r[key]) for r in fm])
                row[f"{key}_mean"], row[f"{key}_sd"] = m, sdv
                if key == "auc":
                    row["n_folds_scored"] = n
            m, sdv, _ = _mean_sd(seed_aucs)
            row["seed_pooled_auc_mean"], row["seed_pooled_auc_sd"] = m, sdv
            row["pooled_auc"], row["pooled_auc_ci_low"], row["pooled_auc_ci_high"] = boot["auc"], boot["ci_low"], boot["ci_high"]
            results.append(row)
        roc[task] = {arm: (v[1], v[2]) for arm, v in pooled.items()}
        if fused_arm is None or fused_arm not in pooled:
            continue
        units_f, y_f, s_f, groups_f = pooled[fused_arm]
        for arm in arms:
            if arm == fused_arm or arm not in pooled:
                continue
            units_o, y_o, s_o, _ = pooled[arm]
            common = sorted(set(units_f) & set(units_o))
            fi = {u: i for i, u in enumerate(units_f)}
            oi = {u: i for i, u in enumerate(units_o)}
            yy = y_f[[fi[u] for u in common]]
            sf = s_f[[fi[u] for u in common]]
            so = s_o[[oi[u] for u in common]]
            gg = [groups_f[fi[u]] for u in common]
            comp: dict[str, Any] = {"task": task, "fused_arm": fused_arm, "other_arm": arm, "n_units": len(common)}
            if yy.all() or not yy.any():
                comparisons.append(comp)
                continue
            d = delong_test(yy, sf, so)
            b = paired_bootstrap_delta(yy, sf, so, groups=gg, n_boot=n_boot, alpha=alpha, seed=seed)
            significant = d["p"] < alpha and (b["ci_low"] > 0 or b["ci_high"] < 0)
            if significant:
                verdict = "fused better" if d["delta"] > 0 else "fused worse"
            else:
                verdict = "no significant difference"
            comp.update(
                {
                    "auc_fused": d["auc_a"],
                    "auc_other": d["auc_b"],
                    "delta_auc": d["delta"],
                    "delong_se": d["se"],
                    "delong_z": d["z"],
                    "delong_p": d["p"],
                    "bootstrap_delta_ci_low": b["ci_low"],
                    "bootstrap_delta_ci_high": b["ci_high"],
                    "bootstrap_p": b["p"],
                    "verdict": verdict,
                }
            )
            comparisons.append(comp)
    return {"results": results, "comparisons": comparisons, "roc": roc}


class ClassificationStudy:
    """The cross-validated classification study over input arms (see the module docstring).

    Args:
        cohort: the :class:`~.cohort.Cohort` (eligible patients only; exclusions recorded in it).
        arms: the input arms (:class:`~.arms.ChannelArm`, :class:`~.arms.FusionArm`); all use the same folds.
        classifier_def: callable building the classifier, called with ``{in_channels_arg: channels}`` (a MONAI
            network given with ``"_mode_": "callable"``), one logit output.
        fused_arm: name of the arm compared with all others (DeLong, bootstrap).
        tasks: subset of ``("patient", "slice")``.
        n_folds: k of the stratified patient-level k-fold.
        seeds: one fold assignment (and one set of classifier initialisations) per seed.
        folds_to_run: run only the first ``folds_to_run`` folds of each seed (smoke tests); ``None`` = all.
        image_size: the side the slices are resized to (the fusion runs at this size too).
        in_channels_arg: keyword of ``classifier_def`` that takes the number of input channels.
        epochs, batch_size, learning_rate, weight_decay, flip_prob, class_balance: the training recipe.
        aggregation: slice-to-patient score aggregation for the ``patient`` task (``mean``, ``median``, ``max``).
        threshold_rule: ``youden``, ``f1`` or a number; fixed on the training patients of each fold.
        n_boot, alpha, stats_seed: bootstrap resamples, 1 - CI level, bootstrap seed.
        output_dir: where the report, tables and figure go.
        cache_dir: where fused images are cached (keyed by cohort, size and fusion weights); ``None`` = no cache.
        overwrite: replace the results of an earlier run in ``output_dir`` (otherwise that is an error).
        device: where the classifiers train (``None``: CUDA if available, else CPU).
        num_threads: torch CPU threads (``None``: leave as is).
    """

    def __init__(
        self,
        cohort: Cohort,
        arms: Sequence[Arm],
        classifier_def: Callable[..., nn.Module],
        fused_arm: str | None = "clinicalfmamba",
        tasks: Sequence[str] = TASKS,
        n_folds: int = 5,
        seeds: Sequence[int] = (0, 1, 2),
        folds_to_run: int | None = None,
        image_size: int = 128,
        in_channels_arg: str = "n_input_channels",
        epochs: int = 5,
        batch_size: int = 32,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-4,
        flip_prob: float = 0.5,
        class_balance: bool = True,
        aggregation: str = "mean",
        threshold_rule: str | float = "youden",
        n_boot: int = 2000,
        alpha: float = 0.05,
        stats_seed: int = 0,
        output_dir: str | os.PathLike = "eval/study",
        cache_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        device: str | torch.device | None = None,
        num_threads: int | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        names = [a.name for a in arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown task(s) {sorted(unknown)}; choose from {TASKS}")
        if fused_arm is not None and fused_arm not in names:
            raise ValueError(f"fused_arm {fused_arm!r} is not one of the arms {names}")
        self.cohort = cohort
        self.arms = list(arms)
        self.classifier_def = classifier_def
        self.fused_arm = fused_arm
        self.tasks = [t for t in TASKS if t in tasks]
        if "slice" in self.tasks and not cohort.has_slice_labels:
            logger.warning("the cohort has no slice labels: the slice-level task is skipped")
            self.tasks.remove("slice")
        self.n_folds = int(n_folds)
        self.seeds = [int(s) for s in seeds]
        self.folds_to_run = self.n_folds if folds_to_run is None else max(1, min(int(folds_to_run), self.n_folds))
        self.image_size = int(image_size)
        self.in_channels_arg = in_channels_arg
        self.recipe = {
            "epochs": int(epochs),
            "batch_size": int(batch_size),
            "learning_rate": float(learning_rate),
            "weight_decay": float(weight_decay),
            "flip_prob": float(flip_prob),
            "class_balance": bool(class_balance),
        }
        self.aggregation = aggregation
        self.threshold_rule = threshold_rule
        self.n_boot, self.alpha, self.stats_seed = int(n_boot), float(alpha), int(stats_seed)
        self.output_dir = Path(output_dir)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.overwrite = bool(overwrite)
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.num_threads = num_threads
        self.config = dict(config or {})

    # ------------------------------------------------------------------------------------------------
    def _task_slices(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """Indices into ``cohort.slices`` used by ``task`` and the slice targets."""
        sl = self.cohort.slices
        if task == "patient":
            use_tumour = self.cohort.has_slice_labels
            idx = [i for i, s in enumerate(sl) if (s.tumour == 1 or not use_tumour)]
            target = [self.cohort.labels[sl[i].patient] for i in idx]
        else:
            idx = [i for i, s in enumerate(sl) if s.tumour is not None]
            target = [int(sl[i].tumour) for i in idx]
        return np.asarray(idx, dtype=np.int64), np.asarray(target, dtype=np.int64)

    def _unit_scores(self, task: str, idx: np.ndarray, target: np.ndarray, probs: np.ndarray) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
        """(units, patients, labels, scores): patients with aggregated scores, or the slices themselves."""
        sl = self.cohort.slices
        if task == "patient":
            patients = [sl[i].patient for i in idx]
            agg = aggregate_scores(patients, probs, self.aggregation)
            units = sorted(agg)
            return units, units, np.asarray([self.cohort.labels[u] for u in units]), np.asarray([agg[u] for u in units])
        units = [f"{sl[i].patient}/{sl[i].slice_id}" for i in idx]
        return units, [sl[i].patient for i in idx], target.copy(), probs

    def _check_output_dir(self) -> None:
        existing = [f for f in RESULT_FILES if (self.output_dir / f).exists()]
        if existing and not self.overwrite:
            raise FileExistsError(
                f"{self.output_dir} already holds study results ({', '.join(existing)}); pass --overwrite true or "
                "choose another --output_dir"
            )
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def run(self) -> dict[str, Any]:
        """Run the protocol and write the outputs; returns the summary (``results``, ``comparisons``, ...)."""
        t_start = time.perf_counter()
        self._check_output_dir()
        if self.num_threads:
            torch.set_num_threads(int(self.num_threads))
        summary = self.cohort.summary()
        logger.info(
            "cohort %s: %d eligible patients (%d positive / %d negative), %d slices; %d patients excluded %s",
            summary["cohort"],
            summary["n_patients"],
            summary["n_positive"],
            summary["n_negative"],
            summary["n_slices"],
            summary["n_excluded"],
            summary["excluded_reasons"],
        )
        folds = fold_assignment(self.cohort.labels, self.n_folds, self.seeds)
        fold_rows = [
            {"seed": s, "patient": p, "label": self.cohort.labels[p], "fold": f} for s in self.seeds for p, f in sorted(folds[s].items())
        ]
        t0 = time.perf_counter()
        pairs = load_pairs(self.cohort, self.image_size)
        load_seconds = time.perf_counter() - t0
        logger.info("loaded %d slice pairs at %dx%d in %.1f s", pairs.shape[0], self.image_size, self.image_size, load_seconds)
        task_data = {t: self._task_slices(t) for t in self.tasks}
        patient_of = np.asarray([s.patient for s in self.cohort.slices])

        predictions: list[dict[str, Any]] = []
        fold_metrics: list[dict[str, Any]] = []
        arm_info: list[dict[str, Any]] = []
        n_units_total = len(self.arms) * len(self.seeds) * self.folds_to_run
        done = 0
        train_seconds: list[float] = []
        cpu_seconds: list[float] = []
        t_train_start = time.perf_counter()
        for arm in self.arms:
            t_arm = time.perf_counter()
            images = arm.build(pairs, cache_dir=self.cache_dir, cache_key=f"{self.cohort.fingerprint()}")
            info = arm.describe()
            info["build_seconds"] = round(time.perf_counter() - t_arm, 1)
            arm_info.append(info)
            for seed in self.seeds:
                for fold in range(self.folds_to_run):
                    t_unit, c_unit = time.perf_counter(), time.process_time()
                    for ti, task in enumerate(self.tasks):
                        idx, target = task_data[task]
                        test_mask = np.asarray([folds[seed][p] == fold for p in patient_of[idx]])
                        tr, te = idx[~test_mask], idx[test_mask]
                        fit_seed = seed * 1000 + fold * 10 + ti
                        net = build_classifier(self.classifier_def, arm.in_channels, self.in_channels_arg, fit_seed)
                        fit = fit_classifier(net, images, target[~test_mask], tr, seed=fit_seed, device=self.device, **self.recipe)
                        p_tr = predict_proba(net, images, tr, device=self.device)
                        p_te = predict_proba(net, images, te, device=self.device)
                        _, _, y_tr, s_tr = self._unit_scores(task, tr, target[~test_mask], p_tr)
                        units, pats, y_te, s_te = self._unit_scores(task, te, target[test_mask], p_te)
                        thr = choose_threshold(y_tr, s_tr, self.threshold_rule)
                        m = threshold_metrics(y_te, s_te, thr)
                        a = auc(y_te, s_te)
                        fold_metrics.append(
                            {
                                "task": task,
                                "arm": arm.name,
                                "seed": seed,
                                "fold": fold,
                                "n_train_units": len(y_tr),
                                "n_test_units": len(y_te),
                                "n_train_slices": len(tr),
                                "auc": a,
                                "threshold": thr,
                                **m,
                                "train_auc": auc(y_tr, s_tr),
                                "final_train_loss": fit["epoch_loss"][-1] if fit["epoch_loss"] else math.nan,
                                "seconds": fit["seconds"],
                                "cpu_seconds": fit["cpu_seconds"],
                            }
                        )
                        predictions.extend(
                            {"task": task, "arm": arm.name, "seed": seed, "fold": fold, "unit": u, "patient": p, "label": int(yv), "score": float(sv)}
                            for u, p, yv, sv in zip(units, pats, y_te, s_te)
                        )
                        logger.info(
                            "arm %s seed %d fold %d/%d task %s: %d train / %d test units, fit %.1f s, test AUC %.3f",
                            arm.name, seed, fold + 1, self.n_folds, task, len(y_tr), len(y_te), fit["seconds"], a,
                        )
                    done += 1
                    train_seconds.append(time.perf_counter() - t_unit)
                    cpu_seconds.append(time.process_time() - c_unit)
                    rate = (time.perf_counter() - t_train_start) / done
                    logger.info("progress %d/%d arm-seed-fold units, %.1f s per unit, about %.1f min left", done, n_units_total, train_seconds[-1], rate * (n_units_total - done) / 60)
            del images
        arm_names = [a.name for a in self.arms]
        stats = summarise(predictions, fold_metrics, arm_names, self.fused_arm, self.n_boot, self.alpha, self.stats_seed)
        labels = {a.name: (a.label if isinstance(a, FusionArm) else a.name) for a in self.arms}
        weights = {a.name: getattr(a, "weights", "n/a") for a in self.arms}
        for r in stats["results"]:
            r["arm_label"] = labels[r["arm"]]
            r["fusion_weights"] = weights[r["arm"]]
        run_info = {
            "cohort": summary,
            "excluded_patients": dict(sorted(self.cohort.excluded.items())),
            "tasks": self.tasks,
            "arms": arm_info,
            "fused_arm": self.fused_arm,
            "n_folds": self.n_folds,
            "folds_run": self.folds_to_run,
            "seeds": self.seeds,
            "image_size": self.image_size,
            "classifier": repr(self.classifier_def),
            "recipe": self.recipe,
            "aggregation": self.aggregation,
            "threshold_rule": self.threshold_rule,
            "n_boot": self.n_boot,
            "alpha": self.alpha,
            "device": str(self.device),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "versions": _versions(),
            "seconds": {
                "total": round(time.perf_counter() - t_start, 1),
                "load_images": round(load_seconds, 1),
                "per_arm_seed_fold_mean": round(float(np.mean(train_seconds)), 2) if train_seconds else None,
                "per_arm_seed_fold_all": [round(x, 2) for x in train_seconds],
                "per_arm_seed_fold_cpu_mean": round(float(np.mean(cpu_seconds)), 2) if cpu_seconds else None,
                "fusion": {a["arm"]: a.get("fuse_seconds") for a in arm_info if a.get("kind") == "fusion"},
            },
            "config": self.config,
        }
        self._write(stats, predictions, fold_metrics, fold_rows, run_info, labels)
        logger.info("study finished in %.1f min; report: %s", (time.perf_counter() - t_start) / 60, self.output_dir / "report.md")
        return {**stats, "run_info": run_info, "predictions": predictions, "fold_metrics": fold_metrics}

    def _write(self, stats, predictions, fold_metrics, fold_rows, run_info, labels) -> None:
        """Write every result into a temporary folder beside them, then move the files into place: a failure
        while writing leaves no partial set of results."""
        with tempfile.TemporaryDirectory(dir=self.output_dir, prefix=".partial-") as tmp:
            out = Path(tmp)
            _write_csv(out / "results.csv", stats["results"])
            _write_csv(out / "comparisons.csv", stats["comparisons"])
            _write_csv(out / "fold_metrics.csv", fold_metrics)
            _write_csv(out / "predictions.csv", predictions)
            _write_csv(out / "folds.csv", fold_rows)
            write_roc_figure(out / "roc_curves.png", stats["roc"], labels, self.cohort, stats["results"])
            (out / "run_info.json").write_text(json.dumps(run_info, indent=2, default=str))
            write_report(out / "report.md", stats, run_info, self.cohort, labels)
            for path in sorted(out.iterdir()):
                os.replace(path, self.output_dir / path.name)


def _versions() -> dict[str, str]:
    import monai
    import sklearn

    return {"torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__}
