"""Attention dropout inside rel_attention: the C++ and Triton (interpreter)
kernels replay against the reference with the mask ``dropout.record()`` gives
back (layout ``[B, H, L, K]``), forward and every gradient."""
import pytest
import torch
from torch.library import opcheck

import fastformers
from fastformers.ops import dropout
from fastformers.ops.xl import naive, op

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["cpp", "triton"]
# Loads the C++ kernels: direct torch.ops calls below would run the reference registration without them.
HAS_CPP = "cpp" in fastformers.available_backends()
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="needs the C++ extension")
TOLERANCES = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=1e-4)}


def make_inputs(L, M, B, H, d, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    K = M + L

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()

    return [rand(L, B, H, d), rand(K, B, H, d), rand(K, B, H, d), rand(K + L - 1, H, d), rand(K + L - 1, H), rand(H, d)]


def reference_with_mask(inputs, scale, causal, keep, p):
    """The attention written out with an explicit keep mask ``[B, H, L, K]``."""
    query, key, value, *_ = inputs
    scores = naive.relative_scores(*inputs[:1], key, *inputs[3:]) * scale
    if causal:
        scores = scores.masked_fill(~naive.causal_mask(query.shape[0], key.shape[0])[:, :, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=1) * keep.permute(2, 3, 0, 1).to(scores.dtype) / (1 - p)
    return torch.einsum("ijbh,jbhd->ibhd", probs, value)


def needs(backend, request):
    """Skip without the C++ extension; check the interpreter for triton."""
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    elif not HAS_CPP:
        pytest.skip("no C++ extension")


def forward_backward(fn, inputs, grad):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad)
    return out.detach(), grads


# (L, M, B, H, d, causal): decode step (L = 1, its own C++ kernel), a query
# tile boundary of the C++ kernel (L = 70), odd d, full attention.
CPP_CASES = [(7, 5, 3, 2, 24, True), (1, 6, 2, 3, 8, True), (70, 3, 1, 1, 8, True), (6, 0, 2, 2, 5, False)]
TRITON_CASES = [(7, 5, 2, 2, 24, True), (1, 4, 1, 2, 8, True), (5, 0, 1, 1, 5, False)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "backend,case",
    [("cpp", case) for case in CPP_CASES] + [("triton", case) for case in TRITON_CASES],
    ids=str,
)
def test_replay_matches_reference(backend, case, dtype, request):
    needs(backend, request)
    *shape, causal = case
    p, scale = 0.3, shape[-1] ** -0.5
    inputs = make_inputs(*shape, dtype)
    grad = torch.randn(shape[0], *shape[2:], dtype=dtype)
    with dropout.record() as calls:
        out, grads = forward_backward(
            lambda *x: fastformers.ops.rel_attention(*x, scale, causal=causal, dropout_p=p, backend=backend),
            inputs, grad,
        )
    (call,) = calls
    L, M, B, H, d = shape
    assert call.op == "rel_attention" and call.p == p and call.shape == (B, H, L, M + L)
    keep = call.mask()
    ref_out, ref_grads = forward_backward(lambda *x: reference_with_mask(x, scale, causal, keep, p), inputs, grad)
    torch.testing.assert_close(out, ref_out, **TOLERANCES[dtype])
    for name, got, expected in zip(("query", "key", "value", "pos_emb", "pos_bias", "query_pos_bias"), grads,
                                   ref_grads):
        torch.testing.assert_close(got, expected, **TOLERANCES[dtype], msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_p_is_the_dropout_free_call_bit_for_bit(backend, request):
    needs(backend, request)
    inputs = make_inputs(7, 5, 2, 2, 8, torch.float32)
    grad = torch.randn(7, 2, 2, 8)

    def run(**kwargs):
        return forward_backward(lambda *x: fastformers.ops.rel_attention(*x, 0.3, backend=backend, **kwargs),
                                inputs, grad)

    with dropout.record() as calls:
        out, grads = run(dropout_p=0.0)
    assert calls == []
    plain_out, plain_grads = run()
    assert torch.equal(out, plain_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_result(backend, request):
    needs(backend, request)
    inputs = [t.detach() for t in make_inputs(7, 5, 2, 2, 8, torch.float32)]

    def run(**kwargs):
        return fastformers.ops.rel_attention(*inputs, 0.3, dropout_p=0.5, backend=backend, **kwargs)

    assert torch.equal(run(seed=11), run(seed=11))
    assert not torch.equal(run(seed=11), run(seed=12))
    torch.manual_seed(5)
    first = run()
    torch.manual_seed(5)
    assert torch.equal(first, run())
    assert not torch.equal(first, run())  # a fresh draw


@needs_cpp
@pytest.mark.parametrize("causal,masked", [(True, False), (True, True), (False, True)])
def test_cpp_and_reference_share_the_bits(causal, masked):
    """Same seed: the C++ kernel and the reference formulas of the op agree,
    with an explicit mask too."""
    inputs = [t.detach() for t in make_inputs(9, 4, 2, 3, 8, torch.float64)]
    mask = None
    if masked:
        mask = torch.rand(9, 13, 2, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[:, 0] = True
    args = (*inputs, 0.3, causal, mask, 0.2, 1234, 40)
    out, lse = torch.ops.fastformers.rel_attention(*args)
    ref_out, ref_lse = op.reference_forward(*args)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    torch.testing.assert_close(
        out, naive.rel_attention(*inputs, 0.3, mask=mask, causal=causal, dropout_p=0.2, seed=1234, offset=40))
    grad = torch.randn_like(out)
    backward_args = (grad, *inputs, out, lse, *args[6:])
    for got, expected in zip(torch.ops.fastformers.rel_attention_backward(*backward_args),
                             op.reference_backward(*backward_args)):
        torch.testing.assert_close(got, expected)


@needs_cpp
def test_keep_rate():
    """The kernel's output with V = one-hot of the key index is the dropped
    probability row: its zeros are the dropped entries."""
    L, M, p = 16, 48, 0.25
    K = L + M
    query, key, _, pos_emb, pos_bias, u = [t.detach() for t in make_inputs(L, M, 1, 1, K, torch.float64)]
    value = torch.eye(K, dtype=torch.float64)[:, None, None, :]
    with dropout.record() as calls:
        out = fastformers.ops.rel_attention(query, key, value, pos_emb, pos_bias, u, 0.1, dropout_p=p)
    visible = naive.causal_mask(L, K)
    kept = out[:, 0, 0] != 0
    assert torch.equal(kept, calls[0].mask()[0, 0] & visible)
    rate = kept.sum().item() / visible.sum().item()
    assert abs(rate - (1 - p)) < 0.05


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_p_names_dropout_p(p):
    inputs = [t.detach() for t in make_inputs(3, 1, 1, 1, 4, torch.float32)]
    with pytest.raises(ValueError, match="dropout_p"):
        fastformers.ops.rel_attention(*inputs, 0.5, dropout_p=p)


@needs_cpp
def test_cpp_kernel_checks_p():
    inputs = [t.detach() for t in make_inputs(3, 1, 1, 1, 4, torch.float32)]
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        torch.ops.fastformers.rel_attention(*inputs, 0.5, True, None, 1.0, 0, 0)


@needs_cpp
def test_opcheck_with_dropout():
    inputs = [t.detach().requires_grad_() for t in make_inputs(5, 3, 2, 2, 8, torch.float32)]
    opcheck(torch.ops.fastformers.rel_attention.default, (*inputs, 0.35, True, None, 0.2, 77, 8))
    detached = [t.detach() for t in inputs]
    out, lse = torch.ops.fastformers.rel_attention(*detached, 0.35, True, None, 0.2, 77, 8)
    opcheck(torch.ops.fastformers.rel_attention_backward.default,
            (torch.randn_like(out), *detached, out, lse, 0.35, True, None, 0.2, 77, 8))


@needs_cpp
def test_torch_compile_fullgraph_with_dropout():
    inputs = [t.detach().float().requires_grad_() for t in make_inputs(7, 5, 2, 2, 8, torch.float64)]

    @torch.compile(fullgraph=True)
    def step(q, k, v, pe, pb, u):
        out, _ = torch.ops.fastformers.rel_attention(q * 2, k, v, pe, pb, u, 0.3, True, None, 0.25, 99, 4)
        return (out * out).sum()

    compiled = step(*inputs)
    compiled.backward()
    compiled_grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    q, k, v, pe, pb, u = inputs
    expected = (naive.rel_attention(q * 2, k, v, pe, pb, u, 0.3, dropout_p=0.25, seed=99, offset=4) ** 2).sum()
    expected.backward()
    torch.testing.assert_close(compiled, expected)
    for got, t in zip(compiled_grads, inputs):
        torch.testing.assert_close(got, t.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_with_dropout(backend, request):
    """bfloat16 kernels with a fixed seed against the reference with the same bits (harness's low-precision rule)."""
    from harness import assert_parity

    needs(backend, request)
    inputs = [t.detach() for t in make_inputs(7, 5, 2, 2, 24, torch.bfloat16)]
    assert_parity(
        lambda *x: fastformers.ops.rel_attention(*x, 0.2, dropout_p=0.25, seed=321, backend=backend),
        lambda *x: naive.rel_attention(*x, 0.2, dropout_p=0.25, seed=321, offset=0),
        inputs,
    )
