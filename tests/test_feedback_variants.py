"""Every labml feed-forward variant and the query/key/value biases on the fused
Feedback recurrence, against labml_nn (same state_dict); the visible fallback
and the explain protocol (``fused_backend``) of the Feedback models."""
import warnings

import pytest
import torch
from torch import nn

import fastformers
import fastformers.nn as ours
from fastformers._backend import FallbackWarning

pytestmark = pytest.mark.usefixtures("one_thread")
FUSED_BACKENDS = [name for name in ("cpp", "triton") if name in fastformers.available_backends()]
TOL = dict(atol=2e-4, rtol=2e-3)


def labml_namespace():
    labml_feedback = pytest.importorskip("labml_nn.transformers.feedback")
    from labml_nn.transformers import feed_forward

    return type("ns", (), dict(
        FeedbackTransformerLayer=labml_feedback.FeedbackTransformerLayer,
        FeedbackAttention=labml_feedback.FeedbackAttention, FeedForward=feed_forward.FeedForward,
        FeedbackTransformerKV=labml_feedback.FeedbackTransformerKV,
        FeedbackTransformer=labml_feedback.FeedbackTransformer))


def build(ns, kv, activation=nn.ReLU(), gated=False, biases=False, dropout=0.1, heads=2, d_k=8, n_layers=2):
    d_model = heads * d_k
    ff = ns.FeedForward(d_model, 3 * d_model, dropout, activation=activation, is_gated=gated)
    layer = ns.FeedbackTransformerLayer(
        d_model=d_model, attn=ns.FeedbackAttention(heads, d_model, dropout, is_kv_precomputed=kv),
        feed_forward=ff, dropout_prob=dropout)
    model = ns.FeedbackTransformerKV(layer, n_layers, d_model, heads) if kv else ns.FeedbackTransformer(layer, n_layers)
    if biases:
        def with_bias(module):
            module.linear = nn.Linear(module.linear.in_features, module.linear.out_features, bias=True)

        for layer in model.layers:
            with_bias(layer.attn.query)
            if layer.attn.key is not None:
                with_bias(layer.attn.key)
        if kv:
            with_bias(model.key)
            with_bias(model.value)
    return model


def randomise(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.5 if p.dim() == 1 else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model


def outputs_and_grads(model, x, grad):
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * grad).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


VARIANTS = [
    ("gelu", dict(activation=nn.GELU())),
    ("silu", dict(activation=nn.SiLU())),
    ("sigmoid", dict(activation=nn.Sigmoid())),
    ("identity", dict(activation=nn.Identity())),
    ("gated-gelu", dict(activation=nn.GELU(), gated=True)),
    ("gated-relu-biases", dict(gated=True, biases=True)),
    ("relu-biases", dict(biases=True)),
]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("kv", [True, False], ids=["kv", "plain"])
@pytest.mark.parametrize("name,options", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_variant_matches_labml(name, options, kv, backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    labml = randomise(build(labml_namespace(), kv, **options)).eval()
    fused = build(ours, kv, **options)
    fused.load_state_dict(labml.state_dict(), strict=True)
    fused.eval().backend = backend
    x = torch.randn(6, 3, 16)
    grad = torch.randn(6, 3, 16)
    assert fused.fused_backend(x.device, training=False) == (backend, None)
    got = outputs_and_grads(fused, x, grad)
    assert fused.last_path == "fused"
    expected = outputs_and_grads(labml, x, grad)
    torch.testing.assert_close(got[0], expected[0], **TOL)
    torch.testing.assert_close(got[1], expected[1], **TOL)
    for param, ref in expected[2].items():
        if ref is None:
            assert got[2][param] is None, param
        else:
            torch.testing.assert_close(got[2][param], ref, **TOL, msg=lambda m, param=param: f"{param}: {m}")
    if kv:
        labml.free()


@pytest.mark.parametrize("kv", [True, False], ids=["kv", "plain"])
def test_default_labml_construction_trains_fused(kv):
    """labml's constructors default to dropout 0.1: training takes the fused path."""
    model = build(ours, kv).train()
    assert model.fused_backend(torch.device("cpu"), training=True) == ("cpp", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        model(torch.randn(4, 2, 16))
    assert model.last_path == "fused"


class Tanh(nn.Tanh):
    """A subclass, so its fallback warning is not spent by another test."""


def test_unsupported_layout_warns_once_and_explains():
    model = build(ours, True, activation=Tanh())
    backend, reason = model.fused_backend(torch.device("cpu"), training=True)
    assert backend == "reference" and "activation" in reason and "GELU" in reason
    assert model.fused_backend(torch.device("cpu"), training=False) == (backend, reason)
    with pytest.warns(FallbackWarning, match="activation"):
        model(torch.randn(3, 2, 16))
    assert model.last_path == "per-op"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        model(torch.randn(3, 2, 16))  # once per (class, reason)


def test_tanh_gelu_is_not_fused():
    model = build(ours, False, activation=nn.GELU(approximate="tanh"))
    backend, reason = model.fused_backend(torch.device("cpu"), training=True)
    assert backend == "reference" and "activation" in reason


def test_requested_reference_backend_is_explained_without_warning():
    model = build(ours, True)
    model.backend = "reference"
    backend, reason = model.fused_backend(torch.device("cpu"), training=True)
    assert backend == "reference" and "requested" in reason
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        model(torch.randn(3, 2, 16))
    assert model.last_path == "per-op"


def test_device_without_fused_kernels_is_explained():
    backend, reason = build(ours, True).fused_backend(torch.device("meta"), training=True)
    assert backend == "reference" and "meta" in reason


def test_non_dropout_module_is_not_fused():
    model = build(ours, False)
    model.layers[1].dropout = nn.Identity()
    backend, reason = model.fused_backend(torch.device("cpu"), training=True)
    assert backend == "reference" and "layer 1" in reason and "nn.Dropout" in reason
