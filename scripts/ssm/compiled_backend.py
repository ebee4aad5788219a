"""The ``compiled`` backend: the run-time built C kernels of :mod:`scripts.ssm.native` registered as one scan backend.

Without autograd the forward kernel runs; with autograd the compiled forward and backward
(:class:`~scripts.ssm.native.ops.CompiledSelectiveScan`); anything the kernels do not take (other devices,
N > 64, no kernel built) runs the ``fast`` backend unchanged. ``auto`` picks this backend on CPU when it builds.
The kernels run on the process's library (:func:`scripts.ssm.native.loader.kernel_library`, built on first use).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fast import scan_time_major_fast, selective_scan_fast
from .native import ops
from .native.loader import compiled_scan_available, kernel_library
from .registry import ScanBackend, register_backend

__all__ = [
    "CompiledMixerOps",
    "kernel_applicable",
    "kernel_trainable",
    "mixer_scan_kernel",
    "scan_time_major_compiled",
    "scan_time_major_kernel",
    "selective_scan_compiled",
]


def kernel_applicable(*tensors: torch.Tensor | None, n_state: int) -> bool:
    """True when the forward kernels can run these inputs: CPU, no autograd needed, N supported, kernel built."""
    present = [t for t in tensors if t is not None]
    if any(t.device.type != "cpu" for t in present):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    library = kernel_library()
    return library is not None and n_state <= library.nmax


def kernel_trainable(*tensors: torch.Tensor | None, n_state: int) -> bool:
    """True when the compiled forward and backward can run these inputs: CPU, N supported, kernel built."""
    if any(t is not None and t.device.type != "cpu" for t in tensors):
        return False
    library = kernel_library()
    return library is not None and n_state <= library.nmax


def scan_time_major_kernel(*args, **kwargs):
    """:func:`scripts.ssm.native.ops.scan_time_major` on the process's library (the caller checks
    :func:`kernel_applicable`): y (L, batch, G, P) and the last state (batch, G, N, P)."""
    return ops.scan_time_major(kernel_library(), *args, **kwargs)


def mixer_scan_kernel(*args, **kwargs):
    """:func:`scripts.ssm.native.ops.mixer_scan` on the process's library (the caller checks
    :meth:`CompiledMixerOps.fused_supported`)."""
    return ops.mixer_scan(kernel_library(), *args, **kwargs)


def _grouped(x: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    return None if x is None else x.reshape(groups, -1)


def selective_scan_compiled(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Selective scan with mamba_ssm semantics (arguments as :func:`scripts.ssm.reference.selective_scan_ref`).

    Runs the compiled kernel when :func:`kernel_applicable`, with autograd the compiled forward and backward when the
    kernel is built, else :func:`scripts.ssm.fast.selective_scan_fast`.
    """
    n_state = A.shape[-1]
    trainable = not kernel_applicable(u, delta, A, B, C, D, z, delta_bias, n_state=n_state)
    if trainable and not kernel_trainable(u, delta, A, B, C, D, z, delta_bias, n_state=n_state):
        return selective_scan_fast(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    dtype_in = u.dtype
    batch, dim, length = u.shape
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    groups = B.shape[1]
    if dim % groups != 0:
        raise ValueError(f"channel count {dim} is not divisible by the {groups} groups of B/C")
    per_group = dim // groups

    def time_major(x):  # (batch, dim, L) -> (L, batch, G, P)
        return x.permute(2, 0, 1).reshape(length, batch, groups, per_group)

    u_t, delta_t = time_major(u), time_major(delta)
    args = (u_t, delta_t, A.reshape(groups, per_group, n_state), B.permute(3, 0, 1, 2), C.permute(3, 0, 1, 2))
    if trainable:
        D_g, bias_g = _grouped(D, groups), _grouped(delta_bias, groups)
        apply = ops.CompiledSelectiveScan.apply
        y, last = apply(kernel_library(), delta_t, u_t, *args[2:], D_g, bias_g, bool(delta_softplus))
    else:
        y, last = scan_time_major_kernel(*args, D, delta_bias, delta_softplus)
    y = y.reshape(length, batch, dim).permute(1, 2, 0)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    y = y.to(dtype_in)
    if return_last_state:
        return y, last.transpose(-1, -2).reshape(batch, dim, n_state)
    return y


def scan_time_major_compiled(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, delta_proj_weight=None):
    """The mixers' time-major scan (shapes as :func:`scripts.ssm.selective_scan_time_major`): the forward kernel
    (with the dt projection folded in) without autograd, the compiled forward + backward with it, else ``fast``."""
    n_state = A.shape[-1]
    if kernel_applicable(u, delta, A, B, C, D, delta_bias, delta_proj_weight, n_state=n_state):
        return scan_time_major_kernel(
            u, delta, A, B, C, D, delta_bias, delta_softplus, delta_proj_weight=delta_proj_weight
        )[0]
    if delta_proj_weight is not None:
        delta = torch.einsum("lbgr,gpr->lbgp", delta, delta_proj_weight)
    if kernel_trainable(u, delta, A, B, C, D, delta_bias, n_state=n_state):
        return ops.scan_time_major_trainable(kernel_library(), u, delta, A, B, C, D, delta_bias, delta_softplus)
    return scan_time_major_fast(u, delta, A, B, C, D, delta_bias, delta_softplus)


class CompiledMixerOps:
    """The mixer operations the compiled library fuses (see :mod:`scripts.ssm.mixer` for their contracts). Each
    returns None (or False) where the kernel does not take the inputs: autograd needed, not CPU, sizes too large."""

    @staticmethod
    def causal_conv_silu(x, weight, bias, index):
        if kernel_applicable(x, weight, bias, n_state=0) and weight.shape[-1] <= kernel_library().kmax:
            return ops.causal_conv_silu(kernel_library(), x, weight, bias, index=index)
        return None

    @staticmethod
    def merge(y, index, z, norm_weight=None, norm_bias=None, eps=1e-5):
        if not kernel_applicable(y, z, norm_weight, norm_bias, n_state=0):
            return None
        library = kernel_library()
        if norm_weight is None or y.shape[-1] <= library.pmax:
            return ops.gate_merge(library, y, index, z, norm_weight, norm_bias, eps)
        merged = ops.gate_merge(library, y, index, z)
        normalised = F.layer_norm(merged, merged.shape[-1:], eps=eps)
        return torch.addcmul(norm_bias[:, None, None], normalised, norm_weight[:, None, None])

    @staticmethod
    def fused_supported(x, d_inner, d_state, dt_rank, d_conv, lanes, *parameters) -> bool:
        if not kernel_applicable(x, *parameters, n_state=0):
            return False
        return ops.mixer_scan_applicable(kernel_library(), x, d_inner, d_state, dt_rank, d_conv, lanes)

    @staticmethod
    def fused_merges(sets: int, width: int, norm: bool) -> bool:
        """Whether the fused kernel should merge too: its work items are then the ``sets`` (batch, member) sets,
        and every thread needs one; a norm only up to the kernel's row width."""
        library = kernel_library()
        max_norm = 0 if library is None else library.pmax
        return sets >= torch.get_num_threads() and (not norm or width <= max_norm)

    @staticmethod
    def prepare_fused(*args, **kwargs):
        return ops.prepare_mixer_weights(kernel_library(), *args, **kwargs)

    @staticmethod
    def fused(*args, **kwargs):
        return mixer_scan_kernel(*args, **kwargs)


register_backend(
    ScanBackend(
        "compiled",
        "fused C kernels, forward and backward",
        selective_scan_compiled,
        time_major=scan_time_major_compiled,
        auto=lambda device: device.type == "cpu" and compiled_scan_available(),
        priority=20,
        mixer=CompiledMixerOps(),
    )
)  # fmt: skip
