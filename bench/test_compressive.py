"""Compressive Transformer ops: labml-style references (permute + nn.Conv1d +
permute; the reconstruction loss as labml_nn computes it) vs the fused
backends and torch.compile of the reference; plus the whole training step at
labml's experiment configuration, ours vs labml_nn."""
import pytest
import torch

from fastformers.benchmarks import compressive, timing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = compressive.conv_compress_cases(DEVICE) + compressive.attention_reconstruction_loss_cases(DEVICE)
BACKENDS = ["reference", *timing.fused_backends(DEVICE), timing.COMPILED_REFERENCE]


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


FUSED = timing.fused_backends(DEVICE)
STEP_IMPLEMENTATIONS = ["labml_nn", *FUSED, *map(compressive.CompressiveTrainingStep.without_rel_attention, FUSED)]


@pytest.mark.parametrize("implementation", STEP_IMPLEMENTATIONS)
def test_compressive_training_step(benchmark, implementation):
    pytest.importorskip("labml_nn")
    step = compressive.compressive_training_step(implementation, DEVICE)
    benchmark.group = f"Compressive training step {compressive.CompressiveTrainingStep().label()}"
    benchmark.pedantic(step, rounds=5, warmup_rounds=2)
