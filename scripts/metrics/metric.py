"""MONAI metric class wrapping the fusion-metric profiles, for engines, handlers and evaluators."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction

from .profiles import FusionProfile, compute_metrics, get_profile

__all__ = ["FusionMetric"]

_BATCH_REDUCTIONS = {"mean": "mean_batch", "sum": "sum_batch", "mean_batch": "mean_batch", "sum_batch": "sum_batch"}


class FusionMetric(CumulativeIterationMetric):
    """Fusion quality metrics of a fused image against its two sources, under a metric profile.

    ``y_pred``: fused images (B, 1, H, W[, D]) in [0, 1]; ``y``: the sources (B, 2, H, W[, D]) in [0, 1]
    (channel 0 = reference MRI, channel 1 = other modality / PET-SPECT Y), i.e. the network's
    ``image`` input. Lists of channel-first tensors work too (MONAI decollated batches).

    Each call returns and buffers a (B, M) tensor, one column per metric in ``metric_names``.
    ``aggregate()`` reduces over all buffered images (NaN entries skipped): shape (M,), or a scalar
    when one metric is selected (usable as an ignite key metric). ``aggregate_dict()`` returns
    ``{name: value}``.

    Args:
        profile: profile name (``available_profiles()``) or ``FusionProfile``.
        metrics: metric names of the profile; ``None`` -> the profile defaults for ``spatial_dims``.
        spatial_dims: 2 or 3 (selects the default metric list).
        reduction: ``"mean"``, ``"sum"`` (over images) or ``"none"``.
        get_not_nans: also return the count of non-NaN values per metric.
        profile_options: forwarded to the profile factory (e.g. ``ssim_data_range=2.0``).

    Example::

        metric = FusionMetric(profile="clinicalfmamba", metrics=["SSIM"])
        metric(y_pred=fused, y=image)
        ssim = metric.aggregate().item()
    """

    def __init__(
        self,
        profile: str | FusionProfile = "default",
        metrics: Sequence[str] | str | None = None,
        spatial_dims: int = 2,
        reduction: str = "mean",
        get_not_nans: bool = False,
        **profile_options: Any,
    ) -> None:
        super().__init__()
        if reduction not in _BATCH_REDUCTIONS and reduction != "none":
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.profile = get_profile(profile, **profile_options)
        self.spatial_dims = spatial_dims
        self.metric_names: tuple[str, ...] = self.profile.select(metrics, spatial_dims)
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if y is None:
            raise ValueError("FusionMetric needs the two source images as y (B, 2, ...)")
        if y_pred.ndim != self.spatial_dims + 2 or y.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected y_pred (B, 1, *spatial) and y (B, 2, *spatial) with {self.spatial_dims} spatial dims, "
                f"got {tuple(y_pred.shape)} and {tuple(y.shape)}"
            )
        if y_pred.shape[1] != 1 or y.shape[1] != 2 or y_pred.shape[0] != y.shape[0]:
            raise ValueError(
                f"expected y_pred (B, 1, ...) and y (B, 2, ...), got {tuple(y_pred.shape)}, {tuple(y.shape)}"
            )
        if y_pred.shape[2:] != y.shape[2:]:
            raise ValueError(f"spatial shapes differ: {tuple(y_pred.shape)} vs {tuple(y.shape)}")
        rows = []
        for i in range(y_pred.shape[0]):
            values = compute_metrics(y_pred[i, 0], y[i, 0], y[i, 1], profile=self.profile, metrics=self.metric_names)
            rows.append([values[n] for n in self.metric_names])
        dtype = torch.float32 if y_pred.device.type == "mps" else torch.float64
        return torch.tensor(rows, dtype=dtype, device=y_pred.device)

    def aggregate(self, reduction: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reduce the buffered (N, M) values over images; see the class docstring."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor")
        reduction = reduction or self.reduction
        if reduction == "none":
            values, not_nans = data, (~torch.isnan(data)).sum(dim=0)
        else:
            if reduction not in _BATCH_REDUCTIONS:
                raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
            values, not_nans = do_metric_reduction(data, _BATCH_REDUCTIONS[reduction])
            if len(self.metric_names) == 1:
                values, not_nans = values.reshape(()), not_nans.reshape(())
        return (values, not_nans) if self.get_not_nans else values

    def aggregate_dict(self) -> dict[str, float]:
        """Mean over the buffered images (NaN skipped) as ``{metric name: value}``."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor")
        values, _ = do_metric_reduction(data, "mean_batch")
        return {n: float(v) for n, v in zip(self.metric_names, values.reshape(-1).tolist())}
