"""Fused modules run concurrently from several Python threads (the kernels release the GIL and
share the block cache): each thread's results must be bit-identical to the same work run serially."""
import threading

import pytest
import torch

import fastformers
from fastformers.models import ModelConfig, build_model

pytestmark = [
    pytest.mark.skipif("cpp" not in fastformers.available_backends(), reason="needs the C++ extension"),
    pytest.mark.usefixtures("one_thread"),
]

THREADS = 3
# Every variant's fused path: XL and Compressive (rel_attention; conv_compress and the
# reconstruction loss once memory is full), the fused Feedback recurrence, Switch's expert FFN.
CONFIGS = [
    dict(model="xl", mem_len=6),
    dict(model="compressive", mem_len=4, c_mem_len=4, compression_rate=2),
    dict(model="feedback", kv=True),
    dict(model="switch", n_experts=3, drop_tokens=False),  # no random token dropping
]


def job(config: dict, seed: int):
    """Three batches of forward+backward carrying memory; returns every logit and gradient."""
    generator = torch.Generator().manual_seed(seed)
    model_config = ModelConfig(n_tokens=11, d_model=16, heads=2, d_ff=32, n_layers=2, **config)
    model = build_model(model_config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    model.train()
    results, memory = [], None
    for _ in range(3):
        tokens = torch.randint(0, 11, (5, 3), generator=generator)
        output = model(tokens, memory)
        loss = output.logits.square().mean() + (0 if output.aux_loss is None else output.aux_loss)
        model.zero_grad(set_to_none=True)
        loss.backward()
        results.append(output.logits.detach())
        results += [p.grad.clone() for p in model.parameters() if p.grad is not None]
        memory = output.memory
    return results


def test_concurrent_forward_backward_is_bit_identical_to_serial():
    work = [(config, seed) for seed in range(THREADS) for config in CONFIGS]
    serial = [job(config, seed) for config, seed in work]
    concurrent = [None] * len(work)
    errors = []
    barrier = threading.Barrier(THREADS)

    def worker(index):
        try:
            barrier.wait()
            for k in range(index, len(work), THREADS):
                concurrent[k] = job(*work[k])
        except BaseException as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for (config, seed), expected, got in zip(work, serial, concurrent):
        assert len(got) == len(expected), config
        for i, (a, b) in enumerate(zip(expected, got)):
            assert torch.equal(a, b), f"{config['model']} seed {seed}: result {i} differs from the serial run"
