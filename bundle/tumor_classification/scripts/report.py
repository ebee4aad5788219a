"""Markdown report and ROC figure of the classification study."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cohort import Cohort

__all__ = ["conclusion_lines", "results_markdown", "write_report", "write_roc_figure"]

TASK_TITLES = {"patient": "patient level", "slice": "slice level"}


def _f(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def _pm(m: Any, s: Any) -> str:
    if m is None or (isinstance(m, float) and not math.isfinite(m)):
        return "n/a"
    return f"{m:.3f} ± {_f(s)}"


def _p(p: Any) -> str:
    if p is None or (isinstance(p, float) and not math.isfinite(p)):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def task_title(task: str, cohort: Cohort) -> str:
    what = cohort.label_name if task == "patient" else cohort.slice_label_name
    return f"{TASK_TITLES[task]}: {what}"


def results_markdown(
    results: Sequence[Mapping[str, Any]], comparisons: Sequence[Mapping[str, Any]], task: str, labels: Mapping[str, str]
) -> str:
    """The results table of one task (one row per arm)."""
    comp = {c["other_arm"]: c for c in comparisons if c["task"] == task and "delta_auc" in c}
    lines = [
        "| arm | units | AUC per fold (mean ± sd) | pooled OOF AUC [95% CI] | per-seed pooled AUC | F1 | accuracy "
        "| ΔAUC fused − arm | DeLong p | bootstrap 95% CI of Δ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["task"] != task:
            continue
        c = comp.get(r["arm"])
        lines.append(
            "| {arm} | {n} | {fold} | {pooled} [{lo}, {hi}] | {seedp} | {f1} | {acc} | {d} | {p} | {ci} |".format(
                arm=labels.get(r["arm"], r["arm"]),
                n=r["n_units"],
                fold=_pm(r["auc_mean"], r["auc_sd"]),
                pooled=_f(r["pooled_auc"]),
                lo=_f(r["pooled_auc_ci_low"]),
                hi=_f(r["pooled_auc_ci_high"]),
                seedp=_pm(r["seed_pooled_auc_mean"], r["seed_pooled_auc_sd"]),
                f1=_pm(r["f1_mean"], r["f1_sd"]),
                acc=_pm(r["accuracy_mean"], r["accuracy_sd"]),
                d=f"{c['delta_auc']:+.3f}" if c else "—",
                p=_p(c["delong_p"]).lstrip("= ") if c else "—",
                ci=f"[{c['bootstrap_delta_ci_low']:+.3f}, {c['bootstrap_delta_ci_high']:+.3f}]" if c else "—",
            )
        )
    return "\n".join(lines)


def conclusion_lines(
    stats: Mapping[str, Any], run_info: Mapping[str, Any], cohort: Cohort, labels: Mapping[str, str]
) -> list[str]:
    """Plain statements: does the fused arm beat each single-sequence arm (and the others), with CI and p."""
    fused = run_info.get("fused_arm")
    if not fused:
        return ["No fused arm was named, so no comparison is made."]
    res = {(r["task"], r["arm"]): r for r in stats["results"]}
    single = [a["arm"] for a in run_info["arms"] if a.get("kind") == "channels" and len(a.get("sources", [])) == 1]
    out = []
    untrained = any(a["arm"] == fused and a.get("weights") == "untrained" for a in run_info["arms"])
    if untrained:
        out.append(
            f"**Warning: the fused arm `{fused}` used a fusion network WITHOUT trained weights (random initialisation; "
            "the fusion bundle had no `models/model.pt`). Its numbers say nothing about ClinicalFMamba; rerun the "
            "study after training the fusion bundle.**"
        )
        out.append("")
    for task in run_info["tasks"]:
        rf = res.get((task, fused))
        if rf is None:
            continue
        comps = [c for c in stats["comparisons"] if c["task"] == task and "delta_auc" in c]
        beats_single = [c for c in comps if c["other_arm"] in single and c["verdict"] == "fused better"]
        head = (
            f"**{task_title(task, cohort)}** — fused arm `{labels.get(fused, fused)}`: pooled out-of-fold AUC "
            f"{_f(rf['pooled_auc'])} [95% CI {_f(rf['pooled_auc_ci_low'])}, {_f(rf['pooled_auc_ci_high'])}]. "
        )
        if single:
            if len(beats_single) == len([c for c in comps if c["other_arm"] in single]) and beats_single:
                head += (
                    "The fused arm **beats every single-sequence arm** on this cohort "
                    "(DeLong p < α and bootstrap CI of Δ excluding 0)."
                )
            elif beats_single:
                head += "The fused arm beats **some but not all** single-sequence arms on this cohort."
            else:
                head += (
                    "The fused arm **does not beat the single-sequence arms** on this cohort (no significant AUC gain)."
                )
        out.append(head)
        out.append("")
        for c in comps:
            ro = res[(task, c["other_arm"])]
            kind = "single-sequence" if c["other_arm"] in single else "other"
            out.append(
                f"- vs `{c['other_arm']}` ({kind}): AUC {_f(c['auc_fused'])} vs {_f(c['auc_other'])} "
                f"[{_f(ro['pooled_auc_ci_low'])}, {_f(ro['pooled_auc_ci_high'])}], ΔAUC {c['delta_auc']:+.3f} "
                f"(bootstrap 95% CI {c['bootstrap_delta_ci_low']:+.3f} to {c['bootstrap_delta_ci_high']:+.3f}), "
                f"DeLong p {_p(c['delong_p'])} → {c['verdict']}."
            )
        out.append("")
    return out


def _cnn_inputs_text(c: Mapping[str, Any]) -> str:
    """What the CNN saw per task and how it stopped (empty for a CNN entry without these keys)."""
    inputs = c.get("inputs")
    if not isinstance(inputs, Mapping):
        return ""
    size = inputs.get("size")
    return (
        f"; inputs z-scored inside the head, {size}x{size} crops around the {inputs.get('patient_task')} "
        f"(patient task) and the {inputs.get('slice_task')} (slice task, never the mask); early stopping on "
        f"{c.get('val_fraction')} of the training patients, best epoch restored"
    )


def _classifier_text(c: Mapping[str, Any]) -> str:
    if c.get("kind") == "cnn":
        return (
            f"`{c['classifier']}`: CNN `{c['network']}` trained on slices, recipe {c['recipe']}"
            + _cnn_inputs_text(c)
            + f"; patient score = {c['aggregation']} of its tumour-slice probabilities"
        )
    if c.get("kind") == "radiomics":
        what = "intensity, histogram and GLCM texture inside the tumour mask" + (
            " plus the mask's 2-D shape (identical in every arm)" if c.get("shape_features") else " (no shape features)"
        )
        return (
            f"`{c['classifier']}`: one radiomics vector per patient ({what}; {c['n_bins']} grey levels), then "
            f"univariate selection of k in {c['k_grid']} features and L2 logistic regression with C in {c['c_grid']}, "
            f"k and C chosen by a {c['inner_folds']}-fold inner CV on the training patients only"
        )
    if c.get("kind") == "wholeslice":
        return (
            f"`{c['classifier']}`: per slice, features of the whole head region without the tumour mask (z-scored per "
            f"patient; {c['n_bins']} grey levels), univariate selection of k in {c['k_grid']} features and L2 logistic "
            f"regression with C in {c['c_grid']}, chosen by a {c['inner_folds']}-fold inner CV grouped by patient on "
            "the training patients only"
        )
    return f"`{c['classifier']}`: {c}"


def _subset(stats: Mapping[str, Any], name: str) -> dict[str, Any]:
    return {
        "results": [r for r in stats["results"] if r["classifier"] == name],
        "comparisons": [c for c in stats["comparisons"] if c["classifier"] == name],
    }


def _sections(
    stats: Mapping[str, Any], run_info: Mapping[str, Any], cohort: Cohort, labels: Mapping[str, str], level: str
) -> list[str]:
    lines: list[str] = []
    for c in run_info["classifiers"]:
        sub = _subset(stats, c["classifier"])
        if not sub["results"]:
            continue
        info = {**run_info, "tasks": c["tasks"]}
        lines += [f"{level} Classifier `{c['classifier']}`", "", *conclusion_lines(sub, info, cohort, labels), ""]
        for task in c["tasks"]:
            lines += [
                f"{level}# {c['classifier']} — {task_title(task, cohort)}",
                "",
                results_markdown(sub["results"], sub["comparisons"], task, labels),
                "",
            ]
    return lines


def write_report(
    path: Path,
    stats: Mapping[str, Any],
    run_info: Mapping[str, Any],
    cohort: Cohort,
    labels: Mapping[str, str],
    external: Mapping[str, Any] | None = None,
) -> None:
    summ = run_info["cohort"]
    excluded = run_info.get("excluded_patients", {})
    reasons = summ["excluded_reasons"]
    secs = run_info["seconds"]
    lines = [
        "# Tumour classification study: fused vs single-sequence inputs",
        "",
        f"Cohort `{summ['cohort']}`: **{summ['n_patients']} eligible patients** ({summ['n_positive']} positive = "
        f"{cohort.label_name}, {summ['n_negative']} negative), {summ['n_slices']} slices "
        f"({summ['n_tumour_slices']} with tumour). Sequences: A = {summ['sequences'][0]}, B = {summ['sequences'][1]}.",
        f"**Excluded: {summ['n_excluded']} patients** — "
        + (", ".join(f"{n} × {r}" for r, n in sorted(reasons.items())) if reasons else "none")
        + (f" ({', '.join(sorted(excluded))})." if excluded else "."),
        "",
        f"Protocol: stratified patient-level {run_info['n_folds']}-fold cross-validation"
        + (
            f" (only the first {run_info['folds_run']} fold(s) run)"
            if run_info["folds_run"] != run_info["n_folds"]
            else ""
        )
        + f", seeds {run_info['seeds']}, the same folds for every arm and classifier; slices resized to "
        f"{run_info['image_size']}×{run_info['image_size']}. Threshold rule for F1/accuracy: "
        f"{run_info['threshold_rule']} on each fold's training units. Bootstrap: {run_info['n_boot']} resamples of "
        f"patients, {100 * (1 - run_info['alpha']):.0f}% percentile CI. Pooled out-of-fold (OOF) score of a unit = "
        "mean over seeds of its out-of-fold score; DeLong and the paired bootstrap compare these pooled scores.",
        "",
        "Classifiers:",
        "",
        *[f"- {_classifier_text(c)}; tasks: {', '.join(c['tasks'])}." for c in run_info["classifiers"]],
        "",
        "Arms: "
        + "; ".join(
            f"`{a['arm']}` = "
            + (
                f"channel(s) {a['sources']}"
                if a["kind"] == "channels"
                else f"{a['module']} fusion, weights: {a['weights']}"
            )
            for a in run_info["arms"]
        ),
        "",
        "A difference is called significant when DeLong's p < α **and** the patient-resampled bootstrap CI of ΔAUC "
        "excludes 0 (at slice level DeLong treats slices as independent, the bootstrap does not).",
        "",
        "## Cross-validated results",
        "",
        *_sections(stats, run_info, cohort, labels, "###"),
        "![ROC curves](roc_curves.png)",
        "",
    ]
    if external is not None:
        ext = run_info["external_cohort"]
        lines += [
            "## External validation",
            "",
            f"Every arm and classifier trained on all {summ['n_patients']} patients of `{summ['cohort']}` "
            "(once per seed), "
            f"then scored on the external cohort `{ext['cohort']}`: {ext['n_patients']} patients ({ext['n_positive']} "
            f"positive, {ext['n_negative']} negative), {ext['n_slices']} slices. Pooled score = mean over seeds; the "
            '"AUC per fold" column is per seed. Files `external_results.csv`, `external_comparisons.csv`, '
            "`external_predictions.csv`.",
            "",
            *_sections(external, run_info, cohort, labels, "###"),
            "![external ROC curves](external_roc_curves.png)",
            "",
        ]
    per_fit = ", ".join(f"{k} {v} s" for k, v in secs["per_fit_mean"].items())
    lines += [
        f"Time: {secs['total'] / 60:.1f} min in total; mean per fit: {per_fit}; {run_info['torch_threads']} torch "
        f"thread(s), {run_info['cpu_count']} CPUs.",
        "",
        "Files: `results.csv` (these tables), `comparisons.csv` (fused vs each arm), `fold_metrics.csv`, "
        "`predictions.csv` (out-of-fold scores), `folds.csv` (fold of every patient per seed), `run_info.json`.",
        "",
    ]
    path.write_text("\n".join(lines))


def write_roc_figure(
    path: Path,
    roc: Mapping[str, Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]]],
    labels: Mapping[str, str],
    cohort: Cohort,
    results: Sequence[Mapping[str, Any]],
    subtitle: str = "pooled out-of-fold, mean over seeds",
) -> None:
    """One panel per classifier and task: ROC curves of every arm (``roc[classifier][task][arm] = (y, s)``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    panels = [(c, t) for c in roc for t in roc[c] if roc[c][t]]
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 6), squeeze=False)
    res = {(r["classifier"], r["task"], r["arm"]): r for r in results}
    for ax, (clf, task) in zip(axes[0], panels):
        for arm, (y, s) in roc[clf][task].items():
            if len(np.unique(y)) < 2:
                continue
            fpr, tpr, _ = roc_curve(y, s)
            r = res.get((clf, task, arm), {})
            ax.plot(
                fpr,
                tpr,
                lw=1.6,
                label=f"{labels.get(arm, arm)}: {_f(r.get('pooled_auc'))} "
                f"[{_f(r.get('pooled_auc_ci_low'))}, {_f(r.get('pooled_auc_ci_high'))}]",
            )
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"{clf} — {task_title(task, cohort)}\n({subtitle})", fontsize=10)
        ax.legend(
            loc="upper center",
            bbox_to_anchor=(0.5, -0.13),
            fontsize=8,
            title="arm: pooled AUC [95% CI]",
            title_fontsize=8,
        )
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
