"""Stratified patient-level k-fold assignment, identical for every arm of the study."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.model_selection import StratifiedKFold

__all__ = ["fold_assignment", "stratified_patient_folds"]


def stratified_patient_folds(labels: Mapping[str, int], n_folds: int = 5, seed: int = 0) -> dict[str, int]:
    """Assign every patient to one of ``n_folds`` test folds, stratified by its (patient-level) label.

    The patients are sorted by id first, so the assignment depends only on the ids, labels, ``n_folds`` and
    ``seed`` (scikit-learn ``StratifiedKFold(shuffle=True, random_state=seed)``), never on the order of the
    input or on the arm being evaluated. Slices are never split: a patient's slices all follow the patient.

    Args:
        labels: patient id -> label (0/1).
        n_folds: k (>= 2, at most the size of the smaller class).
        seed: shuffling seed.

    Returns:
        patient id -> test fold index in ``range(n_folds)``.
    """
    patients = sorted(labels)
    y = np.asarray([int(labels[p]) for p in patients])
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    smallest = int(min(np.sum(y == 0), np.sum(y == 1)))
    if smallest < n_folds:
        raise ValueError(
            f"{n_folds}-fold stratification needs at least {n_folds} patients per class; "
            f"the smaller class has {smallest}"
        )
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=int(seed))
    out: dict[str, int] = {}
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(y)), y)):
        for i in test:
            out[patients[i]] = fold
    return out


def fold_assignment(labels: Mapping[str, int], n_folds: int, seeds: Sequence[int]) -> dict[int, dict[str, int]]:
    """``{seed: {patient: fold}}`` for every seed (the folds shared by all arms)."""
    return {int(s): stratified_patient_folds(labels, n_folds, int(s)) for s in seeds}
