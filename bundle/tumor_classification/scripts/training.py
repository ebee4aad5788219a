"""The fixed classifier recipe shared by every arm of the study.

One binary logit per slice (``num_classes=1`` / ``out_channels=1``), ``BCEWithLogitsLoss`` with
``pos_weight = n_negative / n_positive`` of the training slices (class balance), AdamW, a fixed number of
epochs without early stopping or model selection (nothing is tuned on test patients), mini-batches drawn in a
seeded random order, and random left-right flips (p = ``flip_prob``) as the only augmentation. The network is
any MONAI 2-D classifier given as a callable (``"_mode_": "callable"`` in the config) that takes the number of
input channels as keyword ``in_channels_arg``; its initial weights depend on the fit seed only, so every arm
starts from the same random state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["build_classifier", "fit_classifier", "predict_proba"]

logger = logging.getLogger(__name__)


def build_classifier(classifier_def: Callable[..., nn.Module], in_channels: int, in_channels_arg: str, seed: int) -> nn.Module:
    """``classifier_def(**{in_channels_arg: in_channels})`` with the torch RNG seeded by ``seed``."""
    torch.manual_seed(int(seed))
    return classifier_def(**{in_channels_arg: int(in_channels)})


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
    flip_prob: float = 0.5,
    class_balance: bool = True,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train ``network`` on ``images[index]`` with binary ``targets`` (aligned with ``index``).

    Returns:
        dict with ``seconds`` (wall), ``cpu_seconds`` (process CPU time, all threads), ``epoch_loss`` (mean training loss per epoch) and ``pos_weight``.
    """
    device = torch.device(device)
    network.to(device).train()
    y_all = torch.as_tensor(np.asarray(targets, dtype=np.float32))
    idx_all = torch.as_tensor(np.asarray(index, dtype=np.int64))
    n_pos = float(y_all.sum())
    n_neg = float(len(y_all) - n_pos)
    pos_weight = (n_neg / n_pos) if (class_balance and n_pos > 0 and n_neg > 0) else 1.0
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight], device=device))
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(int(seed))
    t0, c0 = time.perf_counter(), time.process_time()
    history = []
    for _ in range(int(epochs)):
        order = torch.randperm(len(idx_all), generator=gen)
        flips = torch.rand(len(idx_all), generator=gen) < flip_prob
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            sel = order[start : start + batch_size]
            if len(sel) < 2 and len(order) > 1:  # BatchNorm needs two samples; drop a last singleton
                continue
            x = images[idx_all[sel]].clone()
            f = flips[sel]
            if f.any():
                x[f] = torch.flip(x[f], dims=[-1])
            x, y = x.to(device), y_all[sel].to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = network(x).reshape(-1)
            loss = loss_fn(logits, y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(sel)
            count += len(sel)
        history.append(total / max(count, 1))
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "epoch_loss": history,
        "pos_weight": pos_weight,
    }


def predict_proba(
    network: nn.Module, images: torch.Tensor, index: np.ndarray, batch_size: int = 128, device: torch.device | str = "cpu"
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
