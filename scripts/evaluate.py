"""Evaluation workflow support: method selection, per-pair fusion metrics, reports, method comparison.

``configs/evaluate.json`` is layered on ``configs/inference.json`` (same pre-processing, network call, padding
inversion and colour handling) and adds three things from this module:

- :func:`evaluation_datalist` — the pairs to score (default: the Harvard ``pairs.csv`` test split), with
  ``split`` and ``tasks`` filters;
- :func:`fusion_method` — the module that fuses: the ClinicalFMamba network with its trained weights
  (``method="clinicalfmamba"``; a missing checkpoint is an error naming the path) or a classic baseline
  (``"mean"``, ``"max"``, ``"laplacian"``, :mod:`scripts.baselines`);
- :class:`FusionReport` — an ignite handler that scores every fused pair under one or more metric profiles
  (:mod:`scripts.metrics`) and writes the per-pair CSV, the per-task summary (CSV and markdown, mean ± std,
  headed by the profile's conventions) and a figure grid.

:func:`compare` runs the workflow for several methods and writes one comparison table per profile; it is also
the command line of this module::

    python -m scripts.evaluate --methods mean max laplacian --profile default cddfuse

What is scored: the fused image ``F`` is the method's output (grey; for a colour PET/SPECT pair the fused
luma ``Y``) in [0, 1], cropped back to the input size; the sources are the two images the method fused, i.e.
the MRI and the CT (or the BT.601 ``Y`` of the colour PET/SPECT image), each min-max normalised to [0, 1]
(``ScaleIntensityd`` of the pre-processing). The profile then maps the three images to its scale (e.g.
``default``: x255 and rounded). PNG arrays, which MONAI holds width-first, are transposed back to
``(H, W)`` before scoring, so direction-dependent metrics see the image as stored.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from scripts.baselines import BASELINES
from scripts.data import IMAGE_EXTENSIONS, PathLike, load_datalist, split_extension
from scripts.data import has_split_field as _has_split_field
from scripts.metrics import get_profile
from scripts.pair_check import PairCheck, check_pairs
from scripts.transforms import AttachChromad, ycbcr_to_rgb

__all__ = [
    "BASELINES",
    "METHODS",
    "NETWORK_METHOD",
    "FusionReport",
    "compare",
    "csv_text",
    "comparison_markdown",
    "evaluation_datalist",
    "evaluation_pairs",
    "format_mean_std",
    "fusion_method",
    "main",
    "read_rows",
    "summarise",
    "summary_markdown",
    "write_text_atomic",
]

logger = logging.getLogger(__name__)

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
NETWORK_METHOD = "clinicalfmamba"
METHODS: tuple[str, ...] = (NETWORK_METHOD, *BASELINES)
_ALL = "all"


# ------------------------------------------------------------------------------------------------
# datalist and method
# ------------------------------------------------------------------------------------------------


def evaluation_datalist(
    source: PathLike | Sequence[Mapping[str, Any]],
    split: str | Sequence[str] | None = "test",
    tasks: str | Sequence[str] | None = None,
    errors: list[tuple[dict[str, str], str]] | None = None,
) -> list[dict[str, str]]:
    """The pairs to evaluate.

    Args:
        source: a folder holding a ``pairs.csv`` (the Harvard copy: that CSV is read), any other folder of
            pairs, a CSV or JSON datalist, or a list of pair dicts (see :func:`scripts.data.load_datalist`).
        split: keep only pairs of this split (or these splits) when the source has a ``split`` field; a source
            without one is used whole (logged). ``None``: all pairs.
        tasks: keep only these tasks (e.g. ``"CT-MRI"`` or ``["PET-MRI", "SPECT-MRI"]``); ``None``: all.
        errors: collect entries naming missing files here instead of raising (:func:`scripts.data.load_datalist`).

    Returns:
        list of ``{"mri", "other", "task", "id"}`` (or ``{"image", ...}``) dicts.

    Raises:
        ValueError: when no pair is left, naming the source and the filters.
    """
    if not isinstance(source, (list, tuple)):
        path = Path(str(source)).expanduser()
        if path.is_dir() and (path / "pairs.csv").is_file():
            source = path / "pairs.csv"
    if split is not None and not _has_split_field(source):
        logger.info("datalist %s has no 'split' field: split %r ignored, every pair is evaluated", source, split)
        split = None
    items = load_datalist(source, split=split, errors=errors)
    if tasks is not None:
        wanted = {tasks} if isinstance(tasks, str) else set(tasks)
        available = sorted({d["task"] for d in items})
        items = [d for d in items if d["task"] in wanted]
        if not items:
            raise ValueError(f"no pairs of tasks {sorted(wanted)} in {source} (split {split!r}); it has {available}")
    return items


def evaluation_pairs(
    datalist: PathLike | Sequence[Mapping[str, Any]],
    split: str | Sequence[str] | None = "test",
    tasks: str | Sequence[str] | None = None,
    on_error: str = "skip",
    **check: Any,
) -> PairCheck:
    """:func:`evaluation_datalist` checked by :func:`scripts.pair_check.check_pairs`; with ``on_error="skip"`` a
    datalist entry naming a missing file is set aside like any bad pair. ``check``: further ``check_pairs``
    arguments."""
    errors: list[tuple[dict[str, str], str]] | None = [] if on_error == "skip" else None
    items = evaluation_datalist(datalist, split=split, tasks=tasks, errors=errors)
    return check_pairs(items, on_error=on_error, set_aside=errors or (), **check)


def fusion_method(
    method: str, network: nn.Module | None = None, ckpt_path: PathLike | None = None, allow_untrained: bool = False
) -> nn.Module:
    """The fusion module for a method name.

    Args:
        method: ``"clinicalfmamba"`` (the network) or a baseline: ``"mean"``, ``"max"``, ``"laplacian"``.
        network: the network module, used for ``"clinicalfmamba"``.
        ckpt_path: its trained weights, which must exist for ``"clinicalfmamba"`` (the workflow's ``network``
            entry loads them, as in ``configs/inference.json``).
        allow_untrained: evaluate the network without weights (random initialisation, reported as UNTRAINED).

    Returns:
        an ``nn.Module`` mapping ``image`` ``(B, 2, *spatial)`` in [0, 1] to ``(B, 1, *spatial)`` in [0, 1].
    """
    name = str(method).strip().lower()
    if name in BASELINES:
        return BASELINES[name]()
    if name != NETWORK_METHOD:
        raise ValueError(f"unknown fusion method {method!r}; choose one of {', '.join(METHODS)}")
    if network is None:
        raise ValueError("method 'clinicalfmamba' needs the network ('clinicalfmamba_def' is missing or disabled)")
    if (ckpt_path is None or not Path(ckpt_path).is_file()) and not allow_untrained:
        raise FileNotFoundError(
            f"method 'clinicalfmamba' needs trained weights, but the checkpoint {ckpt_path} was not found; "
            f"pass --ckpt_path FILE, evaluate a baseline with --method {'|'.join(BASELINES)}, or pass "
            "--allow_untrained true to score the network's random initialisation knowingly"
        )
    return network


# ------------------------------------------------------------------------------------------------
# summaries and tables
# ------------------------------------------------------------------------------------------------


def summarise(rows: Sequence[Mapping[str, Any]], metric_names: Sequence[str]) -> list[dict[str, Any]]:
    """Per-task mean and sample standard deviation (``ddof=1``) of each metric, then all pairs pooled.

    Args:
        rows: per-pair rows with ``task`` and one float per metric (NaN = not computed, skipped).
        metric_names: the metric columns.

    Returns:
        one dict per task (in order of first appearance) and a last ``task="all"`` dict when there are several
        tasks: ``{"task", "n", "<M>_mean", "<M>_std", ...}``. ``std`` is NaN with fewer than two values.
    """
    tasks: list[str] = []
    for r in rows:
        if r["task"] not in tasks:
            tasks.append(r["task"])
    groups = [(t, [r for r in rows if r["task"] == t]) for t in tasks]
    if len(tasks) > 1:
        groups.append((_ALL, list(rows)))
    out = []
    for task, group in groups:
        entry: dict[str, Any] = {"task": task, "n": len(group)}
        for m in metric_names:
            values = np.array([float(r[m]) for r in group], dtype=np.float64)
            values = values[~np.isnan(values)]
            finite = values[np.isfinite(values)]
            entry[f"{m}_mean"] = float(np.mean(values)) if values.size else math.nan
            with_std = finite.size > 1 and finite.size == values.size  # an infinite value has no std
            entry[f"{m}_std"] = float(np.std(finite, ddof=1)) if with_std else math.nan
        out.append(entry)
    return out


def format_mean_std(mean: float, std: float) -> str:
    """``"mean ± std"`` with decimals by magnitude (3 below 10, 2 below 100, else 1); ``–`` for a missing std."""
    if math.isnan(mean):
        return "n/a"
    if math.isinf(mean):
        return "inf" if mean > 0 else "-inf"
    digits = 3 if abs(mean) < 10 else 2 if abs(mean) < 100 else 1
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if not math.isnan(std) else f"{mean:.{digits}f} ± –"


def _md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _conventions_markdown(profile: str, metric_names: Sequence[str]) -> list[str]:
    described = get_profile(profile).describe()
    lines = [f"Profile `{profile}` conventions (`get_profile({profile!r}).describe()`):", ""]
    lines += [_md_row(["item", "definition"]), _md_row(["---", "---"]), _md_row(["scale", described["scale"]])]
    lines += [_md_row([m, described[m].replace("|", "/")]) for m in metric_names]
    return lines


def summary_markdown(
    summary: Sequence[Mapping[str, Any]], metric_names: Sequence[str], method_column: str | None = None
) -> list[str]:
    """Markdown table lines: one row per summary entry (``task``, optional method, ``n``, metric mean ± std)."""
    head = ["task"] + (["method"] if method_column else []) + ["n"] + list(metric_names)
    lines = [_md_row(head), _md_row(["---"] * (len(head) - len(metric_names)) + ["---:"] * len(metric_names))]
    for s in summary:
        cells = [s["task"]] + ([s[method_column]] if method_column else []) + [s["n"]]
        cells += [format_mean_std(float(s[f"{m}_mean"]), float(s[f"{m}_std"])) for m in metric_names]
        lines.append(_md_row(cells))
    return lines


def comparison_markdown(summaries: Mapping[str, Sequence[Mapping[str, Any]]], metric_names: Sequence[str]) -> list[str]:
    """One table with rows per task, then per method (``summaries``: method -> :func:`summarise` output)."""
    tasks: list[str] = []
    for summary in summaries.values():
        for s in summary:
            if s["task"] not in tasks:
                tasks.append(s["task"])
    rows = []
    for task in tasks:
        for method, summary in summaries.items():
            rows += [{**s, "method": method} for s in summary if s["task"] == task]
    return summary_markdown(rows, metric_names, method_column="method")


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as CSV text with a header of ``columns`` (extra keys ignored, ``\n`` line ends)."""
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def read_rows(path: PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-pair rows from a CSV written by :class:`FusionReport`: ``(rows, metric names)``, metrics as floats."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        metric_names = [c for c in columns if c not in ("task", "id", "method")]
        rows = [{**r, **{m: float(r[m]) for m in metric_names}} for r in reader]
    return rows, metric_names


# ------------------------------------------------------------------------------------------------
# the handler
# ------------------------------------------------------------------------------------------------


def _as_array(img: Any) -> np.ndarray:
    return torch.as_tensor(img).detach().cpu().to(torch.float64).numpy()


def _is_pil_image(img: Any) -> bool:
    """Whether a loaded image came from a PIL-read file (stored width-first by MONAI's ``PILReader``)."""
    meta = getattr(img, "meta", None) or {}
    name = meta.get("filename_or_obj", "")
    name = name[0] if isinstance(name, (list, tuple)) and name else name
    return split_extension(str(name))[1].lower() in IMAGE_EXTENSIONS


class FusionReport:
    """Ignite handler: score every fused pair, then write the per-pair CSV, summaries and a figure grid.

    Attached to a ``SupervisedEvaluator`` whose post-processing inverts the padding (``Invertd``) and, for colour
    pairs, builds the colour fused image (``AttachChromad``). Per decollated item it reads

    - ``pred``: fused image ``(1, *spatial)`` in [0, 1] at the input size;
    - ``mri``, ``other``: the sources as fused, ``(1, *spatial)`` in [0, 1] (grey, or ``Y`` of a colour image);
    - ``task``, ``id``; optional ``pred_rgb`` ``(3, *spatial)`` on 0..255 and ``other_ycbcr`` ``(3, *spatial)``
      (colour pairs, for the figure).

    and scores ``F = pred`` against ``A = mri``, ``B = other`` with :func:`scripts.metrics.compute_metrics` under
    each profile. :meth:`add` does the same for a plain dict, outside an engine. :meth:`write` writes into
    ``output_dir``, per profile ``P``:

    - ``metrics_P.csv``: one row per pair (``task, id, method``, every metric);
    - ``summary_P.csv``: per task and pooled (``all``): ``n``, ``<metric>_mean``, ``<metric>_std``;
    - ``summary_P.md``: the profile's conventions (``describe()``), the scored images, the data, then the
      mean ± std table (sample std, ``n - 1``);

    and ``figure.png`` (kept if it exists and ``overwrite`` is false, as it does not depend on the profile):
    ``figure_cases`` pairs per task, columns MRI, other modality (colour), the method's fused image (colour),
    and the baselines' fused images for comparison when ``figure_baselines``.

    Existing CSV/markdown reports are never replaced unless ``overwrite``: :meth:`attach` raises before any pair
    is fused. A metric that fails on a pair (e.g. VIF on images smaller than 41 pixels) is NaN in that row and
    logged; NaNs are skipped in the summaries.

    Args:
        output_dir: report folder (created).
        method: method name written into the rows and titles.
        profile: metric profile name, or a list of names (one set of reports each).
        metrics: metric names (must exist in every profile); ``None``: each profile's defaults.
        spatial_dims: 2 or 3 (3-D figures show the middle slice of the last axis).
        datalist: the pairs to be evaluated, to pick evenly spaced figure cases per task and to check the
            evaluation is complete; optional.
        failed: ``(pair, reason)`` of pairs set aside before fusion (listed in the markdown).
        source: where the pairs come from (path, or a list of pairs), for the markdown.
        split: the split filter used, for the markdown.
        tasks: the task filter used, for the markdown.
        weights: the checkpoint used (network), for the markdown.
        figure_cases: pairs per task in the figure (0: no figure).
        figure_baselines: add the baselines' fused images to the figure.
        y_range: colour mapping of fused ``Y`` for the baselines' colour images (as ``AttachChromad``).
        overwrite: replace existing reports.
    """

    def __init__(
        self,
        output_dir: PathLike,
        method: str,
        profile: str | Sequence[str] = "default",
        metrics: Sequence[str] | None = None,
        spatial_dims: int = 2,
        datalist: Sequence[Mapping[str, Any]] | None = None,
        failed: Sequence[tuple[Mapping[str, Any], str]] = (),
        source: PathLike | Sequence[Mapping[str, Any]] | None = None,
        split: str | Sequence[str] | None = None,
        tasks: str | Sequence[str] | None = None,
        weights: PathLike | None = None,
        figure_cases: int = 2,
        figure_baselines: bool = True,
        y_range: str = "source",
        overwrite: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.method = str(method)
        self.profiles = [profile] if isinstance(profile, str) else list(profile)
        if not self.profiles:
            raise ValueError("at least one metric profile is needed")
        self.spatial_dims = spatial_dims
        self.metric_names: dict[str, tuple[str, ...]] = {
            p: get_profile(p).select(metrics, spatial_dims) for p in self.profiles
        }
        self.datalist = list(datalist) if datalist is not None else None
        self.failed = list(failed)
        self.data_description = self.describe_data(source, split, tasks)
        self.weights = weights
        self.figure_cases = figure_cases
        self.figure_baselines = figure_baselines
        self.y_range = y_range
        self.overwrite = overwrite
        self.rows: dict[str, list[dict[str, Any]]] = {p: [] for p in self.profiles}
        self.metric_errors: list[str] = []
        self.cases: dict[tuple[str, str], dict[str, Any]] = {}
        self.written: dict[str, Path] = {}
        self._figure_keys = self._pick_figure_cases()

    @staticmethod
    def describe_data(
        source: PathLike | Sequence[Mapping[str, Any]] | None,
        split: str | Sequence[str] | None,
        tasks: str | Sequence[str] | None,
    ) -> str:
        """One line naming the datalist source and its filters."""
        if source is None:
            where = "datalist"
        elif isinstance(source, (list, tuple)):
            where = f"a list of {len(source)} pairs"
        else:
            where = f"`{os.path.normpath(os.path.abspath(os.path.expanduser(str(source))))}`"
        if split is not None and source is not None:
            path = Path(str(source)) if not isinstance(source, (list, tuple)) else None
            csv_path = path / "pairs.csv" if path is not None and path.is_dir() else None
            if not _has_split_field(csv_path if csv_path is not None and csv_path.is_file() else source):
                split = None
        return f"{where}, split {split if split is not None else 'all'}, tasks {tasks if tasks is not None else 'all'}"

    # -- setup ------------------------------------------------------------------------------------

    def report_paths(self) -> dict[str, Path]:
        """The report files: ``{"metrics_P": ..., "summary_P": ..., "markdown_P": ..., "figure": ...}``."""
        paths = {}
        for p in self.profiles:
            paths[f"metrics_{p}"] = self.output_dir / f"metrics_{p}.csv"
            paths[f"summary_{p}"] = self.output_dir / f"summary_{p}.csv"
            paths[f"markdown_{p}"] = self.output_dir / f"summary_{p}.md"
        paths["figure"] = self.output_dir / "figure.png"
        return paths

    def check_outputs(self) -> None:
        """Raise ``FileExistsError`` when reports exist and ``overwrite`` is false; ``ValueError`` without pairs."""
        if self.datalist is not None and not self.datalist:
            reasons = "; ".join(reason for _, reason in self.failed[:3]) + ("; ..." if len(self.failed) > 3 else "")
            raise ValueError(
                f"no valid pairs to evaluate ({len(self.failed)} set aside" + (f": {reasons})" if reasons else ")")
            )
        existing = [str(v) for k, v in self.report_paths().items() if k != "figure" and v.exists()]
        if existing and not self.overwrite:
            raise FileExistsError(
                f"evaluation reports exist and are not replaced: {existing}; pass --overwrite true to replace them, "
                f"or choose another --output_dir"
            )

    def attach(self, engine: Engine) -> None:
        """Check the outputs, then score every item when each iteration completes."""
        self.check_outputs()
        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _pick_figure_cases(self) -> set[tuple[str, str]] | None:
        if self.datalist is None or self.figure_cases <= 0:
            return None
        keys: set[tuple[str, str]] = set()
        tasks = sorted({str(d.get("task", "")) for d in self.datalist})
        for task in tasks:
            items = [d for d in self.datalist if str(d.get("task", "")) == task]
            idx = np.unique(np.linspace(0, len(items) - 1, num=min(self.figure_cases, len(items))).round().astype(int))
            keys.update((task, str(items[i].get("id", ""))) for i in idx)
        return keys

    # -- scoring ----------------------------------------------------------------------------------

    def __call__(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if not isinstance(batch, list) or not isinstance(output, list):
            raise ValueError("FusionReport needs decollated engine outputs (evaluator with decollate=True)")
        for b, o in zip(batch, output):
            self.add({**b, **o})

    def _score(self, profile: str, f: np.ndarray, a: np.ndarray, b: np.ndarray, pair: str) -> dict[str, float]:
        from scripts.metrics import compute_metrics

        names = self.metric_names[profile]
        try:
            return compute_metrics(f, a, b, profile=profile, metrics=names)
        except Exception:  # isolate the failing metric(s): the others are still reported
            values = {}
            for n in names:
                try:
                    values[n] = compute_metrics(f, a, b, profile=profile, metrics=[n])[n]
                except Exception as e:
                    values[n] = math.nan
                    self.metric_errors.append(f"{pair} {profile} {n}: {e}")
                    logger.warning("metric %s (profile %s) failed on pair %s: %s", n, profile, pair, e)
            return values

    def _scoring_view(self, img: Any, pil: bool) -> np.ndarray:
        """``(1, *spatial)`` to the spatial array, PNGs transposed back to ``(H, W)``."""
        arr = _as_array(img)
        arr = arr.reshape(arr.shape[-self.spatial_dims :]) if arr.ndim > self.spatial_dims else arr
        return arr.T if pil and arr.ndim == 2 else arr

    def add(self, data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Score one pair (keys as in the class docstring); returns ``{profile: row}``."""
        task, pair_id = str(data.get("task", "")), str(data.get("id", ""))
        pil = _is_pil_image(data.get("mri"))
        f = self._scoring_view(data["pred"], pil)
        a, b = self._scoring_view(data["mri"], pil), self._scoring_view(data["other"], pil)
        if not f.shape == a.shape == b.shape:
            raise ValueError(
                f"pair {task}/{pair_id}: fused {f.shape} and sources {a.shape}, {b.shape} differ in size; "
                "the evaluator's post-processing must invert the padding (Invertd)"
            )
        out = {}
        for p in self.profiles:
            row = {"task": task, "id": pair_id, "method": self.method}
            row.update(self._score(p, f, a, b, f"{task}/{pair_id}"))
            self.rows[p].append(row)
            out[p] = row
        key = (task, pair_id)
        if self.figure_cases > 0 and (
            key in self._figure_keys
            if self._figure_keys is not None
            else sum(k[0] == task for k in self.cases) < self.figure_cases
        ):
            self.cases[key] = self._figure_case(data, pil)
        return out

    # -- figure -----------------------------------------------------------------------------------

    def _display(self, img: Any, pil: bool) -> np.ndarray:
        """``(C, *spatial)`` to a displayable ``(H, W)`` or ``(H, W, C)`` array (3-D: middle slice)."""
        arr = _as_array(img)
        if arr.ndim == self.spatial_dims + 1 and self.spatial_dims == 3:
            arr = arr[..., arr.shape[-1] // 2]
        arr = np.moveaxis(arr, 0, -1)  # (X, Y, C)
        arr = np.swapaxes(arr, 0, 1) if pil else np.flip(np.swapaxes(arr, 0, 1), axis=0)  # NIfTI: y up
        return arr[..., 0] if arr.shape[-1] == 1 else arr

    def _figure_case(self, data: Mapping[str, Any], pil: bool) -> dict[str, Any]:
        ycbcr = data.get("other_ycbcr")
        case: dict[str, Any] = {"pil": pil, "mri": self._display(data["mri"], pil)}
        case["other"] = (
            self._display(ycbcr_to_rgb(torch.as_tensor(ycbcr).cpu()).clamp(0, 255) / 255.0, pil)
            if ycbcr is not None
            else self._display(data["other"], pil)
        )
        colour = data.get("pred_rgb")
        fused = {self.method: colour / 255.0 if colour is not None else data["pred"]}
        if self.figure_baselines:
            image = torch.cat([torch.as_tensor(data["mri"]), torch.as_tensor(data["other"])], dim=0)
            image = image.detach().cpu().to(torch.float32)[None]
            for name, cls in BASELINES.items():
                if name == self.method:
                    continue
                with torch.no_grad():
                    pred = cls()(image)[0]
                if ycbcr is not None:
                    rgb = AttachChromad(keys="pred", y_range=self.y_range)({"pred": pred, "other_ycbcr": ycbcr})
                    fused[name] = rgb["pred_rgb"] / 255.0
                else:
                    fused[name] = pred
        case["fused"] = {k: self._display(v, pil) for k, v in fused.items()}
        return case

    def write_figure(self, path: Path) -> Path | None:
        """The figure grid (rows: cases, columns: MRI, other, fused images); ``None`` without cases."""
        if not self.cases:
            return None
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        keys = sorted(self.cases)
        methods = list(self.cases[keys[0]]["fused"])
        columns = ["MRI", "other"] + methods
        fig = Figure(figsize=(2.0 * len(columns), 2.1 * len(keys)), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(keys), len(columns), squeeze=False)
        for r, key in enumerate(keys):
            case = self.cases[key]
            images = [case["mri"], case["other"]] + [case["fused"][m] for m in methods]
            modality = key[0].split("-")[0] if "-" in key[0] else "other"
            first_of_task = r == 0 or keys[r - 1][0] != key[0]
            titles = ["MRI" if r == 0 else "", modality if first_of_task else ""] + [
                (f"{m} (evaluated)" if m == self.method else m) if r == 0 else "" for m in methods
            ]
            for c, (img, title) in enumerate(zip(images, titles)):
                ax = axes[r, c]
                ax.imshow(np.clip(img, 0.0, 1.0), cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0)
                ax.set_xticks([])
                ax.set_yticks([])
                if title:
                    ax.set_title(title, fontsize=9)
            axes[r, 0].set_ylabel(f"{key[0]}\n{key[1]}", fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
        try:
            fig.savefig(tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    # -- reports ----------------------------------------------------------------------------------

    def summary(self, profile: str) -> list[dict[str, Any]]:
        """:func:`summarise` of the rows scored so far under ``profile``."""
        return summarise(self.rows[profile], self.metric_names[profile])

    def markdown(self, profile: str) -> str:
        """The markdown report of one profile (conventions, scored images, data, mean ± std table)."""
        names = self.metric_names[profile]
        n = len(self.rows[profile])
        weights = f"; weights `{self.weights}`" if self.weights else ""
        lines = [f"# Fusion metrics: `{self.method}`, profile `{profile}`", ""]
        lines += [
            f"- method: `{self.method}`{weights}",
            f"- data: {self.data_description or 'datalist'}; {n} pairs scored"
            + (f", {len(self.failed)} set aside before fusion" if self.failed else ""),
            (
                "- scored images: F = the fused grey image (colour pairs: the fused Y) in [0, 1], cropped to the input "
                "size; sources A = MRI, B = CT or the BT.601 Y of the colour PET/SPECT image, each min-max normalised "
                "to [0, 1] as the method received them; then the profile's scale below"
                if self.spatial_dims == 2
                else "- scored volumes: F = the fused volume in [0, 1] on the reference grid (whole volume, background "
                "included); sources A = reference, B = other volume, each normalised to [0, 1] as the method received "
                "them (configs/inference_3d.json: minimum -> 0, 99.9th percentile -> 1, clipped); "
                "then the profile's scale below"
            ),
            "- table: mean ± sample standard deviation (n - 1) over pairs, per task, then all pairs pooled",
            "",
        ]
        lines += _conventions_markdown(profile, names) + [""]
        lines += summary_markdown(self.summary(profile), names) + [""]
        if self.failed:
            lines += ["Pairs set aside before fusion:", ""]
            lines += [f"- `{item.get('id', item)}`: {reason}" for item, reason in self.failed] + [""]
        errors = [e for e in self.metric_errors if f" {profile} " in e]
        if errors:
            lines += ["Metrics that failed (NaN, skipped in the table):", ""] + [f"- {e}" for e in errors] + [""]
        return "\n".join(lines)

    def write(self) -> dict[str, Path]:
        """Write the reports (see the class docstring); returns ``{name: path}`` of the files written."""
        if self.datalist is not None and len(self.rows[self.profiles[0]]) != len(self.datalist):
            logger.warning(
                "%d of %d pairs were scored; the reports cover those only",
                len(self.rows[self.profiles[0]]),
                len(self.datalist),
            )
        self.check_outputs()
        paths = self.report_paths()
        for p in self.profiles:
            names = self.metric_names[p]
            write_text_atomic(paths[f"metrics_{p}"], csv_text(self.rows[p], ["task", "id", "method", *names]))
            columns = ["task", "n"] + [f"{m}_{s}" for m in names for s in ("mean", "std")]
            write_text_atomic(paths[f"summary_{p}"], csv_text(self.summary(p), columns))
            write_text_atomic(paths[f"markdown_{p}"], self.markdown(p))
            self.written.update({k: paths[k] for k in (f"metrics_{p}", f"summary_{p}", f"markdown_{p}")})
            logger.info("%s, profile %s:\n%s", self.method, p, "\n".join(summary_markdown(self.summary(p), names)))
        if paths["figure"].exists() and not self.overwrite:
            logger.info("figure %s exists and is kept (overwrite=false)", paths["figure"])
        elif self.write_figure(paths["figure"]) is not None:
            self.written["figure"] = paths["figure"]
        logger.info("evaluation reports: %s", ", ".join(str(v) for v in self.written.values()))
        return dict(self.written)


# ------------------------------------------------------------------------------------------------
# several methods
# ------------------------------------------------------------------------------------------------


def _config_files(bundle_root: Path, spatial_dims: int = 2) -> list[str]:
    """The evaluation config stack: 2D ``inference + evaluate``; 3D with ``inference_3d`` / ``evaluate_3d`` layered."""
    names = ["inference", "evaluate"] if spatial_dims == 2 else ["inference", "inference_3d", "evaluate", "evaluate_3d"]
    return [str(bundle_root / "configs" / f"{n}.json") for n in names]


def compare(
    methods: Sequence[str] = tuple(BASELINES),
    profile: str | Sequence[str] = "default",
    output_dir: PathLike | None = None,
    bundle_root: PathLike | None = None,
    reuse: bool = False,
    overwrite: bool = False,
    spatial_dims: int = 2,
    **override: Any,
) -> dict[str, Path]:
    """Evaluate several methods on the same pairs and write one comparison table per profile.

    Runs ``configs/inference.json`` + ``configs/evaluate.json`` (``spatial_dims=3``: with ``inference_3d.json`` and
    ``evaluate_3d.json`` layered, BraTS-style volumes) once per method (``output_dir/<method>``), then
    writes ``output_dir/comparison_P.csv`` (rows: task, method) and ``output_dir/comparison_P.md`` (profile
    conventions and the mean ± std table, rows per task then method).

    Args:
        methods: method names (:data:`METHODS`), in table order.
        profile: one profile name or several.
        output_dir: root folder of the per-method reports and the tables (default ``<bundle_root>/eval``).
        bundle_root: the bundle folder (default: this file's bundle).
        reuse: keep a method's existing per-pair CSV for a profile instead of re-running it, when it covers
            exactly the current pairs (checked by task and id).
        overwrite: replace existing reports.
        spatial_dims: 2 (images) or 3 (volumes, the 3D config stack).
        override: further config overrides (``dataset_dir``, ``datalist``, ``split``, ``tasks``, ``ckpt_path``,
            ``save_fused``, ...).

    Returns:
        ``{"comparison_P_md": path, "comparison_P_csv": path, ...}``.
    """
    from monai.bundle import ConfigParser, ConfigWorkflow

    root = Path(bundle_root) if bundle_root is not None else BUNDLE_ROOT
    out_root = Path(output_dir) if output_dir is not None else root / "eval"
    profiles = [profile] if isinstance(profile, str) else list(profile)
    targets = {p: (out_root / f"comparison_{p}.md", out_root / f"comparison_{p}.csv") for p in profiles}
    existing = [str(x) for pair in targets.values() for x in pair if x.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"comparison tables exist and are not replaced: {existing}; pass --overwrite true")
    from scripts.cli import RunFailedError, check_override_keys

    parser = ConfigParser()
    parser.read_config(_config_files(root, spatial_dims))
    check_override_keys(parser.get(), override, configs=" + ".join(_config_files(root, spatial_dims)))
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {p: {} for p in profiles}
    names: dict[str, list[str]] = {}
    description = ""
    failures: list[str] = []
    for method in methods:
        method_dir = out_root / method
        wf = ConfigWorkflow(
            config_file=_config_files(root, spatial_dims),
            meta_file=str(root / "configs" / "metadata.json"),
            logging_file=str(root / "configs" / "logging.conf"),
            workflow_type="infer",
            **{"bundle_root": str(root), **override},
            method=method,
            profile=profiles,
            output_dir=str(method_dir),
            overwrite=overwrite,
        )
        wf.initialize()
        valid = {(d.get("task", ""), d.get("id", "")) for d in wf.parser.get_parsed_content("pair_check").valid}
        description = wf.parser.get_parsed_content("report").data_description
        todo = []
        for p in profiles:
            csv_path = method_dir / f"metrics_{p}.csv"
            if reuse and csv_path.is_file():
                old, old_names = read_rows(csv_path)
                if {(r["task"], r["id"]) for r in old} == valid and len(old) == len(valid):
                    logger.info("%s, profile %s: reusing %s", method, p, csv_path)
                    rows[p][method], names[p] = old, old_names
                    continue
                logger.info("%s, profile %s: %s covers other pairs, re-running", method, p, csv_path)
            todo.append(p)
        if todo:
            if todo != profiles:
                wf.parser["profile"] = todo
                wf.initialize()
            wf.run()
            try:
                wf.finalize()
            except RuntimeError as e:  # pairs set aside: the tables are written, then the run fails
                cause = next((c for c in _causes(e) if isinstance(c, RunFailedError)), None)
                if cause is None:
                    raise
                failures.append(f"{method}: {cause}")
            report = wf.parser.get_parsed_content("report")
            for p in todo:
                rows[p][method], names[p] = report.rows[p], list(report.metric_names[p])
    written = {}
    for p in profiles:
        summaries = {m: summarise(r, names[p]) for m, r in rows[p].items()}
        table = [{**s, "method": m} for m, summary in summaries.items() for s in summary]
        tasks = list(dict.fromkeys(s["task"] for s in table))
        table = sorted(table, key=lambda s: (tasks.index(s["task"]), list(summaries).index(s["method"])))
        columns = ["task", "method", "n"] + [f"{m}_{s}" for m in names[p] for s in ("mean", "std")]
        md_path, csv_path = targets[p]
        write_text_atomic(csv_path, csv_text(table, columns))
        lines = [f"# Fusion metrics: {', '.join(methods)}, profile `{p}`", ""]
        lines += [
            f"- data: {description}",
            (
                "- scored images: F = fused grey / Y image in [0, 1]; sources = MRI and CT / PET-Y / SPECT-Y, each "
                "min-max normalised to [0, 1] as the methods received them; then the profile's scale"
                if spatial_dims == 2
                else "- scored volumes: F = fused volume in [0, 1] on the reference grid; sources = the two volumes, "
                "each normalised as the methods received them (minimum -> 0, 99.9th percentile -> 1, clipped); "
                "whole volumes, background included; then the profile's scale"
            ),
            "- table: mean ± sample standard deviation (n - 1) over pairs",
            "",
        ]
        lines += _conventions_markdown(p, names[p]) + [""] + comparison_markdown(summaries, names[p]) + [""]
        write_text_atomic(md_path, "\n".join(lines))
        written[f"comparison_{p}_md"], written[f"comparison_{p}_csv"] = md_path, csv_path
        logger.info("comparison (profile %s): %s", p, md_path)
    if failures:
        raise RunFailedError(f"comparison tables written, but pairs failed: {'; '.join(failures)}")
    return written


def _causes(err: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while err is not None and all(err is not e for e in out):
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def _parse_value(text: str) -> Any:
    """A command-line value: JSON, else a Python literal, else the string itself."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            continue
    return text


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Command line of :func:`compare`; further ``--key value`` pairs are config overrides."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.evaluate",
        description="Evaluate several fusion methods with configs/evaluate.json and write comparison tables. "
        "Other --key value pairs override config entries (e.g. --tasks \"['CT-MRI']\" --datalist FILE).",
    )
    parser.add_argument("--methods", nargs="+", default=list(BASELINES), choices=list(METHODS))
    parser.add_argument("--profile", nargs="+", default=["default"], help="one or more metric profiles")
    parser.add_argument("--output_dir", default=None, help="default: <bundle>/eval")
    parser.add_argument("--bundle_root", default=None)
    parser.add_argument("--reuse", action="store_true", help="reuse per-method CSVs that cover the same pairs")
    parser.add_argument("--overwrite", action="store_true", help="replace existing reports")
    parser.add_argument("--spatial_dims", type=int, default=2, choices=(2, 3), help="3: volumes, the 3D config stack")
    args, rest = parser.parse_known_args(argv)
    override: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        key = rest[i]
        if not key.startswith("--") or i + 1 >= len(rest):
            parser.error(f"expected --key value pairs after the known options, got {rest[i:]}")
        override[key[2:]] = _parse_value(rest[i + 1])
        i += 2
    return compare(
        methods=args.methods,
        profile=args.profile,
        output_dir=args.output_dir,
        bundle_root=args.bundle_root,
        reuse=args.reuse,
        overwrite=args.overwrite,
        spatial_dims=args.spatial_dims,
        **override,
    )


if __name__ == "__main__":
    from scripts.cli import install_error_hook

    install_error_hook()
    main()
