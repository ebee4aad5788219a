"""The ctypes binding of the compiled kernels (scripts/ssm/native/binding.py) against the C structs of scan_kernel.h,
as the compiled library reports their layout (sizeof, field names in order, offsetof)."""

import ctypes

import pytest
import torch
from native_testing import needs_kernel

from scripts.ssm.native import binding
from scripts.ssm.native.loader import kernel_library


@needs_kernel
@pytest.mark.parametrize("family", sorted(binding.STRUCTS))
def test_ctypes_structures_match_the_c_structs(family):
    struct, suffixes = binding.STRUCTS[family]
    size, fields = binding.c_struct_layout(kernel_library(), struct.__name__)
    assert size > 0, f"the library does not know the struct {struct.__name__}"
    python_fields = [(name, getattr(struct, name).offset) for name, _ in struct._fields_]
    assert python_fields == fields
    assert ctypes.sizeof(struct) == size
    for suffix in suffixes:  # every entry point of the family takes a pointer to this struct
        fn = getattr(kernel_library().cdll, f"{family}_{suffix}")
        assert fn.argtypes[0] == ctypes.POINTER(struct)


@needs_kernel
def test_the_layout_report_refuses_unknown_names():
    assert binding.c_struct_layout(kernel_library(), "NoSuchParams") == (0, [])
    size, fields = binding.c_struct_layout(kernel_library(), "ScanParams")
    assert fields[0] == ("L", 0) and fields[-1][0] == "T" and size == fields[-1][1] + 8


@needs_kernel
def test_kernel_library_reports_its_limits():
    library = kernel_library()
    assert library.function("scan", torch.float64).__name__ == "scan_f64"
    assert library.function("mixer_scan", torch.float32).__name__ == "mixer_scan_f32"
    assert (library.nmax, library.kmax, library.tnmax) == (64, 16, 256)
    assert library.block in (4, 8, 16) and library.fused_pmax >= 256 and library.pmax >= library.fused_pmax


def test_pointer_of_a_missing_array_is_null():
    t = torch.zeros(3)
    assert binding.pointer(None) is None and binding.pointer(t) == t.data_ptr()
    params = binding.ScanParams(L=3, D=binding.pointer(None), u=binding.pointer(t))
    assert params.L == 3 and params.D is None and params.u == t.data_ptr()
