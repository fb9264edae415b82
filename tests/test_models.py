"""The four language models: shapes, memory policies, auxiliary losses, labml defaults."""
import pytest
import torch

import fastformers
from fastformers.models import (MODEL_DEFAULTS, MODEL_NAMES, build_model,
                                default_model_config)
from fastformers.recipes import recipe

from lm_helpers import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

V = 11


def tiny(model, **overrides):
    return build_model(default_model_config(model, V, **{**TINY_MODEL, **overrides}))


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_logits_shape(model):
    lm = tiny(model)
    output = lm(torch.randint(0, V, (5, 3)))
    assert output.logits.shape == (5, 3, V)
    assert (output.memory is not None) == lm.carries_memory


def test_xl_memory_keeps_the_last_mem_len_steps():
    lm = tiny("xl", mem_len=6)
    memory = None
    for _ in range(3):
        memory = lm(torch.randint(0, V, (4, 2)), memory).memory
    assert len(memory) == TINY_MODEL["n_layers"]
    assert all(m.shape == (6, 2, 16) and not m.requires_grad for m in memory)
    assert tiny("xl", mem_len=0)(torch.randint(0, V, (4, 2))).memory == []


def test_compressive_memory_and_reconstruction_loss():
    lm = tiny("compressive", mem_len=4, c_mem_len=3, compression_rate=2)
    output = lm(torch.randint(0, V, (4, 2)))
    assert output.aux_loss is None  # nothing left the memory yet
    memory = output.memory
    assert isinstance(memory, fastformers.nn.CompressiveMemory) and memory.c_mem_length == 0
    output = lm(torch.randint(0, V, (4, 2)), memory)
    # 8 steps, keep 4, compress the oldest 4 two-to-one.
    assert (output.memory.mem_length, output.memory.c_mem_length) == (4, 2)
    assert output.aux_loss is not None and output.aux_loss.requires_grad
    output.aux_loss.backward()
    # Only the compression learns from the reconstruction loss.
    for name, parameter in lm.named_parameters():
        assert (parameter.grad is not None) == (".compress." in name), name
    output = lm(torch.randint(0, V, (4, 2)), output.memory)
    assert output.memory.c_mem_length == 3  # capped at c_mem_len
    lm.eval()
    assert lm(torch.randint(0, V, (4, 2)), output.memory).aux_loss is None


def test_switch_load_balancing_loss():
    lm = tiny("switch", load_balancing_coef=0.5, n_experts=3)
    output = lm(torch.randint(0, V, (6, 2)))
    # n_experts · Σ f_i P_i is 1 for a perfectly balanced router, summed over layers.
    assert output.aux_loss.item() == pytest.approx(0.5 * output.stats["lb_loss"])
    assert output.stats["lb_loss"] >= TINY_MODEL["n_layers"] * (1 - 1e-6)
    assert 0 <= output.stats["dropped"] <= 1


def test_feedback_original_and_kv_variants():
    assert isinstance(tiny("feedback").transformer, fastformers.nn.FeedbackTransformerKV)
    assert isinstance(tiny("feedback", kv=False).transformer, fastformers.nn.FeedbackTransformer)


def test_defaults_are_labml_experiment_settings():
    assert MODEL_DEFAULTS["xl"] == dict(d_model=128, heads=4, d_ff=256, n_layers=6, dropout=0.0, mem_len=32)
    labml_xl = recipe("xl", "labml").train
    assert {k: labml_xl[k] for k in ("seq_len", "batch_size", "optimizer", "lr")} == dict(
        seq_len=2, batch_size=32, optimizer="noam", lr=1.0)
    assert recipe("compressive", "labml").train["optimizer"] == "adamw"
    config = default_model_config("switch", V, d_model=None, n_layers=2)
    assert config.d_model == 128 and config.n_layers == 2 and config.capacity_factor == 1.2


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of heads"):
        default_model_config("xl", V, d_model=30, heads=4)
    with pytest.raises(ValueError, match="model must be one of"):
        default_model_config("gpt", V)


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_same_logits_as_labml_modules_in_the_same_shell(model):
    labml = pytest.importorskip("labml_nn") and fastformers.models.labml_modules()
    config = default_model_config(model, V, **TINY_MODEL, drop_tokens=False)
    ours = build_model(config).double()
    theirs = build_model(config, labml).double()
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.normal_(0, 0.3)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randint(0, V, (5, 2))
    ours_out, theirs_out = ours(x), theirs(x)
    torch.testing.assert_close(ours_out.logits, theirs_out.logits, rtol=1e-9, atol=1e-9)
    if ours.carries_memory:
        torch.testing.assert_close(ours(x, ours_out.memory).logits, theirs(x, theirs_out.memory).logits,
                                   rtol=1e-9, atol=1e-9)


def test_feedback_reference_and_fused_backends_agree():
    lm = tiny("feedback").double()
    x = torch.randint(0, V, (6, 2))
    with fastformers.use_backend("reference"):
        reference = lm(x).logits
    fused = lm(x).logits
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-10)
