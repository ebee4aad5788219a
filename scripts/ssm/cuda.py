"""Optional mamba_ssm CUDA kernel backend (imported lazily; never required)."""

from __future__ import annotations

from functools import lru_cache

from .registry import ScanBackend, register_backend

__all__ = ["mamba_ssm_scan", "mamba_ssm_available"]


@lru_cache(maxsize=1)
def _load():
    """Import mamba_ssm's kernel entry point, or return None.

    mamba_ssm raises ModuleNotFoundError (not only ImportError of itself) when its compiled
    ``selective_scan_cuda`` extension is missing, so any exception means "not available".
    """
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # noqa: BLE001 - any failure to import the optional kernels means "absent"
        return None
    return selective_scan_fn


def mamba_ssm_available() -> bool:
    """True when ``mamba_ssm`` and its compiled CUDA extension import."""
    return _load() is not None


def mamba_ssm_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """mamba_ssm's fused CUDA selective scan; tensors must be on a CUDA device."""
    fn = _load()
    if fn is None:
        raise RuntimeError("scan backend 'mamba_ssm' requested but mamba_ssm (with its CUDA extension) does not import")
    if not u.is_cuda:
        raise RuntimeError("scan backend 'mamba_ssm' needs CUDA tensors; use backend 'fast' on CPU")
    # the kernel wants contiguous float inputs and float32 A/D/delta_bias
    return fn(
        u.contiguous(),
        delta.contiguous(),
        A.float().contiguous(),
        B.contiguous(),
        C.contiguous(),
        None if D is None else D.float(),
        None if z is None else z.contiguous(),
        None if delta_bias is None else delta_bias.float(),
        delta_softplus,
        return_last_state,
    )


register_backend(
    ScanBackend(
        "mamba_ssm", "CUDA kernel", mamba_ssm_scan, auto=lambda device: device.type == "cuda" and mamba_ssm_available(),
        priority=20,
    )
)  # fmt: skip
