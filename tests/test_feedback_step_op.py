"""The Feedback Transformer attention step: every backend against the reference."""
import pytest
import torch
from torch.library import opcheck

import fastformers
from fastformers.ops.feedback import naive
from fastformers.ops.feedback.step_op import step_kernels
from harness import assert_parity

FUSED_BACKENDS = [name for name in ("cpp", "triton") if name in fastformers.available_backends()]
# (steps, batch, heads, d_k): one memory step, odd sizes, more than one Triton
# block of steps (32), the grid corners.
SHAPES = [(1, 1, 1, 24), (2, 3, 4, 24), (17, 1, 4, 64), (64, 3, 1, 24), (64, 3, 4, 64)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def make_inputs(steps, B, H, d, dtype, *, spare_rows=2, strided=False):
    """Caches with unused rows beyond ``steps``; ``strided`` puts keys and values
    in one ``[T_max, B, 2, H, d]`` buffer as the fused modules do."""
    T_max, P = steps + spare_rows, steps + 5
    if strided:
        kv = torch.randn(T_max, B, 2, H, d, dtype=dtype)
        key_cache, value_cache = kv[:, :, 0], kv[:, :, 1]
    else:
        key_cache, value_cache = torch.randn(T_max, B, H, d, dtype=dtype), torch.randn(T_max, B, H, d, dtype=dtype)
    return dict(
        query=torch.randn(B, H, d, dtype=dtype), key_cache=key_cache, value_cache=value_cache,
        key_pos_embeddings=torch.randn(P, H, d, dtype=dtype), key_pos_bias=torch.randn(P, H, dtype=dtype),
        query_pos_bias=torch.randn(H, d, dtype=dtype),
    )


ORDER = ("query", "key_cache", "value_cache", "key_pos_embeddings", "key_pos_bias", "query_pos_bias")


def _call(fn, steps, scale):
    def run(q, k, v, r, s, u):
        return fn(q, k, v, steps, r, s, u, scale)

    return run


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, dtype, shape, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    steps, B, H, d = shape
    inputs = make_inputs(steps, B, H, d, dtype, strided=steps % 2 == 0)
    scale = d ** -0.5
    fused = _call(lambda *a: fastformers.ops.feedback_attention_step(*a, backend=backend), steps, scale)
    assert_parity(fused, _call(naive.feedback_attention_step, steps, scale), [inputs[k] for k in ORDER])


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_accumulating_backward_adds_used_rows_only(backend, dtype, request):
    """The accumulating backward adds exactly the functional gradients into the
    used rows of whole-cache / whole-table buffers and leaves every other row."""
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    steps, B, H, d = 5, 3, 2, 24
    inputs = make_inputs(steps, B, H, d, dtype, spare_rows=3, strided=True)
    args = [inputs[k] for k in ORDER]
    grad = torch.randn(B, H, d, dtype=dtype)
    expected = naive.feedback_attention_step_backward(grad, *args[:3], steps, *args[3:], 0.3)
    grad_kv = torch.randn(steps + 3, B, 2, H, d, dtype=dtype)
    buffers = [grad_kv[:, :, 0], grad_kv[:, :, 1], torch.randn(steps + 5, H, d, dtype=dtype),
               torch.randn(steps + 5, H, dtype=dtype), torch.randn(H, d, dtype=dtype)]
    before = [b.clone() for b in buffers]
    _, accumulate = step_kernels(backend, grad.device)
    grad_query = accumulate(grad, *args[:3], steps, *args[3:], 0.3, 0.0, 0, 0, *buffers)
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_query, expected[0], **tol)
    torch.testing.assert_close(buffers[0][:steps], before[0][:steps] + expected[1], **tol)
    torch.testing.assert_close(buffers[1][:steps], before[1][:steps] + expected[2], **tol)
    torch.testing.assert_close(buffers[2][-steps:], before[2][-steps:] + expected[3], **tol)
    torch.testing.assert_close(buffers[3][-steps:], before[3][-steps:] + expected[4], **tol)
    torch.testing.assert_close(buffers[4], before[4] + expected[5], **tol)
    for after, old in zip(buffers[:2], before[:2]):
        assert torch.equal(after[steps:], old[steps:])
    for after, old in zip(buffers[2:4], before[2:4]):
        assert torch.equal(after[:-steps], old[:-steps])


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_bfloat16_step_accumulates_into_float32_buffers(backend, request):
    """A recurrence sums thousands of step gradients: bfloat16 steps may add into
    float32 buffers, which then hold the float32-accurate sum."""
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    steps, B, H, d = 5, 3, 2, 24
    inputs = make_inputs(steps, B, H, d, torch.bfloat16, spare_rows=3, strided=True)
    args = [inputs[k] for k in ORDER]
    grad = torch.randn(B, H, d, dtype=torch.bfloat16)
    exact = naive.feedback_attention_step_backward(grad.double(), *[a.double() for a in args[:3]], steps,
                                                   *[a.double() for a in args[3:]], 0.3)
    grad_kv = torch.zeros(steps + 3, B, 2, H, d)
    buffers = [grad_kv[:, :, 0], grad_kv[:, :, 1], torch.zeros(steps + 5, H, d), torch.zeros(steps + 5, H),
               torch.zeros(H, d)]
    _, accumulate = step_kernels(backend, grad.device)
    grad_query = accumulate(grad, *args[:3], steps, *args[3:], 0.3, 0.0, 0, 0, *buffers)
    assert grad_query.dtype == torch.bfloat16
    tol = dict(atol=1e-4, rtol=1e-4)  # float32 accuracy, far below bfloat16's 4e-3
    torch.testing.assert_close(buffers[0][:steps].double(), exact[1], **tol)
    torch.testing.assert_close(buffers[1][:steps].double(), exact[2], **tol)
    torch.testing.assert_close(buffers[2][-steps:].double(), exact[3], **tol)
    torch.testing.assert_close(buffers[3][-steps:].double(), exact[4], **tol)
    torch.testing.assert_close(buffers[4].double(), exact[5], **tol)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_accumulating_backward_rejects_other_buffer_dtypes(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    steps, B, H, d = 2, 1, 1, 8
    inputs = make_inputs(steps, B, H, d, torch.float32)
    args = [inputs[k] for k in ORDER]
    _, accumulate = step_kernels(backend, torch.device("cpu"))
    buffers = [torch.zeros(steps + 2, B, H, d, dtype=torch.float64), torch.zeros(steps + 2, B, H, d, dtype=torch.float64),
               torch.zeros(steps + 5, H, d, dtype=torch.float64), torch.zeros(steps + 5, H, dtype=torch.float64),
               torch.zeros(H, d, dtype=torch.float64)]
    with pytest.raises((RuntimeError, TypeError), match="gradient buffers must"):
        accumulate(torch.randn(B, H, d), *args[:3], steps, *args[3:], 0.3, 0.0, 0, 0, *buffers)

@pytest.mark.parametrize("dtype", [torch.float64], ids=str)
def test_opcheck(dtype):
    assert fastformers.extension_available()
    steps, B, H, d = 3, 2, 2, 8
    inputs = make_inputs(steps, B, H, d, dtype)
    args = [inputs[k] for k in ORDER]
    step_args = (*args[:3], steps, *args[3:], 0.25)
    opcheck(torch.ops.fastformers.feedback_attention_step.default,
            tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in step_args))
    grad = torch.randn(B, H, d, dtype=dtype)
    opcheck(torch.ops.fastformers.feedback_attention_step_backward.default, (grad, *step_args))
    buffers = (torch.zeros_like(args[1]), torch.zeros_like(args[2]), torch.zeros_like(args[3]),
               torch.zeros_like(args[4]), torch.zeros_like(args[5]))
    opcheck(torch.ops.fastformers.feedback_attention_step_backward_accumulate_.default, (grad, *step_args, 0.0, 0, 0, *buffers))


def test_torch_compile_fullgraph():
    steps, B, H, d = 4, 2, 2, 8
    inputs = make_inputs(steps, B, H, d, torch.float32)
    query = inputs["query"].requires_grad_()
    table = inputs["key_pos_embeddings"].requires_grad_()

    @torch.compile(fullgraph=True)
    def step(q, r):
        return torch.ops.fastformers.feedback_attention_step(
            q * 2, inputs["key_cache"], inputs["value_cache"], steps, r, inputs["key_pos_bias"],
            inputs["query_pos_bias"], 0.5).sum()

    compiled = step(query, table)
    compiled.backward()
    grads = query.grad.clone(), table.grad.clone()
    query.grad = table.grad = None
    expected = naive.feedback_attention_step(query * 2, inputs["key_cache"], inputs["value_cache"], steps, table,
                                             inputs["key_pos_bias"], inputs["query_pos_bias"], 0.5).sum()
    expected.backward()
    torch.testing.assert_close(compiled, expected)
    torch.testing.assert_close(grads[0], query.grad)
    torch.testing.assert_close(grads[1], table.grad)


def test_double_backward_raises():
    inputs = make_inputs(3, 2, 2, 8, torch.float64)
    query = inputs["query"].requires_grad_()
    out = torch.ops.fastformers.feedback_attention_step(query, inputs["key_cache"], inputs["value_cache"], 3,
                                                        inputs["key_pos_embeddings"], inputs["key_pos_bias"],
                                                        inputs["query_pos_bias"], 0.5)
    (grad,) = torch.autograd.grad(out.sum(), query, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grad.sum().backward()


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
def test_bad_input(backend):
    good = make_inputs(3, 2, 2, 8, torch.float32)

    def call(steps=3, **override):
        args = {**good, **override}
        return fastformers.ops.feedback_attention_step(
            args["query"], args["key_cache"], args["value_cache"], steps, args["key_pos_embeddings"],
            args["key_pos_bias"], args["query_pos_bias"], 0.5, backend=backend)

    with pytest.raises(ValueError, match=r"query must be \[batch, heads, d_k\]"):
        call(query=torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"key_cache must be \[T_max, 2, 2, 8\]"):
        call(key_cache=torch.randn(5, 2, 8))
    with pytest.raises(ValueError, match="value_cache must match key_cache"):
        call(value_cache=torch.randn(4, 2, 2, 8))
    with pytest.raises(ValueError, match=r"key_pos_bias must be \[8, 2\]"):
        call(key_pos_bias=torch.randn(7, 2))
    with pytest.raises(ValueError, match=r"steps must be in \[1, min\(T_max=5, P=8\)\]"):
        call(steps=0)
    with pytest.raises(ValueError, match="steps must be in"):
        call(steps=6)
    with pytest.raises(TypeError, match="steps must be an int"):
        call(steps=2.0)
    with pytest.raises(TypeError, match="query_pos_bias dtype torch.float64 must equal"):
        call(query_pos_bias=torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="must be a floating tensor"):
        call(**{k: v.long() for k, v in good.items()})
    with pytest.raises(ValueError, match="all must share a device"):
        call(key_pos_bias=torch.randn(8, 2, device="meta"))
    with pytest.raises(TypeError, match="key_cache must be a torch.Tensor"):
        call(key_cache=[[1.0]])


def test_cpp_kernel_checks_inputs():
    assert fastformers.extension_available()
    good = make_inputs(3, 2, 2, 8, torch.float32)
    with pytest.raises(RuntimeError, match=r"steps must be in \[1"):
        torch.ops.fastformers.feedback_attention_step(good["query"], good["key_cache"], good["value_cache"], 9,
                                                      good["key_pos_embeddings"], good["key_pos_bias"],
                                                      good["query_pos_bias"], 0.5)
    with pytest.raises(RuntimeError, match="key_pos_bias must be"):
        torch.ops.fastformers.feedback_attention_step(good["query"], good["key_cache"], good["value_cache"], 2,
                                                      good["key_pos_embeddings"], torch.randn(3, 2),
                                                      good["query_pos_bias"], 0.5)
