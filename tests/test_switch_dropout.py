"""Hidden-activation dropout inside switch_mlp: each backend's mask, replayed
through ``dropout.record()``, gives an independent dense oracle's output and
every gradient; p = 0 is the no-dropout computation bit for bit; the mask does
not depend on the backend; eval mode, seeds, keep rate and bad p in the module."""
import pytest
import torch
import torch.nn.functional as F

from fastformers.ops import dropout
from fastformers.ops.switch import naive, route, switch_mlp
from fastformers.ops.switch.op import expert_lists
from test_switch_module import make_switch
from test_switch_ops import make_weights

pytestmark = pytest.mark.usefixtures("triton_interpreter", "one_thread")

TOLERANCE = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=1e-4)}


def dense_oracle(x, routing, weights, scale, activation, mask, p):
    """Token by token, without the op's grouping: ``scale · layer2(mask · act(layer1 x) [· gate] / (1 - p))``
    for kept tokens, ``scale · x`` for dropped ones; ``mask`` ``[T, d_ff]`` by token row."""
    w1, b1, w2, b2, w_gate, b_gate = weights
    kept_tokens = {}
    starts, kept = routing.offsets.tolist(), routing.kept.tolist()
    for expert in range(len(kept)):
        for token in routing.order[starts[expert]:starts[expert] + kept[expert]].tolist():
            kept_tokens[token] = expert
    rows = []
    for token in range(x.shape[0]):
        expert = kept_tokens.get(token)
        if expert is None:
            rows.append(x[token])
            continue
        hidden = naive.ACTIVATIONS[activation](F.linear(x[token], w1[expert], None if b1 is None else b1[expert]))
        if w_gate is not None:
            hidden = hidden * F.linear(x[token], w_gate[expert], None if b_gate is None else b_gate[expert])
        hidden = hidden * mask[token].to(x.dtype) / (1 - p)
        rows.append(F.linear(hidden, w2[expert], None if b2 is None else b2[expert]))
    return torch.stack(rows) * scale[:, None]


def problem(dtype, gated, n_tokens=29, n_experts=4, d_model=24, d_ff=40, capacity_factor=0.8):
    x = torch.randn(n_tokens, d_model, dtype=dtype)
    routing = route(torch.randn(n_tokens, n_experts, dtype=dtype), capacity_factor, True, "deterministic")
    assert routing.n_dropped > 0  # dropped tokens must get no dropout
    weights = make_weights(n_experts, d_model, d_ff, dtype, gated=gated)
    return x, routing, weights, routing.route_prob_max.clone()


def forward_and_grads(fn, x, weights, scale, grad_y):
    leaves = [t.detach().clone().requires_grad_() for t in (x, scale, *[w for w in weights if w is not None])]
    it = iter(leaves[2:])
    weights = [None if w is None else next(it) for w in weights]
    y = fn(leaves[0], weights, leaves[1])
    return [y.detach(), *torch.autograd.grad(y, leaves, grad_y)]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("activation,gated", [("relu", False), ("gelu", True), ("silu", True)])
def test_recorded_mask_replays_output_and_every_gradient(backend, dtype, activation, gated):
    x, routing, weights, scale = problem(dtype, gated)
    p = 0.3
    grad_y = torch.randn_like(x)
    with dropout.record() as calls:
        got = forward_and_grads(lambda x, w, s: switch_mlp(x, routing, *w[:4], s, activation, *w[4:], dropout_p=p,
                                                           backend=backend), x, weights, scale, grad_y)
    assert len(calls) == 1
    call = calls[0]
    assert (call.op, call.p, call.shape) == ("switch_mlp", p, (x.shape[0], weights[0].shape[1]))
    mask = call.mask()
    expected = forward_and_grads(lambda x, w, s: dense_oracle(x, routing, w, s, activation, mask, p),
                                 x, weights, scale, grad_y)
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, **TOLERANCE[dtype], msg=lambda m, i=i: f"output/grad {i}: {m}")
    # dropout changed the result: the mask was applied at all
    plain = switch_mlp(x, routing, *weights[:4], scale, activation, *weights[4:], backend=backend)
    assert not torch.allclose(got[0], plain)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_p_zero_is_the_computation_without_dropout_bit_for_bit(backend):
    x, routing, weights, scale = problem(torch.float32, gated=True)
    groups = expert_lists(*weights)
    args = (x, routing.order, routing.offsets, routing.kept, *groups, scale, "gelu")
    if backend == "cpp":
        forward, backward = torch.ops.fastformers.switch_mlp, torch.ops.fastformers.switch_mlp_backward
    elif backend == "triton":
        from fastformers.ops.switch import triton_kernel

        forward, backward = triton_kernel.switch_mlp_forward, triton_kernel.switch_mlp_backward
    else:
        forward, backward = naive.switch_mlp, naive.switch_mlp_backward
    y, hidden = forward(*args, 0.0, 0, 0)
    y_seeded, hidden_seeded = forward(*args, 0.0, 987654321, 12)
    assert torch.equal(y, y_seeded) and torch.equal(hidden, hidden_seeded)
    grad_y = torch.randn_like(y)
    grads = backward(grad_y, *args[:-1], hidden, "gelu", 0.0, 0, 0)
    grads_seeded = backward(grad_y, *args[:-1], hidden, "gelu", 0.0, 987654321, 12)
    flat = lambda gs: [g for group in gs for g in (group if isinstance(group, list) else [group])]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(flat(grads), flat(grads_seeded)))
    # and the wrapper without dropout arguments is that call
    assert torch.equal(switch_mlp(x, routing, *weights[:4], scale, "gelu", *weights[4:], backend=backend), y)


def test_mask_does_not_depend_on_the_backend():
    x, routing, weights, scale = problem(torch.float64, gated=False)
    outputs = [switch_mlp(x, routing, *weights[:4], scale, "relu", dropout_p=0.5, seed=77, backend=backend)
               for backend in ("cpp", "triton", "reference")]
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0], **TOLERANCE[torch.float64])


def test_bad_p_raises_value_error_naming_it():
    x, routing, weights, scale = problem(torch.float32, gated=False)
    for p in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="dropout_p must be in"):
            switch_mlp(x, routing, *weights[:4], scale, dropout_p=p)


def module_with_dropout(p=0.1, backend="cpp"):
    module = make_switch(n_experts=4, capacity_factor=1.0, dtype=torch.float32)
    for expert in module.experts:
        expert.dropout.p = p
    module.backend = backend
    return module.train()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_module_training_replays_the_recorded_mask(backend):
    module = module_with_dropout(0.2, backend)
    x = torch.randn(6, 5, 24)
    torch.manual_seed(3)
    with dropout.record() as calls:
        out = module(x)[0]
    assert module.last_backend == backend and len(calls) == 1
    module.backend = "reference"
    torch.manual_seed(3)  # the same tokens dropped by the router
    routing = route(module.switch(x.view(-1, 24)), 1.0, True, "labml")
    weights = [torch.stack([getattr(getattr(e, layer), name) for e in module.experts])
               for layer, name in (("layer1", "weight"), ("layer1", "bias"), ("layer2", "weight"),
                                   ("layer2", "bias"))] + [None, None]
    expected = dense_oracle(x.view(-1, 24), routing, weights, routing.route_prob_max, "relu", calls[0].mask(), 0.2)
    torch.testing.assert_close(out.view(-1, 24), expected, **TOLERANCE[torch.float32])


def test_module_same_seed_same_result_and_eval_applies_none():
    module = module_with_dropout(0.3)
    x = torch.randn(7, 3, 24)
    results = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        results.append(module(x)[0])
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])
    module.eval()
    with dropout.record() as calls:
        torch.manual_seed(5)
        evaluated = module(x)[0]
    assert calls == [] and module.last_backend == "cpp"
    for expert in module.experts:
        expert.dropout.p = 0.0
    torch.manual_seed(5)
    assert torch.equal(evaluated, module(x)[0])


def test_module_keep_rate():
    module = module_with_dropout(0.25)
    with dropout.record() as calls:
        module(torch.randn(64, 8, 24))
    keep_rate = calls[0].mask().float().mean().item()
    assert abs(keep_rate - 0.75) < 0.01  # 512 x 48 bits: the standard error is 0.003
