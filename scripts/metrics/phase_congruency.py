"""Phase congruency (Kovesi) with log-Gabor filters, in numpy (no phasepack / OpenCV).

Re-implemented from Kovesi's published method ("Image features from phase congruency", 1999, and
his phasecong2 / phasecong3 notes). Two variants are needed by the FSIM definitions in use:

``"phasecong2"`` (Zhang et al.'s ``FSIM.m``): Gaussian angular spread (sigma = pi / norient / 1.2),
noise threshold from the filter-energy model (median of the smallest-scale response power, T
divided by 1.7), no frequency-spread weighting; the result is ``sum_o max(E_o - T_o, 0) / sum_o
sum_s A_so``.

``"phasecong3"`` (``phasepack.phasecong``): raised-cosine angular spread, noise from the median of
the smallest-scale amplitude (Rayleigh model), frequency-spread weighting (cut-off 0.5, gain 10);
one map per orientation, ``PC_o = W_o max(E_o - T_o, 0) / sum_s A_so``.

Common parts: FFT of the image; frequency grid in cycles/pixel over [-0.5, 0.5) (odd sizes:
[-0.5, 0.5]); log-Gabor radial filters with centre frequency 1 / (min_wavelength * mult^s) and
bandwidth ``sigma_onf``, multiplied by a Butterworth low-pass (cut-off 0.45, order 15), zero DC;
local energy ``E = sum_s (e_s m_e + o_s m_o - |e_s m_o - o_s m_e|)`` with (m_e, m_o) the unit
mean phase vector.

PC is invariant to ``a * image + b`` (a > 0) up to the 1e-4 regularisers. A constant image has PC = 0
everywhere.
"""

from __future__ import annotations

import math

import numpy as np

from .utils import ArrayLike, as_numpy, check_spatial_2d

__all__ = ["phase_congruency"]

_EPSILON = 1e-4


def _frequency_grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised radius and angle (ifftshifted, i.e. in FFT order); radius[0, 0] set to 1."""

    def axis(n: int) -> np.ndarray:
        if n % 2:
            return np.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1) / float(n - 1)
        return np.arange(-n / 2.0, n / 2.0) / float(n)

    x, y = np.meshgrid(axis(cols), axis(rows))
    radius = np.fft.ifftshift(np.sqrt(x * x + y * y))
    theta = np.fft.ifftshift(np.arctan2(-y, x))
    radius[0, 0] = 1.0
    return radius, theta


def _log_gabor_bank(
    radius: np.ndarray, nscale: int, min_wavelength: float, mult: float, sigma_onf: float
) -> list[np.ndarray]:
    lowpass = 1.0 / (1.0 + (radius / 0.45) ** 30)  # Butterworth, cut-off 0.45, order 15
    # radius[0, 0] == 1 (not 0): the DC term is zeroed explicitly below, as in Kovesi's code
    bank = []
    for s in range(nscale):
        fo = 1.0 / (min_wavelength * mult**s)
        lg = np.exp(-(np.log(radius / fo) ** 2) / (2.0 * math.log(sigma_onf) ** 2)) * lowpass
        lg[0, 0] = 0.0
        bank.append(lg)
    return bank


def _angular_spread(theta: np.ndarray, angle: float, norient: int, kind: str) -> np.ndarray:
    ds = np.sin(theta) * math.cos(angle) - np.cos(theta) * math.sin(angle)
    dc = np.cos(theta) * math.cos(angle) + np.sin(theta) * math.sin(angle)
    dtheta = np.abs(np.arctan2(ds, dc))
    if kind == "gaussian":
        theta_sigma = math.pi / norient / 1.2
        return np.exp(-(dtheta**2) / (2.0 * theta_sigma**2))
    dtheta = np.minimum(dtheta * norient / 2.0, math.pi)
    return (np.cos(dtheta) + 1.0) / 2.0


def _local_energy(responses: list[np.ndarray]) -> np.ndarray:
    sum_e = sum(r.real for r in responses)
    sum_o = sum(r.imag for r in responses)
    x_energy = np.sqrt(sum_e**2 + sum_o**2) + _EPSILON
    mean_e = sum_e / x_energy
    mean_o = sum_o / x_energy
    energy = np.zeros_like(sum_e)
    for r in responses:
        e, o = r.real, r.imag
        energy += e * mean_e + o * mean_o - np.abs(e * mean_o - o * mean_e)
    return energy


def _noise_threshold_phasecong2(filters: list[np.ndarray], first_response: np.ndarray, k: float) -> float:
    rows, cols = first_response.shape
    em_n = float(np.sum(filters[0] ** 2))
    median_e2n = float(np.median(np.abs(first_response) ** 2))
    mean_e2n = -median_e2n / math.log(0.5)
    noise_power = mean_e2n / em_n
    spatial = [np.real(np.fft.ifft2(f)) * math.sqrt(rows * cols) for f in filters]
    sum_an2 = sum(float(np.sum(s * s)) for s in spatial)
    sum_aiaj = 0.0
    for i in range(len(spatial) - 1):
        for j in range(i + 1, len(spatial)):
            sum_aiaj += float(np.sum(spatial[i] * spatial[j]))
    noise_energy2 = 2.0 * noise_power * sum_an2 + 4.0 * noise_power * sum_aiaj
    tau = math.sqrt(noise_energy2 / 2.0)
    mean_noise = tau * math.sqrt(math.pi / 2.0)
    sigma_noise = math.sqrt((2.0 - math.pi / 2.0) * tau * tau)
    return (mean_noise + k * sigma_noise) / 1.7


def _noise_threshold_phasecong3(first_amplitude: np.ndarray, nscale: int, mult: float, k: float) -> float:
    tau = float(np.median(first_amplitude)) / math.sqrt(math.log(4.0))
    total_tau = tau * (1.0 - (1.0 / mult) ** nscale) / (1.0 - 1.0 / mult)
    mean_noise = total_tau * math.sqrt(math.pi / 2.0)
    sigma_noise = total_tau * math.sqrt((4.0 - math.pi) / 2.0)
    return mean_noise + k * sigma_noise


def phase_congruency(
    image: ArrayLike,
    variant: str = "phasecong2",
    nscale: int = 4,
    norient: int = 4,
    min_wavelength: float = 6.0,
    mult: float = 2.0,
    sigma_onf: float = 0.55,
    k: float = 2.0,
    cutoff: float = 0.5,
    g: float = 10.0,
) -> np.ndarray:
    """Phase congruency map(s) of a 2-D image.

    Args:
        image: (H, W) array on any intensity scale.
        variant: ``"phasecong2"`` -> one (H, W) map in [0, 1]; ``"phasecong3"`` -> (norient, H, W),
            one map per orientation (sum them for the ``phasepack`` / ClinicalFMamba FSIM).
        nscale, norient, min_wavelength, mult, sigma_onf: log-Gabor bank.
        k: noise threshold in standard deviations of the noise energy.
        cutoff, g: frequency-spread weighting (``phasecong3`` only).
    """
    if variant not in ("phasecong2", "phasecong3"):
        raise ValueError(f"variant must be 'phasecong2' or 'phasecong3', got {variant!r}")
    im = as_numpy(image)
    check_spatial_2d(im, name="phase congruency")
    rows, cols = im.shape
    if np.ptp(im) == 0:
        shape = (rows, cols) if variant == "phasecong2" else (norient, rows, cols)
        return np.zeros(shape)
    spectrum = np.fft.fft2(im)
    radius, theta = _frequency_grid(rows, cols)
    bank = _log_gabor_bank(radius, nscale, min_wavelength, mult, sigma_onf)
    spread_kind = "gaussian" if variant == "phasecong2" else "cosine"

    energy_all = np.zeros((rows, cols))
    amplitude_all = np.zeros((rows, cols))
    per_orientation = []
    for o in range(norient):
        spread = _angular_spread(theta, o * math.pi / norient, norient, spread_kind)
        filters = [lg * spread for lg in bank]
        responses = [np.fft.ifft2(spectrum * f) for f in filters]
        amplitudes = [np.abs(r) for r in responses]
        sum_an = sum(amplitudes)
        energy = _local_energy(responses)
        if variant == "phasecong2":
            threshold = _noise_threshold_phasecong2(filters, responses[0], k)
            energy_all += np.maximum(energy - threshold, 0.0)
            amplitude_all += sum_an
        else:
            threshold = _noise_threshold_phasecong3(amplitudes[0], nscale, mult, k)
            energy = np.maximum(energy - threshold, 0.0)
            max_an = np.maximum.reduce(amplitudes)
            width = (sum_an / (max_an + _EPSILON) - 1.0) / (nscale - 1)
            weight = 1.0 / (1.0 + np.exp((cutoff - width) * g))
            pc = np.divide(weight * energy, sum_an, out=np.zeros_like(energy), where=sum_an > 0)
            per_orientation.append(pc)
    if variant == "phasecong2":
        return np.divide(energy_all, amplitude_all, out=np.zeros_like(energy_all), where=amplitude_all > 0)
    return np.stack(per_orientation)
