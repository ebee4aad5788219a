"""Classifier families of the study: each is fitted on the training patients of a fold and scores other patients.

Every family sees the same :class:`ArmImages` (one arm's images of one cohort) and the same patient folds:

- :class:`CNNClassifier` — a MONAI 2-D network trained on slices with the recipe of :mod:`.training` (early
  stopping on an inner validation split of the training patients) on the inputs of :mod:`.cnn_inputs`
  (tumour-centred crops for the patient task, head crops without the mask for the slice task); a patient's
  score is the aggregate (mean by default) of its tumour slices' probabilities. Both tasks.
- :class:`RadiomicsClassifier` — one IBSI-named feature vector per patient (:mod:`.features`: intensity,
  histogram and GLCM texture inside the tumour mask of the stacked tumour slices, plus the mask's morphology
  unless ``with_shape=False``), then a scikit-learn pipeline fitted on the training patients only: drop constant
  features, standardise, keep the ``k`` best features (ANOVA F), L2-penalised logistic regression with balanced
  class weights; ``k`` and the penalty ``C`` are chosen by an inner stratified CV on the training patients
  (nested CV, ROC AUC). Patient task only: inside the tumour mask, the slice task (tumour vs none) would be
  answered by the mask itself.
- :class:`WholeSliceClassifier` — the slice task without the mask: whole-slice features of the head region
  (:func:`.features.whole_slice_features`, z-scored against the patient's own head over all its slices: a
  label-free normalisation that a pipeline reading the whole volume can do) per slice, then the same nested-CV
  pipeline fitted on the training patients' slices (the inner folds group slices by patient).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .cnn_inputs import INPUT_MODES, build_augmentation, cnn_inputs
from .cohort import Cohort
from .features import head_mask, patient_features, whole_slice_features
from .stats import aggregate_scores
from .training import (
    balanced_weights,
    build_classifier,
    fit_classifier,
    inner_validation_split,
    predict_proba,
)

__all__ = ["ArmImages", "CNNClassifier", "Classifier", "RadiomicsClassifier", "Scores", "WholeSliceClassifier"]

logger = logging.getLogger(__name__)

#: (units, patient of each unit, labels, scores)
Scores = tuple[list[str], list[str], np.ndarray, np.ndarray]


@dataclass
class ArmImages:
    """One arm's images of one cohort.

    Attributes:
        cohort: the cohort (slices in ``cohort.slices`` order).
        images: ``(N, C, S, S)`` float tensor in [0, 1], the arm's images.
        pairs: ``(N, 2, S, S)`` the input pairs (head masks are computed from them, the same in every arm).
        rois: ``(N, S, S)`` bool tumour masks, or ``None`` when the cohort has none.
        channel_names: names of the ``C`` channels (feature prefixes of a two-channel arm).
        cache: per-arm memo (e.g. the radiomics feature matrix).
    """

    cohort: Cohort
    images: torch.Tensor
    pairs: torch.Tensor
    rois: np.ndarray | None = None
    channel_names: Sequence[str] = ("image",)
    cache: dict[Any, Any] = field(default_factory=dict)

    def task_slices(self, task: str, patients: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Slice indices of ``patients`` used by ``task`` and their targets: tumour slices with the patient label
        (all slices when the cohort has no slice labels) for ``patient``; every labelled slice for ``slice``."""
        keep = set(patients)
        sl = self.cohort.slices
        if task == "patient":
            use_tumour = self.cohort.has_slice_labels
            idx = [i for i, s in enumerate(sl) if s.patient in keep and (s.tumour == 1 or not use_tumour)]
            target = [self.cohort.labels[sl[i].patient] for i in idx]
        else:
            idx = [i for i, s in enumerate(sl) if s.patient in keep and s.tumour is not None]
            target = [int(sl[i].tumour) for i in idx]
        return np.asarray(idx, dtype=np.int64), np.asarray(target, dtype=np.int64)

    @property
    def heads(self) -> np.ndarray:
        """``(N, S, S)`` bool head masks (:func:`.features.head_mask` of each input pair)."""
        if "heads" not in self.cache:
            self.cache["heads"] = np.stack([head_mask(p) for p in self.pairs.numpy()]) if len(self.pairs) else None
        return self.cache["heads"]


class Classifier:
    """A classifier family: ``fit`` on some patients of an :class:`ArmImages`, ``predict`` on others."""

    name: str
    tasks: tuple[str, ...]
    needs_masks: bool = False

    def fit(self, task: str, data: ArmImages, patients: Sequence[str], seed: int) -> Any:
        raise NotImplementedError

    def predict(self, model: Any, task: str, data: ArmImages, patients: Sequence[str]) -> Scores:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


class CNNClassifier(Classifier):
    """A MONAI 2-D network per arm, task and fold, trained with :func:`.training.fit_classifier`.

    Inputs (:func:`.cnn_inputs.cnn_inputs`): every slice z-scored inside its head region, then a square crop
    resized to ``input_size``: around the tumour mask for the patient task (``patient_input="tumour"``), around
    the head for the slice task (which never sees the mask). Training: per-sample weights that balance the
    classes (and, for the patient task, the patients: a patient with many tumour slices weighs as much as one
    with few), the MONAI augmentation of :func:`.cnn_inputs.build_augmentation`, at most ``epochs`` epochs with
    early stopping on an inner validation split of the **training patients** (``val_fraction`` of them, whole
    patients, stratified), the best epoch restored. A patient's score is the ``aggregation`` of its tumour
    slices' probabilities.

    Args:
        classifier_def: callable building the network, called with ``{in_channels_arg: channels}``; one logit.
        in_channels_arg: keyword of ``classifier_def`` for the number of input channels.
        epochs: maximum number of epochs; ``patience``: epochs without a better validation AUC before stopping.
        batch_size, learning_rate, weight_decay: AdamW training.
        val_fraction: share of the training patients held out for early stopping (0: no validation, all epochs).
        input_size: side of the network input; ``crop_margin``: margin around the tumour box on each side (a
            fraction of its size); ``min_crop_fraction``: smallest tumour box side, as a fraction of the image side.
        patient_input: ``"tumour"`` (crop around the mask) or ``"head"`` (the whole head) for the patient task.
        augment_prob, rotate_degrees, scale, translate_fraction, intensity_scale, intensity_shift: augmentation.
        patient_balance: weight the patient task's slices so that every patient counts the same.
        aggregation: slice-to-patient aggregation for the patient task (``mean``, ``median``, ``max``).
        device: where the network trains.
        name: the family's name in the results.
    """

    tasks = ("patient", "slice")

    def __init__(
        self,
        classifier_def: Callable[..., nn.Module],
        in_channels_arg: str = "n_input_channels",
        epochs: int = 40,
        patience: int = 8,
        batch_size: int = 32,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-4,
        val_fraction: float = 0.2,
        input_size: int = 64,
        crop_margin: float = 0.25,
        min_crop_fraction: float = 0.25,
        patient_input: str = "tumour",
        augment_prob: float = 0.5,
        rotate_degrees: float = 10.0,
        scale: float = 0.1,
        translate_fraction: float = 0.05,
        intensity_scale: float = 0.1,
        intensity_shift: float = 0.1,
        patient_balance: bool = True,
        aggregation: str = "mean",
        device: str | torch.device | None = None,
        name: str = "cnn",
    ) -> None:
        if patient_input not in INPUT_MODES:
            raise ValueError(f"patient_input must be one of {INPUT_MODES}, got {patient_input!r}")
        self.name = str(name)
        self.classifier_def = classifier_def
        self.in_channels_arg = in_channels_arg
        self.recipe = {
            "epochs": int(epochs),
            "batch_size": int(batch_size),
            "learning_rate": float(learning_rate),
            "weight_decay": float(weight_decay),
            "patience": int(patience),
        }
        self.val_fraction = float(val_fraction)
        self.inputs_spec = {
            "size": int(input_size),
            "margin": float(crop_margin),
            "min_side_fraction": float(min_crop_fraction),
        }
        self.patient_input = patient_input
        self.augment_spec = {
            "prob": float(augment_prob),
            "rotate_degrees": float(rotate_degrees),
            "scale": float(scale),
            "translate_fraction": float(translate_fraction),
            "intensity_scale": float(intensity_scale),
            "intensity_shift": float(intensity_shift),
            "size": int(input_size),
        }
        self.patient_balance = bool(patient_balance)
        self.aggregation = aggregation
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device if device is not None else auto)

    @property
    def needs_masks(self) -> bool:  # type: ignore[override]
        return self.patient_input == "tumour"

    def input_mode(self, task: str) -> str:
        """``"tumour"`` or ``"head"``: the crop the task's images get (the slice task never sees the mask)."""
        return self.patient_input if task == "patient" else "head"

    def inputs(self, data: ArmImages, task: str) -> torch.Tensor:
        """``(N, C, input_size, input_size)`` network inputs of every slice of ``data`` for ``task`` (memoised)."""
        mode = self.input_mode(task)
        key = ("cnn_inputs", mode, tuple(sorted(self.inputs_spec.items())))
        if key not in data.cache:
            rois = data.rois if mode == "tumour" else None
            x, fallbacks = cnn_inputs(data.images, data.heads, rois, mode, **self.inputs_spec)
            lost = sum(bool(f) and s.tumour == 1 for f, s in zip(fallbacks, data.cohort.slices))
            if lost:
                logger.info("%s: %d tumour slice(s) with a mask empty at image_size get the head crop", self.name, lost)
            data.cache[key] = x
        return data.cache[key]

    def fit(self, task: str, data: ArmImages, patients: Sequence[str], seed: int) -> nn.Module:
        idx, target = data.task_slices(task, patients)
        images = self.inputs(data, task)
        groups = [data.cohort.slices[i].patient for i in idx]
        tr, va = inner_validation_split(idx, target, groups, self.val_fraction, seed)
        balance_patients = task == "patient" and self.patient_balance
        weights = balanced_weights(target[tr], [groups[i] for i in tr] if balance_patients else None)
        augment = build_augmentation(seed, dihedral=self.input_mode(task) == "tumour", **self.augment_spec)
        net = build_classifier(self.classifier_def, images.shape[1], self.in_channels_arg, seed)
        fit = fit_classifier(
            net, images, target[tr], idx[tr], seed=seed, sample_weights=weights, augment=augment,
            val_index=idx[va], val_targets=target[va], device=self.device, **self.recipe,
        )  # fmt: skip
        fit["val_patients"] = sorted({groups[i] for i in va})
        # the study's fold table: the early-stopping choice (as the feature families' inner-CV choice)
        fit["best_params"] = {"best_epoch": fit["best_epoch"], "epochs_run": fit["epochs_run"]}
        if fit["val_auc"]:
            fit["inner_auc"] = fit["val_auc"][fit["best_epoch"] - 1]
        net.fit_info = fit  # type: ignore[attr-defined]
        return net

    def predict(self, model: nn.Module, task: str, data: ArmImages, patients: Sequence[str]) -> Scores:
        idx, target = data.task_slices(task, patients)
        probs = predict_proba(model, self.inputs(data, task), idx, device=self.device)
        sl = data.cohort.slices
        if task == "patient":
            agg = aggregate_scores([sl[i].patient for i in idx], probs, self.aggregation)
            units = sorted(agg)
            return units, units, np.asarray([data.cohort.labels[u] for u in units]), np.asarray([agg[u] for u in units])
        units = [f"{sl[i].patient}/{sl[i].slice_id}" for i in idx]
        return units, [sl[i].patient for i in idx], target.copy(), probs

    def describe(self) -> dict[str, Any]:
        return {
            "classifier": self.name,
            "kind": "cnn",
            "network": repr(self.classifier_def),
            "recipe": self.recipe,
            "val_fraction": self.val_fraction,
            "inputs": {**self.inputs_spec, "patient_task": self.patient_input, "slice_task": "head"},
            "augmentation": self.augment_spec,
            "patient_balance": self.patient_balance,
            "aggregation": self.aggregation,
        }


class RadiomicsClassifier(Classifier):
    """Radiomics features per patient + penalised logistic regression with nested CV (see the module docstring).

    Args:
        with_shape: include the morphology features (identical across arms); ``False`` = image features only.
        n_bins: grey levels of the fixed-bin-number discretisation for the histogram and GLCM features.
        c_grid: candidate inverse penalties ``C`` of the L2 logistic regression.
        k_grid: candidate numbers of features kept by the univariate filter (capped at the number available).
        inner_folds: folds of the inner stratified CV that picks ``C`` and ``k`` on the training patients.
        name: the family's name in the results.
    """

    tasks = ("patient",)
    needs_masks = True

    def __init__(
        self,
        with_shape: bool = True,
        n_bins: int = 32,
        c_grid: Sequence[float] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
        k_grid: Sequence[int] = (5, 10, 20),
        inner_folds: int = 5,
        name: str | None = None,
    ) -> None:
        self.with_shape = bool(with_shape)
        self.name = str(name) if name else ("radiomics" if with_shape else "radiomics_image")
        self.n_bins = int(n_bins)
        self.c_grid = [float(c) for c in c_grid]
        self.k_grid = [int(k) for k in k_grid]
        self.inner_folds = int(inner_folds)

    def features(self, data: ArmImages) -> tuple[list[str], np.ndarray, list[str]]:
        """(patients, ``(P, F)`` feature matrix, feature names) of every patient of ``data`` (memoised)."""
        key = ("radiomics", self.with_shape, self.n_bins)
        if key in data.cache:
            return data.cache[key]
        if data.rois is None:
            raise ValueError(
                f"cohort {data.cohort.name}: radiomics needs tumour masks; give a 'mask' column in the cohort table"
            )
        images, heads = data.images.numpy(), data.heads
        patients = data.cohort.patients
        rows = []
        for p in patients:
            idx, _ = data.task_slices("patient", [p])
            idx = idx[data.rois[idx].any(axis=(1, 2))]  # slices whose (resized) mask kept some tumour
            rows.append(
                patient_features(
                    images[idx], data.rois[idx], heads[idx], self.n_bins, data.channel_names, self.with_shape
                )
            )
        names = sorted(rows[0]) if rows else []
        x = np.asarray([[r[n] for n in names] for r in rows], dtype=np.float64)
        data.cache[key] = (patients, x, names)
        return data.cache[key]

    def _rows(self, data: ArmImages, patients: Sequence[str]) -> np.ndarray:
        all_p, x, _ = self.features(data)
        pos = {p: i for i, p in enumerate(all_p)}
        missing = [p for p in patients if p not in pos]
        if missing:
            raise ValueError(f"no radiomics features for patient(s) {missing[:5]} (no tumour slice with a mask)")
        return x[[pos[p] for p in patients]]

    def build_model(self, n_features: int, seed: int) -> Any:
        """The scikit-learn estimator: inner-CV grid search over ``k`` and ``C`` of the pipeline."""
        from sklearn.feature_selection import SelectKBest, VarianceThreshold, f_classif
        from sklearn.impute import SimpleImputer
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV, StratifiedKFold
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        pipe = Pipeline(
            [
                ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
                ("constant", VarianceThreshold(0.0)),
                ("scale", StandardScaler()),
                ("select", SelectKBest(f_classif)),
                ("lr", LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000)),
            ]
        )
        ks = sorted({min(k, n_features) for k in self.k_grid})
        grid = {"select__k": ks, "lr__C": self.c_grid}
        inner = StratifiedKFold(self.inner_folds, shuffle=True, random_state=int(seed))
        return GridSearchCV(pipe, grid, scoring="roc_auc", cv=inner, refit=True, n_jobs=1, error_score=0.5)

    def fit(self, task: str, data: ArmImages, patients: Sequence[str], seed: int) -> Any:
        if task != "patient":
            raise ValueError(f"classifier {self.name} scores patients only (task 'patient'), not {task!r}")
        x = self._rows(data, patients)
        y = np.asarray([data.cohort.labels[p] for p in patients])
        n_inner = int(min(np.bincount(y, minlength=2)))
        model = self.build_model(x.shape[1], seed)
        if n_inner < self.inner_folds:
            model.cv.n_splits = max(2, n_inner)
        import warnings

        from threadpoolctl import threadpool_limits

        # one BLAS thread: tiny problems, and several BLAS threads on a shared CPU are ~20x slower here
        with warnings.catch_warnings(), threadpool_limits(limits=1):
            warnings.simplefilter("ignore")  # constant features inside an inner fold, perfect separation
            model.fit(x, y)
        model.fit_info = {"best_params": model.best_params_, "inner_auc": float(model.best_score_)}
        return model

    def predict(self, model: Any, task: str, data: ArmImages, patients: Sequence[str]) -> Scores:
        units = sorted(patients)
        x = self._rows(data, units)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1):
            s = model.predict_proba(x)[:, 1]
        return units, units, np.asarray([data.cohort.labels[p] for p in units]), np.asarray(s, dtype=np.float64)

    def describe(self) -> dict[str, Any]:
        return {
            "classifier": self.name,
            "kind": "radiomics",
            "shape_features": self.with_shape,
            "n_bins": self.n_bins,
            "c_grid": self.c_grid,
            "k_grid": self.k_grid,
            "inner_folds": self.inner_folds,
        }


class WholeSliceClassifier(RadiomicsClassifier):
    """Slice-level tumour vs no tumour from whole-slice features (no tumour mask), L2 logistic regression with
    nested CV over ``k`` and ``C`` (inner folds split by patient). Arguments as :class:`RadiomicsClassifier`."""

    tasks = ("slice",)
    needs_masks = False

    def __init__(self, name: str = "wholeslice", **kwargs: Any) -> None:
        super().__init__(with_shape=False, name=name, **kwargs)

    def slice_features(self, data: ArmImages) -> tuple[np.ndarray, list[str]]:
        """``(N, F)`` features of every slice of ``data`` (memoised) and their names."""
        key = ("wholeslice", self.n_bins)
        if key not in data.cache:
            images, heads = data.images.numpy(), data.heads
            ref: dict[str, list[tuple[float, float]]] = {}
            for p in data.cohort.patients:  # label-free, per patient: its head pixels over all its slices
                own = [i for i, s in enumerate(data.cohort.slices) if s.patient == p]
                values = [images[own, c][heads[own]] for c in range(images.shape[1])]
                ref[p] = [(float(v.mean()), float(v.std())) for v in values]
            sl = data.cohort.slices
            rows = [
                whole_slice_features(images[i], heads[i], self.n_bins, data.channel_names, ref[sl[i].patient])
                for i in range(len(images))
            ]
            names = sorted(rows[0]) if rows else []
            data.cache[key] = (np.asarray([[r[n] for n in names] for r in rows], dtype=np.float64), names)
        return data.cache[key]

    def fit(self, task: str, data: ArmImages, patients: Sequence[str], seed: int) -> Any:
        if task != "slice":
            raise ValueError(f"classifier {self.name} scores slices only (task 'slice'), not {task!r}")
        import warnings

        from sklearn.model_selection import StratifiedGroupKFold
        from threadpoolctl import threadpool_limits

        idx, y = data.task_slices("slice", patients)
        x = self.slice_features(data)[0][idx]
        groups = [data.cohort.slices[i].patient for i in idx]
        model = self.build_model(x.shape[1], seed)
        model.cv = StratifiedGroupKFold(min(self.inner_folds, len(set(groups))), shuffle=True, random_state=int(seed))
        with warnings.catch_warnings(), threadpool_limits(limits=1):
            warnings.simplefilter("ignore")
            model.fit(x, y, groups=groups)
        model.fit_info = {"best_params": model.best_params_, "inner_auc": float(model.best_score_)}
        return model

    def predict(self, model: Any, task: str, data: ArmImages, patients: Sequence[str]) -> Scores:
        from threadpoolctl import threadpool_limits

        idx, y = data.task_slices("slice", patients)
        with threadpool_limits(limits=1):
            s = model.predict_proba(self.slice_features(data)[0][idx])[:, 1]
        sl = data.cohort.slices
        units = [f"{sl[i].patient}/{sl[i].slice_id}" for i in idx]
        return units, [sl[i].patient for i in idx], y.copy(), np.asarray(s, dtype=np.float64)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "kind": "wholeslice"}
