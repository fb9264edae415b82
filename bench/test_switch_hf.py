"""Hugging Face Switch Transformers against the same model after
``fastformers.convert`` (switch-base-8 widths, random weights, nothing
downloaded): the sparse MLP alone forward+backward, and the whole
``SwitchTransformersForConditionalGeneration`` eval forward and training step
(see :func:`fastformers.benchmarks.switch.switch_hf_cases`). The Switch FFN against
the dense FFN, ``grouped_mm`` and labml_nn is ``bench/test_switch.py``."""
import pytest
import torch

from fastformers.benchmarks import switch, timing

pytest.importorskip("transformers")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = switch.switch_hf_cases(DEVICE)
IMPLEMENTATIONS = ["hf", *timing.fused_backends(DEVICE)]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.op.split(" (")[0].replace(" ", "-"))
def test_forward_backward(benchmark, case, implementation):
    """Sparse MLP: forward+backward; whole model: one training step (with the AdamW update)."""
    inputs = case.make_inputs()
    benchmark.group = f"{case.op} {case.shape} fwd+bwd"

    def forward_backward():
        out = case.run(inputs, implementation)
        out.backward(torch.ones_like(out))
        case.update(implementation)
        for tensor in inputs:
            tensor.grad = None
        case.zero_grad(implementation)

    benchmark(forward_backward)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_model_eval_forward(benchmark, implementation):
    case = CASES[-1]
    inputs = case.make_inputs()
    benchmark.group = f"{case.op} {case.shape} eval fwd"

    def forward():
        with torch.no_grad():
            case.run(inputs, implementation)

    benchmark(forward)
