"""Helpers shared by the tests of the compiled kernels (tests/ssm/test_native_*.py)."""

import pytest

from scripts.ssm import compiled_scan_available, compiled_scan_info

#: skips a test where no kernel could be built (no C compiler); the fallback tests cover that case
needs_kernel = pytest.mark.skipif(
    not compiled_scan_available(), reason=f"kernel not built: {compiled_scan_info()['error']}"
)


def detached(inputs, dtype=None):
    """``inputs`` (name -> tensor) detached from autograd, optionally cast to ``dtype``."""
    return {k: v.detach().to(dtype or v.dtype) for k, v in inputs.items()}
