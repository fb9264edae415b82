"""SwitchFeedForward forward+backward: labml_nn (when importable), torch's
grouped GEMM, the dense FFN with the same active parameters and the fused
backends, at labml's experiment size (T = 64 x 32, d_model 128, d_ff 256,
E = 4, 16, 64). The compute-heavy shapes run with ``FASTFORMERS_BENCH_LARGE=1``
(``fastformers bench switch --large`` from the command line)."""
import os

import pytest
import torch

from fastformers.benchmarks import switch, timing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = switch.switch_cases(DEVICE, large=os.environ.get("FASTFORMERS_BENCH_LARGE") == "1")
IMPLEMENTATIONS = [CASES[0].baseline, *CASES[0].peers, *timing.fused_backends(DEVICE)]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.shape.replace(" ", ","))
def test_forward_backward(benchmark, case, implementation):
    inputs = case.make_inputs()
    grad = torch.randn_like(case.run(inputs, implementation))
    benchmark.group = f"{case.op} {case.shape} fwd+bwd"

    def forward_backward():
        torch.autograd.backward(case.run(inputs, implementation), grad)
        inputs[0].grad = None
        case.zero_grad(implementation)

    benchmark(forward_backward)
