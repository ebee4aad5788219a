import ctypes.util

from scripts.cpu_tuning import tune_allocator


def test_tune_allocator_applies_on_glibc_and_is_idempotent():
    expected = ctypes.util.find_library("c") is not None
    first = tune_allocator()
    assert first == expected or first is False
    assert tune_allocator() == first
