"""The Feedback models under ``torch.autocast("cpu", dtype=torch.bfloat16)`` on
every backend: bfloat16 outputs, within 2% of labml_nn in float32 and of the
reference path under autocast, gradients for every parameter; the attention
step op follows autocast."""
import pytest
import torch
from torch import nn

import fastformers
import fastformers.nn as ours

pytestmark = pytest.mark.usefixtures("one_thread")
BACKENDS = ["reference", *(name for name in ("cpp", "triton") if name in fastformers.available_backends())]


def labml_model(kv, gated):
    labml_feedback = pytest.importorskip("labml_nn.transformers.feedback")
    from labml_nn.transformers import feed_forward

    return build(labml_feedback, feed_forward.FeedForward, kv, gated)


def build(ns, feed_forward, kv, gated, heads=2, d_k=16, n_layers=2):
    d_model = heads * d_k
    layer = ns.FeedbackTransformerLayer(
        d_model=d_model, attn=ns.FeedbackAttention(heads, d_model, 0.0, is_kv_precomputed=kv),
        feed_forward=feed_forward(d_model, 2 * d_model, 0.0, activation=nn.GELU(), is_gated=gated), dropout_prob=0.0)
    model = ns.FeedbackTransformerKV(layer, n_layers, d_model, heads) if kv else ns.FeedbackTransformer(layer, n_layers)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5))
    return model


def relative_error(value, exact):
    return ((value.float() - exact.float()).norm() / exact.float().norm()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv", [True, False], ids=["kv", "plain"])
def test_bfloat16_autocast(backend, kv, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    gated = not kv  # one gated case per backend
    labml = labml_model(kv, gated)
    model = build(ours, ours.FeedForward, kv, gated)
    model.load_state_dict(labml.state_dict())
    model.backend = backend
    x = torch.randn(6, 2, 32)
    expected = labml(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    # The fused path returns the autocast dtype; op by op, the final LayerNorm
    # runs in float32 as CPU autocast runs it for labml's module.
    assert out.dtype == (torch.float32 if backend == "reference" else torch.bfloat16)
    assert model.last_path == ("per-op" if backend == "reference" else "fused")
    assert relative_error(out, expected) < 0.02
    if backend != "reference":
        reference = build(ours, ours.FeedForward, kv, gated)
        reference.load_state_dict(labml.state_dict())
        reference.backend = "reference"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert relative_error(out, reference(x)) < 0.02
    out.float().pow(2).sum().backward()
    for name, param in model.named_parameters():
        if name.endswith(("key_pos_embeddings", "key_pos_bias")):
            assert param.grad is not None and param.grad[-5:].abs().sum() > 0, name
        else:
            assert param.grad is not None and param.grad.dtype == param.dtype, name


def test_step_op_follows_autocast():
    B, H, d, steps = 2, 2, 8, 3
    args = [torch.randn(B, H, d), torch.randn(steps, B, H, d), torch.randn(steps, B, H, d), steps,
            torch.randn(5, H, d), torch.randn(5, H), torch.randn(H, d), 0.3]
    expected = torch.ops.fastformers.feedback_attention_step(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct = torch.ops.fastformers.feedback_attention_step(*args)
        wrapped = fastformers.ops.feedback_attention_step(*args)
    for out in (direct, wrapped):
        assert out.dtype == torch.bfloat16
        assert relative_error(out, expected) < 0.02
