"""Test-wide setup.

Triton reads TRITON_INTERPRET when kernels are imported, so it is set here,
before any test module imports fastformers: every Triton kernel then runs on
CPU tensors through the interpreter. The ahead-of-time compile check runs in a
subprocess without it (tests/test_aot.py).

One exception: on a machine with a CUDA GPU, a run of the CUDA suite alone
(``python -m pytest tests/cuda``) leaves the interpreter off, so that its
kernels run on the GPU. In every other run tests/cuda skips (see its conftest).
A TRITON_INTERPRET already in the environment always wins.
"""
import os
from pathlib import Path

import pytest
import torch

CUDA_SUITE = Path(__file__).parent / "cuda"


def runs_only_the_cuda_suite(args) -> bool:
    """Whether every path pytest was given lies inside tests/cuda."""
    paths = [Path(arg.split("::", 1)[0]).resolve() for arg in args if not arg.startswith("-")]
    return bool(paths) and all(path == CUDA_SUITE or CUDA_SUITE in path.parents for path in paths)


def interpreter_wanted(args) -> bool:
    return not (torch.cuda.is_available() and runs_only_the_cuda_suite(args))


def pytest_configure(config):
    # Runs before any test module is collected, hence before fastformers (and
    # its @triton.jit kernels) is imported.
    if interpreter_wanted(config.args):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected
def pytest_collection_modifyitems(config, items):
    """Start test_aot.py's report run in the background and run its tests last
    (tests/aot_report.py): its compiling then overlaps the other tests."""
    aot_items = [item for item in items if item.path.name == "test_aot.py"]
    if not any("report" in item.fixturenames for item in aot_items):
        return
    items[:] = [item for item in items if item.path.name != "test_aot.py"] + aot_items
    import aot_report

    config.stash[aot_report.STASH_KEY] = aot_report.BackgroundReport()


def pytest_unconfigure(config):
    import aot_report

    report = config.stash.get(aot_report.STASH_KEY, None)
    if report is not None:
        report.stop()


def _shim_labml_tracker():
    """labml 0.5.3 lacks ``tracker.debug``, which labml_nn 0.5.1's attention calls."""
    try:
        from labml import tracker
    except ImportError:
        return
    if not hasattr(tracker, "debug"):
        tracker.debug = lambda *args, **kwargs: None


_shim_labml_tracker()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_fallback_warnings(monkeypatch):
    """Each test sees the warn-once FallbackWarnings afresh, whatever ran before it."""
    from fastformers import _backend

    monkeypatch.setattr(_backend, "_warned_fallbacks", set())


@pytest.fixture
def one_thread():
    """For modules of tiny tensors and many ops (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    intra-op threads only add synchronisation, which stalls badly on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def triton_interpreter():
    """For tests that run Triton kernels on CPU tensors: the interpreter must be
    on (this conftest switches it on before fastformers is imported)."""
    from fastformers.triton_utils import interpreter_enabled

    assert interpreter_enabled(), "TRITON_INTERPRET=1 must be set before fastformers is imported"
