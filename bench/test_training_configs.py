"""Each model's training forward+backward, labml_nn against fastformers.convert
of it, with dropout 0 and 0.1, in float32 and under bfloat16 autocast, under
pytest-benchmark (``fastformers bench training`` prints the same comparison
with its ratios). Sizes: :data:`fastformers.benchmarks.training.SIZES`."""
import pytest
import torch

from fastformers.benchmarks import lm, training as tb

pytestmark = pytest.mark.skipif(not lm.labml_available(), reason="needs labml_nn")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [size for size in tb.SIZES if not size.large]


@pytest.mark.parametrize("precision", tb.PRECISIONS)
@pytest.mark.parametrize("dropout", tb.DROPOUTS)
@pytest.mark.parametrize("implementation", ["labml_nn", "fastformers"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{s.model}-{s.label}" for s in SIZES])
def test_training_step(benchmark, size, implementation, dropout, precision):
    benchmark.group = f"training {size.model} {size.label} dropout={dropout:g} {precision}"
    labml, fused = tb.models(size, dropout, DEVICE)
    model = labml if implementation == "labml_nn" else fused
    try:
        step = tb.step_fn(model, size, precision, DEVICE)
        step()
    except (RuntimeError, TypeError) as error:
        if implementation != "labml_nn":
            raise  # our fused path must run every configuration
        # labml_nn's Switch fails under CPU autocast (README: training configurations)
        pytest.skip(f"labml_nn cannot run this configuration: {str(error).splitlines()[0]}")
    benchmark(step)
