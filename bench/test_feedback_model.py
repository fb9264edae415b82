"""Feedback Transformer models (forward+backward) and the attention step: labml_nn
/ the reference vs the fused backends. labml's experiment size runs only with
FASTFORMERS_BENCH_LARGE=1 (about 30 s per labml forward+backward)."""
import pytest
import torch

from fastformers.benchmarks import feedback, timing

pytest.importorskip("labml_nn")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = feedback.feedback_model_cases(DEVICE) + feedback.feedback_attention_step_cases(DEVICE)
# The baseline (labml_nn's module, or the op's reference) then the fused backends.
RUNS = [(case, backend) for case in CASES for backend in (case.baseline, *timing.fused_backends(DEVICE))]


@pytest.mark.parametrize("case,backend", RUNS,
                         ids=[f"{c.op}:{c.shape}:{b}".replace(" ", ",") for c, b in RUNS])
def test_forward_backward(benchmark, case, backend):
    inputs = case.make_inputs()
    grad = torch.randn_like(case.run(inputs, backend))
    benchmark.group = f"{case.op} {case.shape} fwd+bwd"

    def forward_backward():
        torch.autograd.backward(case.run(inputs, backend), grad)
        for tensor in inputs:
            tensor.grad = None
        if case.zero_grad is not None:
            case.zero_grad(backend)

    benchmark.pedantic(forward_backward, rounds=3, warmup_rounds=1)


def test_cached_generation(benchmark):
    """256 new tokens, ours cached vs labml_nn recomputing the prefix; tokens/s in extra_info."""
    gen = benchmark.pedantic(feedback.generation_tokens_per_s, rounds=1)
    benchmark.extra_info.update(gen)
