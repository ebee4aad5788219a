"""Score the 2D candidates and the baselines on one split, apply the protocol's rules, keep the records.

``docs/evaluation_protocol.md`` states the rules; this module applies them and nothing else:

- :func:`score_split` fuses the split with every candidate (its run folder's ``model.pt``) and every baseline
  through ``configs/evaluate.json`` and writes the records: ``pairs_<profile>.csv`` (one row per pair and
  method) and ``summary_<profile>.json`` (per task: n, mean and sample std of each metric);
- :func:`mean_ranks` ranks the methods per task and metric (``cddfuse`` profile) and averages each candidate's
  ranks; :func:`select_candidate` picks the lowest mean rank (ties: the paper's network);
- :func:`check_targets` reports the protocol's validation targets per task;
- the test split is scored once: :func:`score_split` refuses a split whose records exist.

Command line::

    python -m scripts.model_selection --split val    # docs/results/val/: records + selection.json
    python -m scripts.model_selection --split test   # once, after the val selection: docs/results/test/

The model card's tables are rendered from these records by :mod:`scripts.results_card`.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.baselines import BASELINES
from scripts.evaluate import NETWORK_METHOD, compare, csv_text, read_rows, summarise, write_text_atomic

__all__ = [
    "CANDIDATES",
    "CDDFUSE_PUBLISHED",
    "PROFILES",
    "RANK_PROFILE",
    "Candidate",
    "check_targets",
    "main",
    "mean_ranks",
    "read_summary",
    "score_split",
    "select_candidate",
]

logger = logging.getLogger(__name__)

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = BUNDLE_ROOT / "docs" / "results"
#: profiles recorded for every method: quality (two conventions) and pixel-level behaviour
PROFILES: tuple[str, ...] = ("cddfuse", "clinicalfmamba", "characterisation")
#: the profile whose 8 metrics (all higher-is-better) rank the methods
RANK_PROFILE = "cddfuse"
RANK_METRICS: tuple[str, ...] = ("EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM")
TASKS: tuple[str, ...] = ("CT-MRI", "PET-MRI", "SPECT-MRI")

#: CDDFuse's published Harvard results (its README, its own Python evaluator; MRI-CT 21, MRI-PET 42, MRI-SPECT 73
#: test pairs), as listed in the project's reference notes on peers
CDDFUSE_PUBLISHED: dict[str, dict[str, float]] = {
    "CT-MRI": dict(zip(RANK_METRICS, (4.88, 79.17, 38.14, 2.61, 1.41, 0.61, 0.68, 1.34))),
    "PET-MRI": dict(zip(RANK_METRICS, (4.22, 70.74, 29.57, 2.03, 1.69, 0.71, 0.71, 1.49))),
    "SPECT-MRI": dict(zip(RANK_METRICS, (3.90, 58.31, 20.87, 2.49, 1.35, 0.97, 0.78, 1.48))),
}


@dataclass(frozen=True)
class Candidate:
    """A trained candidate network: its run folder (holding ``model.pt``) and its network switches.

    Args:
        name: short name used as the method name in the records.
        description: one line for tables.
        run_dir: the training run folder, relative to the bundle root (``model.pt``, ``training_log.csv``).
        network: overrides of ``evaluate.json``'s ``clinicalfmamba_def`` (e.g. ``{"refine": False}``).
    """

    name: str
    description: str
    run_dir: str
    network: Mapping[str, Any] = field(default_factory=dict)

    def weights(self, bundle_root: Path) -> Path:
        return bundle_root / self.run_dir / "model.pt"


#: the two candidates of docs/evaluation_protocol.md, in tie-break order (the first wins a tie)
CANDIDATES: tuple[Candidate, ...] = (
    Candidate(
        "paper",
        "the paper's network",
        "training/harvard2d_paper",
        {"refine": False, "source_selection": False},
    ),
    Candidate(
        "refine",
        "with the refinement block",
        "training/harvard2d_refine_v2",
        {"refine": True, "source_selection": False},
    ),
)


def _record_paths(out: Path, profile: str) -> tuple[Path, Path]:
    return out / f"pairs_{profile}.csv", out / f"summary_{profile}.json"


def _summary_record(rows: Sequence[Mapping[str, Any]], names: Sequence[str], methods: Sequence[str]) -> dict:
    """``{method: {task: {"n": n, metric: {"mean": m, "std": s}}}}`` (tasks of the rows, then ``all``)."""
    out: dict[str, Any] = {}
    for method in methods:
        per_task = summarise([r for r in rows if r["method"] == method], names)
        out[method] = {
            s["task"]: {"n": s["n"], **{m: {"mean": s[f"{m}_mean"], "std": s[f"{m}_std"]} for m in names}}
            for s in per_task
        }
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def read_summary(path: Path) -> dict[str, Any]:
    """A ``summary_<profile>.json`` record."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _tasks(summary: Mapping[str, Mapping[str, Any]], methods: Sequence[str]) -> list[str]:
    return [t for t in TASKS if all(t in summary[m] for m in methods)]


def mean_ranks(
    summary: Mapping[str, Mapping[str, Mapping[str, Any]]],
    methods: Sequence[str],
    metrics: Sequence[str] = RANK_METRICS,
    tasks: Sequence[str] | None = None,
) -> dict[str, float]:
    """Each method's rank (1 = highest mean) per task and metric, averaged over tasks x metrics.

    Ties share the best of their ranks (``[0.7, 0.7, 0.5]`` ranks ``1, 1, 3``). A missing value ranks last.
    ``tasks``: default, the tasks of :data:`TASKS` present in the summary.
    """
    tasks = _tasks(summary, methods) if tasks is None else tasks
    totals = {m: 0.0 for m in methods}
    count = 0
    for task in tasks:
        for metric in metrics:
            values = {}
            for m in methods:
                cell = summary[m].get(task, {}).get(metric)
                value = None if cell is None else cell["mean"]
                values[m] = -math.inf if value is None or math.isnan(value) else value
            for m in methods:
                totals[m] += 1 + sum(1 for other in methods if values[other] > values[m])
            count += 1
    return {m: totals[m] / count for m in methods}


def select_candidate(ranks: Mapping[str, float], candidates: Sequence[str]) -> str:
    """The candidate with the lowest mean rank; on a tie the first in ``candidates`` order."""
    return min(candidates, key=lambda name: (ranks[name], list(candidates).index(name)))


def check_targets(
    summary: Mapping[str, Mapping[str, Mapping[str, Any]]],
    method: str,
    tasks: Sequence[str] | None = None,
    published: Mapping[str, Mapping[str, float]] = CDDFUSE_PUBLISHED,
) -> dict[str, dict[str, Any]]:
    """The protocol's targets per task for ``method`` (``cddfuse`` summary record).

    Returns, per task: ``beats_max`` (metrics of Q^AB/F and SF above max), ``beats_mean`` (metrics above mean),
    ``reaches_cddfuse`` (metrics at or above CDDFuse's published values) and ``met`` (all three bars held:
    both max metrics, at least 6 of 8 above mean, at least 6 of 8 reaching CDDFuse).
    """
    out = {}
    for task in _tasks(summary, [method]) if tasks is None else tasks:
        value = {m: summary[method][task][m]["mean"] for m in RANK_METRICS}
        above_max = [m for m in ("Qabf", "SF") if value[m] > summary["max"][task][m]["mean"]]
        above_mean = [m for m in RANK_METRICS if value[m] > summary["mean"][task][m]["mean"]]
        reached = [m for m in RANK_METRICS if value[m] >= published[task][m]]
        out[task] = {
            "beats_max": above_max,
            "beats_mean": above_mean,
            "reaches_cddfuse": reached,
            "met": len(above_max) == 2 and len(above_mean) >= 6 and len(reached) >= 6,
        }
    return out


def _best_epoch(run_dir: Path) -> dict[str, Any]:
    """The run's best validation epoch and key metric, read from its epoch log (last row)."""
    log = run_dir / "training_log.csv"
    if not log.is_file():
        return {}
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not rows[-1].get("best_epoch"):
        return {"epochs_run": len(rows)}
    return {
        "epochs_run": len(rows),
        "best_epoch": int(rows[-1]["best_epoch"]),
        "best_val_qabf": float(rows[-1]["best_metric"]),
    }


def score_split(
    split: str,
    output_dir: Path | None = None,
    candidates: Sequence[Candidate] = CANDIDATES,
    baselines: Sequence[str] = tuple(BASELINES),
    profiles: Sequence[str] = PROFILES,
    bundle_root: Path | None = None,
    work_dir: Path | None = None,
    **override: Any,
) -> dict[str, Any]:
    """Score ``split`` with every candidate and baseline; write the records and, for ``val``, the selection.

    Args:
        split: the split of the datalist (``val`` or ``test``).
        output_dir: records folder (default ``docs/results/<split>``); must not hold records yet.
        candidates: the candidate networks (their ``model.pt`` must exist).
        baselines: baseline method names.
        profiles: metric profiles recorded; must include ``cddfuse``.
        bundle_root: the bundle folder (default: this file's bundle).
        work_dir: scratch folder for the evaluation workflow's own reports (default ``<bundle>/eval/<split>``).
        override: further ``evaluate.json`` overrides (``dataset_dir``, ``datalist``, ...).

    Returns:
        the selection record (``selection.json``'s content) for ``val``, else ``{"split": ..., "methods": ...}``.

    Raises:
        FileExistsError: the split's records exist (the test split is scored once).
        FileNotFoundError: a candidate's weights are missing; or ``test`` before the ``val`` selection.
    """
    root = Path(bundle_root) if bundle_root is not None else BUNDLE_ROOT
    out = Path(output_dir) if output_dir is not None else root / "docs" / "results" / split
    if any(p.exists() for prof in profiles for p in _record_paths(out, prof)):
        raise FileExistsError(f"{out} already holds the {split} records: a split is scored once (protocol)")
    if split == "test" and not (out.parent / "val" / "selection.json").is_file():
        raise FileNotFoundError(f"score the validation split first: {out.parent / 'val' / 'selection.json'} missing")
    for c in candidates:
        if not c.weights(root).is_file():
            raise FileNotFoundError(f"candidate {c.name!r}: weights {c.weights(root)} not found (train it first)")
    scratch = Path(work_dir) if work_dir is not None else root / "eval" / f"model_selection_{split}"
    common = {"split": split, "figure_cases": 0, **override}
    per_method: dict[str, dict[str, tuple[list[dict], list[str]]]] = {p: {} for p in profiles}
    runs = [
        (c.name, {f"clinicalfmamba_def#{k}": v for k, v in c.network.items()}, str(c.weights(root))) for c in candidates
    ]
    runs += [(b, {}, None) for b in baselines]
    for name, net_override, weights in runs:
        method = NETWORK_METHOD if weights else name
        extra = {**net_override, **({"ckpt_path": weights} if weights else {})}
        logger.info("scoring %s on %s", name, split)
        compare([method], profiles, output_dir=scratch / name, bundle_root=root, overwrite=True, **common, **extra)
        for p in profiles:
            rows, names = read_rows(scratch / name / method / f"metrics_{p}.csv")
            per_method[p][name] = ([{**r, "method": name} for r in rows], names)
    methods = [name for name, _, _ in runs]
    summaries = {}
    for p in profiles:
        rows = [r for name in methods for r in per_method[p][name][0]]
        names = per_method[p][methods[0]][1]
        pairs_path, summary_path = _record_paths(out, p)
        write_text_atomic(pairs_path, csv_text(rows, ["task", "id", "method", *names]))
        summaries[p] = _summary_record(rows, names, methods)
        record = {"split": split, "profile": p, "metrics": list(names), "methods": summaries[p]}
        write_text_atomic(summary_path, json.dumps(_json_safe(record), indent=1) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    result: dict[str, Any] = {"split": split, "methods": methods}
    if split == "val":
        result = _selection(summaries[RANK_PROFILE], candidates, methods, root)
        write_text_atomic(out / "selection.json", json.dumps(_json_safe(result), indent=1) + "\n")
        logger.info("selected candidate: %s (mean ranks %s)", result["selected"], result["mean_ranks"])
    return result


def _selection(summary: Mapping[str, Any], candidates: Sequence[Candidate], methods: Sequence[str], root: Path) -> dict:
    ranks = mean_ranks(summary, methods)
    names = [c.name for c in candidates]
    selected = select_candidate(ranks, names)
    return {
        "rule": "docs/evaluation_protocol.md: lowest mean rank over 3 tasks x 8 cddfuse metrics among candidates and "
        "baselines (ties share the best rank); on equal scores the first candidate",
        "mean_ranks": ranks,
        "selected": selected,
        "candidates": {
            c.name: {
                "description": c.description,
                "run_dir": c.run_dir,
                "network": dict(c.network),
                **_best_epoch(root / c.run_dir),
                "targets": check_targets(summary, c.name),
            }
            for c in candidates
        },
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line of :func:`score_split` (records under ``docs/results/<split>``)."""
    parser = argparse.ArgumentParser(prog="python -m scripts.model_selection", description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", required=True, choices=("val", "test"))
    parser.add_argument("--output_dir", default=None, help="records folder (default docs/results/<split>)")
    parser.add_argument("--dataset_dir", default=None, help="Harvard folder (default ../shared/data/harvard)")
    args = parser.parse_args(argv)
    override = {"dataset_dir": args.dataset_dir} if args.dataset_dir else {}
    output_dir = Path(args.output_dir) if args.output_dir else None
    return score_split(args.split, output_dir=output_dir, **override)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    main()
