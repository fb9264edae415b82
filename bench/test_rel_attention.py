"""rel_attention: labml-style eager reference, torch.compile of it, and the fused
backends; plus one TransformerXL training step, ours vs labml_nn."""
import pytest
import torch

from fastformers.benchmarks import timing, xl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = xl.rel_attention_cases(DEVICE)
BACKENDS = ["reference", timing.COMPILED_REFERENCE, *timing.fused_backends(DEVICE)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.shape.replace(" ", ","))
def test_forward_backward(benchmark, case, backend):
    inputs = case.make_inputs()
    grad = torch.randn_like(case.run(inputs, backend))
    benchmark.group = f"{case.op} {case.shape} fwd+bwd"

    def forward_backward():
        torch.autograd.backward(case.run(inputs, backend), grad)

    benchmark.pedantic(forward_backward, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("implementation", ["labml_nn", *timing.fused_backends(DEVICE)])
def test_transformer_xl_training_step(benchmark, implementation):
    pytest.importorskip("labml_nn")
    step = xl.transformer_xl_step(implementation, DEVICE)
    benchmark.group = "TransformerXL training step L=128 M=128 B=32 d_model=128 H=4 layers=6"
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("backend", ["reference", *timing.fused_backends(DEVICE),
                                     *CASES[0].forward_only_peers])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.shape.replace(" ", ","))
def test_forward(benchmark, case, backend):
    inputs = case.make_inputs()
    benchmark.group = f"{case.op} {case.shape} fwd"

    def forward():
        with torch.no_grad():
            case.run(inputs, backend)

    benchmark.pedantic(forward, rounds=3, warmup_rounds=1)
