"""Check every pair of a datalist before any compute: from the file headers, then by decoding the pixels.

:func:`check_pairs` combines the header checks of :mod:`scripts.data` (:func:`scripts.data.header_problem`: empty or
unsupported files, channel counts, dimensionality, sizes, NIfTI voxel grids) with the workflows' own loading
transforms (:func:`scripts.transforms.validate_pair`: truncated or corrupt pixel data, NaN/Inf voxels). Pairs that
cannot be fused are set aside with a reason naming the file(s), or stop the run (``on_error="raise"``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scripts.data import PathLike, check_tasks, header_problem, load_datalist
from scripts.transforms import validate_pair

__all__ = ["PairCheck", "check_pairs"]

logger = logging.getLogger(__name__)


@dataclass
class PairCheck:
    """Result of :func:`check_pairs`: pairs that can be fused and ``(pair, reason)`` for those that cannot."""

    valid: list[dict[str, str]] = field(default_factory=list)
    failed: list[tuple[dict[str, str], str]] = field(default_factory=list)


def check_pairs(
    datalist: PathLike | Sequence[Mapping[str, Any]],
    on_error: str = "skip",
    split: str | Sequence[str] | None = None,
    spatial_dims: int | None = None,
    expected_tasks: str | Sequence[str] | None = None,
    read_pixels: bool = True,
    resample: bool = False,
    tolerance: float = 1e-3,
    set_aside: Sequence[tuple[Mapping[str, Any], str]] = (),
) -> PairCheck:
    """Check every pair before any compute: readable, supported, consistent, finite.

    Header checks (no pixels read): the files exist and are not empty, their format is supported, their
    channel counts are 1, 3 or 4 (2 for a single-file pair), their dimensionality fits ``spatial_dims``, both
    images have the same size and, for NIfTI pairs, the same voxel grid (spacing, orientation, origin within
    ``tolerance``). With ``read_pixels`` the pair is then loaded with the workflows' own transforms
    (:func:`validate_pair`), which also finds truncated or corrupt pixel data and NaN/Inf
    voxels.

    Args:
        datalist: a datalist or any source :func:`scripts.data.load_datalist` reads (folder, CSV, JSON).
        on_error: ``"skip"``: log an error naming the file(s) and set the pair aside in ``failed``; a datalist
            entry naming a missing file is a bad pair like any other;
            ``"raise"``: raise at the first bad pair or datalist entry (nothing is fused).
        split: for CSV/JSON sources, keep only entries of this split.
        spatial_dims: 2 or 3: the workflow's dimensionality (``None``: not checked).
        expected_tasks: the tasks the workflow is meant for; a datalist holding other tasks is refused
            (:func:`scripts.data.check_tasks`). ``None``: any task.
        read_pixels: also decode the pixels (twice the reading, but every unreadable pair is found up front).
        resample: NIfTI pairs on different voxel grids are accepted (the workflow resamples the other image
            onto the reference grid) instead of set aside.
        tolerance: voxel-grid tolerance (:func:`scripts.data.geometry_differences`).
        set_aside: entries already found bad while the datalist was built (``(entry, reason)``), reported first.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    bad_entries: list[tuple[dict[str, str], str]] | None = [] if on_error == "skip" else None
    items = load_datalist(datalist, split=split, errors=bad_entries)
    check_tasks(items, expected_tasks, datalist)
    result = PairCheck()
    for item, reason in [*set_aside, *(bad_entries or [])]:
        logger.error("skipping datalist entry: %s", reason)
        result.failed.append((dict(item), reason))
    for item in items:
        try:
            reason = header_problem(item, spatial_dims, resample, tolerance)
            if reason is None and read_pixels:
                validate_pair(item, spatial_dims=spatial_dims, resample=resample, tolerance=tolerance)
        except Exception as e:
            reason = str(e)
        if reason is None:
            result.valid.append(dict(item))
            continue
        if on_error == "raise":
            raise ValueError(reason)
        logger.error("skipping pair: %s", reason)
        result.failed.append((dict(item), reason))
    return result
