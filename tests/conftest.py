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


def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` where there is none (not Linux / glibc)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim() if sys.platform.startswith("linux") else None
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def pytest_runtest_teardown(item):
    """Give freed heap memory back to the system after a test that left the process big: glibc keeps what the
    zoo tests' models freed (its mmap threshold grows after large frees), and over the long suite the process
    grew past 18 GB of this 24 GB machine, once past it (OOM-killed)."""
    if _TRIM is None:
        return
    try:
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1]) * _PAGE
    except OSError:
        return
    if resident > 4 * 2**30:
        import gc

        gc.collect()
        _TRIM(0)


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
