"""The CUDA suite (marker ``cuda``): every op and model on a GPU against the
reference, without the Triton interpreter.

Run it alone on a GPU machine: ``python -m pytest tests/cuda`` (tests/conftest.py
then leaves the interpreter off). In any other run it skips, except the dry run
(``FASTFORMERS_GPU_CHECK_DRY_RUN=1``), which runs the tests marked ``dry`` on
CPU through the interpreter, and skips the rest.
"""
import pytest
import torch

from cuda_check import DRY_RUN


def _skip_reason():
    from fastformers.triton_utils import interpreter_enabled

    if DRY_RUN:
        return None if interpreter_enabled() else "the dry run needs TRITON_INTERPRET=1"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (bench/gpu_check.sh runs this suite on one; --dry-run runs it on CPU)"
    if interpreter_enabled():
        return "the Triton interpreter is on in this run: run the CUDA suite alone, python -m pytest tests/cuda"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    here = str(config.rootpath / "tests" / "cuda")
    for item in items:
        if not str(item.path).startswith(here):
            continue
        item.add_marker(pytest.mark.cuda)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
        elif DRY_RUN and item.get_closest_marker("dry") is None:
            item.add_marker(pytest.mark.skip(reason="GPU only: the dry run takes the tests marked dry"))


@pytest.fixture(autouse=True)
def _no_leftover_cuda_memory():
    yield
    if torch.cuda.is_available() and not DRY_RUN:
        torch.cuda.empty_cache()
