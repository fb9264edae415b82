"""Triton grouped expert FFN kernels under the interpreter, against the
reference: output and every gradient (x, scale, each weight and bias), for
the shapes, activations and routing edge cases of the op; the device-built
tile schedule; routing without host syncs; the module on the Triton backend."""
import pytest
import torch

from fastformers.ops.switch import naive, route
from fastformers.ops.switch.op import expert_lists
from test_switch_ops import (ROUTING_EDGE_CASES, check_parity, edge_case_routing, make_weights, random_problem,
                             skewed_logits)

pytestmark = pytest.mark.usefixtures("triton_interpreter", "one_thread")

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# (tokens, n_experts, d_model): one token on one expert, a few tokens over
# many experts (most empty), 64 tokens over 1, 4 and 16 experts; d 24 (not a
# multiple of any block) and 64.
SHAPES = [(1, 1, 24), (5, 4, 24), (5, 16, 64), (64, 1, 24), (64, 4, 64), (64, 16, 24)]


def _kernels():
    # Imported here: the module is built for the interpreter only once the
    # conftest has set TRITON_INTERPRET.
    from fastformers.ops.switch import triton_kernel

    return triton_kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(dtype, shape):
    check_parity(*random_problem(*shape, shape[-1] + 8, dtype), backend="triton")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("activation", list(naive.ACTIVATIONS))
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("biases", [True, False], ids=["bias", "nobias"])
def test_ffn_variants(dtype, activation, gated, biases):
    x = torch.randn(40, 24, dtype=dtype)
    routing = route(torch.randn(40, 4, dtype=dtype), 0.8, True, "deterministic")
    check_parity(x, routing, make_weights(4, 24, 40, dtype, biases=biases, gated=gated), activation, "triton")


def test_gated_gelu_bfloat16():
    x = torch.randn(40, 24, dtype=torch.bfloat16)
    routing = route(torch.randn(40, 4, dtype=torch.bfloat16), 0.8, True, "deterministic")
    check_parity(x, routing, make_weights(4, 24, 40, torch.bfloat16, gated=True), "gelu", "triton")


@pytest.mark.parametrize("case, experts_used, capacity_factor, drop_tokens", ROUTING_EDGE_CASES)
def test_routing_edge_cases(case, experts_used, capacity_factor, drop_tokens):
    routing = edge_case_routing(case, experts_used, capacity_factor, drop_tokens)
    x = torch.randn(33, 24, dtype=torch.float64)
    check_parity(x, routing, make_weights(4, 24, 48, torch.float64, gated=True), "gelu", "triton")


def test_labml_policy_routing():
    """The random drop policy reorders segments; the kernels follow ``order``."""
    routing = route(skewed_logits(40, 4, [0, 1]), 0.5, True, "labml", generator=torch.Generator().manual_seed(1))
    check_parity(torch.randn(40, 24, dtype=torch.float64), routing, make_weights(4, 24, 32, torch.float64),
                 backend="triton")


def test_per_expert_weight_lists_match_stacked():
    """Separate per-expert tensors (stacked by the launcher) and views of one
    buffer (used in place) give the same outputs and gradients."""
    kernels = _kernels()
    weights = make_weights(4, 24, 32, torch.float32, gated=True)
    views = expert_lists(*weights)
    copies = [[w.clone() for w in group] for group in views]
    assert kernels.stacked(views[0]).data_ptr() == weights[0].data_ptr()
    assert kernels.stacked(copies[0]).data_ptr() != copies[0][0].data_ptr()
    x = torch.randn(30, 24)
    routing = route(torch.randn(30, 4), 0.8, True, "deterministic")
    args = (x, routing.order, routing.offsets, routing.kept)
    y_views, hidden = kernels.switch_mlp_forward(*args, *views, routing.route_prob_max, "relu")
    y_copies, _ = kernels.switch_mlp_forward(*args, *copies, routing.route_prob_max, "relu")
    torch.testing.assert_close(y_views, y_copies, rtol=0, atol=0)
    grad_y = torch.randn_like(x)
    grads = [kernels.switch_mlp_backward(grad_y, *args, *groups, routing.route_prob_max, hidden, "relu")
             for groups in (views, copies)]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("n_tokens, n_experts, block_m", [(1, 1, 16), (50, 8, 16), (64, 3, 64), (7, 64, 4)])
def test_tile_schedule_covers_every_position_once(n_tokens, n_experts, block_m):
    routing = route(skewed_logits(n_tokens, n_experts, list(range(0, n_experts, 2))), 0.7, True, "deterministic")
    schedule = _kernels().tile_schedule(routing.offsets, routing.kept, n_tokens, block_m)
    assert schedule.shape == (n_tokens // block_m + min(n_experts, n_tokens), 4)
    offsets, kept = routing.offsets.tolist(), routing.kept.tolist()
    covered = []
    for expert, start, kept_end, seg_end in schedule.tolist():
        if start == seg_end:
            continue
        assert offsets[expert] <= start < seg_end == offsets[expert + 1]
        assert kept_end == min(offsets[expert] + kept[expert], seg_end)
        covered += range(start, min(start + block_m, seg_end))
    assert covered == list(range(n_tokens))


def test_deterministic_routing_stays_on_device():
    """Meta tensors have no data: any host read in routing would raise."""
    routing = route(torch.randn(50, 8, device="meta"), 0.5, True, "deterministic")
    assert routing.order.device.type == "meta" and routing.dropped.device.type == "meta"
    _kernels().tile_schedule(routing.offsets, routing.kept, 50, 16)


def test_launcher_errors():
    kernels = _kernels()
    x = torch.randn(9, 8)
    routing = route(torch.randn(9, 3), 1.0, True, "deterministic")
    groups = expert_lists(*make_weights(3, 8, 12, torch.float32))
    args = (x, routing.order, routing.offsets, routing.kept, *groups, routing.route_prob_max)
    y, hidden = kernels.switch_mlp_forward(*args, "gelu")
    with pytest.raises(ValueError, match=r"hidden must be torch.float32 \[9, 12\]"):
        kernels.switch_mlp_backward(torch.ones_like(y), *args, hidden[:, :5], "gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        kernels.switch_mlp_forward(*args, "tanh")
    half = [a.half() if a.is_floating_point() else a for a in args[:4]]
    half_groups = [[w.half() for w in group] for group in groups]
    with pytest.raises(TypeError, match="the Triton switch kernels take .* got torch.float16"):
        kernels.switch_mlp_forward(*half, *half_groups, routing.route_prob_max.half(), "gelu")


def test_switch_feed_forward_on_triton():
    """The module with one nn.Linear per expert (stacked per call) against its reference backend."""
    from test_switch_module import assert_same, make_switch, run_backend

    module = make_switch(4, 0.5, is_gated=True, activation=torch.nn.GELU())
    x = torch.randn(8, 3, 24, dtype=torch.float64)
    fused, fused_dropped, fused_grads = run_backend(module, "triton", x)
    reference, reference_dropped, reference_grads = run_backend(module, "reference", x)
    assert fused_dropped == reference_dropped > 0
    assert_same(fused, reference, torch.float64, "outputs")
    assert_same(fused_grads, reference_grads, torch.float64, "grads")


def test_hidden_matches_reference():
    """The saved pre-activations, in order layout with zero rows for dropped tokens, are the reference's."""
    x = torch.randn(20, 24, dtype=torch.float64)
    routing = route(torch.randn(20, 4, dtype=torch.float64), 0.6, True, "deterministic")
    groups = expert_lists(*make_weights(4, 24, 32, torch.float64, gated=True))
    args = (x, routing.order, routing.offsets, routing.kept, *groups, routing.route_prob_max, "gelu")
    torch.testing.assert_close(_kernels().switch_mlp_forward(*args)[1], naive.switch_mlp(*args)[1])
