"""feedback_memory: labml-style einsum reference vs the fused backends."""
import pytest
import torch

from fastformers.benchmarks import feedback, timing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = feedback.feedback_memory_cases(DEVICE)
BACKENDS = ["reference", *timing.fused_backends(DEVICE)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.shape.replace(" ", ","))
def test_forward_backward(benchmark, case, backend):
    inputs = case.make_inputs()
    grad = torch.randn_like(case.run(inputs, backend))
    benchmark.group = f"{case.op} {case.shape} fwd+bwd"

    def forward_backward():
        torch.autograd.backward(case.run(inputs, backend), grad)

    benchmark(forward_backward)
