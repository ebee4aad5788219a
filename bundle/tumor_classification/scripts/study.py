"""The classification study: does a classifier do better on fused images than on either sequence alone?

:class:`ClassificationStudy` runs the whole protocol (``configs/study.json``):

1. cohort: eligible patients (labelled, both sequences real), the excluded ones counted with reasons;
2. folds: stratified patient-level k-fold for each seed, computed once and shared by every arm, classifier and
   task;
3. arms: FLAIR alone, T1c alone, both as two channels, ClinicalFMamba-fused, mean- and max-fused (any list);
4. classifier families (:mod:`.classifiers`): a CNN trained on slices, radiomics + penalised logistic regression
   (with and without the mask's shape features), ...; for each arm, seed, fold, classifier and task, the
   classifier is fitted on the training patients only and scores the test patients (out-of-fold) and the
   training patients (only to fix the decision threshold);
5. optional external validation: each arm and classifier is fitted on **all** patients of the development
   cohort (per seed) and scores every patient of an external cohort;
6. statistics (:mod:`.stats`) and the report (:mod:`.report`), per classifier.

Tasks:

- ``patient`` — the patient label (LGG: WHO grade III vs II). Unit of analysis = patient.
- ``slice`` — tumour vs no tumour per slice (classifiers that see whole slices only). Unit = slice; the
  bootstrap still resamples patients.

Statistics per classifier, task and arm: ROC AUC of each test fold (mean ± sd over folds and seeds); per-seed
pooled out-of-fold AUC (mean ± sd over seeds); the **pooled out-of-fold score** of a unit = mean over seeds of
its out-of-fold score, whose AUC gets a 95% percentile bootstrap CI (patients resampled); DeLong's paired test
and a paired patient-bootstrap CI of the AUC difference, fused arm vs each other arm, on the pooled scores;
F1, accuracy, sensitivity and specificity of each test fold at the threshold fixed on that fold's training
patients (``threshold_rule``: Youden's J by default), mean ± sd over folds and seeds. External validation
reports the same statistics, a "fold" there being one seed's model trained on the whole development cohort.
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .arms import Arm, ChannelArm, FusionArm, load_masks, load_pairs
from .classifiers import ArmImages, Classifier
from .cohort import Cohort
from .folds import fold_assignment
from .report import write_report, write_roc_figure
from .stats import (
    auc,
    bootstrap_auc,
    choose_threshold,
    delong_test,
    paired_bootstrap_delta,
    threshold_metrics,
)

__all__ = ["TASKS", "ClassificationStudy", "summarise"]

logger = logging.getLogger(__name__)

TASKS = ("patient", "slice")
RESULT_FILES = (
    "report.md", "results.csv", "comparisons.csv", "fold_metrics.csv", "predictions.csv", "folds.csv",
    "roc_curves.png", "run_info.json", "external_results.csv", "external_comparisons.csv",
    "external_predictions.csv", "external_fold_metrics.csv", "external_roc_curves.png",
)  # fmt: skip


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
            row["pooled_auc"], row["pooled_auc_ci_low"], row["pooled_auc_ci_high"] = (
                boot["auc"],
                boot["ci_low"],
                boot["ci_high"],
            )
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


def summarise_by_classifier(
    predictions: Sequence[Mapping[str, Any]],
    fold_metrics: Sequence[Mapping[str, Any]],
    classifiers: Sequence[str],
    arms: Sequence[str],
    fused_arm: str | None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`summarise` for each classifier; rows get a leading ``classifier`` column and ``roc`` is keyed by
    classifier first."""
    out: dict[str, Any] = {"results": [], "comparisons": [], "roc": {}}
    for name in classifiers:
        p = [r for r in predictions if r["classifier"] == name]
        f = [r for r in fold_metrics if r["classifier"] == name]
        if not p:
            continue
        st = summarise(p, f, arms, fused_arm, n_boot, alpha, seed)
        out["results"] += [{"classifier": name, **r} for r in st["results"]]
        out["comparisons"] += [{"classifier": name, **r} for r in st["comparisons"]]
        out["roc"][name] = st["roc"]
    return out


class ClassificationStudy:
    """The cross-validated classification study over input arms and classifier families (module docstring).

    Args:
        cohort: the :class:`~.cohort.Cohort` (eligible patients only; exclusions recorded in it).
        arms: the input arms (:class:`~.arms.ChannelArm`, :class:`~.arms.FusionArm`); all use the same folds.
        classifiers: the classifier families (:class:`~.classifiers.CNNClassifier`,
            :class:`~.classifiers.RadiomicsClassifier`, ...); names must be unique.
        fused_arm: name of the arm compared with all others (DeLong, bootstrap).
        tasks: subset of ``("patient", "slice")``; each classifier runs the tasks it supports.
        n_folds: k of the stratified patient-level k-fold.
        seeds: one fold assignment (and one set of classifier initialisations) per seed.
        folds_to_run: run only the first ``folds_to_run`` folds of each seed (smoke tests); ``None`` = all.
        image_size: the side the slices are resized to (the fusion runs at this size too).
        threshold_rule: ``youden``, ``f1`` or a number; fixed on the training units of each fold.
        n_boot, alpha, stats_seed: bootstrap resamples, 1 - CI level, bootstrap seed.
        output_dir: where the report, tables and figures go.
        cache_dir: where fused images are cached (keyed by cohort, size and fusion weights); ``None`` = no cache.
        overwrite: replace the results of an earlier run in ``output_dir`` (otherwise that is an error).
        num_threads: torch CPU threads (``None``: leave as is).
        external_cohort: an external validation cohort (``None``: none); see the module docstring.
        progress: show a progress bar (tqdm) over the arm x seed x fold x classifier fits.
        config: values recorded in ``run_info.json``.
    """

    def __init__(
        self,
        cohort: Cohort,
        arms: Sequence[Arm],
        classifiers: Sequence[Classifier],
        fused_arm: str | None = "clinicalfmamba",
        tasks: Sequence[str] = TASKS,
        n_folds: int = 5,
        seeds: Sequence[int] = (0, 1, 2),
        folds_to_run: int | None = None,
        image_size: int = 128,
        threshold_rule: str | float = "youden",
        n_boot: int = 2000,
        alpha: float = 0.05,
        stats_seed: int = 0,
        output_dir: str | os.PathLike = "eval/study",
        cache_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        num_threads: int | None = None,
        external_cohort: Cohort | None = None,
        progress: bool = True,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        names = [a.name for a in arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        clf_names = [c.name for c in classifiers]
        if not clf_names or len(set(clf_names)) != len(clf_names):
            raise ValueError(f"give at least one classifier, with unique names; got {clf_names}")
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown task(s) {sorted(unknown)}; choose from {TASKS}")
        if fused_arm is not None and fused_arm not in names:
            raise ValueError(f"fused_arm {fused_arm!r} is not one of the arms {names}")
        self.cohort = cohort
        self.arms = list(arms)
        self.classifiers = list(classifiers)
        self.fused_arm = fused_arm
        self.tasks = [t for t in TASKS if t in tasks]
        if "slice" in self.tasks and not cohort.has_slice_labels:
            logger.warning("the cohort has no slice labels: the slice-level task is skipped")
            self.tasks.remove("slice")
        self.n_folds = int(n_folds)
        self.seeds = [int(s) for s in seeds]
        self.folds_to_run = self.n_folds if folds_to_run is None else max(1, min(int(folds_to_run), self.n_folds))
        self.image_size = int(image_size)
        self.threshold_rule = threshold_rule
        self.n_boot, self.alpha, self.stats_seed = int(n_boot), float(alpha), int(stats_seed)
        self.output_dir = Path(output_dir)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.overwrite = bool(overwrite)
        self.num_threads = num_threads
        self.external = external_cohort
        self.progress = bool(progress)
        self.config = dict(config or {})

    # ------------------------------------------------------------------------------------------------
    def _check_output_dir(self) -> None:
        existing = [f for f in RESULT_FILES if (self.output_dir / f).exists()]
        if existing and not self.overwrite:
            raise FileExistsError(
                f"{self.output_dir} already holds study results ({', '.join(existing)}); pass --overwrite true or "
                "choose another --output_dir"
            )
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def _jobs(self, clf: Classifier) -> list[str]:
        return [t for t in self.tasks if t in clf.tasks]

    def _arm_images(self, arm: Arm, cohort: Cohort, pairs: torch.Tensor, rois: np.ndarray | None) -> ArmImages:
        images = arm.build(pairs, cache_dir=self.cache_dir, cache_key=cohort.fingerprint())
        if isinstance(arm, ChannelArm):
            channel_names = [cohort.sequence_names[s].lower() for s in arm.sources]
        else:
            channel_names = [arm.name]
        return ArmImages(cohort, images, pairs, rois, channel_names)

    def _fit_score(
        self, clf: Classifier, task: str, train: ArmImages, train_p: list[str], test: ArmImages, test_p: list[str],
        fit_seed: int, row: dict[str, Any], predictions: list, fold_metrics: list,
    ) -> None:  # fmt: skip
        """Fit ``clf`` on ``train_p`` of ``train``, score ``test_p`` of ``test``, append the rows."""
        t0, c0 = time.perf_counter(), time.process_time()
        model = clf.fit(task, train, train_p, fit_seed)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        _, _, y_tr, s_tr = clf.predict(model, task, train, train_p)
        units, pats, y_te, s_te = clf.predict(model, task, test, test_p)
        thr = choose_threshold(y_tr, s_tr, self.threshold_rule)
        info = getattr(model, "fit_info", {}) or {}
        loss = info.get("epoch_loss")
        fold_metrics.append(
            {
                **row,
                "n_train_units": len(y_tr),
                "n_test_units": len(y_te),
                "auc": auc(y_te, s_te),
                "threshold": thr,
                **threshold_metrics(y_te, s_te, thr),
                "train_auc": auc(y_tr, s_tr),
                "final_train_loss": loss[-1] if loss else math.nan,
                "inner_cv_auc": info.get("inner_auc", math.nan),
                "selected": json.dumps(info["best_params"], sort_keys=True) if "best_params" in info else "",
                "seconds": seconds,
                "cpu_seconds": cpu,
            }
        )
        predictions.extend(
            {**row, "unit": u, "patient": p, "label": int(yv), "score": float(sv)}
            for u, p, yv, sv in zip(units, pats, y_te, s_te)
        )

    def run(self) -> dict[str, Any]:
        """Run the protocol and write the outputs; returns the summary (``results``, ``comparisons``, ...)."""
        t_start = time.perf_counter()
        self._check_output_dir()
        if self.num_threads:
            torch.set_num_threads(int(self.num_threads))
        summary = self.cohort.summary()
        logger.info(
            "cohort %s: %d eligible patients (%d positive / %d negative), %d slices; %d patients excluded %s",
            summary["cohort"], summary["n_patients"], summary["n_positive"], summary["n_negative"],
            summary["n_slices"], summary["n_excluded"], summary["excluded_reasons"],
        )  # fmt: skip
        folds = fold_assignment(self.cohort.labels, self.n_folds, self.seeds)
        fold_rows = [
            {"seed": s, "patient": p, "label": self.cohort.labels[p], "fold": f}
            for s in self.seeds
            for p, f in sorted(folds[s].items())
        ]
        need_masks = any(getattr(c, "needs_masks", False) for c in self.classifiers)
        t0 = time.perf_counter()
        pairs = load_pairs(self.cohort, self.image_size)
        rois = load_masks(self.cohort, self.image_size) if need_masks else None
        ext_pairs = load_pairs(self.external, self.image_size) if self.external is not None else None
        ext_rois = load_masks(self.external, self.image_size) if (self.external is not None and need_masks) else None
        load_seconds = time.perf_counter() - t0
        logger.info(
            "loaded %d slice pairs at %dx%d in %.1f s", pairs.shape[0], self.image_size, self.image_size, load_seconds
        )

        predictions: list[dict[str, Any]] = []
        fold_metrics: list[dict[str, Any]] = []
        ext_predictions: list[dict[str, Any]] = []
        ext_fold_metrics: list[dict[str, Any]] = []
        arm_info: list[dict[str, Any]] = []
        patients = self.cohort.patients
        n_fits = sum(len(self._jobs(c)) for c in self.classifiers) * len(self.arms) * len(self.seeds)
        n_fits *= self.folds_to_run + (1 if self.external is not None else 0)
        seconds: dict[str, list[float]] = {c.name: [] for c in self.classifiers}
        bar = tqdm(total=n_fits, desc="study fits", unit="fit", disable=not self.progress, dynamic_ncols=True)
        for arm in self.arms:
            t_arm = time.perf_counter()
            data = self._arm_images(arm, self.cohort, pairs, rois)
            ext = self._arm_images(arm, self.external, ext_pairs, ext_rois) if self.external is not None else None
            info = arm.describe()
            info["build_seconds"] = round(time.perf_counter() - t_arm, 1)
            arm_info.append(info)
            for seed in self.seeds:
                for fold in list(range(self.folds_to_run)) + ([-1] if ext is not None else []):
                    if fold >= 0:
                        train_p = [p for p in patients if folds[seed][p] != fold]
                        test_p = [p for p in patients if folds[seed][p] == fold]
                        test, preds, fms = data, predictions, fold_metrics
                    else:  # external validation: trained on every development patient
                        train_p, test_p = patients, ext.cohort.patients
                        test, preds, fms = ext, ext_predictions, ext_fold_metrics
                    for clf in self.classifiers:
                        for ti, task in enumerate(self._jobs(clf)):
                            t_fit = time.perf_counter()
                            fit_seed = seed * 1000 + (fold if fold >= 0 else 90) * 10 + ti
                            row = {"classifier": clf.name, "task": task, "arm": arm.name, "seed": seed, "fold": fold}
                            self._fit_score(clf, task, data, train_p, test, test_p, fit_seed, row, preds, fms)
                            seconds[clf.name].append(time.perf_counter() - t_fit)
                            what = f"{clf.name} {arm.name} seed {seed} fold {fold} {task}"
                            bar.set_postfix_str(f"{what}: AUC {fms[-1]['auc']:.3f}")
                            bar.update(1)
                            logger.debug("%s: test AUC %.3f", what, fms[-1]["auc"])
            del data, ext
        bar.close()
        arm_names = [a.name for a in self.arms]
        clf_names = [c.name for c in self.classifiers]
        common = (clf_names, arm_names, self.fused_arm, self.n_boot, self.alpha, self.stats_seed)
        stats = summarise_by_classifier(predictions, fold_metrics, *common)
        ext_stats = (
            summarise_by_classifier(ext_predictions, ext_fold_metrics, *common) if self.external is not None else None
        )
        labels = {a.name: (a.label if isinstance(a, FusionArm) else a.name) for a in self.arms}
        weights = {a.name: getattr(a, "weights", "n/a") for a in self.arms}
        for st in (stats, ext_stats):
            for r in (st or {}).get("results", []):
                r["arm_label"] = labels[r["arm"]]
                r["fusion_weights"] = weights[r["arm"]]
        run_info = {
            "cohort": summary,
            "excluded_patients": dict(sorted(self.cohort.excluded.items())),
            "external_cohort": self.external.summary() if self.external is not None else None,
            "tasks": self.tasks,
            "arms": arm_info,
            "classifiers": [{**c.describe(), "tasks": self._jobs(c)} for c in self.classifiers],
            "fused_arm": self.fused_arm,
            "n_folds": self.n_folds,
            "folds_run": self.folds_to_run,
            "seeds": self.seeds,
            "image_size": self.image_size,
            "threshold_rule": self.threshold_rule,
            "n_boot": self.n_boot,
            "alpha": self.alpha,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "versions": _versions(),
            "seconds": {
                "total": round(time.perf_counter() - t_start, 1),
                "load_images": round(load_seconds, 1),
                "per_fit_mean": {k: round(float(np.mean(v)), 2) for k, v in seconds.items() if v},
                "per_classifier_total": {k: round(float(np.sum(v)), 1) for k, v in seconds.items() if v},
                "fusion": {a["arm"]: a.get("fuse_seconds") for a in arm_info if a.get("kind") == "fusion"},
            },
            "config": self.config,
        }
        ext_out = (ext_stats, ext_predictions, ext_fold_metrics) if ext_stats is not None else None
        self._write(stats, predictions, fold_metrics, fold_rows, run_info, labels, ext_out)
        logger.info(
            "study finished in %.1f min; report: %s",
            (time.perf_counter() - t_start) / 60,
            self.output_dir / "report.md",
        )
        out = {**stats, "run_info": run_info, "predictions": predictions, "fold_metrics": fold_metrics}
        if ext_stats is not None:
            out["external"] = {**ext_stats, "predictions": ext_predictions, "fold_metrics": ext_fold_metrics}
        return out

    def _write(self, stats, predictions, fold_metrics, fold_rows, run_info, labels, external=None) -> None:
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
            if external is not None:
                ext_stats, ext_pred, ext_fm = external
                _write_csv(out / "external_results.csv", ext_stats["results"])
                _write_csv(out / "external_comparisons.csv", ext_stats["comparisons"])
                _write_csv(out / "external_predictions.csv", ext_pred)
                _write_csv(out / "external_fold_metrics.csv", ext_fm)
                write_roc_figure(
                    out / "external_roc_curves.png", ext_stats["roc"], labels, self.external, ext_stats["results"],
                    subtitle="external cohort, mean over seeds",
                )  # fmt: skip
            (out / "run_info.json").write_text(json.dumps(run_info, indent=2, default=str))
            write_report(out / "report.md", stats, run_info, self.cohort, labels, external[0] if external else None)
            for path in sorted(out.iterdir()):
                os.replace(path, self.output_dir / path.name)


def _versions() -> dict[str, str]:
    import monai
    import sklearn

    return {
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }
