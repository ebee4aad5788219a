"""Statistics of the classification study: AUC, DeLong test, patient-level bootstrap, thresholds.

Everything here works on plain 1-D arrays (labels in {0, 1}, real-valued scores; higher score = more
likely positive) and is deterministic for a given ``seed``.

- :func:`auc` — ROC AUC by mid-ranks (Mann-Whitney), ties counted 1/2; equals scikit-learn's
  ``roc_auc_score`` (tested).
- :func:`delong_components` / :func:`delong_variance` / :func:`delong_test` — DeLong, DeLong & Clarke-Pearson
  (Biometrics 1988) structural components with the fast mid-rank computation of Sun & Xu (IEEE SPL 2014);
  paired two-sided z-test of two AUCs measured on the same units. Identical score vectors give
  ``delta = 0`` and ``p = 1``.
- :func:`bootstrap_auc` / :func:`paired_bootstrap_delta` — percentile bootstrap with **cluster (patient)
  resampling**: patients are drawn with replacement and every unit (slice) of a drawn patient enters with the
  patient's multiplicity. With one unit per patient this is the ordinary bootstrap.
- :func:`aggregate_scores` — slice scores to one score per patient (mean, median or max).
- :func:`choose_threshold` / :func:`threshold_metrics` — a decision threshold fixed on training data
  (Youden's J, best F1, or a fixed value) and F1 / accuracy / sensitivity / specificity at that threshold.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata

__all__ = [
    "aggregate_scores",
    "auc",
    "bootstrap_auc",
    "choose_threshold",
    "delong_components",
    "delong_test",
    "delong_variance",
    "paired_bootstrap_delta",
    "threshold_metrics",
]


def _as_binary(y: Any) -> np.ndarray:
    y = np.asarray(y).astype(float).ravel()
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    return y.astype(bool)


def _as_scores(s: Any, n: int) -> np.ndarray:
    s = np.asarray(s, dtype=float)
    if s.ndim == 1:
        s = s[None]
    if s.shape[-1] != n:
        raise ValueError(f"{s.shape[-1]} scores for {n} labels")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s


def auc(y: Any, s: Any) -> float:
    """ROC AUC of scores ``s`` for binary labels ``y`` (mid-ranks, ties = 1/2); NaN if one class is absent."""
    y = _as_binary(y)
    s = _as_scores(s, y.size)[0]
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - m * (m + 1) / 2.0) / (m * n))


def delong_components(y: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and DeLong structural components of one or several score vectors on the same units.

    Args:
        y: (N,) labels in {0, 1}.
        scores: (N,) or (K, N) scores.

    Returns:
        ``(aucs (K,), v10 (K, m), v01 (K, n))``: ``v10[k, i]`` is the fraction of negatives that positive ``i``
        out-scores (ties 1/2) and ``v01[k, j]`` the fraction of positives that out-score negative ``j``; their
        means both equal the AUC.
    """
    y = _as_binary(y)
    s = _as_scores(scores, y.size)
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        raise ValueError("DeLong needs at least one positive and one negative unit")
    pos, neg = s[:, y], s[:, ~y]
    k = s.shape[0]
    tx = np.empty((k, m))
    ty = np.empty((k, n))
    tz = np.empty((k, m + n))
    for r in range(k):  # Sun & Xu: mid-ranks within positives, within negatives, and overall
        tx[r] = rankdata(pos[r])
        ty[r] = rankdata(neg[r])
        tz[r] = rankdata(np.concatenate([pos[r], neg[r]]))
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return aucs, v10, v01


def delong_variance(y: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance matrix ``S10 / m + S01 / n`` (sample covariances, ddof = 1)."""
    aucs, v10, v01 = delong_components(y, scores)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(aucs), len(aucs)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(aucs), len(aucs)))
    return aucs, s10 / m + s01 / n


def delong_test(y: Any, scores_a: Any, scores_b: Any) -> dict[str, float]:
    """Paired two-sided DeLong test of ``AUC(a) - AUC(b)`` on the same units.

    Returns:
        dict with ``auc_a``, ``auc_b``, ``delta`` (a - b), ``se`` (of the difference), ``z`` and ``p``.
        When the difference has zero variance (e.g. identical score vectors) ``z = 0`` and ``p = 1`` if
        ``delta == 0``; a non-zero delta with zero variance gives ``p = 0``.
    """
    aucs, cov = delong_variance(y, np.stack([np.asarray(scores_a, float), np.asarray(scores_b, float)]))
    delta = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    if se <= 1e-12:
        z, p = (0.0, 1.0) if abs(delta) <= 1e-12 else (math.copysign(math.inf, delta), 0.0)
    else:
        z = delta / se
        p = float(2.0 * norm.sf(abs(z)))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "delta": delta, "se": se, "z": z, "p": min(p, 1.0)}


def _group_index(groups: Sequence[Hashable] | None, n: int) -> tuple[np.ndarray, int]:
    if groups is None:
        return np.arange(n), n
    _, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    if inverse.size != n:
        raise ValueError(f"{inverse.size} groups for {n} units")
    return inverse, int(inverse.max()) + 1


def _resampled_aucs(
    y: np.ndarray, s: np.ndarray, groups: Sequence[Hashable] | None, n_boot: int, seed: int
) -> np.ndarray:
    """(n_boot, K) AUCs of cluster-bootstrap resamples (NaN where a resample lacks a class)."""
    idx, n_groups = _group_index(groups, y.size)
    members = [np.flatnonzero(idx == g) for g in range(n_groups)]
    rng = np.random.default_rng(seed)
    out = np.full((n_boot, s.shape[0]), np.nan)
    for b in range(n_boot):
        drawn = rng.integers(0, n_groups, size=n_groups)
        units = np.concatenate([members[g] for g in drawn])
        yb = y[units]
        if yb.all() or not yb.any():
            continue
        for k in range(s.shape[0]):
            out[b, k] = auc(yb, s[k, units])
    return out


def bootstrap_auc(
    y: Any,
    s: Any,
    groups: Sequence[Hashable] | None = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """AUC with a percentile bootstrap CI; ``groups`` (e.g. patient ids per slice) are resampled as clusters.

    Returns:
        dict with ``auc`` (the point estimate on the original data, equal to scikit-learn's), ``ci_low``,
        ``ci_high``, ``n_boot`` (resamples used) and ``n_skipped`` (resamples with a single class, dropped).
    """
    yb = _as_binary(y)
    sb = _as_scores(s, yb.size)[:1]
    boots = _resampled_aucs(yb, sb, groups, n_boot, seed)[:, 0]
    valid = boots[np.isfinite(boots)]
    lo, hi = np.quantile(valid, [alpha / 2, 1 - alpha / 2]) if valid.size else (math.nan, math.nan)
    return {
        "auc": auc(yb, sb[0]),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "n_boot": int(valid.size),
        "n_skipped": int(n_boot - valid.size),
    }


def paired_bootstrap_delta(
    y: Any,
    scores_a: Any,
    scores_b: Any,
    groups: Sequence[Hashable] | None = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """Bootstrap CI of ``AUC(a) - AUC(b)`` with the same (cluster) resamples for both arms.

    Returns:
        dict with ``delta``, ``ci_low``, ``ci_high`` and ``p`` (two-sided, ``2 * min(P(d* <= 0), P(d* >= 0))``,
        capped at 1), ``n_boot`` and ``n_skipped``.
    """
    yb = _as_binary(y)
    s = np.stack([_as_scores(scores_a, yb.size)[0], _as_scores(scores_b, yb.size)[0]])
    boots = _resampled_aucs(yb, s, groups, n_boot, seed)
    d = boots[:, 0] - boots[:, 1]
    d = d[np.isfinite(d)]
    if d.size == 0:
        lo = hi = p = math.nan
    else:
        lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2])
        p = min(1.0, 2.0 * min(np.mean(d <= 0), np.mean(d >= 0)))
    return {
        "delta": auc(yb, s[0]) - auc(yb, s[1]),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "p": float(p),
        "n_boot": int(d.size),
        "n_skipped": int(n_boot - d.size),
    }


def aggregate_scores(
    groups: Sequence[Hashable], scores: Sequence[float], method: str = "mean"
) -> dict[Hashable, float]:
    """One score per group (patient) from its units' scores: ``mean`` (default), ``median`` or ``max``."""
    reducers = {"mean": np.mean, "median": np.median, "max": np.max}
    if method not in reducers:
        raise ValueError(f"unknown aggregation {method!r}; choose one of {sorted(reducers)}")
    buckets: dict[Hashable, list[float]] = {}
    for g, v in zip(groups, scores):
        buckets.setdefault(g, []).append(float(v))
    return {g: float(reducers[method](v)) for g, v in buckets.items()}


def choose_threshold(y: Any, s: Any, rule: str | float = "youden") -> float:
    """A decision threshold from (training) labels and scores; predicted positive iff ``score >= threshold``.

    Args:
        rule: ``"youden"`` (maximise sensitivity + specificity - 1), ``"f1"`` (maximise F1), or a number
            (used as is, e.g. 0.5).

    Ties between candidate thresholds go to the one closest to the median score; the candidates are midpoints
    between consecutive distinct scores (plus both ends), so the threshold never sits exactly on a training
    score.
    """
    if not isinstance(rule, str):
        return float(rule)
    yb = _as_binary(y)
    sb = _as_scores(s, yb.size)[0]
    if yb.all() or not yb.any():
        return float(np.median(sb))
    u = np.unique(sb)
    candidates = np.concatenate([[u[0] - 1e-6], (u[:-1] + u[1:]) / 2.0, [u[-1] + 1e-6]])
    best, best_val = None, -math.inf
    med = float(np.median(sb))
    for t in candidates:
        pred = sb >= t
        tp = float(np.sum(pred & yb))
        fp = float(np.sum(pred & ~yb))
        fn = float(np.sum(~pred & yb))
        tn = float(np.sum(~pred & ~yb))
        if rule == "youden":
            val = tp / (tp + fn) + tn / (tn + fp) - 1.0
        elif rule == "f1":
            val = 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0
        else:
            raise ValueError(f"unknown threshold rule {rule!r}; use 'youden', 'f1' or a number")
        if val > best_val + 1e-12 or (abs(val - best_val) <= 1e-12 and abs(t - med) < abs(best - med)):
            best, best_val = float(t), val
    return float(best)


def threshold_metrics(y: Any, s: Any, threshold: float) -> dict[str, float]:
    """F1 (positive class), accuracy, sensitivity and specificity of ``score >= threshold``."""
    yb = _as_binary(y)
    pred = _as_scores(s, yb.size)[0] >= threshold
    tp = float(np.sum(pred & yb))
    fp = float(np.sum(pred & ~yb))
    fn = float(np.sum(~pred & yb))
    tn = float(np.sum(~pred & ~yb))
    nan = float("nan")
    return {
        "f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else nan,
        "accuracy": (tp + tn) / yb.size if yb.size else nan,
        "sensitivity": tp / (tp + fn) if (tp + fn) > 0 else nan,
        "specificity": tn / (tn + fp) if (tn + fp) > 0 else nan,
    }
