"""Compressive Transformer ops: labml-style references (permute + nn.Conv1d +
permute; the reconstruction loss as labml_nn computes it) vs the fused
backends and torch.compile of the reference."""
import pytest
import torch

from fastformers import benchmark

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = benchmark.conv_compress_cases(DEVICE) + benchmark.attention_reconstruction_loss_cases(DEVICE)
BACKENDS = ["reference", *benchmark.fused_backends(DEVICE), benchmark.COMPILED_REFERENCE]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}[{c.shape.replace(' ', ',')}]")
def test_forward_backward(benchmark, case, backend):
    inputs = case.make_inputs()
    grad = torch.randn_like(case.run(inputs, backend))  # also compiles the torch.compile peer, untimed
    benchmark.group = f"{case.op} {case.shape} fwd+bwd"

    def forward_backward():
        torch.autograd.backward(case.run(inputs, backend), grad)
        for tensor in inputs:
            tensor.grad = None

    benchmark(forward_backward)
