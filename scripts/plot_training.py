"""Training curves from a run's per-epoch CSV log (``training_log.csv`` written by ``configs/train.json``)::

    python -m scripts.plot_training training/harvard2d/training_log.csv --output docs/figures/harvard2d_curves.png

One panel for the total loss (training, and validation where logged), one for the training loss terms
(``train_*`` columns: intensity, gradient, SSIM), one for the learning rate, and one per validation metric
(``val_*`` columns; they are empty on epochs without validation, which are skipped, not drawn as zeros). The key
metric's best epoch (``best_epoch`` column) is marked. An existing figure is replaced only with ``--overwrite true``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["VAL_LABELS", "plot_training_log", "read_training_log"]

VAL_LABELS = {
    "val_qabf": "Q^AB/F (key metric)",
    "val_loss": "loss",
    "val_ssim": "SSIM",
    "val_mi": "MI",
    "val_scd": "SCD",
    "val_sf": "SF",
    "val_en": "EN",
    "val_sd": "SD",
}


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def read_training_log(path: str | Path) -> dict[str, list[float]]:
    """Numeric columns of a training log, one value per epoch (NaN where a cell is empty).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: naming the file, when it has no ``epoch`` column or no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training log not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "epoch" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: no 'epoch' column (expected the training_log.csv of configs/train.json)")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: the training log has no epochs")
    columns = {name: [_number(r.get(name)) for r in rows] for name in reader.fieldnames or []}
    return {name: values for name, values in columns.items() if not all(math.isnan(v) for v in values)}


def _points(epochs: list[float], values: list[float]) -> tuple[list[float], list[float]]:
    kept = [(e, v) for e, v in zip(epochs, values) if not math.isnan(v)]
    return [e for e, _ in kept], [v for _, v in kept]


def plot_training_log(path: str | Path, output: str | Path, title: str | None = None, overwrite: bool = False) -> Path:
    """Draw the curves of one training log into ``output`` (PNG); returns the path.

    Raises:
        FileExistsError: when ``output`` exists and ``overwrite`` is false.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; choose another --output or pass --overwrite true")
    log = read_training_log(path)
    epochs = log["epoch"]
    terms = [c for c in log if c.startswith("train_") and c != "train_loss"]
    metrics = [c for c in VAL_LABELS if c in log and c != "val_loss"]
    metrics += [c for c in log if c.startswith("val_") and c not in VAL_LABELS]
    panels = ["loss"] + (["terms"] if terms else []) + (["lr"] if "lr" in log else []) + metrics
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.8 * nrows), squeeze=False)
    best = [b for b in log.get("best_epoch", []) if not math.isnan(b)]
    best_epoch = best[-1] if best else None
    for ax, panel in zip(axes.flat, panels):
        if panel == "loss":
            for col, label in (("train_loss", "training"), ("val_loss", "validation")):
                if col in log:
                    ax.plot(*_points(epochs, log[col]), marker=".", label=label)
            ax.set_title("total loss")
            ax.legend(fontsize=7)
        elif panel == "terms":
            for col in terms:
                ax.plot(*_points(epochs, log[col]), marker=".", label=col.removeprefix("train_"))
            ax.set_title("training loss terms (unweighted)")
            ax.legend(fontsize=7)
        elif panel == "lr":
            ax.plot(*_points(epochs, log["lr"]), marker=".")
            ax.set_title("learning rate")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        else:
            ax.plot(*_points(epochs, log[panel]), marker="o", color="tab:green")
            ax.set_title(f"validation {VAL_LABELS.get(panel, panel.removeprefix('val_'))}")
            if panel == "val_qabf" and best_epoch is not None:
                ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=0.8, label=f"best epoch {best_epoch:g}")
                ax.legend(fontsize=7)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title or f"training curves: {Path(path).parent.name or Path(path).name}")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", help="a run's training_log.csv")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--title", default=None, help="figure title (default: the run folder's name)")
    parser.add_argument("--overwrite", default="false", choices=["true", "false"], help="replace an existing figure")
    args = parser.parse_args(argv)
    try:
        out = plot_training_log(args.log, args.output, args.title, args.overwrite == "true")
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
