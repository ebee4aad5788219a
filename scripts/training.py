"""Training helpers for ``configs/train.json``: datalists by split, resumable runs, per-epoch log, progress bar.

Reproducibility and resume (see ``configs/train.json``): every epoch draws its data order and augmentation
from a seed derived from ``(seed, epoch, rank)`` (:class:`EpochSeed`), and checkpoints are written at epoch
boundaries only, so a run resumed from the checkpoint of epoch ``e`` repeats epochs ``e + 1, ...`` exactly as
an uninterrupted run would (bitwise on CPU). :class:`ResumeCheckpoint` keeps one resume file per run folder,
replaced atomically after every epoch; :func:`latest_checkpoint` finds the newest readable checkpoint of a run
folder; :func:`check_run_dir` refuses to start a fresh run over a folder that already holds one.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import re
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.data.utils import set_rnd
from monai.handlers import from_engine

from scripts.data import has_split_field, load_datalist, series_split

__all__ = [
    "CHECKPOINT_PATTERN",
    "RESUME_FILENAME",
    "EpochLog",
    "EpochSeed",
    "ResumeCheckpoint",
    "TrainingProgressBar",
    "check_run_dir",
    "epoch_seed",
    "fusion_datalist",
    "latest_checkpoint",
    "parameter_groups",
    "record_command",
]

logger = logging.getLogger(__name__)

#: file names of the epoch checkpoints written by ``CheckpointSaver(save_interval=1)`` (ignite naming)
CHECKPOINT_PATTERN = re.compile(r"^(?:.*_)?checkpoint_epoch=(\d+)\.pt$")
#: the one resume checkpoint of a run folder, overwritten after every epoch (:class:`ResumeCheckpoint`)
RESUME_FILENAME = "resume.pt"


def fusion_datalist(
    source: str | os.PathLike | Sequence[Mapping[str, Any]],
    split: str | Sequence[str] | None = None,
    tasks: str | Sequence[str] | None = None,
    val_fraction: float = 0.2,
) -> list[dict[str, str]]:
    """Pairs of one split (and some tasks) from a datalist source.

    A source without split information (a Harvard-layout folder without ``pairs.csv``, a CSV / JSON / list
    without a ``split`` field) is split by series, never by slice: :func:`scripts.data.series_split` puts whole
    series (pairs sharing an acquisition, :func:`scripts.data.series_of`) of each task into ``"val"``
    (about ``val_fraction`` of the pairs) and the rest into ``"train"``, deterministically, and logs the sizes.
    Training therefore never validates on its own training pairs.

    Args:
        source: a folder holding a ``pairs.csv`` (the Harvard copy), any source :func:`scripts.data.load_datalist`
            reads (CSV / JSON file with a ``split`` field, Harvard-layout folder), or a list of pair dicts.
        split: keep only entries of this split (``"train"``, ``"val"``, ...); ``None`` keeps all.
        tasks: keep only these tasks (e.g. ``["CT-MRI"]``); ``None`` keeps all.
        val_fraction: share of the pairs the series split puts into ``"val"`` (sources without a split only).

    Returns:
        list of ``{"mri", "other", "task", "id"}`` dicts (or ``{"image", ...}`` for single-file pairs).
    """
    if not isinstance(source, (list, tuple)) and (Path(str(source)) / "pairs.csv").is_file():
        source = Path(str(source)) / "pairs.csv"
    if split is not None and not has_split_field(source):
        items = series_split(load_datalist(source), val_fraction=val_fraction, source=source)
        wanted_splits = {split} if isinstance(split, str) else set(split)
        items = [{k: v for k, v in d.items() if k != "split"} for d in items if d["split"] in wanted_splits]
    else:
        items = load_datalist(source, split=split)
    if tasks is not None:
        wanted = {tasks} if isinstance(tasks, str) else set(tasks)
        items = [d for d in items if d.get("task") in wanted]
        if not items:
            raise ValueError(f"empty datalist: no pairs of tasks {sorted(wanted)} in split {split!r} of {source}")
    if not items:
        raise ValueError(f"empty datalist: no pairs in split {split!r} of {source}")
    return items


def _epoch_of(path: Path) -> int | None:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def _checkpoint_epoch(path: Path) -> int | None:
    """The epoch a checkpoint file was written after (its trainer state), or ``None`` if it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupt file
        logger.warning("skipping unreadable checkpoint %s: %s", path, e)
        return None
    trainer = state.get("trainer") if isinstance(state, Mapping) else None
    if isinstance(trainer, Mapping) and "epoch" in trainer:
        return int(trainer["epoch"])
    if isinstance(trainer, Mapping) and trainer.get("epoch_length"):  # ignite stores the iteration count
        return int(trainer.get("iteration", 0)) // int(trainer["epoch_length"])
    return _epoch_of(path) or 0


def _run_checkpoints(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name == RESUME_FILENAME or _epoch_of(p) is not None]


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """The newest readable checkpoint of a run folder (``resume.pt`` or ``checkpoint_epoch=N.pt``), or ``None``.

    Checkpoints are ordered by the epoch stored in them. A file that cannot be loaded (e.g. cut short by a kill
    while it was written) is skipped with a warning and the next older one is used.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        logger.info("no checkpoint to resume from: %s does not exist; starting from scratch", folder)
        return None
    readable = [(epoch, path) for path in _run_checkpoints(folder) if (epoch := _checkpoint_epoch(path)) is not None]
    if not readable:
        logger.info("no checkpoint to resume from in %s; starting from scratch", folder)
        return None
    epoch, path = max(readable, key=lambda item: (item[0], item[1].name == RESUME_FILENAME))
    logger.info("resuming from %s (after epoch %d)", path, epoch)
    return str(path)


def check_run_dir(ckpt_dir: str | os.PathLike, resume_from: str | None = None) -> None:
    """Refuse a fresh run (``resume_from is None``) in a folder that holds checkpoints of another run.

    Raises:
        FileExistsError: naming the folder and the two ways out (resume, or another folder).
    """
    folder = Path(ckpt_dir)
    if resume_from is not None or not folder.is_dir():
        return
    found = sorted(p.name for p in _run_checkpoints(folder))
    if found:
        raise FileExistsError(
            f"{folder} already holds training checkpoints ({', '.join(found)}); pass --resume true to continue "
            "that run, or choose a new --output_dir (or --ckpt_dir) to start a fresh one"
        )


class ResumeCheckpoint:
    """Write everything needed to resume to one file, ``resume.pt`` in ``save_dir``, after every epoch.

    The file is replaced atomically (written beside it, then renamed), so a kill while saving leaves the previous
    epoch's checkpoint intact. Its keys are those of ``save_dict``, each holding that object's ``state_dict()``, as
    MONAI's ``CheckpointLoader`` reads them.

    Args:
        save_dir: the run folder.
        save_dict: name -> object with ``state_dict()`` (network, optimizer, scheduler, engines, best saver).
        filename: the file name in ``save_dir``.
    """

    def __init__(self, save_dir: str | os.PathLike, save_dict: Mapping[str, Any], filename: str = RESUME_FILENAME):
        self.path = Path(save_dir) / filename
        self.save_dict = dict(save_dict)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        state = {}
        for name, obj in self.save_dict.items():
            module = getattr(obj, "module", obj) if isinstance(obj, torch.nn.parallel.DistributedDataParallel) else obj
            state[name] = module.state_dict()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def parameter_groups(
    network: torch.nn.Module, lr: float, lr_multipliers: Mapping[str, float] | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: parameters named with a prefix of ``lr_multipliers`` learn at ``lr * factor``.

    The first group holds every other parameter at ``lr`` (the rate the epoch log reports). A prefix that matches
    no parameter (e.g. ``"selection."`` for a network built without the source-selection output) adds no group.

    Args:
        network: the network (a ``DistributedDataParallel`` wrapper's ``module.`` prefix is ignored).
        lr: base learning rate.
        lr_multipliers: parameter-name prefix -> learning-rate factor, e.g. ``{"selection.": 10.0}``.
    """
    multipliers = dict(lr_multipliers or {})
    groups: dict[str, list[torch.nn.Parameter]] = {prefix: [] for prefix in multipliers}
    base: list[torch.nn.Parameter] = []
    for name, param in network.named_parameters():
        name = name.removeprefix("module.")
        prefix = next((p for p in multipliers if name.startswith(p)), None)
        (base if prefix is None else groups[prefix]).append(param)
    out: list[dict[str, Any]] = [{"params": base, "lr": lr}]
    out += [{"params": params, "lr": lr * multipliers[p]} for p, params in groups.items() if params]
    return out


def _shell_quote(arg: str) -> str:
    """``arg`` for a POSIX shell: bare when safe, in double quotes when that needs no escapes, else ``shlex``."""
    quoted = shlex.quote(arg)
    if quoted == arg or any(c in arg for c in '"$`\\!'):
        return quoted
    return f'"{arg}"'


def record_command(output_dir: str | os.PathLike, argv: Sequence[str] | None = None) -> Path:
    """Append the command that started (or resumed) a run to ``output_dir/command.txt``, with the UTC time.

    ``python -m monai.bundle`` runs are written as such (``sys.argv[0]`` is MONAI's ``__main__.py``).
    """
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].replace(os.sep, "/").endswith("monai/bundle/__main__.py"):
        program = "python -m monai.bundle"
    else:
        program = shlex.quote(argv[0]) if argv else "python"
    line = " ".join([program, *(_shell_quote(a) for a in argv[1:])])
    path = Path(output_dir) / "command.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n{line}\n")
    return path


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 32-bit seed mixed from ``(seed, epoch, rank)`` (NumPy ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(rank)]).generate_state(1)[0])


class EpochSeed:
    """Reseed every random source at the start of each epoch from ``(seed, epoch, rank)``.

    Seeds Python's ``random``, NumPy's and PyTorch's global generators (the ``DataLoader`` draws its shuffling
    order and worker seeds from PyTorch's when its iterator is created, after ``EPOCH_STARTED``) and the random
    transforms of ``transform`` (used in the main process when ``num_workers=0``; workers are reseeded by MONAI's
    ``worker_init_fn`` from the PyTorch seed). An epoch's data then do not depend on what ran before it, so a
    resumed run repeats the epochs of an uninterrupted one exactly.

    Args:
        seed: the run's seed.
        transform: the training transform (or dataset) whose random transforms are reseeded.
        rank: process rank mixed into the seed (default: the ``torch.distributed`` rank, 0 without it).
    """

    def __init__(self, seed: int, transform: Any = None, rank: int | None = None) -> None:
        self.seed = int(seed)
        self.transform = transform
        self.rank = rank

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        seed = epoch_seed(self.seed, engine.state.epoch, _rank() if self.rank is None else self.rank)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also seeds every CUDA device
        if self.transform is not None:
            set_rnd(self.transform, seed)


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 else None
    if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        return float(value)
    return None


class EpochLog:
    """Per-epoch training log as a CSV file (one row per epoch), also summarised in the logger.

    Columns: ``epoch``, ``iterations`` (total so far), ``lr`` (used in the epoch), ``train_loss`` (mean over the
    epoch's iterations of this process), ``train_<term>`` for each term of ``loss.last_terms`` (e.g. the
    :class:`scripts.losses.FusionLoss` terms), each scalar metric of ``validator`` when it ran in this epoch (named
    as in the validator, ``val_`` prefixed if it is not already), ``best_metric`` / ``best_epoch`` of the validator,
    then ``epoch_seconds`` and ``finished_at`` (UTC). The file is rewritten atomically after each epoch; a resumed
    run keeps the rows of the epochs before its first one and drops any later rows (written after the checkpoint
    it resumed from). With DistributedDataParallel, attach it on rank 0 only (the training loss is then rank 0's).

    Args:
        filename: the CSV file to write.
        loss: the loss module; its ``last_terms`` dict (if any) is averaged per epoch.
        optimizer: its first parameter group's learning rate is logged.
        validator: the validation engine (a MONAI evaluator).
        output_transform: training engine output -> loss value.
        name: logger name.
    """

    def __init__(
        self,
        filename: str | os.PathLike,
        loss: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        validator: Engine | None = None,
        output_transform: Callable = from_engine(["loss"], first=True),
        name: str | None = "ClinicalFMamba",
    ) -> None:
        self.filename = Path(filename)
        self.loss = loss
        self.optimizer = optimizer
        self.validator = validator
        self.output_transform = output_transform
        self.logger = logging.getLogger(name)
        self.rows: list[dict[str, Any]] = []
        self._sums: dict[str, float] = {}
        self._count = 0
        self._lr: float | None = None
        self._start = 0.0
        self._restored = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def started(self, engine: Engine) -> None:
        self._restored = False

    def epoch_started(self, engine: Engine) -> None:
        if not self._restored:  # first epoch of this run: keep the rows of the epochs already done (resume)
            self._restored = True
            self.rows = []
            if engine.state.epoch > 1 and self.filename.is_file():
                with open(self.filename, newline="") as f:
                    self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < engine.state.epoch]
        self._sums, self._count, self._start = {}, 0, time.perf_counter()
        self._lr = float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else None

    def iteration_completed(self, engine: Engine) -> None:
        values = {"loss": _scalar(self.output_transform(engine.state.output))}
        for key, value in (getattr(self.loss, "last_terms", None) or {}).items():
            if key != "total":
                values[key] = _scalar(value)
        for key, value in values.items():
            if value is not None:
                self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1

    def epoch_completed(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        row: dict[str, Any] = {"epoch": epoch, "iterations": engine.state.iteration, "lr": self._lr}
        for key, total in self._sums.items():
            row[f"train_{key}"] = total / max(self._count, 1)
        validator = self.validator
        if validator is not None and validator.state.epoch == epoch and validator.state.metrics:
            for key, value in validator.state.metrics.items():
                value = _scalar(value)
                if value is not None:
                    row[key if key.startswith("val") else f"val_{key}"] = value
        if validator is not None and getattr(validator.state, "best_metric_epoch", -1) > 0:
            row["best_metric"] = _scalar(validator.state.best_metric)
            row["best_epoch"] = validator.state.best_metric_epoch
        row["epoch_seconds"] = round(time.perf_counter() - self._start, 3)
        row["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.rows.append(row)
        self._write()
        shown = ", ".join(
            f"{k} {v:.5g}" for k, v in row.items() if k not in ("epoch", "iterations", "finished_at") and _finite(v)
        )
        self.logger.info("epoch %d/%s: %s", epoch, engine.state.max_epochs, shown)

    def _write(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns.extend(k for k in row if k not in columns)
        columns = [c for c in columns if c not in _TIMING_COLUMNS] + [c for c in _TIMING_COLUMNS if c in columns]
        self.filename.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.filename.with_name(f".{self.filename.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.filename)


_TIMING_COLUMNS = ("epoch_seconds", "finished_at")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _loss_output(output: Any) -> dict[str, float]:
    return {"loss": float(from_engine(["loss"], first=True)(output))}


class TrainingProgressBar(ProgressBar):
    """ignite ``ProgressBar`` that shows the loss when attached by a MONAI engine (``handler.attach(engine)``).

    Args:
        output_transform: engine output -> ``{name: value}`` shown in the bar; default ``{"loss": loss}``.
        kwargs: ``ProgressBar`` arguments (``persist``, ``desc``, ...).
    """

    def __init__(self, output_transform: Callable | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._show = output_transform or _loss_output

    def attach(  # type: ignore[override]
        self, engine: Engine, metric_names: Any = None, output_transform: Callable | None = None, **kwargs: Any
    ) -> None:
        super().attach(engine, metric_names=metric_names, output_transform=output_transform or self._show, **kwargs)
