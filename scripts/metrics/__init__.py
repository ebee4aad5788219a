"""Fusion quality metrics: plain functions, profiles with explicit conventions, and a MONAI metric.

Quick use::

    from scripts.metrics import compute_metrics, FusionMetric
    compute_metrics(fused, mri, ct, profile="cddfuse")        # {"EN": ..., "SD": ..., ...}
    FusionMetric(profile="clinicalfmamba", metrics=["SSIM"])  # MONAI CumulativeIterationMetric

Definitions, scales and pitfalls: ``docs/metrics.md``.
"""

from .characterisation import (
    edge_overshoot_fraction,
    gradient_magnitude,
    max_copy_fraction,
    mean_abs_to_max,
    source_copy_fraction,
)
from .fmi import FMI_FEATURES, fmi, fmi_features, matlab_sobel_edges
from .fsim import FSIM_T1, FSIM_T2, fsim, fsim_clinicalfmamba, scharr_uint16_magnitude
from .information import (
    INTEGER_8BIT_RANGE,
    entropy,
    joint_histogram,
    mutual_information,
    normalized_mutual_information,
    unique_value_entropy,
)
from .metric import FusionMetric
from .phase_congruency import phase_congruency
from .profiles import (
    FusionProfile,
    MetricSpec,
    available_profiles,
    cddfuse_profile,
    characterisation_profile,
    clinicalfmamba_profile,
    compute_metrics,
    default_profile,
    get_profile,
    register_profile,
)
from .qabf import QABF_CONSTANTS, QABF_MAX, qabf, sobel_strength_orientation
from .similarity import MS_SSIM_WEIGHTS, fit_ms_ssim_weights, ms_ssim, psnr, ssim, ssim_skimage
from .spatial import average_gradient, scd, spatial_frequency, standard_deviation
from .utils import as_numpy, as_unit_range, minmax_to_8bit, pearson_correlation, quantize_8bit, rgb_to_y
from .vif import matlab_gaussian_window, vif_p

__all__ = [
    # entry points
    "compute_metrics",
    "FusionMetric",
    "FusionProfile",
    "MetricSpec",
    "available_profiles",
    "get_profile",
    "register_profile",
    "default_profile",
    "cddfuse_profile",
    "clinicalfmamba_profile",
    "characterisation_profile",
    # pixel-level behaviour (not quality scores)
    "source_copy_fraction",
    "max_copy_fraction",
    "mean_abs_to_max",
    "edge_overshoot_fraction",
    "gradient_magnitude",
    # single-image statistics
    "entropy",
    "unique_value_entropy",
    "standard_deviation",
    "spatial_frequency",
    "average_gradient",
    # information
    "INTEGER_8BIT_RANGE",
    "joint_histogram",
    "mutual_information",
    "normalized_mutual_information",
    "fmi",
    "fmi_features",
    "matlab_sobel_edges",
    "FMI_FEATURES",
    # structure / fidelity
    "scd",
    "vif_p",
    "matlab_gaussian_window",
    "qabf",
    "sobel_strength_orientation",
    "QABF_CONSTANTS",
    "QABF_MAX",
    "ssim",
    "ssim_skimage",
    "ms_ssim",
    "fit_ms_ssim_weights",
    "MS_SSIM_WEIGHTS",
    "psnr",
    "fsim",
    "fsim_clinicalfmamba",
    "scharr_uint16_magnitude",
    "phase_congruency",
    "FSIM_T1",
    "FSIM_T2",
    # helpers
    "as_numpy",
    "as_unit_range",
    "quantize_8bit",
    "minmax_to_8bit",
    "pearson_correlation",
    "rgb_to_y",
]
