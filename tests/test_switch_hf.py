"""fastformers.convert on Hugging Face Switch Transformers (transformers 5.x):
the converted model's loss (with HF's router z-loss and auxiliary loss) and
every gradient equal HF's in float64, in training (jitter off and on) and eval
mode; capacity overflow, an empty expert, HF state_dict keys, dropout, the
visible fallback and bad input. Small configs with random weights: nothing is
downloaded."""
import copy

import pytest
import torch
from torch import nn

import fastformers
from fastformers._backend import FallbackWarning
from fastformers.hf import FusedSwitchSparseMLP
from fastformers.ops import dropout

transformers = pytest.importorskip("transformers")
hf_switch = pytest.importorskip("transformers.models.switch_transformers.modeling_switch_transformers")

pytestmark = pytest.mark.usefixtures("triton_interpreter", "one_thread")

D, D_FF, E = 16, 24, 4


def config(**overrides):
    values = dict(vocab_size=40, d_model=D, d_kv=4, d_ff=D_FF, num_layers=2, num_decoder_layers=2, num_heads=2,
                  num_experts=E, expert_capacity=4, encoder_sparse_step=2, decoder_sparse_step=2, dropout_rate=0.0,
                  router_jitter_noise=0.0, decoder_start_token_id=0, pad_token_id=0)
    values.update(overrides)
    return transformers.SwitchTransformersConfig(**values)


def hf_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return transformers.SwitchTransformersForConditionalGeneration(config(**overrides)).double()


def hf_layout_grads(model):
    """Every parameter's gradient under HF's names (stacked expert gradients split per expert; None -> zeros)."""
    grads = {}
    for name, p in model.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        owner = model.get_submodule(prefix) if prefix else model
        if isinstance(owner, FusedSwitchSparseMLP) and leaf in ("wi", "wo"):
            for e in range(p.shape[0]):
                grads[f"{prefix}.experts.expert_{e}.{leaf}.weight"] = p.grad[e]
        else:
            grads[name] = torch.zeros_like(p) if p.grad is None else p.grad
    return grads


def loss_and_grads(model, inputs, labels, seed=1):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(input_ids=inputs, labels=labels, output_router_logits=True)
    out.loss.backward()
    grads = hf_layout_grads(model)
    for name, p in model.named_parameters():
        if p.grad is None and "expert" not in name:
            grads[name] = torch.zeros_like(p)
    return out, grads


def assert_same_model_step(model, converted, training, seed=1):
    model.train(training)
    converted.train(training)
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randint(1, 40, (3, 9), generator=generator)
    labels = torch.randint(1, 40, (3, 6), generator=generator)
    expected, expected_grads = loss_and_grads(model, inputs, labels, seed)
    got, grads = loss_and_grads(converted, inputs, labels, seed)
    for what in ("loss", "logits", "encoder_z_loss", "encoder_aux_loss", "decoder_z_loss", "decoder_aux_loss"):
        torch.testing.assert_close(getattr(got, what), getattr(expected, what), atol=1e-10, rtol=1e-9, msg=what)
    for router_logits in ("encoder_router_logits", "decoder_router_logits"):
        for a, b in zip(getattr(got, router_logits), getattr(expected, router_logits), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert grads.keys() == {name: None for name in expected_grads}.keys()
    for name, want in expected_grads.items():
        # the routers compute in float32 (router_dtype), everything else in float64
        tolerance = 1e-5 if want.dtype == torch.float32 else 1e-9
        torch.testing.assert_close(grads[name], want, atol=tolerance, rtol=tolerance, msg=name)
    return expected


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_whole_model_loss_and_every_gradient_match_hf(backend, training):
    model = hf_model()
    converted = fastformers.convert(copy.deepcopy(model), backend=backend)
    sparse = [m for m in converted.modules() if isinstance(m, FusedSwitchSparseMLP)]
    assert len(sparse) == 2 and not any(type(m).__name__ == "SwitchTransformersSparseMLP" for m in converted.modules())
    assert list(converted.state_dict()) == list(model.state_dict())
    assert_same_model_step(model, converted, training)
    assert all(m.last_backend == backend for m in sparse)


def test_router_jitter_in_training_draws_as_hf():
    model = hf_model(router_jitter_noise=0.1)
    converted = fastformers.convert(copy.deepcopy(model), backend="cpp")
    assert_same_model_step(model, converted, training=True)


def sparse_pair(n_experts=E, capacity=3, seed=0, **overrides):
    torch.manual_seed(seed)
    hf = hf_switch.SwitchTransformersSparseMLP(config(num_experts=n_experts, expert_capacity=capacity, **overrides))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.5)
    hf = hf.double()
    return hf, fastformers.convert(copy.deepcopy(hf), backend="cpp")


def sparse_step(module, x, grad):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad)
    return out, x.grad


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_sparse_mlp_capacity_overflow_and_an_empty_expert(backend):
    hf, fused = sparse_pair(capacity=2, router_bias=True)
    fused.backend = backend
    with torch.no_grad():
        # expert 3 never wins; expert 0 wins most tokens and overflows its capacity of 2 per sequence
        hf.router.classifier.bias.copy_(torch.tensor([1.5, 0.0, 0.0, -100.0]))
        fused.router.classifier.bias.copy_(hf.router.classifier.bias)
    x = torch.randn(3, 8, D, dtype=torch.float64)
    grad = torch.randn(3, 8, D, dtype=torch.float64)
    selected, _, _ = hf.router(x)
    assert selected[..., 3].sum() == 0 and (selected.sum(-1) == 0).any()
    expected, expected_grad_x = sparse_step(hf, x, grad)
    got, grad_x = sparse_step(fused, x, grad)
    assert fused.last_backend == backend
    dropped = selected.sum(-1) == 0
    assert torch.all(got[dropped] == 0)  # over capacity: zero output, as HF's module
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(grad_x, expected_grad_x, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(fused.wo.grad[3], torch.zeros(D, D_FF, dtype=torch.float64), atol=0, rtol=0)
    for e in range(3):
        torch.testing.assert_close(fused.wi.grad[e], hf.experts[f"expert_{e}"].wi.weight.grad, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(fused.wo.grad[e], hf.experts[f"expert_{e}"].wo.weight.grad, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(fused.router.classifier.weight.grad, hf.router.classifier.weight.grad, atol=1e-5,
                               rtol=1e-5)


def test_state_dict_keeps_hf_keys_both_ways():
    hf, fused = sparse_pair()
    assert list(fused.state_dict()) == list(hf.state_dict())
    other, _ = sparse_pair(seed=1)
    fused.load_state_dict(other.state_dict(), strict=True)
    torch.testing.assert_close(fused.experts["expert_2"].wo.weight, other.experts["expert_2"].wo.weight, atol=0,
                               rtol=0)
    hf.load_state_dict(fused.state_dict(), strict=True)
    for key, value in other.state_dict().items():
        assert torch.equal(hf.state_dict()[key], value), key


def test_expert_dropout_in_training_only():
    hf, fused = sparse_pair(capacity=16, dropout_rate=0.3)
    x = torch.randn(2, 8, D, dtype=torch.float64)
    fused.eval()
    with dropout.record() as calls:
        evaluated = fused(x)
    assert calls == []
    torch.testing.assert_close(evaluated, hf.eval()(x), atol=1e-10, rtol=1e-9)
    fused.train()
    with dropout.record() as calls:
        torch.manual_seed(4)
        trained = fused(x)
    assert len(calls) == 1 and calls[0].p == pytest.approx(0.3)
    assert 0.55 < calls[0].mask().double().mean() < 0.85
    torch.manual_seed(4)
    assert torch.equal(fused(x), trained) and not torch.allclose(trained, evaluated)


def test_activation_without_kernel_runs_the_reference_visibly():
    hf, fused = sparse_pair(dense_act_fn="gelu_new")
    x = torch.randn(2, 5, D, dtype=torch.float64)
    fused.backend = None
    with pytest.warns(FallbackWarning, match="activation NewGELUActivation has no fused kernel"):
        out = fused(x)
    assert fused.last_backend == "reference"
    torch.testing.assert_close(out, hf(x), atol=1e-10, rtol=1e-9)
    fused.backend = "cpp"
    with pytest.raises(ValueError, match="backend 'cpp' cannot run these experts"):
        fused(x)


def test_bad_input_gives_clear_errors():
    hf, _ = sparse_pair()
    hf.router.expert_capacity = 0
    with pytest.raises(ValueError, match=r"model \(.*SwitchTransformersSparseMLP\): router.expert_capacity must be"):
        fastformers.convert(hf)
    with pytest.raises(ValueError, match="at least 2 experts"):
        fastformers.convert(hf_switch.SwitchTransformersSparseMLP(config(num_experts=1)))
    hf, _ = sparse_pair()
    hf.experts["expert_2"].wi = nn.Linear(D, D_FF + 1, bias=False)  # a hand-built ModuleDict entry
    model = nn.Sequential(hf)
    with pytest.raises(ValueError, match=r"model.0 .*experts.expert_2 has wi \[25, 16\] and wo \[16, 24\]"):
        fastformers.convert(model)
    assert model[0] is hf  # nothing replaced
    hf.experts["expert_2"].wi = nn.Linear(D, D_FF, bias=True)
    with pytest.raises(ValueError, match="bias-free"):
        fastformers.convert(model)
    with pytest.raises(ValueError, match=r"hidden_states must be \[batch, seq_len, d_model\]"):
        fastformers.convert(sparse_pair()[0])(torch.randn(4, D, dtype=torch.float64))
