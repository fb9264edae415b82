"""Switch Transformer ops: routing against per-expert references and labml,
the C++ grouped expert FFN against the reference, forward and every gradient."""
import pytest
import torch
from torch.library import opcheck

import fastformers
from fastformers.ops.switch import Routing, naive, route, switch_mlp
from fastformers.ops.switch.op import expert_lists
from harness import assert_parity

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def make_weights(n_experts, d_model, d_ff, dtype, *, biases=True, gated=False):
    """w1, b1, w2, b2, w_gate, b_gate with labml-like (1/sqrt(fan_in)) scales."""

    def param(*shape, fan_in):
        return (torch.randn(*shape, dtype=torch.float64) / fan_in**0.5).to(dtype)

    w1 = param(n_experts, d_ff, d_model, fan_in=d_model)
    w2 = param(n_experts, d_model, d_ff, fan_in=d_ff)
    b1 = param(n_experts, d_ff, fan_in=d_model) if biases else None
    b2 = param(n_experts, d_model, fan_in=d_ff) if biases else None
    w_gate = param(n_experts, d_ff, d_model, fan_in=d_model) if gated else None
    b_gate = param(n_experts, d_ff, fan_in=d_model) if gated and biases else None
    return w1, b1, w2, b2, w_gate, b_gate


def check_parity(x, routing, weights, activation="relu", backend="cpp"):
    """``backend`` vs reference for y and the gradients of x, scale and every weight given."""
    w1, b1, w2, b2, w_gate, b_gate = weights
    scale = routing.route_prob_max.to(x.dtype)
    present = [name for name, w in zip(("b1", "b2", "w_gate", "b_gate"), (b1, b2, w_gate, b_gate)) if w is not None]
    optional = dict(zip(present, [w for w in (b1, b2, w_gate, b_gate) if w is not None]))

    def call(backend):
        def fn(x, w1, w2, scale, *optional_values):
            given = dict(zip(present, optional_values))
            return switch_mlp(
                x, routing, w1, given.get("b1"), w2, given.get("b2"), scale, activation,
                given.get("w_gate"), given.get("b_gate"), backend=backend,
            )

        return fn

    assert_parity(call(backend), call("reference"), (x, w1, w2, scale, *optional.values()))


def test_cpp_extension_is_built():
    assert "cpp" in fastformers.available_backends(), "the C++ extension must be built for the test suite"


# (tokens, n_experts, d_model): a single token, a single expert, many experts
# with most of them empty, and the 64-expert x 512-token case.
SHAPES = [(1, 1, 24), (5, 4, 24), (512, 1, 24), (512, 4, 128), (512, 64, 24), (512, 64, 128), (5, 64, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(dtype, shape):
    check_parity(*random_problem(*shape, 2 * shape[-1], dtype))


def random_problem(n_tokens, n_experts, d_model, d_ff, dtype):
    """x, its deterministic routing (capacity factor 1) and expert weights."""
    x = torch.randn(n_tokens, d_model, dtype=dtype)
    routing = route(torch.randn(n_tokens, n_experts, dtype=dtype), 1.0, True, "deterministic")
    return x, routing, make_weights(n_experts, d_model, d_ff, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", list(naive.ACTIVATIONS))
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("biases", [True, False], ids=["bias", "nobias"])
def test_ffn_variants(dtype, activation, gated, biases):
    x = torch.randn(64, 24, dtype=dtype)
    routing = route(torch.randn(64, 4, dtype=dtype), 1.0, True, "deterministic")
    check_parity(x, routing, make_weights(4, 24, 40, dtype, biases=biases, gated=gated), activation)


def skewed_logits(n_tokens, n_experts, experts_used):
    """Router logits that send every token to one of ``experts_used``."""
    logits = torch.randn(n_tokens, n_experts, dtype=torch.float64)
    chosen = torch.tensor(experts_used)[torch.randint(len(experts_used), (n_tokens,))]
    logits[torch.arange(n_tokens), chosen] += 20
    return logits


# (case, experts the 33 tokens go to, capacity_factor, drop_tokens) over 4 experts
ROUTING_EDGE_CASES = [
    ("expert_without_tokens", [0, 2, 3], 1.0, True),
    ("all_tokens_on_one_expert", [1], 1.0, True),
    ("capacity_above_tokens", [0, 1], 10.0, True),
    ("capacity_zero", [0, 1, 2, 3], 0.1, True),
    ("no_dropping", [2], 0.5, False),
]


def edge_case_routing(case, experts_used, capacity_factor, drop_tokens, n_tokens=33, n_experts=4, dtype=torch.float64):
    """The routing of one ``ROUTING_EDGE_CASES`` entry, checked to be that case."""
    routing = route(skewed_logits(n_tokens, n_experts, experts_used).to(dtype), capacity_factor, drop_tokens)
    counts = routing.counts.tolist()
    if case == "expert_without_tokens":
        assert counts[1] == 0
    if case == "all_tokens_on_one_expert":
        assert counts == [0, n_tokens, 0, 0] and routing.n_dropped == n_tokens - routing.capacity
    if case == "capacity_above_tokens":
        assert routing.capacity > n_tokens and routing.n_dropped == 0
    if case == "capacity_zero":
        assert routing.capacity == 0 and routing.n_dropped == n_tokens and routing.kept.sum() == 0
    if case == "no_dropping":
        assert routing.n_dropped == 0 and torch.equal(routing.kept, routing.counts)
    return routing


@pytest.mark.parametrize("case, experts_used, capacity_factor, drop_tokens", ROUTING_EDGE_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_routing_edge_cases(case, experts_used, capacity_factor, drop_tokens, dtype):
    n_tokens, n_experts = 33, 4
    routing = edge_case_routing(case, experts_used, capacity_factor, drop_tokens, n_tokens, n_experts, dtype)
    x = torch.randn(n_tokens, 24, dtype=dtype)
    check_parity(x, routing, make_weights(n_experts, 24, 48, dtype, gated=True))


def per_expert_routing(logits, capacity_factor, drop_tokens):
    """Deterministic routing written the obvious way, one expert at a time."""
    n_tokens, n_experts = logits.shape
    routes = logits.softmax(-1).argmax(-1).tolist()
    capacity = int(capacity_factor * n_tokens / n_experts)
    order, offsets, kept = [], [0], []
    for expert in range(n_experts):
        tokens = [t for t in range(n_tokens) if routes[t] == expert]
        order += tokens
        offsets.append(len(order))
        kept.append(min(len(tokens), capacity) if drop_tokens else len(tokens))
    return order, offsets, kept, capacity


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5, 1.0, 1.5, 8.0])
@pytest.mark.parametrize("drop_tokens", [True, False])
@pytest.mark.parametrize("n_tokens, n_experts", [(1, 1), (7, 3), (100, 8), (64, 64)])
def test_deterministic_routing_matches_per_expert_reference(capacity_factor, drop_tokens, n_tokens, n_experts):
    logits = torch.randn(n_tokens, n_experts)
    routing = route(logits, capacity_factor, drop_tokens, "deterministic")
    order, offsets, kept, capacity = per_expert_routing(logits, capacity_factor, drop_tokens)
    assert routing.order.tolist() == order
    assert routing.offsets.tolist() == offsets
    assert routing.kept.tolist() == kept
    assert routing.capacity == capacity
    assert routing.counts.tolist() == [b - a for a, b in zip(offsets, offsets[1:])]
    assert routing.n_dropped == n_tokens - sum(kept)
    probs = logits.softmax(-1)
    torch.testing.assert_close(routing.probs, probs)
    torch.testing.assert_close(routing.route_prob_max, probs.max(-1).values)
    assert routing.route.tolist() == probs.argmax(-1).tolist()


def stacked_expert_weights(experts):
    layer1 = torch.stack([e.layer1.weight for e in experts]), torch.stack([e.layer1.bias for e in experts])
    layer2 = torch.stack([e.layer2.weight for e in experts]), torch.stack([e.layer2.bias for e in experts])
    return layer1, layer2


@pytest.mark.parametrize("is_scale_prob", [True, False])
def test_labml_policy_drops_what_labml_drops(is_scale_prob):
    pytest.importorskip("labml_nn")
    from labml_nn.transformers.feed_forward import FeedForward
    from labml_nn.transformers.switch import SwitchFeedForward

    seq_len, batch, d_model, n_experts = 40, 3, 24, 4
    labml = SwitchFeedForward(
        capacity_factor=0.8, drop_tokens=True, is_scale_prob=is_scale_prob, n_experts=n_experts,
        expert=FeedForward(d_model, 48, dropout=0.0), d_model=d_model,
    ).double()
    # uneven routing so that several experts overflow and draw a permutation each
    with torch.no_grad():
        labml.switch.bias.copy_(torch.tensor([1.0, 0.5, 0.0, -2.0]))
    x = torch.randn(seq_len, batch, d_model, dtype=torch.float64)

    torch.manual_seed(7)
    expected, counts, route_prob_sum, n_dropped, route_prob_max = labml(x)
    torch.manual_seed(7)
    tokens = x.view(-1, d_model)
    routing = route(labml.switch(tokens), 0.8, True, "labml")
    assert sum(c > routing.capacity for c in routing.counts.tolist()) >= 2
    assert routing.n_dropped == n_dropped > 0
    assert routing.counts.tolist() == counts.long().tolist()
    torch.testing.assert_close(routing.probs.sum(0), route_prob_sum)
    torch.testing.assert_close(routing.route_prob_max, route_prob_max)

    (w1, b1), (w2, b2) = stacked_expert_weights(labml.experts)
    p_max = routing.route_prob_max
    scale = p_max if is_scale_prob else p_max / p_max.detach()
    out = switch_mlp(tokens, routing, w1, b1, w2, b2, scale, backend="cpp")
    torch.testing.assert_close(out.view_as(expected), expected, atol=1e-12, rtol=1e-12)


def test_labml_policy_with_generator_is_reproducible():
    logits = skewed_logits(200, 8, [0, 1, 2])
    first = route(logits, 1.0, True, "labml", generator=torch.Generator().manual_seed(3))
    torch.rand(5)  # the global generator must not matter
    second = route(logits, 1.0, True, "labml", generator=torch.Generator().manual_seed(3))
    other = route(logits, 1.0, True, "labml", generator=torch.Generator().manual_seed(4))
    assert torch.equal(first.order, second.order)
    assert not torch.equal(first.order, other.order)
    # same grouping whatever the seed: only the choice within each expert changes
    assert torch.equal(first.offsets, other.offsets) and torch.equal(first.kept, other.kept)
    for start, end in zip(first.offsets.tolist(), first.offsets.tolist()[1:]):
        assert sorted(first.order[start:end].tolist()) == sorted(other.order[start:end].tolist())


def op_arguments(dtype, gated=True, capacity_factor=0.8, dropout_p=0.0, activation="gelu"):
    """The op's arguments up to the activation, and the dropout's ``(dropout_p, seed, offset)``."""
    x = torch.randn(17, 8, dtype=dtype)
    routing = route(torch.randn(17, 3, dtype=dtype), capacity_factor, True, "deterministic")
    groups = expert_lists(*make_weights(3, 8, 12, dtype, gated=gated))
    scale = routing.route_prob_max
    return (x, routing.order, routing.offsets, routing.kept, *groups, scale, activation), (dropout_p, 1234, 8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_opcheck(dtype, gated, dropout_p):
    args, dropout_args = op_arguments(dtype, gated, dropout_p=dropout_p)
    args = (*args, *dropout_args)
    def leaves(arg, grad):
        if isinstance(arg, list):
            return [leaves(a, grad) for a in arg]
        if isinstance(arg, torch.Tensor):
            return arg.detach().requires_grad_(grad and arg.is_floating_point())
        return arg

    opcheck(torch.ops.fastformers.switch_mlp.default, tuple(leaves(a, True) for a in args))
    y, hidden = torch.ops.fastformers.switch_mlp(*args)
    grad_y = torch.randn_like(y)
    plain = [leaves(a, False) for a in args]
    opcheck(torch.ops.fastformers.switch_mlp_backward.default, (grad_y, *plain[:-4], hidden.detach(), *plain[-4:]))


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_torch_compile_fullgraph(dropout_p):
    (x, order, offsets, kept, w1, b1, w2, b2, w_gate, b_gate, scale, _), dropout_args = op_arguments(
        torch.float32, dropout_p=dropout_p)
    w1 = torch.stack(w1).requires_grad_()
    x.requires_grad_()
    weights = torch.randn_like(x)

    @torch.compile(fullgraph=True)
    def step(x, w1):
        y, _ = torch.ops.fastformers.switch_mlp(x * 2, order, offsets, kept, list(w1.unbind(0)), b1, w2, b2, w_gate,
                                                b_gate, scale, "gelu", *dropout_args)
        return (y * weights).sum()

    compiled = step(x, w1)
    compiled.backward()
    compiled_grads = x.grad.clone(), w1.grad.clone()
    x.grad = w1.grad = None
    expected, _ = naive.switch_mlp(x * 2, order, offsets, kept, w1.unbind(0), b1, w2, b2, w_gate, b_gate, scale,
                                   "gelu", *dropout_args)
    expected = (expected * weights).sum()
    expected.backward()
    torch.testing.assert_close(compiled, expected)
    torch.testing.assert_close(compiled_grads, (x.grad, w1.grad))


def test_double_backward_raises():
    args, dropout_args = op_arguments(torch.float64)
    args[0].requires_grad_()
    y, _ = torch.ops.fastformers.switch_mlp(*args, *dropout_args)
    (grad,) = torch.autograd.grad(y.sum(), args[0], create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grad.sum().backward()


def test_recycled_gradient_blocks_never_alias_live_gradients():
    """The C++ backward reuses the blocks of freed weight gradients: gradients
    still alive keep their values while later backwards run, and the reused
    blocks give the same gradients as fresh ones."""
    torch.manual_seed(0)
    routing = route(torch.randn(64, 4), 2.0, False)
    stacked = make_weights(4, 24, 32, torch.float32)[:4]
    w1, b1, w2, b2 = ([w.clone().requires_grad_() for w in group] for group in stacked)
    leaves = [*w1, *b1, *w2, *b2]

    def weight_grads(x):
        y = switch_mlp(x, routing, w1, b1, w2, b2, routing.route_prob_max, backend="cpp")
        return torch.autograd.grad(y.square().sum(), leaves)

    inputs = [torch.randn(64, 24) for _ in range(3)]
    expected = [[grad.clone() for grad in weight_grads(x)] for x in inputs]
    alive = weight_grads(inputs[0])
    for x, want in zip(inputs[1:], expected[1:]):
        for grad, value in zip(weight_grads(x), want):
            torch.testing.assert_close(grad, value, rtol=0, atol=0)
    for grad, value in zip(alive, expected[0]):
        torch.testing.assert_close(grad, value, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_bad_input(backend):
    x = torch.randn(17, 8)
    routing = route(torch.randn(17, 3), 1.0, True)
    w1, b1, w2, b2, w_gate, b_gate = make_weights(3, 8, 12, torch.float32, gated=True)
    scale = routing.route_prob_max

    def call(**changes):
        args = dict(x=x, routing=routing, w1=w1, b1=b1, w2=w2, b2=b2, scale=scale)
        args.update(changes)
        return switch_mlp(**args, backend=backend)

    with pytest.raises(ValueError, match=r"x must be \[tokens, d_model\]"):
        call(x=x[None])
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        call(x=x.long())
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        call(x=[[1.0]])
    with pytest.raises(ValueError, match=r"w1 must be \[n_experts, d_ff, d_model=8\]"):
        call(w1=w1[..., :4])
    with pytest.raises(ValueError, match=r"w2 must be \[3, 8, 12\], got shape \[3, 12, 8\]"):
        call(w2=w2.transpose(1, 2))
    with pytest.raises(ValueError, match=r"b1 must be \[3, 12\]"):
        call(b1=b1[:2])
    with pytest.raises(ValueError, match=r"scale must be \[17\]"):
        call(scale=scale[:3])
    with pytest.raises(TypeError, match="b2 dtype torch.float64 must equal x dtype torch.float32"):
        call(b2=b2.double())
    with pytest.raises(ValueError, match="all must share a device"):
        call(scale=scale.to("meta"))
    with pytest.raises(ValueError, match=r"routing.order must be int64 \[17\]"):
        call(routing=route(torch.randn(16, 3), 1.0, True))
    with pytest.raises(ValueError, match=r"routing.offsets must be int64 \[5\]"):
        call(w1=torch.randn(4, 12, 8), b1=None, w2=torch.randn(4, 8, 12), b2=None)
    with pytest.raises(TypeError, match="routing must be the Routing returned by route"):
        call(routing=tuple(routing))
    with pytest.raises(ValueError, match="activation must be one of"):
        switch_mlp(x, routing, w1, b1, w2, b2, scale, "tanh", backend=backend)
    with pytest.raises(ValueError, match="b_gate is given without w_gate"):
        switch_mlp(x, routing, w1, b1, w2, b2, scale, "relu", None, b_gate, backend=backend)
    with pytest.raises(ValueError, match=r"w_gate must be \[3, 12, 8\]"):
        switch_mlp(x, routing, w1, b1, w2, b2, scale, "relu", w_gate[:, :2], backend=backend)


def test_route_bad_input():
    with pytest.raises(ValueError, match=r"logits must be \[tokens, n_experts\]"):
        route(torch.randn(3), 1.0, True)
    with pytest.raises(TypeError, match="logits must be a floating tensor"):
        route(torch.ones(3, 2, dtype=torch.int64), 1.0, True)
    with pytest.raises(ValueError, match="drop_policy must be one of"):
        route(torch.randn(3, 2), 1.0, True, "random")


def test_cpp_kernel_checks_routing():
    args, dropout_args = op_arguments(torch.float32)
    args = [*args, *dropout_args]
    bad_order = args[1].clone()
    bad_order[0] = bad_order[1]
    with pytest.raises(RuntimeError, match="order must be a permutation"):
        torch.ops.fastformers.switch_mlp(args[0], bad_order, *args[2:])
    bad_kept = args[3] + 100
    with pytest.raises(RuntimeError, match=r"kept\[0\]=\d+ must lie in"):
        torch.ops.fastformers.switch_mlp(*args[:3], bad_kept, *args[4:])
    with pytest.raises(RuntimeError, match="offsets must start at 0 and end at T=17"):
        torch.ops.fastformers.switch_mlp(*args[:2], args[2] + 1, *args[3:])
    with pytest.raises(ValueError, match="activation must be one of 'relu', 'gelu', 'silu', 'sigmoid', 'identity'"):
        torch.ops.fastformers.switch_mlp(*args[:-4], "tanh", *dropout_args)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1"):
        torch.ops.fastformers.switch_mlp(*args[:-3], 1.0, 0, 0)
    y, hidden = torch.ops.fastformers.switch_mlp(*args)
    with pytest.raises(RuntimeError, match="hidden must be"):
        torch.ops.fastformers.switch_mlp_backward(torch.ones_like(y), *args[:-4], hidden[:, :3], *args[-4:])
