import os
import sys
from pathlib import Path

import pytest
import torch

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = BUNDLE_ROOT.parent / "shared" / "data"
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
from scripts.ssm.reference import warm_up_exp  # noqa: E402

warm_up_exp()  # float64 comparisons must not meet the first, racy exp of the process (scripts/ssm/reference.py)

COMPANION_ROOT = BUNDLE_ROOT / "bundle" / "tumor_classification"


def _import_companion_package() -> None:
    """The companion bundle's own ``scripts`` package, imported as ``tumor_classification_scripts`` (both bundles
    call their package ``scripts``, the MONAI convention; the tests import the fusion bundle's under that name)."""
    import importlib.util

    name = "tumor_classification_scripts"
    if name in sys.modules:
        return
    init = COMPANION_ROOT / "scripts" / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_import_companion_package()


@pytest.fixture
def shared_data() -> Path:
    """The real data folder ``../shared/data``; CI always has it, elsewhere the test skips."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
