"""The stacked-weight ops ``switch_mlp_stacked{,_backward}`` (one ``[E, ...]``
tensor per weight kind, gradients written stacked) against the per-expert list
ops and the reference; the list layout's own parity. ``test_switch_ops``'s
parity, edge-case and dropout tests run the stacked ops too (``switch_mlp``
with stacked weights takes them)."""
import pytest
import torch
from torch.library import opcheck

from fastformers.ops.switch import naive, route, switch_mlp
from fastformers.ops.switch.op import expert_lists
from harness import assert_parity
from test_switch_ops import make_weights

pytestmark = pytest.mark.usefixtures("triton_interpreter", "one_thread")

OPS = torch.ops.fastformers


def stacked_arguments(dtype, *, gated=True, biases=True, n_tokens=17, n_experts=3, d_model=8, d_ff=12,
                      capacity_factor=0.8):
    """x, order, offsets, kept, the six stacked weights (None when absent) and scale."""
    x = torch.randn(n_tokens, d_model, dtype=dtype)
    routing = route(torch.randn(n_tokens, n_experts, dtype=dtype), capacity_factor, True, "deterministic")
    weights = make_weights(n_experts, d_model, d_ff, dtype, biases=biases, gated=gated)
    return (x, routing.order, routing.offsets, routing.kept, *weights, routing.route_prob_max)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("biases", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_cpp_stacked_ops_equal_the_list_ops_bit_for_bit(dtype, gated, biases, dropout_p):
    """Same kernels, other weight layout: identical outputs and gradients, the
    weight gradients as one contiguous [E, ...] tensor per kind (None when absent)."""
    *head, w1, b1, w2, b2, w_gate, b_gate, scale = stacked_arguments(dtype, gated=gated, biases=biases)
    stacked = (w1, b1, w2, b2, w_gate, b_gate)
    tail = ("silu", dropout_p, 99, 4)
    y, hidden = OPS.switch_mlp_stacked(*head, *stacked, scale, *tail)
    y_list, hidden_list = OPS.switch_mlp(*head, *expert_lists(*stacked), scale, *tail)
    assert torch.equal(y, y_list) and torch.equal(hidden, hidden_list)
    grad_y = torch.randn_like(y)
    grad_x, *grad_weights, grad_scale = OPS.switch_mlp_stacked_backward(grad_y, *head, *stacked, scale, hidden, *tail)
    grad_x_list, *grad_groups, grad_scale_list = OPS.switch_mlp_backward(grad_y, *head, *expert_lists(*stacked),
                                                                         scale, hidden, *tail)
    assert torch.equal(grad_x, grad_x_list) and torch.equal(grad_scale, grad_scale_list)
    for weight, grad, grads in zip(stacked, grad_weights, grad_groups, strict=True):
        if weight is None:
            assert grad is None and grads == []
            continue
        assert grad.shape == weight.shape and grad.dtype == weight.dtype and grad.is_contiguous()
        assert torch.equal(grad, torch.stack(grads))


def test_cpp_stacked_p_zero_ignores_the_seed():
    args = stacked_arguments(torch.float32)
    y, hidden = OPS.switch_mlp_stacked(*args, "gelu", 0.0, 0, 0)
    y_seeded, hidden_seeded = OPS.switch_mlp_stacked(*args, "gelu", 0.0, 987654321, 12)
    assert torch.equal(y, y_seeded) and torch.equal(hidden, hidden_seeded)
    grad_y = torch.randn_like(y)
    grads = OPS.switch_mlp_stacked_backward(grad_y, *args, hidden, "gelu", 0.0, 0, 0)
    grads_seeded = OPS.switch_mlp_stacked_backward(grad_y, *args, hidden, "gelu", 0.0, 987654321, 12)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_seeded))


def as_lists(*weights):
    """Stacked weights as lists of their row views (None stays None): the list layout."""
    return [None if w is None else list(w.unbind(0)) for w in weights]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gated,biases", [(False, True), (True, False)], ids=["plain-bias", "gated-nobias"])
def test_list_layout_matches_reference(backend, dtype, gated, biases):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 under the interpreter is covered by test_switch_triton")
    x = torch.randn(29, 24, dtype=dtype)
    routing = route(torch.randn(29, 4, dtype=dtype), 0.8, True, "deterministic")
    weights = [w for w in make_weights(4, 24, 40, dtype, biases=biases, gated=gated) if w is not None]
    present = [n for n, w in zip(("w1", "b1", "w2", "b2", "w_gate", "b_gate"),
                                 make_weights(1, 1, 1, dtype, biases=biases, gated=gated)) if w is not None]

    def call(backend):
        def fn(x, scale, *values):
            given = dict(zip(present, as_lists(*values) if backend != "reference" else values))
            return switch_mlp(x, routing, given["w1"], given.get("b1"), given["w2"], given.get("b2"), scale, "gelu",
                              given.get("w_gate"), given.get("b_gate"), backend=backend)

        return fn

    assert_parity(call(backend), call("reference"), (x, routing.route_prob_max, *weights))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_non_contiguous_inputs(backend, dtype):
    """x, scale and every stacked weight as strided views."""
    n_tokens, n_experts, d_model, d_ff = 21, 3, 16, 24
    x = torch.randn(d_model, n_tokens, dtype=dtype).t()
    routing = route(torch.randn(n_tokens, n_experts, dtype=dtype), 1.0, True, "deterministic")
    scale = torch.randn(n_tokens, 2, dtype=dtype)[:, 0]
    w1, b1, w2, b2, w_gate, b_gate = make_weights(n_experts, d_model, d_ff, dtype, gated=True)
    strided = [w1.transpose(1, 2).contiguous().transpose(1, 2), b1.repeat(1, 2)[:, ::2],
               w2.transpose(1, 2).contiguous().transpose(1, 2), b2.t().contiguous().t(),
               w_gate.transpose(0, 1).contiguous().transpose(0, 1), b_gate.t().contiguous().t()]
    assert not any(t.is_contiguous() for t in (x, scale, *strided))

    def call(backend):
        return lambda x, scale, w1, b1, w2, b2, w_gate, b_gate: switch_mlp(
            x, routing, w1, b1, w2, b2, scale, "relu", w_gate, b_gate, backend=backend)

    assert_parity(call(backend), call("reference"), (x, scale, *strided))


def leaves(args, requires_grad):
    return tuple(a.detach().requires_grad_(requires_grad and a.is_floating_point()) if isinstance(a, torch.Tensor)
                 else a for a in args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("gated,biases", [(False, True), (True, True), (True, False)],
                         ids=["plain", "gated", "gated-nobias"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_opcheck(dtype, gated, biases, dropout_p):
    args = (*stacked_arguments(dtype, gated=gated, biases=biases), "gelu", dropout_p, 1234, 8)
    opcheck(OPS.switch_mlp_stacked.default, leaves(args, True))
    y, hidden = OPS.switch_mlp_stacked(*args)
    plain = leaves(args, False)
    opcheck(OPS.switch_mlp_stacked_backward.default,
            (torch.randn_like(y), *plain[:-4], hidden.detach(), *plain[-4:]))


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_torch_compile_fullgraph(dropout_p):
    x, order, offsets, kept, w1, b1, w2, b2, w_gate, b_gate, scale = stacked_arguments(torch.float32, biases=False)
    dropout_args = (dropout_p, 31, 5)
    params = [t.requires_grad_() for t in (x, w1, w2, w_gate)]
    weights = torch.randn_like(x)

    @torch.compile(fullgraph=True)
    def step(x, w1, w2, w_gate):
        y, _ = OPS.switch_mlp_stacked(x * 2, order, offsets, kept, w1, None, w2, None, w_gate, None, scale, "silu",
                                      *dropout_args)
        return (y * weights).sum()

    compiled = step(*params)
    compiled.backward()
    compiled_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    expected, _ = naive.switch_mlp(x * 2, order, offsets, kept, *expert_lists(w1, None, w2, None, w_gate, None),
                                   scale, "silu", *dropout_args)
    (expected * weights).sum().backward()
    torch.testing.assert_close(compiled, (expected * weights).sum())
    torch.testing.assert_close(compiled_grads, [p.grad for p in params])


def test_registered_stacked_op_follows_autocast():
    args = stacked_arguments(torch.float32, gated=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, hidden = OPS.switch_mlp_stacked(*args, "relu", 0.0, 0, 0)
    assert y.dtype == torch.bfloat16 and hidden.dtype == torch.float32


def test_cpp_stacked_kernel_checks_weights():
    x, order, offsets, kept, w1, b1, w2, b2, w_gate, b_gate, scale = stacked_arguments(torch.float32)
    head, tail = (x, order, offsets, kept), ("relu", 0.0, 0, 0)
    with pytest.raises(RuntimeError, match=r"b1 must be \[3, 12\], got \[3, 11\]"):
        OPS.switch_mlp_stacked(*head, w1, b1[:, 1:], w2, b2, w_gate, b_gate, scale, *tail)
    with pytest.raises(RuntimeError, match=r"w2 must be \[3, 8, 12\], got \[2, 8, 12\]"):
        OPS.switch_mlp_stacked(*head, w1, b1, w2[:2], b2, w_gate, b_gate, scale, *tail)
    with pytest.raises(RuntimeError, match="w_gate dtype Double must equal x dtype Float"):
        OPS.switch_mlp_stacked(*head, w1, b1, w2, b2, w_gate.double(), b_gate, scale, *tail)
    with pytest.raises(RuntimeError, match="stacked weights must be"):
        OPS.switch_mlp_stacked(*head, w1, torch.tensor(1.0), w2, b2, w_gate, b_gate, scale, *tail)
    with pytest.raises(RuntimeError, match=r"w1 must hold n_experts >= 1 matrices"):
        OPS.switch_mlp_stacked(*head, w1[:, :, :3], b1, w2, b2, w_gate, b_gate, scale, *tail)
    with pytest.raises(RuntimeError, match="b_gate is given without w_gate"):
        OPS.switch_mlp_stacked(*head, w1, b1, w2, b2, None, b_gate, scale, *tail)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_stacked_module_step_copies_no_gradients(gated):
    """A training step of the stacked module: the kernel's [E, ...] gradients
    become the Parameters' .grad as they are (no stack or cat of per-expert tensors)."""
    from fastformers.nn import FeedForward, SwitchFeedForward

    module = SwitchFeedForward(capacity_factor=0.8, drop_tokens=True, is_scale_prob=True, n_experts=8,
                               expert=FeedForward(16, 24, 0.1, is_gated=gated), d_model=16)
    module.backend = "cpp"
    x = torch.randn(12, 4, 16)
    with torch.profiler.profile() as prof:
        module(x)[0].square().sum().backward()
    ops = {event.name for event in prof.events()}
    assert "fastformers::switch_mlp_stacked_backward" in ops
    assert not ops & {"aten::stack", "aten::cat", "aten::_cat"}
    assert all(p.grad is not None and p.grad.shape == p.shape for p in module.parameters())
