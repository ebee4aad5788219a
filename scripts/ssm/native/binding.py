"""The kernel library's ctypes binding: one ``ctypes.Structure`` per parameter struct of ``scan_kernel.h`` and the
signatures of its entry points.

Every kernel entry point is ``void <name>_<f32|f64>(const <Family>Params *, int64 lo, int64 hi, int64 nthreads)``
(work items lo..hi-1, see ``scan_kernel.h``). The Structures below mirror the C structs field by field, in order;
``tests/ssm/test_native_binding.py`` compares their layout with the one the compiled library reports
(:func:`c_struct_layout`).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

__all__ = [
    "STRUCTS",
    "ConvSiluParams",
    "GateMergeParams",
    "KernelLibrary",
    "MixerScanParams",
    "ScanBwdParams",
    "ScanParams",
    "bind",
    "c_struct_layout",
    "pointer",
]

_i64, _ptr, _f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double


def pointer(t: torch.Tensor | None) -> int | None:
    """The data pointer of ``t`` for a struct field (None, a NULL pointer, for a missing optional array)."""
    return None if t is None else t.data_ptr()


class ScanParams(ctypes.Structure):
    """``ScanParams``: the selective scan forward (``scan_f32`` / ``scan_f64``)."""

    _fields_ = [
        ("L", _i64), ("lanes", _i64), ("G", _i64), ("P", _i64), ("N", _i64),
        ("delta", _ptr), ("u", _ptr), ("A", _ptr), ("B", _ptr), ("C", _ptr), ("bc_stride", _i64),
        ("D", _ptr), ("bias", _ptr), ("softplus", _i64), ("y", _ptr), ("h", _ptr),
        ("dtr", _ptr), ("dt_stride", _i64), ("wdt", _ptr), ("R", _i64), ("ckpt", _ptr), ("T", _i64),
    ]  # fmt: skip


class ScanBwdParams(ctypes.Structure):
    """``ScanBwdParams``: the selective scan backward (``scan_bwd_f32`` / ``scan_bwd_f64``)."""

    _fields_ = [
        ("L", _i64), ("lanes", _i64), ("G", _i64), ("P", _i64), ("N", _i64), ("T", _i64),
        ("delta", _ptr), ("u", _ptr), ("A", _ptr), ("B", _ptr), ("C", _ptr), ("bc_stride", _i64),
        ("D", _ptr), ("bias", _ptr), ("softplus", _i64), ("ckpt", _ptr), ("gy", _ptr), ("glast", _ptr),
        ("gdelta", _ptr), ("gu", _ptr), ("gB", _ptr), ("gC", _ptr), ("gA", _ptr), ("gD", _ptr), ("gbias", _ptr),
    ]  # fmt: skip


class ConvSiluParams(ctypes.Structure):
    """``ConvSiluParams``: causal depthwise convolution + SiLU (``conv_silu_f32`` / ``conv_silu_f64``)."""

    _fields_ = [
        ("lanes", _i64), ("G", _i64), ("P", _i64), ("K", _i64), ("x", _ptr), ("x_stride", _i64),
        ("index", _ptr), ("taps", _ptr), ("bias", _ptr), ("out", _ptr),
    ]  # fmt: skip


class GateMergeParams(ctypes.Structure):
    """``GateMergeParams``: directions back to tokens, gated, optionally normalised (``gate_merge_f32`` / ``_f64``)."""

    _fields_ = [
        ("L", _i64), ("B", _i64), ("M", _i64), ("K", _i64), ("P", _i64), ("y", _ptr), ("index", _ptr),
        ("z", _ptr), ("z_stride", _i64), ("ln_w", _ptr), ("ln_b", _ptr), ("eps", _f64), ("out", _ptr),
    ]  # fmt: skip


class MixerScanParams(ctypes.Structure):
    """``MixerScanParams``: the fused mixer kernel, conv + x projection + scan (+ merge) (``mixer_scan_f32``)."""

    _fields_ = [
        ("L", _i64), ("B", _i64), ("G", _i64), ("P", _i64), ("N", _i64), ("R", _i64), ("K", _i64),
        ("x", _ptr), ("x_stride", _i64), ("index", _ptr), ("taps", _ptr), ("conv_bias", _ptr),
        ("src", _ptr), ("src_stride", _i64), ("wxt", _ptr), ("CP", _i64), ("wdt", _ptr), ("dt_bias", _ptr),
        ("A", _ptr), ("D", _ptr), ("y", _ptr), ("h", _ptr), ("KD", _i64), ("out", _ptr), ("z", _ptr),
        ("z_stride", _i64), ("ln_w", _ptr), ("ln_b", _ptr), ("eps", _f64),
    ]  # fmt: skip


#: entry point family -> (its parameter Structure, the element types it is exported in)
STRUCTS: dict[str, tuple[type[ctypes.Structure], tuple[str, ...]]] = {
    "scan": (ScanParams, ("f32", "f64")),
    "scan_bwd": (ScanBwdParams, ("f32", "f64")),
    "conv_silu": (ConvSiluParams, ("f32", "f64")),
    "gate_merge": (GateMergeParams, ("f32", "f64")),
    "mixer_scan": (MixerScanParams, ("f32",)),
}

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


@dataclass(frozen=True)
class KernelLibrary:
    """A loaded, bound kernel library and the limits it was compiled with.

    Attributes: ``cdll`` the ctypes library; ``openmp`` whether it splits work items over OpenMP threads itself;
    ``block`` floats per vector (W, the channel block of the float32 kernels); ``isa`` the vector instruction set;
    ``nmax`` the largest state size N; ``tnmax`` the largest T * N of the backward's recomputed chunk; ``kmax`` the
    widest causal convolution; ``pmax`` the widest row the merge normalises; ``fused_pmax`` and ``xmax`` the largest
    P and R + 2N of the fused mixer kernel.
    """

    cdll: ctypes.CDLL
    openmp: bool
    block: int
    isa: str
    nmax: int
    tnmax: int
    kmax: int
    pmax: int
    fused_pmax: int
    xmax: int

    def function(self, family: str, dtype: torch.dtype):
        """The entry point of ``family`` (a key of :data:`STRUCTS`) for ``dtype`` (float32 or float64)."""
        return getattr(self.cdll, f"{family}_{_SUFFIX[dtype]}")


def bind(cdll: ctypes.CDLL, openmp: bool) -> KernelLibrary:
    """Declare the signatures of ``cdll``'s entry points and read its compile-time limits."""
    for family, (struct, suffixes) in STRUCTS.items():
        for suffix in suffixes:
            fn = getattr(cdll, f"{family}_{suffix}")
            fn.argtypes = [ctypes.POINTER(struct), _i64, _i64, _i64]
            fn.restype = None
    cdll.scan_isa.restype = ctypes.c_char_p
    cdll.kernel_struct_size.argtypes = [ctypes.c_char_p]
    cdll.kernel_struct_size.restype = _i64
    cdll.kernel_struct_field.argtypes = [ctypes.c_char_p, _i64, ctypes.POINTER(_i64)]
    cdll.kernel_struct_field.restype = ctypes.c_char_p
    return KernelLibrary(
        cdll=cdll, openmp=openmp, block=int(cdll.scan_width()), isa=cdll.scan_isa().decode(),
        nmax=int(cdll.scan_nmax()), tnmax=int(cdll.scan_tnmax()), kmax=int(cdll.scan_kmax()),
        pmax=int(cdll.scan_pmax()), fused_pmax=int(cdll.scan_fused_pmax()), xmax=int(cdll.scan_xmax()),
    )  # fmt: skip


def c_struct_layout(library: KernelLibrary, name: str) -> tuple[int, list[tuple[str, int]]]:
    """``sizeof`` of the C struct ``name`` and its fields' (name, ``offsetof``) in declaration order, as the compiled
    library reports them (size 0: no such struct)."""
    size = int(library.cdll.kernel_struct_size(name.encode()))
    fields, offset = [], _i64()
    while (field := library.cdll.kernel_struct_field(name.encode(), len(fields), ctypes.byref(offset))) is not None:
        fields.append((field.decode(), int(offset.value)))
    return size, fields
