"""Backend resolution rules shared by every op."""
import pytest
import torch

from fastformers import _backend


def test_automatic_choice_stays_within_the_ops_kernels():
    cuda = torch.device("cuda")
    assert _backend.resolve_backend(cuda, implemented=("reference", "cpp")) == "reference"
    assert _backend.resolve_backend(torch.device("cpu"), implemented=("reference", "triton")) == "reference"


def test_forcing_a_backend_the_op_lacks_raises():
    with pytest.raises(NotImplementedError, match="backend 'triton' has no kernel for this op yet"):
        _backend.resolve_backend(torch.device("cpu"), "triton", implemented=("reference", "cpp"))
    with _backend.use_backend("triton"):
        with pytest.raises(NotImplementedError, match="implemented: reference, cpp"):
            _backend.resolve_backend(torch.device("cpu"), implemented=("reference", "cpp"))


def test_no_missing_extension_warning_when_it_is_built(recwarn):
    _backend.resolve_backend(torch.device("cpu"), implemented=("reference", "triton"))
    assert not [w for w in recwarn if "not built" in str(w.message)]
