"""Every fused op on the suite's device against its reference: forward and every
gradient, float32 (IEEE and TF32), bfloat16 and float16, small and larger
shapes, and backward determinism (two identical calls, bit-identical results).

Ops a dtype has no GPU kernel for either run their reference (rel_attention
and the compressive ops on CUDA) or refuse it with a TypeError naming the
dtype (switch; the compressive launchers under the interpreter): the refusal
shows as a skip with the error's text.
"""
import functools

import pytest
import torch

from cuda_check import BACKEND, DRY_RUN, FP32, PRECISIONS, assert_close_to_oracle, assert_deterministic, randn
from fastformers.ops.compressive import naive as compressive_naive
from fastformers.ops.compressive import op as compressive_op
from fastformers.ops.feedback import naive as feedback_naive
from fastformers.ops.feedback.op import feedback_memory
from fastformers.ops.feedback.step_op import feedback_attention_step
from fastformers.ops.switch import route, switch_mlp
from fastformers.ops.xl import naive as xl_naive
from fastformers.ops.xl.op import rel_attention


def cases(small, larger):
    """(shape, precision) parameters: every small shape and, on the GPU, every
    larger one, in every precision; the dry run takes the first small shape in
    float32."""
    params = []
    for size, shapes in (("small", small), ("larger", larger)):
        for shape in shapes:
            for precision in PRECISIONS:
                dry = size == "small" and shape == small[0] and precision is FP32
                params.append(pytest.param(shape, precision, marks=[pytest.mark.dry] if dry else [],
                                           id=f"{size}-{'x'.join(map(str, shape))}-{precision.name}"))
    return params


def refusal_skips(call):
    """Run ``call``; a TypeError naming the dtype (a documented refusal: no GPU
    kernel for it) becomes a skip that quotes it."""
    try:
        return call()
    except TypeError as error:
        if "16" in str(error) or "dtype" in str(error):
            pytest.skip(f"refused: {error}")
        raise


# ---------------------------------------------------------------- Transformer-XL

def rel_attention_inputs(L, M, B, H, d, seed=0):
    K = L + M
    return [randn(L, B, H, d, seed=seed), randn(K, B, H, d, seed=seed + 1), randn(K, B, H, d, seed=seed + 2),
            randn(K + L - 1, H, d, scale=0.5, seed=seed + 3), randn(K + L - 1, H, scale=0.5, seed=seed + 4),
            randn(H, d, scale=0.5, seed=seed + 5)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape, precision", cases(
    small=[(7, 5, 2, 3, 24), (1, 9, 2, 2, 32)],
    larger=[(128, 128, 4, 4, 64), (300, 212, 2, 8, 128)]))
def test_rel_attention(shape, precision, causal):
    if DRY_RUN and not causal:
        pytest.skip("the dry run takes the causal case")
    L, M, B, H, d = shape
    scale = d ** -0.5
    assert_close_to_oracle(
        lambda *t: rel_attention(*t, scale, causal=causal, backend=BACKEND),
        lambda *t: xl_naive.rel_attention(*t, scale, causal=causal),
        rel_attention_inputs(L, M, B, H, d), precision)


# ---------------------------------------------------------------- Feedback

@pytest.mark.parametrize("shape, precision", cases(small=[(3, 2, 24), (7, 5, 33)],
                                                   larger=[(7, 64, 512), (13, 256, 1024)]))
def test_feedback_memory(shape, precision):
    L, B, D = shape
    assert_close_to_oracle(lambda x, w: feedback_memory(x, w, backend=BACKEND), feedback_naive.feedback_memory,
                           [randn(L, B, D, seed=0), randn(L, seed=1)], precision)


def attention_step_inputs(steps, T, B, H, d, P):
    return [randn(B, H, d, seed=0), randn(T, B, H, d, seed=1), randn(T, B, H, d, seed=2),
            randn(P, H, d, scale=0.5, seed=3), randn(P, H, scale=0.5, seed=4), randn(H, d, scale=0.5, seed=5)]


@pytest.mark.parametrize("shape, precision", cases(small=[(5, 6, 2, 3, 24, 16), (1, 1, 1, 1, 8, 4)],
                                                   larger=[(128, 130, 64, 8, 64, 256), (257, 300, 8, 4, 128, 512)]))
def test_feedback_attention_step(shape, precision):
    steps, T, B, H, d, P = shape
    scale = d ** -0.5

    def fused(q, k, v, r, s, u):
        return feedback_attention_step(q, k, v, steps, r, s, u, scale, backend=BACKEND)

    def reference(q, k, v, r, s, u):
        return feedback_naive.feedback_attention_step(q, k, v, steps, r, s, u, scale)

    assert_close_to_oracle(fused, reference, attention_step_inputs(steps, T, B, H, d, P), precision)


# ---------------------------------------------------------------- Compressive

@pytest.mark.parametrize("shape, precision", cases(small=[(6, 3, 24, 3), (4, 1, 16, 4)],
                                                   larger=[(128, 16, 512, 4), (96, 33, 300, 3)]))
def test_conv_compress(shape, precision):
    M, B, D, c = shape
    inputs = [randn(M, B, D, seed=0), randn(D, D, c, scale=(D * c) ** -0.5, seed=1), randn(D, scale=0.1, seed=2)]
    refusal_skips(lambda: assert_close_to_oracle(lambda *t: compressive_op.conv_compress(*t, backend=BACKEND),
                                                 compressive_naive.conv_compress, inputs, precision))


def reconstruction_inputs(L, M, c, B, D):
    return [randn(L, B, D, seed=0), randn(M, B, D, seed=1), randn(M // c, B, D, seed=2),
            1 + randn(D, scale=0.1, seed=3), randn(D, scale=0.1, seed=4),
            *(randn(*shape, scale=scale, seed=5 + i) for i, (shape, scale) in enumerate(
                [((D, D), D ** -0.5), ((D,), 0.1)] * 3))]


@pytest.mark.parametrize("shape, precision", cases(small=[(5, 6, 3, 2, 24, 3)],
                                                   larger=[(32, 128, 4, 16, 256, 4), (64, 64, 2, 8, 512, 4)]))
def test_attention_reconstruction_loss(shape, precision):
    L, M, c, B, D, H = shape
    scale = (D // H) ** -0.5

    def call(function, h, mem, c_mem, norm_w, norm_b, qw, qb, kw, kb, vw, vb, **options):
        return function(h, mem, c_mem, norm_w, norm_b, 1e-5, qw, qb, kw, kb, vw, vb, H, scale, **options)

    only_c_mem = [index == 2 for index in range(11)]
    refusal_skips(lambda: assert_close_to_oracle(
        functools.partial(call, compressive_op.attention_reconstruction_loss, backend=BACKEND),
        functools.partial(call, compressive_naive.attention_reconstruction_loss),
        reconstruction_inputs(L, M, c, B, D), precision, only_c_mem))


# ---------------------------------------------------------------- Switch

def switch_inputs(T, d, d_ff, E, gated):
    inputs = [randn(T, d, seed=0), randn(E, d_ff, d, scale=d ** -0.5, seed=1), randn(E, d_ff, scale=0.1, seed=2),
              randn(E, d, d_ff, scale=d_ff ** -0.5, seed=3), randn(E, d, scale=0.1, seed=4),
              randn(T, seed=5).sigmoid()]
    if gated:
        inputs += [randn(E, d_ff, d, scale=d ** -0.5, seed=6), randn(E, d_ff, scale=0.1, seed=7)]
    return inputs


@pytest.mark.parametrize("activation, gated", [("relu", False), ("gelu", True)], ids=["relu", "gelu-gated"])
@pytest.mark.parametrize("shape, precision", cases(small=[(37, 24, 40, 4), (16, 8, 16, 1)],
                                                   larger=[(2048, 128, 256, 16), (4096, 512, 2048, 8)]))
def test_switch_mlp(shape, precision, activation, gated):
    if DRY_RUN and gated:
        pytest.skip("the dry run takes the ReLU case")
    T, d, d_ff, E = shape
    # Capacity 1.0 with a skewed router: some experts overflow, some get no token.
    logits = randn(T, E, scale=2.0, seed=11) + torch.linspace(0, 1, E, dtype=torch.float64, device=randn(1).device)
    routing = route(logits, 1.0, True, "deterministic")

    def on(backend):
        def run(x, w1, b1, w2, b2, scale, w_gate=None, b_gate=None):
            return switch_mlp(x, routing, w1, b1, w2, b2, scale, activation, w_gate, b_gate, backend=backend)
        return run

    refusal_skips(lambda: assert_close_to_oracle(on(BACKEND), on("reference"),
                                                 switch_inputs(T, d, d_ff, E, gated), precision))


# ---------------------------------------------------------------- determinism

def _rel_attention_case(d):
    scale = d ** -0.5
    return (lambda *t: rel_attention(*t, scale, backend=BACKEND)), rel_attention_inputs(64, 64, 2, 2, d)


DETERMINISM = {
    "rel_attention": lambda: _rel_attention_case(32) if DRY_RUN else (
        (lambda *t: rel_attention(*t, 64 ** -0.5, backend=BACKEND)), rel_attention_inputs(512, 512, 8, 8, 64)),
    "feedback_memory": lambda: ((lambda x, w: feedback_memory(x, w, backend=BACKEND)),
                                [randn(7, 8 if DRY_RUN else 256, 64 if DRY_RUN else 1024, seed=0), randn(7, seed=1)]),
    "feedback_attention_step": lambda: (
        (lambda q, k, v, r, s, u: feedback_attention_step(q, k, v, 100, r, s, u, 0.125, backend=BACKEND)),
        attention_step_inputs(100, 100, 2 if DRY_RUN else 64, 2 if DRY_RUN else 8, 64, 128)),
    "conv_compress": lambda: ((lambda *t: compressive_op.conv_compress(*t, backend=BACKEND)),
                              [randn(8, 2, 32, seed=0), randn(32, 32, 2, scale=0.1, seed=1), randn(32, seed=2)]
                              if DRY_RUN else
                              [randn(128, 16, 512, seed=0), randn(512, 512, 4, scale=0.02, seed=1),
                               randn(512, seed=2)]),
}


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=pytest.mark.dry), torch.bfloat16],
                         ids=["float32", "bfloat16"])
@pytest.mark.parametrize("op", sorted(DETERMINISM))
def test_backward_is_deterministic(op, dtype):
    if DRY_RUN and op != "feedback_memory":
        pytest.skip("the dry run takes one op: the interpreter runs programs in order, atomics included")
    fn, inputs = DETERMINISM[op]()
    # Every gradient bit-identical, rel_attention's positional tables included
    # (their per-query-tile partials are summed in a fixed order, no atomics).
    differing = assert_deterministic(fn, inputs, dtype)
    assert not differing, f"{op} ({dtype}): {differing} differ between two identical calls"


def test_switch_backward_is_deterministic():
    T, d, d_ff, E = (64, 16, 32, 4) if DRY_RUN else (4096, 512, 2048, 8)
    logits = randn(T, E, seed=11)
    routing = route(logits, 1.25, True, "deterministic")

    def run(x, w1, b1, w2, b2, scale):
        return switch_mlp(x, routing, w1, b1, w2, b2, scale, "relu", backend=BACKEND)

    differing = assert_deterministic(run, switch_inputs(T, d, d_ff, E, gated=False), torch.bfloat16)
    assert not differing, f"switch_mlp: {differing} differ between two identical calls"
