"""The CNN recipe shared by every arm of the study: the bundle's one training loop.

One binary logit per image (``num_classes=1`` / ``out_channels=1``), ``BCEWithLogitsLoss`` with per-sample
weights (:func:`balanced_weights`: the two classes, and optionally each patient, carry equal total weight),
AdamW, mini-batches drawn in a seeded random order, a MONAI augmentation applied per training image, and early
stopping: after every epoch the network scores an inner validation split (patients of the *training* fold
only, :func:`inner_validation_split`); training stops after ``patience`` epochs without improvement and the
weights of the best epoch are restored. The network is any MONAI 2-D classifier given as a callable
(``"_mode_": "callable"`` in the config) that takes the number of input channels as keyword
``in_channels_arg``; its initial weights depend on the fit seed only, so every arm starts from the same random
state.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from torch import nn

from .stats import auc

__all__ = ["balanced_weights", "build_classifier", "fit_classifier", "inner_validation_split", "predict_proba"]

logger = logging.getLogger(__name__)


def build_classifier(
    classifier_def: Callable[..., nn.Module], in_channels: int, in_channels_arg: str, seed: int
) -> nn.Module:
    """``classifier_def(**{in_channels_arg: in_channels})`` with the torch RNG seeded by ``seed``."""
    torch.manual_seed(int(seed))
    return classifier_def(**{in_channels_arg: int(in_channels)})


def balanced_weights(targets: Sequence[int], groups: Sequence[Hashable] | None = None) -> np.ndarray:
    """Per-sample loss weights, mean 1: both classes carry the same total weight and, with ``groups`` (the
    patient of each sample), every group carries the same weight within its class, whatever its number of
    slices. ``targets``: ``(N,)`` 0/1."""
    y = np.asarray(targets, dtype=np.int64)
    if y.size == 0:
        return np.zeros(0)
    g = np.arange(y.size) if groups is None else np.asarray([str(v) for v in groups])
    w = np.zeros(y.size, dtype=np.float64)
    for cls in np.unique(y):
        in_cls = y == cls
        units, counts = np.unique(g[in_cls], return_counts=True)
        per_unit = dict(zip(units, counts))
        w[in_cls] = [1.0 / (len(units) * per_unit[v]) for v in g[in_cls]]  # class total 1, each unit 1/len(units)
    return w * (y.size / w.sum())


def inner_validation_split(
    index: np.ndarray, targets: np.ndarray, groups: Sequence[Hashable], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split the training units ``index`` (aligned with ``targets`` and ``groups`` = patient of each unit) into
    inner-training and validation positions, whole patients on each side, stratified by ``targets``
    (``StratifiedGroupKFold``, fold 0 of ``round(1 / fraction)``). Returns positions into ``index``; the
    validation part is empty when ``fraction <= 0`` or fewer than two patients are given."""
    from sklearn.model_selection import StratifiedGroupKFold

    n = len(index)
    n_groups = len(set(groups))
    if fraction <= 0 or n_groups < 2:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    k = int(min(max(2, round(1.0 / fraction)), n_groups))
    y = np.asarray(targets)
    stratify = y if np.bincount(y, minlength=2).min() >= k else np.zeros_like(y)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=int(seed) % (2**32))
    train_pos, val_pos = next(splitter.split(np.zeros(n), stratify, groups=list(groups)))
    return np.sort(train_pos), np.sort(val_pos)


def _batch(images: torch.Tensor, idx: torch.Tensor, augment: Callable[[torch.Tensor], Any] | None) -> torch.Tensor:
    if augment is None:
        return images[idx]
    return torch.stack([torch.as_tensor(augment(images[i])) for i in idx.tolist()])


def fit_classifier(
    network: nn.Module,
    images: torch.Tensor,
    targets: np.ndarray,
    index: np.ndarray,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    seed: int,
    sample_weights: np.ndarray | None = None,
    augment: Callable[[torch.Tensor], Any] | None = None,
    val_index: np.ndarray | None = None,
    val_targets: np.ndarray | None = None,
    patience: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train ``network`` on ``images[index]`` (``images``: ``(N, C, H, W)``) with binary ``targets`` (aligned
    with ``index``), at most ``epochs`` epochs.

    Args:
        sample_weights: per-sample loss weights aligned with ``index`` (``None``: all 1).
        augment: applied to each training image ``(C, H, W)`` when it enters a batch (a seeded MONAI ``Compose``).
        val_index, val_targets: the inner validation units; without them the last epoch is kept.
        patience: stop after this many epochs without a better validation score (``None``: run all epochs).
            The score is the validation ROC AUC, or minus the validation loss when ``val_targets`` hold one
            class only. The best epoch's weights are restored (the earliest one on ties).

    Returns:
        dict with ``seconds`` (wall), ``cpu_seconds`` (process CPU time, all threads), ``epoch_loss`` (mean
        training loss per epoch), ``val_auc`` / ``val_loss`` per epoch, ``val_metric``, ``best_epoch``
        (1-based; the epoch whose weights the network now holds), ``epochs_run`` and ``n_val``.
    """
    device = torch.device(device)
    network.to(device).train()
    y_all = torch.as_tensor(np.asarray(targets, dtype=np.float32))
    idx_all = torch.as_tensor(np.asarray(index, dtype=np.int64))
    w_all = torch.as_tensor(np.ones(len(idx_all)) if sample_weights is None else sample_weights, dtype=torch.float32)
    has_val = val_index is not None and len(val_index) > 0
    val_y = np.asarray(val_targets if val_targets is not None else [], dtype=np.int64)
    val_metric = "auc" if has_val and 0 < val_y.sum() < len(val_y) else "neg_loss"
    loss_fn = nn.BCEWithLogitsLoss(reduction="none")
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(int(seed))
    t0, c0 = time.perf_counter(), time.process_time()
    history: list[float] = []
    val_auc: list[float] = []
    val_loss: list[float] = []
    best_score, best_epoch, best_state = -math.inf, len(history), None
    track_meta = get_track_meta()
    set_track_meta(False)  # plain tensors out of the MONAI transforms: 3x less augmentation overhead
    try:
        for epoch in range(int(epochs)):
            network.train()
            order = torch.randperm(len(idx_all), generator=gen)
            total, count = 0.0, 0
            for start in range(0, len(order), batch_size):
                sel = order[start : start + batch_size]
                if len(sel) < 2 and len(order) > 1:  # BatchNorm needs two samples; drop a last singleton
                    continue
                x = _batch(images, idx_all[sel], augment).to(device)
                y, w = y_all[sel].to(device), w_all[sel].to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = (loss_fn(network(x).reshape(-1), y) * w).mean()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(sel)
                count += len(sel)
            history.append(total / max(count, 1))
            if not has_val:
                continue
            p = np.clip(predict_proba(network, images, val_index, device=device), 1e-7, 1 - 1e-7)
            val_loss.append(float(-np.mean(val_y * np.log(p) + (1 - val_y) * np.log(1 - p))))
            val_auc.append(auc(val_y, p) if val_metric == "auc" else math.nan)
            score = val_auc[-1] if val_metric == "auc" else -val_loss[-1]
            if score > best_score:
                best_score, best_epoch = score, epoch + 1
                best_state = copy.deepcopy(network.state_dict())
            elif patience is not None and epoch + 1 - best_epoch >= int(patience):
                break
    finally:
        set_track_meta(track_meta)
    if best_state is not None:
        network.load_state_dict(best_state)
    else:
        best_epoch = len(history)
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "epoch_loss": history,
        "val_auc": val_auc,
        "val_loss": val_loss,
        "val_metric": val_metric if has_val else "none",
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "n_val": len(val_index) if has_val else 0,
    }


def predict_proba(
    network: nn.Module,
    images: torch.Tensor,
    index: np.ndarray,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Sigmoid probabilities of ``images[index]`` (eval mode, no augmentation)."""
    device = torch.device(device)
    network.to(device).eval()
    idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
    out = []
    with torch.inference_mode():
        for start in range(0, len(idx), batch_size):
            x = images[idx[start : start + batch_size]].to(device)
            out.append(torch.sigmoid(network(x).reshape(-1).float()).cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)
