"""Language models: training tokens/s (labml_nn modules vs fastformers reference vs fused backend,
same LM shell) and generation tokens/s (cached step API vs full recompute), under pytest-benchmark."""
import pytest
import torch

from fastformers.benchmarks import lm
from fastformers.models import MODEL_NAMES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VARIANTS = (["labml_nn"] if lm.labml_available() else []) + ["reference", "fused"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_training_step(benchmark, model, variant):
    benchmark.group = f"train {model}"
    benchmark.extra_info["tokens_per_step"] = lm.BENCH_SHAPE["seq_len"] * lm.BENCH_SHAPE["batch_size"]
    benchmark(lm.training_step_fn(model, variant, DEVICE))


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "recompute"])
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_generation(benchmark, model, cached):
    benchmark.group = f"generate {model}"
    benchmark.pedantic(lm.generation_fn(model, cached, DEVICE), rounds=3, warmup_rounds=1)
