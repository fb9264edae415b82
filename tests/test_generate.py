"""Generation: the cached step API gives the logits of a full recompute, and sampling behaves."""
import pytest
import torch

import fastformers
from fastformers.cli import main
from fastformers.generate import generate, generate_ids, sample_next
from fastformers.models import build_model, default_model_config
from fastformers.train import Trainer, default_train_config

from lm_helpers import TINY_MODEL, sample_text

pytestmark = pytest.mark.usefixtures("one_thread")

V = 13
TOL = dict(rtol=1e-10, atol=1e-10)  # float64: the cached and full computations differ only in summation order


def tiny(model, **overrides):
    lm = build_model(default_model_config(model, V, **{**TINY_MODEL, **overrides})).double().eval()
    with torch.no_grad():
        for name, parameter in lm.named_parameters():
            if "pos" in name or name.endswith("weights"):  # zero-initialised tables: make them matter
                parameter.normal_(0, 0.5)
    return lm


def stepwise_logits(lm, tokens, prompt_len):
    """Logits ``[T, 1, V]`` from the prompt in one call, then one step per token, carrying the state."""
    logits, state = lm.step(tokens[:prompt_len])
    parts = [logits]
    for t in range(prompt_len, tokens.shape[0]):
        logits, state = lm.step(tokens[t:t + 1], state)
        parts.append(logits)
    return torch.cat(parts), state


@pytest.mark.parametrize("backend", fastformers.available_backends())
@pytest.mark.parametrize("kv", [True, False])
@torch.no_grad()
def test_feedback_cache_equals_full_recompute(kv, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    lm = tiny("feedback", kv=kv)
    tokens = torch.randint(0, V, (11, 1))
    with fastformers.use_backend(backend):
        cached, state = stepwise_logits(lm, tokens, prompt_len=4)
        full = lm(tokens).logits
    torch.testing.assert_close(cached, full, **TOL)
    assert state.steps == 11


@torch.no_grad()
def test_feedback_cache_slides_past_the_position_table():
    lm = tiny("feedback")
    for layer in lm.transformer.layers:
        layer.attn.P = 6  # a short table: the window must slide after 6 steps
    tokens = torch.randint(0, V, (9, 1))
    _, state = stepwise_logits(lm, tokens, prompt_len=2)
    assert state.steps == 6


@pytest.mark.parametrize("model", ["xl", "compressive"])
@torch.no_grad()
def test_memory_cache_equals_full_recompute_within_the_memory(model):
    # Exact while every earlier step is still in memory (sequence length <= mem_len + 1);
    # beyond that the memory models see a window by design, unlike a full recompute.
    lm = tiny(model, mem_len=10, c_mem_len=4, compression_rate=2)
    tokens = torch.randint(0, V, (11, 1))
    cached, memory = stepwise_logits(lm, tokens, prompt_len=3)
    torch.testing.assert_close(cached, lm(tokens).logits, **TOL)
    if model == "xl":
        assert [m.shape[0] for m in memory] == [10, 10]
    else:  # 11 steps: the oldest two (a multiple of the rate) were compressed into one
        assert (memory.mem_length, memory.c_mem_length) == (9, 1)


@torch.no_grad()
def test_xl_memory_window_past_mem_len():
    # Past mem_len, the step API is exactly the model run on one-token segments with memory.
    lm = tiny("xl", mem_len=4)
    tokens = torch.randint(0, V, (9, 1))
    cached, _ = stepwise_logits(lm, tokens, prompt_len=1)
    memory, expected = None, []
    for t in range(9):
        output = lm(tokens[t:t + 1], memory)
        memory = output.memory
        expected.append(output.logits)
    torch.testing.assert_close(cached, torch.cat(expected), **TOL)


@torch.no_grad()
def test_switch_cache_equals_full_recompute():
    lm = tiny("switch", drop_tokens=True)
    tokens = torch.randint(0, V, (9, 1))
    cached, state = stepwise_logits(lm, tokens, prompt_len=3)
    assert all(layer.feed_forward.drop_tokens for layer in lm.transformer.layers)  # restored
    for layer in lm.transformer.layers:
        layer.feed_forward.drop_tokens = False
    torch.testing.assert_close(cached, lm(tokens).logits, **TOL)
    assert [s.shape[0] for s in state] == [9, 9]


@torch.no_grad()
def test_greedy_generation_matches_recomputing_every_token():
    lm = tiny("feedback")
    prompt = torch.randint(0, V, (3,))
    generated = list(generate_ids(lm, prompt, tokens=6, temperature=0))
    sequence = prompt.tolist()
    for _ in range(6):
        sequence.append(int(lm(torch.tensor(sequence).view(-1, 1)).logits[-1, 0].argmax()))
    assert generated == sequence[3:]


def test_sampling_options():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_next(logits, temperature=0, top_k=0).tolist() == [1]
    generator = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=generator)) for _ in range(50)}
    assert draws == {1, 3}
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, -1.0, 0)
    with pytest.raises(ValueError, match="top_k"):
        sample_next(logits, 1.0, -2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    text = out / "text.txt"
    text.write_text(sample_text(5000), encoding="utf-8")
    config = default_train_config("feedback", data=str(text), out=str(out), steps=2, seq_len=8, batch_size=4,
                                  eval_batches=1)
    Trainer.start(config, log=lambda line: None, **TINY_MODEL).run(progress=False)
    return out / "checkpoint.pt"


def test_generate_from_checkpoint_is_seeded(checkpoint):
    first = "".join(generate(checkpoint, "It is", 20, temperature=1.0, top_k=5, seed=7))
    assert len(first) == 20
    assert first == "".join(generate(checkpoint, "It is", 20, temperature=1.0, top_k=5, seed=7))
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        list(generate(checkpoint, "It is \u2603", 5))


def test_cli_generate(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "The", "--tokens", "12", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("The") and len(printed.rstrip("\n")) == 3 + 12
