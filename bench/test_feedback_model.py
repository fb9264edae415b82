"""Feedback Transformer models (forward+backward) and the attention step: labml_nn
/ the reference vs the fused backends. labml's experiment size runs only with
FASTFORMERS_BENCH_LARGE=1 (about 30 s per labml forward+backward)."""
import pytest
import torch

from fastformers import benchmark as cases

pytest.importorskip("labml_nn")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", *cases.fused_backends(DEVICE)]
CASES = cases.feedback_model_cases(DEVICE) + cases.feedback_attention_step_cases(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}:{c.shape}".replace(" ", ","))
def test_forward_backward(benchmark, case, backend):
    inputs = case.make_inputs()
    grad = torch.randn_like(case.run(inputs, backend))
    benchmark.group = f"{case.op} {case.shape} fwd+bwd"
    benchmark.pedantic(lambda: torch.autograd.backward(case.run(inputs, backend), grad), rounds=3, warmup_rounds=1)


def test_cached_generation(benchmark):
    """256 new tokens, ours cached vs labml_nn recomputing the prefix; tokens/s in extra_info."""
    from fastformers.benchmark import generation_tokens_per_s

    gen = benchmark.pedantic(generation_tokens_per_s, rounds=1)
    benchmark.extra_info.update(gen)
