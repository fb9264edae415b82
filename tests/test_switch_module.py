"""fastformers.nn.SwitchFeedForward on the fused backend against its reference
backend and labml_nn: outputs, router statistics, dropped tokens and every
gradient; backend choice, load-balancing loss, state_dict and convert."""
import re

import pytest
import torch
from torch import nn

import fastformers
from fastformers._backend import FallbackWarning
from fastformers.convert import convert
from fastformers.nn import FeedForward, SwitchFeedForward, load_balancing_loss
from harness import labml_layout, labml_layout_grads

D = 24
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_switch(n_experts=4, capacity_factor=0.5, *, drop_tokens=True, is_scale_prob=True, d_ff=2 * D,
                activation=None, is_gated=False, bias=True, dtype=torch.float64, seed=0, stacked_experts=True):
    torch.manual_seed(seed)
    expert = FeedForward(D, d_ff, 0.0, activation=activation or nn.ReLU(), is_gated=is_gated, bias1=bias,
                         bias2=bias, bias_gate=bias)
    module = SwitchFeedForward(capacity_factor=capacity_factor, drop_tokens=drop_tokens, is_scale_prob=is_scale_prob,
                               n_experts=n_experts, expert=expert, d_model=D)
    if not stacked_experts:
        module.unstack_experts_()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    # uneven routing, so that experts overflow (and some may stay empty)
    with torch.no_grad():
        module.switch.bias.copy_(torch.linspace(1.0, -1.0, n_experts))
    return module.to(dtype)


def run_backend(module, backend, x, seed=3):
    """Outputs and gradients (x, then every parameter) of one forward+backward."""
    module.backend = backend
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out, counts, route_prob_sum, n_dropped, p_max = module(x)
    assert module.last_backend == backend
    torch.manual_seed(11)
    (out * torch.randn_like(out)).sum().backward()
    grads = [x.grad] + labml_layout_grads(module)
    return (out, counts, route_prob_sum, p_max), n_dropped, grads


def assert_same(a, b, dtype, what):
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and u.shape == v.shape, f"{what}[{i}]"
        torch.testing.assert_close(u, v, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype], msg=f"{what}[{i}]")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("policy", ["labml", "deterministic"])
@pytest.mark.parametrize(
    "n_experts,capacity_factor,drop_tokens,is_scale_prob,tokens",
    [(4, 0.5, True, True, (7, 3)), (4, 1.0, False, False, (7, 3)), (1, 1.0, True, True, (1, 1)),
     (64, 1.0, True, True, (32, 16)), (4, 0.0, True, False, (5, 1)), (3, 8.0, True, True, (9, 2))],
)
def test_fused_matches_reference(dtype, policy, n_experts, capacity_factor, drop_tokens, is_scale_prob, tokens):
    module = make_switch(n_experts, capacity_factor, drop_tokens=drop_tokens, is_scale_prob=is_scale_prob, dtype=dtype)
    module.drop_policy = policy
    x = torch.randn(*tokens, D, dtype=dtype)
    fused, fused_dropped, fused_grads = run_backend(module, "cpp", x)
    ref, ref_dropped, ref_grads = run_backend(module, "reference", x)
    assert fused_dropped == ref_dropped and isinstance(fused_dropped, int)
    assert fused[1].dtype == dtype
    assert_same(fused, ref, dtype, "outputs")
    assert_same(fused_grads, ref_grads, dtype, "grads")
    if capacity_factor == 0.0:
        assert fused_dropped == x.shape[0] * x.shape[1]


@pytest.mark.parametrize("activation,is_gated,bias", [(nn.GELU(), False, True), (nn.ReLU(), True, True),
                                                      (nn.GELU(), True, False), (nn.SiLU(), True, False),
                                                      (nn.Sigmoid(), True, True), (nn.Identity(), True, False),
                                                      (nn.SiLU(), False, True)])
def test_fused_expert_variants(activation, is_gated, bias):
    module = make_switch(activation=activation, is_gated=is_gated, bias=bias)
    x = torch.randn(6, 4, D, dtype=torch.float64)
    fused, _, fused_grads = run_backend(module, "cpp", x)
    ref, _, ref_grads = run_backend(module, "reference", x)
    assert_same(fused, ref, torch.float64, "outputs")
    assert_same(fused_grads, ref_grads, torch.float64, "grads")


def labml_pair(**kwargs):
    pytest.importorskip("labml_nn")
    from labml_nn.transformers.feed_forward import FeedForward as LabmlFeedForward
    from labml_nn.transformers.switch import SwitchFeedForward as LabmlSwitch

    ours = make_switch(**kwargs)
    labml = LabmlSwitch(capacity_factor=ours.capacity_factor, drop_tokens=ours.drop_tokens,
                        is_scale_prob=ours.is_scale_prob, n_experts=ours.n_experts,
                        expert=LabmlFeedForward(D, 2 * D, 0.0), d_model=D).double()
    assert list(labml.state_dict()) == list(ours.state_dict())
    labml.load_state_dict(ours.state_dict(), strict=True)
    return labml, ours


@pytest.mark.parametrize("is_scale_prob", [True, False])
def test_fused_matches_labml_with_dropping(is_scale_prob):
    labml, ours = labml_pair(capacity_factor=0.6, is_scale_prob=is_scale_prob)
    x = torch.randn(9, 4, D, dtype=torch.float64)
    fused, n_dropped, fused_grads = run_backend(ours, "cpp", x, seed=7)
    x_labml = x.clone().requires_grad_()
    torch.manual_seed(7)
    out, counts, route_prob_sum, labml_dropped, p_max = labml(x_labml)
    torch.manual_seed(11)
    (out * torch.randn_like(out)).sum().backward()
    assert n_dropped == labml_dropped > 0
    assert_same(fused, (out, counts, route_prob_sum, p_max), torch.float64, "outputs")
    labml_grads = [x_labml.grad] + [p.grad for p in labml.parameters()]
    assert len(labml_grads) == len(fused_grads)
    assert_same(fused_grads, labml_grads, torch.float64, "grads")


def test_generator_makes_drops_reproducible():
    module = make_switch(capacity_factor=0.3)
    module.backend = "cpp"
    x = torch.randn(8, 4, D, dtype=torch.float64)
    outputs = []
    for seed in (5, 5, 6):
        module.generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed + 100)  # the global generator must not matter
        outputs.append(module(x)[0])
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])


def test_deterministic_policy_keeps_the_first_tokens():
    module = make_switch(n_experts=2, capacity_factor=1.0)
    module.drop_policy = "deterministic"
    with torch.no_grad():
        module.switch.weight.zero_()
        module.switch.bias.copy_(torch.tensor([1.0, 0.0]))  # every token to expert 0, capacity 2 of 4
    x = torch.randn(4, 1, D, dtype=torch.float64)
    out, counts, _, n_dropped, p_max = module(x)
    assert n_dropped == 2 and counts.tolist() == [4.0, 0.0]
    torch.testing.assert_close(out[2:], x[2:] * p_max[2:].view(-1, 1, 1))
    assert not torch.allclose(out[:2], x[:2] * p_max[:2].view(-1, 1, 1))


def test_backend_choice_is_visible_and_never_silent():
    # per-expert modules, so that experts can differ
    module = make_switch(d_ff=8, stacked_experts=False)
    x = torch.randn(3, 2, D, dtype=torch.float64)
    module.backend = None
    module(x)
    fused = "cpp" if "cpp" in fastformers.available_backends() else "reference"
    assert module.last_backend == fused
    # active expert dropout with one p for all experts runs fused
    for expert in module.experts:
        expert.dropout.p = 0.1
    module.train()
    module(x)
    assert module.last_backend == fused
    assert module.fused_backend(x.device, training=True) == (fused, None)
    # experts with different p: the automatic choice is the reference, with a warning that says why
    module.experts[1].dropout.p = 0.2
    reason = "the experts' dropout probabilities differ (training mode); give them all the same p"
    assert module.fused_backend(x.device, training=True) == ("reference", reason)
    assert module.fused_backend(x.device, training=False) == (fused, None)
    with pytest.warns(FallbackWarning, match=re.escape(reason)):
        module(x)
    assert module.last_backend == "reference"
    module.backend = "cpp"
    with pytest.raises(ValueError, match=r"backend 'cpp' cannot run these experts: the experts' dropout"):
        module(x)
    with pytest.raises(ValueError, match=r"backend 'cpp' cannot run these experts"):
        module.fused_backend(x.device, training=True)
    module.eval()
    module(x)
    assert module.last_backend == "cpp"
    module.experts[0].activation = nn.Tanh()
    with pytest.raises(ValueError, match="activation Tanh\\(\\) has no fused kernel; use nn.ReLU"):
        module(x)
    module.backend = None
    with pytest.warns(FallbackWarning, match="has no fused kernel"):
        module(x)
    assert module.last_backend == "reference"
    module.backend = "reference"
    assert module.fused_backend(x.device, training=False) == ("reference", "backend 'reference' was requested")
    module.drop_policy = "random"
    with pytest.raises(ValueError, match="drop_policy must be one of"):
        module(x)


def test_load_balancing_loss_matches_labml_experiment():
    counts = torch.tensor([[3.0, 1.0, 0.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
    route_prob_sum = torch.tensor([[2.5, 1.5, 0.5, 3.5], [2.0, 2.0, 2.0, 2.0]])
    total = counts.sum(dim=-1, keepdims=True)
    expected = 4 * ((counts / total) * (route_prob_sum / total)).sum()
    torch.testing.assert_close(load_balancing_loss(counts, route_prob_sum, 4), expected)
    # one layer, perfectly balanced: 1
    torch.testing.assert_close(load_balancing_loss(counts[1], route_prob_sum[1], 4), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"must both be \[4\] or \[n_layers, 4\]"):
        load_balancing_loss(counts, route_prob_sum[0], 4)


def test_load_balancing_loss_gradient_reaches_the_router():
    module = make_switch()
    _, counts, route_prob_sum, _, _ = module(torch.randn(5, 3, D, dtype=torch.float64))
    load_balancing_loss(counts, route_prob_sum, module.n_experts).backward()
    assert module.switch.weight.grad.abs().sum() > 0


def test_state_dict_round_trip():
    module = make_switch(is_gated=True)
    keys = list(module.state_dict())
    assert keys[:3] == ["experts.0.layer1.weight", "experts.0.layer1.bias", "experts.0.layer2.weight"]
    assert "experts.3.linear_v.weight" in keys and keys[-2:] == ["switch.weight", "switch.bias"]
    other = make_switch(is_gated=True, seed=1)
    other.load_state_dict(module.state_dict(), strict=True)
    x = torch.randn(4, 2, D, dtype=torch.float64)
    torch.manual_seed(0)
    expected = module(x)[0]
    torch.manual_seed(0)
    torch.testing.assert_close(other(x)[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("stacked_experts", [True, False])
def test_convert_labml_module_runs_fused(stacked_experts):
    labml, ours = labml_pair(capacity_factor=0.6)
    params = dict(labml.named_parameters())
    x = torch.randn(5, 3, D, dtype=torch.float64)
    torch.manual_seed(2)
    expected = labml(x)
    converted = convert(labml, backend="cpp", stacked_experts=stacked_experts)
    assert type(converted) is SwitchFeedForward and converted.stacked == stacked_experts
    assert converted.drop_policy == "labml" and converted.generator is None and converted.backend == "cpp"
    if stacked_experts:
        # copies in the stacked layout, under labml's keys
        assert converted.switch.weight is params["switch.weight"] and converted.w1.shape == (4, 2 * D, D)
        assert list(converted.state_dict()) == list(params)
        for name, value in converted.state_dict().items():
            assert torch.equal(value, params[name]), name
    else:
        assert all(p is params[name] for name, p in converted.named_parameters())
    torch.manual_seed(2)
    got = converted(x)
    assert converted.last_backend == "cpp"
    assert got[3] == expected[3]
    for a, b in zip(got[:3] + got[4:], expected[:3] + expected[4:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
