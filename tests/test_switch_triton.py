"""Triton grouped expert FFN kernels under the interpreter, against the
reference: output and every gradient (x, scale, each weight and bias), for
the shapes, dtypes (float64, float32, bfloat16, float16), activations,
dropout replay and routing edge cases of the op; the in-kernel tile search;
deterministic backward; the tile classes, TF32 choice and AOT coverage of
the autotuner's configurations; routing without host syncs; the module on the
Triton backend."""
import pytest
import torch

import triton
import triton.language as tl
from fastformers.ops import dropout
from fastformers.ops.switch import naive, route, switch_mlp
from fastformers.ops.switch.op import expert_lists
from fastformers.ops.switch.triton_kernel import _tile
from harness import LOW_PRECISION, LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR
from test_switch_dropout import dense_oracle, forward_and_grads, problem
from test_switch_ops import (ROUTING_EDGE_CASES, check_parity, edge_case_routing, make_weights, random_problem,
                             skewed_logits)

pytestmark = pytest.mark.usefixtures("triton_interpreter", "one_thread")

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", list(naive.ACTIVATIONS))
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_ffn_variants_low_precision(dtype, activation, gated):
    """Every activation, plain and gated, biasless when gated (both kinds of weights covered)."""
    x = torch.randn(40, 24, dtype=dtype)
    routing = route(torch.randn(40, 4, dtype=dtype), 0.8, True, "deterministic")
    check_parity(x, routing, make_weights(4, 24, 40, dtype, biases=not gated, gated=gated), activation, "triton")


def _assert_close_to_oracle(got, exact, reference, dtype, what):
    """float64/float32: ``got`` equals ``exact``; 16-bit: its error against
    the float64 ``exact`` is within the harness's bound from the error of the
    same-dtype ``reference``."""
    if dtype not in LOW_PRECISION:
        tolerance = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got, exact.to(dtype), **tolerance, msg=lambda m: f"{what}: {m}")
        return
    error = (got.double() - exact).abs().max().item()
    bound = (LOW_PRECISION_FACTOR * (reference.double() - exact).abs().max().item()
             + LOW_PRECISION_FLOOR[dtype] * max(exact.abs().max().item(), 1.0))
    assert error <= bound, f"{what} ({dtype}): error {error:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation,gated", [("relu", False), ("gelu", True), ("sigmoid", False)])
def test_recorded_mask_replays_output_and_every_gradient(dtype, activation, gated):
    """The kernels' dropout mask, replayed from ``dropout.record()`` through a
    dense float64 oracle, gives their output and every gradient."""
    x, routing, weights, scale = problem(dtype, gated)
    p = 0.3
    grad_y = torch.randn_like(x)
    with dropout.record() as calls:
        got = forward_and_grads(lambda x, w, s: switch_mlp(x, routing, *w[:4], s, activation, *w[4:], dropout_p=p,
                                                           backend="triton"), x, weights, scale, grad_y)
    mask = calls[0].mask()

    def oracle(dtype_):
        cast = [None if w is None else w.to(dtype_) for w in weights]
        return forward_and_grads(lambda x, w, s: dense_oracle(x, routing, w, s, activation, mask, p),
                                 x.to(dtype_), cast, scale.to(dtype_), grad_y.to(dtype_))

    exact, same_dtype = oracle(torch.float64), oracle(dtype)
    for i, (a, b, c) in enumerate(zip(got, exact, same_dtype)):
        _assert_close_to_oracle(a, b, c, dtype, f"output/grad {i}")
    assert not torch.allclose(got[0], switch_mlp(x, routing, *weights[:4], scale, activation, *weights[4:],
                                                 backend="triton"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_is_bit_identical_between_calls(dtype):
    """No atomics: every gradient element is summed by one program in a fixed order."""
    kernels = _kernels()
    x = torch.randn(70, 24, dtype=dtype)
    routing = route(skewed_logits(70, 4, [0, 1]).to(dtype), 0.9, True, "deterministic")
    groups = expert_lists(*make_weights(4, 24, 40, dtype, gated=True))
    args = (x, routing.order, routing.offsets, routing.kept, *groups, routing.route_prob_max)
    y, hidden = kernels.switch_mlp_forward(*args, "silu", 0.2, 5, 7)
    grad_y = torch.randn_like(y)
    first, second = (kernels.switch_mlp_backward(grad_y, *args, hidden, "silu", 0.2, 5, 7) for _ in range(2))
    flat = lambda grads: [g for group in grads for g in (group if isinstance(group, list) else [group])]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(flat(first), flat(second)))


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


@triton.jit
def _tile_probe(offsets_ptr, kept_ptr, out_ptr, n_experts, BLOCK_M: tl.constexpr):
    """Writes, per program, what ``_tile`` found: expert, first row, segment and kept ends, any kept."""
    expert, rows, in_segment, kept, any_kept = _tile(offsets_ptr, kept_ptr, n_experts, BLOCK_M)
    out = out_ptr + tl.program_id(0) * 5
    tl.store(out, expert)
    tl.store(out + 1, tl.min(rows, 0))
    tl.store(out + 2, tl.min(rows, 0) + tl.sum(in_segment.to(tl.int64), 0))
    tl.store(out + 3, tl.min(rows, 0) + tl.sum(kept.to(tl.int64), 0))
    tl.store(out + 4, any_kept.to(tl.int64))


@pytest.mark.parametrize("n_tokens, n_experts, block_m", [(1, 1, 16), (50, 8, 16), (64, 3, 64), (7, 64, 4),
                                                           (300, 200, 2)])
def test_tile_search_covers_every_position_once(n_tokens, n_experts, block_m):
    """The grid's ``T // BLOCK_M + min(E, T)`` programs find every segment's
    tiles exactly once (E = 200 takes two steps of the expert scan); the rest find no rows."""
    routing = route(skewed_logits(n_tokens, n_experts, list(range(0, n_experts, 2))), 0.7, True, "deterministic")
    n_programs = n_tokens // block_m + min(n_experts, n_tokens)
    found = torch.zeros(n_programs, 5, dtype=torch.int64)
    _tile_probe[(n_programs,)](routing.offsets, routing.kept, found, n_experts, BLOCK_M=block_m)
    offsets, kept = routing.offsets.tolist(), routing.kept.tolist()
    covered = []
    for expert, start, seg_end, kept_end, any_kept in found.tolist():
        if seg_end == start:
            continue
        assert offsets[expert] <= start < offsets[expert + 1]
        assert seg_end == min(start + block_m, offsets[expert + 1])
        assert kept_end == min(max(offsets[expert] + kept[expert], start), seg_end)
        assert any_kept == (kept_end > start)
        covered += range(start, seg_end)
    assert covered == list(range(n_tokens))


def test_deterministic_routing_stays_on_device():
    """Meta tensors have no data: any host read in routing would raise."""
    routing = route(torch.randn(50, 8, device="meta"), 0.5, True, "deterministic")
    assert routing.order.device.type == "meta" and routing.dropped.device.type == "meta"


def test_float32_precision_follows_torch():
    kernels = _kernels()
    assert kernels.matmul_precision(torch.float32) == "ieee"
    try:
        torch.set_float32_matmul_precision("high")
        assert kernels.matmul_precision(torch.float32) == "tf32"
        assert kernels.matmul_precision(torch.bfloat16) == "ieee"
    finally:
        torch.set_float32_matmul_precision("highest")
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert kernels.matmul_precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert kernels.matmul_precision(torch.float32) == "ieee"


def test_tile_classes():
    tile_class = _kernels().tile_class
    assert tile_class(torch.bfloat16, "ieee", 512, 2048) == "mma"
    assert tile_class(torch.float16, "ieee", 24, 2048) == "mma-odd"
    assert tile_class(torch.float32, "tf32", 128, 40) == "mma-odd"
    assert tile_class(torch.float32, "ieee", 512, 2048) == "ieee"
    assert tile_class(torch.float64, "ieee", 512, 2048) == "fp64"


def test_every_autotuner_config_is_an_aot_spec():
    """Each tile the autotuner may pick, for each dtype and float32 precision
    that reaches its class, compiles in the AOT check (same constexprs, warps,
    stages; the "mma" ones with d and d_ff as multiples of 16)."""
    kernels = _kernels()
    compiled = {(spec.kernel.__name__, spec.signature["x_ptr" if "x_ptr" in spec.signature else "grad_y_ptr"],
                 spec.constexprs["PRECISION"], spec.constexprs["BLOCK_M"], spec.constexprs["BLOCK_N"],
                 spec.constexprs["BLOCK_K"], spec.num_warps, spec.num_stages,
                 isinstance(spec, kernels._AlignedSpec), spec.constexprs.get("GATED"))
                for spec in kernels.AOT_SPECS}
    pointer = {torch.float64: "*fp64", torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
    autotuned = [kernels.switch_in_kernel, kernels.switch_out_kernel, kernels.switch_grad_hidden_kernel,
                 kernels.switch_grad_x_kernel, kernels.switch_grad_w_in_kernel, kernels.switch_grad_w_out_kernel]
    for kernel in autotuned:
        name = kernel.fn.__name__
        gating = [False, True] if "GATED" in kernel.fn.arg_names else [None]
        for dtype, precision in [(torch.float64, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32"),
                                 (torch.bfloat16, "ieee"), (torch.float16, "ieee")]:
            for d, d_ff in [(512, 2048), (24, 40)]:
                group = kernels.tile_class(dtype, precision, d, d_ff)
                for m, n, k, warps, stages in kernels._TILES[name][group]:
                    for gated in gating:
                        assert (name, pointer[dtype], precision, m, n, k, warps, stages, group == "mma",
                                gated) in compiled, (name, dtype, precision, group, (m, n, k, warps, stages), gated)


def test_low_precision_hidden_keeps_the_input_dtype():
    """The Triton kernels (CUDA) save hidden in the input dtype; the C++ kernels (CPU) in float32."""
    assert naive.hidden_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16
    assert naive.hidden_dtype(torch.float16, "cuda") == torch.float16
    assert naive.hidden_dtype(torch.bfloat16, "cpu") == torch.float32
    assert naive.hidden_dtype(torch.float64, "cpu") == torch.float64
    x = torch.randn(20, 24, dtype=torch.bfloat16)
    routing = route(torch.randn(20, 4), 0.6, True, "deterministic")
    groups = expert_lists(*make_weights(4, 24, 32, torch.bfloat16, gated=True))
    args = (x, routing.order, routing.offsets, routing.kept, *groups, routing.route_prob_max.bfloat16(), "gelu")
    hidden = _kernels().switch_mlp_forward(*args)[1]
    assert hidden.dtype == torch.bfloat16
    torch.testing.assert_close(hidden.float(), naive.switch_mlp(*args)[1], atol=2e-2, rtol=2e-2)


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
    integers = [a.int() for a in args[:1]] + list(args[1:4])
    int_groups = [[w.int() for w in group] for group in groups]
    with pytest.raises(TypeError, match="the Triton switch kernels take .* got torch.int32"):
        kernels.switch_mlp_forward(*integers, *int_groups, routing.route_prob_max.int(), "gelu")


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
