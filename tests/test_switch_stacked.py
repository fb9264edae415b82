"""Stacked expert storage of fastformers.nn.SwitchFeedForward: labml parity in
float64 (outputs, every gradient, dropped tokens), labml's state_dict keys both
ways, labml checkpoints, views, convert and the optimizer built after it, and
a per-step autograd graph whose size does not depend on E."""
import io

import pytest
import torch
from torch import nn

from fastformers.convert import convert
from fastformers.nn import FeedForward, SwitchFeedForward
from harness import labml_layout_grads

labml_switch = pytest.importorskip("labml_nn.transformers.switch")
labml_ff = pytest.importorskip("labml_nn.transformers.feed_forward")

D = 16

pytestmark = pytest.mark.usefixtures("triton_interpreter", "one_thread")


def labml_module(n_experts=4, capacity_factor=0.7, activation=None, is_gated=False, bias=True, seed=0):
    torch.manual_seed(seed)
    expert = labml_ff.FeedForward(D, 24, 0.0, activation=activation or nn.ReLU(), is_gated=is_gated, bias1=bias,
                                  bias2=bias, bias_gate=bias)
    module = labml_switch.SwitchFeedForward(capacity_factor=capacity_factor, drop_tokens=True, is_scale_prob=True,
                                            n_experts=n_experts, expert=expert, d_model=D).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
        module.switch.bias.copy_(torch.linspace(1.0, -1.0, n_experts))  # overflowing and empty experts
    return module


def forward_backward(module, x, seed):
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out, counts, route_prob_sum, n_dropped, p_max = module(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return (out, counts, route_prob_sum, p_max), n_dropped, x.grad


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("activation,is_gated,bias", [(nn.ReLU(), False, True), (nn.SiLU(), True, False),
                                                      (nn.GELU(), True, True)], ids=["relu", "swiglu", "geglu"])
def test_stacked_matches_labml_in_float64(backend, activation, is_gated, bias):
    labml = labml_module(activation=activation, is_gated=is_gated, bias=bias)
    ours = convert(labml_module(activation=activation, is_gated=is_gated, bias=bias), backend=backend)
    assert ours.stacked and ours.w1.shape == (4, 24, D)
    x = torch.randn(7, 5, D, dtype=torch.float64)
    expected, expected_dropped, expected_grad_x = forward_backward(labml, x, seed=3)
    got, dropped, grad_x = forward_backward(ours, x, seed=3)
    assert ours.last_backend == backend
    assert dropped == expected_dropped > 0
    # the same tokens dropped: they (and only they) pass x through, scaled by p_max
    passthrough = (got[0] - x * got[3].view(7, 5, 1)).abs().amax(-1) == 0
    assert torch.equal(passthrough, (expected[0] - x * expected[3].view(7, 5, 1)).abs().amax(-1) == 0)
    assert int(passthrough.sum()) == dropped
    for a, b in zip(got + (grad_x,), expected + (expected_grad_x,)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    labml_grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in labml.parameters()]
    for a, b in zip(labml_layout_grads(ours), labml_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_state_dict_round_trips_both_ways_with_labml():
    labml = labml_module(is_gated=True)
    ours = convert(labml_module(is_gated=True, seed=1))
    assert list(ours.state_dict()) == list(labml.state_dict())
    ours.load_state_dict(labml.state_dict(), strict=True)
    for key, value in labml.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    fresh = labml_module(is_gated=True, seed=2)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(5, 3, D, dtype=torch.float64)
    torch.manual_seed(0)
    expected = fresh(x)[0]
    torch.manual_seed(0)
    torch.testing.assert_close(ours(x)[0], expected, atol=1e-12, rtol=0)


def test_load_state_dict_from_a_labml_checkpoint_file():
    labml = labml_module()
    buffer = io.BytesIO()
    torch.save(labml.state_dict(), buffer)
    buffer.seek(0)
    ours = SwitchFeedForward(capacity_factor=0.7, drop_tokens=True, is_scale_prob=True, n_experts=4,
                             expert=FeedForward(D, 24, 0.0), d_model=D).double()
    ours.load_state_dict(torch.load(buffer), strict=True)
    torch.testing.assert_close(ours.w2[3], labml.experts[3].layer2.weight, atol=0, rtol=0)
    torch.testing.assert_close(ours.b1[1], labml.experts[1].layer1.bias, atol=0, rtol=0)
    # a truncated checkpoint is reported under labml's keys
    state = labml.state_dict()
    del state["experts.2.layer1.weight"]
    with pytest.raises(RuntimeError, match=r"experts\.0\.layer1\.weight|w1"):
        ours.load_state_dict(state, strict=True)


def test_experts_are_labml_shaped_views():
    module = convert(labml_module())
    assert len(module.experts) == 4
    expert = module.experts[2]
    assert expert.layer1.weight.shape == (24, D) and expert.layer2.bias.shape == (D,)
    assert expert.layer1.weight.data_ptr() == module.w1[2].data_ptr()
    with torch.no_grad():
        module.experts[2].layer2.bias.fill_(0.25)
    assert torch.all(module.b2[2] == 0.25)
    x = torch.randn(3, D, dtype=torch.float64)
    torch.testing.assert_close(expert(x), torch.relu(x @ module.w1[2].T + module.b1[2]) @ module.w2[2].T + 0.25)
    with pytest.raises(IndexError, match="expert index 4 out of range for 4 experts"):
        module.experts[4]
    # unstacking and stacking again keeps every value
    state = module.state_dict()
    module.unstack_experts_()
    assert not module.stacked and isinstance(module.experts[0], FeedForward)
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())
    module.stack_experts_()
    assert module.stacked and all(torch.equal(state[k], v) for k, v in module.state_dict().items())


def test_stacking_mismatched_experts_says_which():
    module = labml_module()
    module.experts[2].layer1 = nn.Linear(D, 20)
    with pytest.raises(ValueError, match=r"expert 2's tensor shapes .* differ from expert 0's"):
        convert(module)
    # nothing was replaced, and the per-expert path still converts
    assert type(module).__module__.startswith("labml_nn")
    with pytest.raises(ValueError, match="has no fused kernel|differ"):
        convert(module, backend="cpp", stacked_experts=False)(torch.randn(2, 2, D, dtype=torch.float64))


def test_optimizer_built_after_convert_trains_the_stacked_experts():
    model = labml_module()
    stale = torch.optim.SGD(model.parameters(), lr=0.1)  # built before convert: holds the old expert tensors
    model = convert(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert {id(p) for p in model.parameters()} == {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not {id(model.w1)} & {id(p) for group in stale.param_groups for p in group["params"]}
    before = model.w1.detach().clone()
    model(torch.randn(6, 4, D, dtype=torch.float64))[0].square().sum().backward()
    optimizer.step()
    assert not torch.equal(model.w1, before)


def test_one_autograd_input_per_tensor_kind_whatever_e():
    def weight_leaves(n_experts):
        module = convert(labml_module(n_experts=n_experts, capacity_factor=2.0), backend="cpp")
        out = module(torch.randn(8, 4, D, dtype=torch.float64))[0]
        leaves, stack, seen = [], [out.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if hasattr(node, "variable"):
                leaves.append(node.variable)
            stack.extend(next_node for next_node, _ in node.next_functions)
        out.sum().backward()
        assert all(module.w1.grad is not None for _ in (0,))
        return sorted(tuple(leaf.shape) for leaf in leaves)

    assert weight_leaves(4) == sorted([(4, 24, D), (4, 24), (4, D, 24), (4, D), (4, D), (4,)])
    assert len(weight_leaves(32)) == len(weight_leaves(4))


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_both_layouts_give_the_same_training_step(autocast):
    """Dropout (same seed, same mask), activations and autocast in the stacked and the per-expert layout."""
    stacked = convert(labml_module(activation=nn.SiLU(), is_gated=True)).float()
    per_expert = convert(labml_module(activation=nn.SiLU(), is_gated=True), stacked_experts=False).float()
    for module in (stacked, per_expert):
        for expert in module.experts:
            expert.dropout.p = 0.2
        module.backend = "cpp"
        module.train()
    x = torch.randn(6, 4, D)
    results = []
    for module in (stacked, per_expert):
        assert module.fused_backend(x.device, training=True) == ("cpp", None)
        torch.manual_seed(9)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = module(x)[0]
        out.float().square().sum().backward()
        results.append([out, *labml_layout_grads(module)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
