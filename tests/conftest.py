import os
import pathlib
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, str(pathlib.Path(__file__).parent))

# property-based tests draw the same examples on every run by default, so that a clean CI run cannot go red
# on a draw the previous one did not make; HYPOTHESIS_PROFILE=explore draws new ones (with the test's own
# example counts, or more with --hypothesis-seed / a settings override) to look for bugs
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or os.environ.get("NORMSWAP_GPU_TESTS_ON") == "cpu":  # the latter: a dry run
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """These tensors are tiny: intra-op threads only add waiting (a lot of it on a busy machine).

    Use it for a whole test file with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["native", "torch-ops"])
def native_path(request, monkeypatch):
    """Run a norm-layer test on each implementation: the fused CPU kernels, then the torch-ops path.

    Use it for a whole test file with ``pytestmark = pytest.mark.usefixtures("native_path")``.
    """
    from normswap.norms import native

    if request.param == "native":
        if not native.available():
            pytest.skip(f"fused CPU kernels {native.status()}")
    else:
        monkeypatch.setattr(native, "usable", lambda x: False)
    return request.param
