"""The feedback-memory weighted sum: every backend against the reference."""
import os
import subprocess
import sys

import pytest
import torch
from torch.library import opcheck

import fastformers
from fastformers.ops.feedback import naive
from harness import assert_parity

FUSED_BACKENDS = [name for name in ("cpp", "triton") if name in fastformers.available_backends()]
# (L = n_layers + 1, batch, d_model): a single layer output, odd sizes, more
# than one Triton block (BLOCK_N = 1024) and one C++ chunk (4096).
SHAPES = [(1, 1, 1), (2, 3, 7), (7, 3, 24), (4, 5, 1031), (3, 2, 4099)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def make_inputs(shape, dtype):
    L, B, D = shape
    return torch.randn(L, B, D, dtype=dtype), torch.randn(L, dtype=dtype)


def test_cpp_extension_is_built():
    assert "cpp" in fastformers.available_backends(), "the C++ extension must be built for the test suite"


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, dtype, shape, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    layer_outputs, weights = make_inputs(shape, dtype)
    assert_parity(
        lambda x, w: fastformers.ops.feedback_memory(x, w, backend=backend),
        naive.feedback_memory,
        (layer_outputs, weights),
    )


def test_use_backend_context_and_env(monkeypatch):
    layer_outputs, weights = make_inputs((3, 2, 5), torch.float64)
    with fastformers.use_backend("reference"):
        assert fastformers.resolve_backend(layer_outputs.device) == "reference"
        with fastformers.use_backend("triton"):
            assert fastformers.resolve_backend(layer_outputs.device) == "triton"
    monkeypatch.setenv("FASTFORMERS_BACKEND", "reference")
    assert fastformers.resolve_backend(layer_outputs.device) == "reference"
    monkeypatch.setenv("FASTFORMERS_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTFORMERS_BACKEND must be one of"):
        fastformers.resolve_backend(layer_outputs.device)
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastformers.use_backend("cuda"):
            pass


def test_auto_backend_on_cpu_is_cpp():
    assert fastformers.resolve_backend(torch.device("cpu")) == "cpp"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype):
    layer_outputs, weights = make_inputs((4, 3, 5), dtype)
    opcheck(torch.ops.fastformers.feedback_memory.default, (layer_outputs.requires_grad_(), weights.requires_grad_()))
    grad = torch.randn(3, 5, dtype=dtype)
    opcheck(torch.ops.fastformers.feedback_memory_backward.default, (grad, layer_outputs.detach(), weights.detach()))


def test_torch_compile_fullgraph():
    layer_outputs, weights = make_inputs((4, 3, 5), torch.float32)
    layer_outputs.requires_grad_()

    @torch.compile(fullgraph=True)
    def step(x, w):
        return torch.ops.fastformers.feedback_memory(x * 2, w).sum()

    compiled = step(layer_outputs, weights)
    compiled.backward()
    expected_grad = layer_outputs.grad.clone()
    layer_outputs.grad = None
    naive.feedback_memory(layer_outputs * 2, weights).sum().backward()
    torch.testing.assert_close(compiled, naive.feedback_memory(layer_outputs * 2, weights).sum())
    torch.testing.assert_close(expected_grad, layer_outputs.grad)


def test_double_backward_raises():
    layer_outputs, weights = make_inputs((3, 2, 4), torch.float64)
    layer_outputs.requires_grad_()
    out = torch.ops.fastformers.feedback_memory(layer_outputs, weights)
    (grad,) = torch.autograd.grad(out.sum(), layer_outputs, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grad.sum().backward()


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
def test_bad_input(backend):
    op = lambda x, w: fastformers.ops.feedback_memory(x, w, backend=backend)  # noqa: E731
    with pytest.raises(ValueError, match=r"rank >= 2"):
        op(torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match=r"weights must be \[n_layers \+ 1\] = \[3\]"):
        op(torch.randn(3, 2, 4), torch.randn(4))
    with pytest.raises(TypeError, match="weights dtype torch.float64 must equal"):
        op(torch.randn(3, 2, 4), torch.randn(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="must be a floating tensor"):
        op(torch.ones(3, 2, 4, dtype=torch.int64), torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="both must share a device"):
        op(torch.randn(3, 2, 4), torch.randn(3, device="meta"))
    with pytest.raises(TypeError, match="must be torch.Tensors"):
        op([[1.0]], torch.randn(1))


def test_cpp_kernel_checks_inputs():
    with pytest.raises(RuntimeError, match=r"weights must be \[3\] to match layer_outputs"):
        torch.ops.fastformers.feedback_memory(torch.randn(3, 2, 4), torch.randn(5))
    with pytest.raises(RuntimeError, match="grad must be"):
        torch.ops.fastformers.feedback_memory_backward(torch.randn(2, 5), torch.randn(3, 2, 4), torch.randn(3))


def test_forced_cpp_on_other_device_raises():
    with pytest.raises(ValueError, match="runs on CPU tensors only"):
        fastformers.resolve_backend(torch.device("meta"), "cpp")


def test_without_extension_warns_once_and_uses_reference():
    script = """
import importlib.abc, sys, warnings
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fastformers._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import torch, fastformers
assert "cpp" not in fastformers.available_backends()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    x, w = torch.randn(3, 2, 4, requires_grad=True), torch.randn(3)
    for _ in range(3):
        out = fastformers.ops.feedback_memory(x, w)
        torch.ops.fastformers.feedback_memory(x, w).sum().backward()
messages = [str(c.message) for c in caught if "not built" in str(c.message)]
assert len(messages) == 1, messages
assert fastformers.resolve_backend(x.device) == "reference"
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "FASTFORMERS_BACKEND"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("backend", [b for b in fastformers.available_backends() if b != "triton"])
def test_autocast_casts_weights_to_the_compute_dtype(backend):
    layer_outputs = torch.randn(4, 3, 8)
    weights = torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wrapped = fastformers.ops.feedback_memory(layer_outputs, weights, backend=backend)
        dispatched = torch.ops.fastformers.feedback_memory(layer_outputs, weights)
    expected = fastformers.ops.feedback_memory(layer_outputs.bfloat16(), weights.bfloat16(), backend="reference")
    assert wrapped.dtype == dispatched.dtype == torch.bfloat16
    torch.testing.assert_close(wrapped, expected)
    torch.testing.assert_close(dispatched, expected)
