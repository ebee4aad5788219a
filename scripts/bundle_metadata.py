"""Bundle metadata upkeep: ``eval_metrics`` from the committed evaluation records, and consistency checks.

``metadata.json`` is the one source; ``configs/metadata.json`` is a byte-identical copy (MONAI tools and
MONAI Label read it there). ``eval_metrics`` is never typed by hand: it is rendered from the evaluation records,
the per-task summaries that ``python -m scripts.evaluate`` writes (``summary_<profile>.md``: ``| task | n | METRIC
... |`` rows of ``mean ± sd``) or that ``python -m scripts.model_selection`` writes (``summary_<profile>.json``, one
method chosen with ``#METHOD``), so a new evaluation of new weights is one command away from the metadata::

    python -m scripts.bundle_metadata --records cddfuse=docs/results/test/summary_cddfuse.json#METHOD --data "..."
    python -m scripts.bundle_metadata                      # re-read the records named in eval_metrics["source"]
    python -m scripts.bundle_metadata --check              # exit 1 if the metadata differs from its records

``required_packages_version`` must list the runtime packages of ``requirements.txt`` (besides torch, MONAI and
numpy, which have their own fields) at versions that satisfy it; :func:`check_required_packages` says which
do not. The CUDA-only ``mamba-ssm`` accelerator is optional and stays out of the metadata (MONAI maps the
deprecated ``optional_packages_version`` key onto ``required_packages_version``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

__all__ = [
    "BUNDLE_ROOT",
    "RECORDS",
    "TEST_DATA",
    "check_required_packages",
    "eval_metrics_from_records",
    "read_record",
    "read_summary_table",
    "write_metadata",
]

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
# the evaluation records of the shipped 2D weights on the Harvard test split, one per metric profile
RECORDS = {
    "cddfuse": "training/harvard2d_selection/test_cddfuse.md",
    "clinicalfmamba": "training/harvard2d_selection/test_clinicalfmamba.md",
}
TEST_DATA = (
    "Harvard Whole Brain Atlas test split (docs/data/harvard_pairs.csv): 176 pairs, CT-MRI 21, PET-MRI 82, SPECT-MRI 73"
)
# requirement names with a metadata field of their own
OWN_FIELDS = {"torch", "monai", "numpy"}
_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?(?:e-?\d+)?)\s*(?:±|$)")


def read_summary_table(path: str | Path) -> dict[str, dict[str, float]]:
    """Per-task means of a ``scripts.evaluate`` summary markdown: ``{task: {metric: mean}}`` (task ``all`` too).

    Raises:
        ValueError: naming the file, when it holds no ``| task | n | ...`` table or a cell is not ``mean ± sd``.
    """
    path = Path(path)
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip().startswith("|")]
    header = next((i for i, ln in enumerate(lines) if re.match(r"^\|\s*task\s*\|\s*n\s*\|", ln)), None)
    if header is None:
        raise ValueError(f"{path}: no '| task | n | ...' summary table (scripts.evaluate's summary_<profile>.md)")
    names = [c.strip() for c in lines[header].strip("|").split("|")][2:]
    table: dict[str, dict[str, float]] = {}
    for line in lines[header + 2 :]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(names) + 2:
            break
        values = {}
        for name, cell in zip(names, cells[2:]):
            m = _NUMBER.match(cell)
            if m is None:
                raise ValueError(f"{path}: task {cells[0]!r}, metric {name!r}: cannot read a mean from {cell!r}")
            values[name] = float(m.group(1))
        table[cells[0]] = values
    if not table:
        raise ValueError(f"{path}: the summary table has no rows")
    return table


def read_record(spec: str, root: str | Path = BUNDLE_ROOT) -> dict[str, dict[str, float]]:
    """Per-task means of one record, named relative to ``root``: ``FILE.md`` (a ``scripts.evaluate`` summary
    markdown) or ``FILE.json#METHOD`` (a ``scripts.model_selection`` ``summary_<profile>.json``, one method's rows).

    Raises:
        ValueError: naming the file, for a JSON record without ``#METHOD`` or without that method.
    """
    rel, _, method = spec.partition("#")
    path = Path(root) / rel
    if path.suffix.lower() != ".json":
        return read_summary_table(path)
    record = json.loads(path.read_text(encoding="utf-8"))
    record = record.get("methods", record)  # summary_<profile>.json: {"split", "profile", "metrics", "methods"}
    if method not in record:
        raise ValueError(f"{path}: name the method as {rel}#METHOD, one of {sorted(record)}")
    return {
        task: {k: float(v["mean"]) for k, v in cells.items() if isinstance(v, Mapping) and v.get("mean") is not None}
        for task, cells in record[method].items()
    }


def eval_metrics_from_records(
    records: Mapping[str, str] = RECORDS, root: str | Path = BUNDLE_ROOT, data: str = TEST_DATA
) -> dict:
    """The ``eval_metrics`` entry: for each profile ``{task: {metric: mean over pairs}}``, with data and sources."""
    metrics: dict = {"data": data, "statistic": "mean over pairs per task (and over all pairs: 'all')"}
    metrics["source"] = dict(records)
    for profile, spec in records.items():
        metrics[profile] = read_record(spec, root)
    return metrics


def check_required_packages(meta: Mapping, requirements: str | Path) -> list[str]:
    """Problems of ``meta['required_packages_version']`` against a requirements file; empty when consistent.

    Every requirement (extras of MONAI included, torch / MONAI / numpy excepted) must be listed at a version
    that satisfies its specifier, nothing else may be listed, and ``mamba-ssm`` must not be required.
    """
    listed = {canonicalize_name(k): v for k, v in meta.get("required_packages_version", {}).items()}
    wanted: dict[str, Requirement] = {}
    for raw in Path(requirements).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        wanted.setdefault(canonicalize_name(req.name), req)
        for extra in req.extras:
            wanted.setdefault(canonicalize_name(extra), Requirement(extra))
    problems = []
    for name, req in sorted(wanted.items()):
        if name in OWN_FIELDS:
            continue
        if name not in listed:
            problems.append(f"{name}: in {Path(requirements).name} but not in required_packages_version")
        elif not req.specifier.contains(Version(listed[name]), prereleases=True):
            problems.append(f"{name}: metadata version {listed[name]} does not satisfy '{req.specifier}'")
    extra = sorted(set(listed) - set(wanted))
    problems += [f"{name}: in required_packages_version but not a runtime requirement" for name in extra]
    if "optional_packages_version" in meta:
        problems.append("optional_packages_version: deprecated key (MONAI reads it as required_packages_version)")
    return problems


def write_metadata(meta: Mapping, root: str | Path = BUNDLE_ROOT) -> list[Path]:
    """Write ``meta`` to ``metadata.json`` and its copy ``configs/metadata.json`` (same bytes); returns both paths."""
    text = json.dumps(meta, indent=4, ensure_ascii=False) + "\n"
    paths = [Path(root) / "metadata.json", Path(root) / "configs" / "metadata.json"]
    for path in paths:
        if path.is_symlink():
            path.unlink()  # a real file, never a link (links break on some checkouts)
        path.write_text(text, encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(BUNDLE_ROOT), help="bundle root (holds metadata.json)")
    parser.add_argument(
        "--records",
        nargs="+",
        metavar="PROFILE=FILE",
        help="summary_<profile>.md, or summary_<profile>.json#METHOD, relative to the root",
    )
    parser.add_argument("--data", default=None, help="what the records scored (default: as in the metadata)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the metadata is stale")
    args = parser.parse_args(argv)
    root = Path(args.root)
    meta = json.loads((root / "metadata.json").read_text(encoding="utf-8"))
    current = meta.get("eval_metrics") or {}
    records = dict(r.split("=", 1) for r in args.records) if args.records else current.get("source", RECORDS)
    expected = eval_metrics_from_records(records, root, args.data or current.get("data", TEST_DATA))
    if args.check:
        problems = check_required_packages(meta, root / "requirements.txt")
        if meta.get("eval_metrics") != expected:
            problems.append("eval_metrics differ from the records (python -m scripts.bundle_metadata rewrites them)")
        copy = root / "configs" / "metadata.json"
        if not copy.is_file() or copy.is_symlink() or copy.read_bytes() != (root / "metadata.json").read_bytes():
            problems.append(f"{copy}: not a real, identical copy of metadata.json")
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    meta["eval_metrics"] = expected
    for path in write_metadata(meta, root):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
