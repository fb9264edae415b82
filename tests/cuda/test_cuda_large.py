"""Ops at sizes whose index products pass 2^31 elements (GPU only, where the
free memory allows): each op runs on the whole tensors, then a slice whose
elements sit past 2^31 (the last batch entry, the last tokens) is checked
against the float64 reference run on that slice alone. A kernel computing
an offset in int32 reads or writes the wrong elements there."""
import pytest
import torch

from cuda_check import BACKEND, DEVICE, free_device_bytes
from fastformers.ops.compressive import naive as compressive_naive
from fastformers.ops.compressive.op import conv_compress
from fastformers.ops.feedback import naive as feedback_naive
from fastformers.ops.feedback.op import feedback_memory
from fastformers.ops.feedback.step_op import feedback_attention_step
from fastformers.ops.switch import route, switch_mlp
from fastformers.ops.xl import naive as xl_naive
from fastformers.ops.xl.op import rel_attention

INT32_LIMIT = 2**31
DTYPE = torch.bfloat16
# bf16 against a float64 reference on bf16 inputs: the kernels accumulate in float32.
TOLERANCE = dict(atol=3e-2, rtol=3e-2)
GIB = 2**30


def needs(gib: float):
    if free_device_bytes() < gib * GIB:
        pytest.skip(f"needs {gib:g} GiB of free GPU memory, {free_device_bytes() / GIB:.1f} GiB free")


def big(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEVICE, dtype=DTYPE) * scale).requires_grad_()


def reference_on(fn, inputs, grad_output):
    """Output and input gradients of ``fn`` in float64 on (slices of) ``inputs``."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_output.double())
    return out.detach(), grads


def close(name, got, expected):
    torch.testing.assert_close(got.double(), expected, **TOLERANCE, msg=lambda m: f"{name}: {m}")


# K * B * H * d = 2048 * 4096 * 8 * 64 = 2^32 elements in key and value.
SHAPES = dict(rel_attention=(512, 1536, 4096, 8, 64),
              feedback_memory=(3, 2**15, 2**15),  # 3 * 2^30 elements
              feedback_attention_step=(8192, 1024, 8, 64),  # the caches hold 2^32 elements each
              conv_compress=(1024, 2048, 1536, 4),  # mem holds 3 * 2^30 elements
              switch=(2**20, 512, 4096, 8))  # hidden [T, d_ff] = 2^32 elements
GIB_NEEDED = dict(rel_attention=44, feedback_memory=20, feedback_attention_step=52, conv_compress=20, switch=48)

# The tensor whose offsets pass 2^31, as a function of each op's shape.
LARGEST_ELEMENTS = dict(rel_attention=lambda L, M, B, H, d: (L + M) * B * H * d,
                        feedback_memory=lambda L, B, D: L * B * D,
                        feedback_attention_step=lambda T, B, H, d: T * B * H * d,
                        conv_compress=lambda M, B, D, c: M * B * D,
                        switch=lambda T, d, d_ff, E: T * d_ff)
gpu_only = pytest.mark.skipif(DEVICE != "cuda", reason="GPU only: sizes past 2^31 elements")


def sized(op: str) -> tuple:
    """The shape of ``op``'s test, once the GPU is known to have room for it."""
    needs(GIB_NEEDED[op])
    return SHAPES[op]


def test_every_shape_passes_int32():
    for op, shape in SHAPES.items():
        assert LARGEST_ELEMENTS[op](*shape) > INT32_LIMIT, op


@gpu_only
def test_rel_attention_keys_past_int32():
    L, M, B, H, d = sized("rel_attention")
    K = L + M
    q, k, v = big(L, B, H, d), big(K, B, H, d), big(K, B, H, d)
    pe, pb, u = big(K + L - 1, H, d, scale=0.5), big(K + L - 1, H, scale=0.5), big(H, d, scale=0.5)
    scale = d ** -0.5
    out = rel_attention(q, k, v, pe, pb, u, scale, backend=BACKEND)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    last = slice(B - 1, B)  # its key elements sit at offsets up to 2^32
    expected_out, expected = reference_on(
        lambda q_, k_, v_: xl_naive.rel_attention(q_, k_, v_, pe.detach().double(), pb.detach().double(),
                                                  u.detach().double(), scale),
        (q[:, last], k[:, last], v[:, last]), grad_out[:, last])
    close("out", out[:, last].detach(), expected_out)
    for name, got, want in zip(("grad query", "grad key", "grad value"), grads, expected):
        close(name, got[:, last], want)


@gpu_only
def test_feedback_memory_past_int32():
    L, B, D = sized("feedback_memory")
    x, w = big(L, B, D), big(L)
    out = feedback_memory(x, w, backend=BACKEND)
    grad_out = torch.randn_like(out)
    grad_x, grad_w = torch.autograd.grad(out, (x, w), grad_out)
    last = slice(B - 4, B)
    expected_out, (expected_grad_x, _) = reference_on(feedback_naive.feedback_memory, (x[:, last], w), grad_out[last])
    close("out", out[last].detach(), expected_out)
    close("grad layer_outputs", grad_x[:, last], expected_grad_x)
    assert torch.isfinite(grad_w).all()


@gpu_only
def test_feedback_attention_step_cache_past_int32():
    steps, B, H, d = sized("feedback_attention_step")
    q, k, v = big(B, H, d), big(steps, B, H, d), big(steps, B, H, d)
    r, s, u = big(steps, H, d, scale=0.5), big(steps, H, scale=0.5), big(H, d, scale=0.5)
    scale = d ** -0.5
    out = feedback_attention_step(q, k, v, steps, r, s, u, scale, backend=BACKEND)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    last = slice(B - 1, B)
    expected_out, expected = reference_on(
        lambda q_, k_, v_: feedback_naive.feedback_attention_step(
            q_, k_, v_, steps, r.detach().double(), s.detach().double(), u.detach().double(), scale),
        (q[last], k[:, last], v[:, last]), grad_out[last])
    close("out", out[last].detach(), expected_out)
    for name, got, want in zip(("grad query", "grad key cache", "grad value cache"), grads,
                               expected):
        close(name, got[last] if name == "grad query" else got[:, last], want)


@gpu_only
def test_conv_compress_past_int32():
    M, B, D, c = sized("conv_compress")
    mem, weight, bias = big(M, B, D), big(D, D, c, scale=(D * c) ** -0.5), big(D, scale=0.1)
    out = conv_compress(mem, weight, bias, backend=BACKEND)
    grad_out = torch.randn_like(out)
    grad_mem, grad_weight = torch.autograd.grad(out, (mem, weight), grad_out)
    last = slice(B - 2, B)
    expected_out, (expected_grad_mem,) = reference_on(
        lambda m: compressive_naive.conv_compress(m, weight.detach().double(), bias.detach().double()),
        (mem[:, last],), grad_out[:, last])
    close("out", out[:, last].detach(), expected_out)
    close("grad mem", grad_mem[:, last], expected_grad_mem)
    assert torch.isfinite(grad_weight).all()


@gpu_only
def test_switch_hidden_past_int32():
    T, d, d_ff, E = sized("switch")
    x = big(T, d)
    w1, b1 = big(E, d_ff, d, scale=d ** -0.5), big(E, d_ff, scale=0.1)
    w2, b2 = big(E, d, d_ff, scale=d_ff ** -0.5), big(E, d, scale=0.1)
    scale = torch.rand(T, device=DEVICE, dtype=DTYPE).requires_grad_()
    routing = route(torch.randn(T, E, device=DEVICE), 1.0, False)  # every token kept
    y = switch_mlp(x, routing, w1, b1, w2, b2, scale, "relu", backend=BACKEND)
    grad_y = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, (x,), grad_y)
    tokens = torch.arange(T - 64, T, device=DEVICE)  # their hidden rows sit past 2^31

    def per_token(x_rows):
        e = routing.route[tokens]
        hidden = torch.relu(torch.einsum("tfd,td->tf", w1[e].detach().double(), x_rows) + b1[e].detach().double())
        out = torch.einsum("tdf,tf->td", w2[e].detach().double(), hidden) + b2[e].detach().double()
        return out * scale[tokens].detach().double()[:, None]

    expected_y, (expected_grad_x,) = reference_on(per_token, (x[tokens],), grad_y[tokens])
    close("y", y[tokens].detach(), expected_y)
    close("grad x", grad_x[tokens], expected_grad_x)

