"""Test-wide setup.

Triton reads TRITON_INTERPRET when kernels are imported, so it is set here,
before anything imports fastformers: every Triton kernel then runs on CPU
tensors through the interpreter. The ahead-of-time compile check runs in a
subprocess without it (tests/test_aot.py).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


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
