"""Relative-position attention (Transformer-XL): the C++ kernels and the op's
reference formulas against the reference. The Triton backend of this op is
tested beside its kernels (tests/test_rel_attention_triton.py)."""
import warnings

import pytest
import torch
from torch.library import opcheck

import fastformers
from fastformers.ops.xl import naive, op
from harness import assert_parity

pytestmark = [
    pytest.mark.skipif("cpp" not in fastformers.available_backends(), reason="needs the C++ extension"),
    pytest.mark.usefixtures("one_thread"),
]

# (L, M, B, H, d): every value of L in {1, 7, 64}, M in {0, 5, 128}, B in {1, 3},
# H in {1, 4}, d in {24, 64} appears, including L = 1 decode steps with memory
# and a query tile boundary (kernel tile 64; L = 70 spans two).
SHAPES = [
    (1, 0, 1, 1, 24),
    (1, 128, 3, 4, 64),
    (1, 5, 1, 4, 24),
    (7, 0, 3, 4, 24),
    (7, 5, 1, 1, 64),
    (7, 128, 3, 1, 24),
    (64, 0, 1, 4, 64),
    (64, 5, 3, 1, 24),
    (64, 128, 1, 1, 64),
    (70, 5, 1, 1, 24),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def make_inputs(L, M, B, H, d, dtype=torch.float64, generator=None):
    K = M + L

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    return rand(L, B, H, d), rand(K, B, H, d), rand(K, B, H, d), rand(K + L - 1, H, d), rand(K + L - 1, H), rand(H, d)


def cpp(scale, causal=True, mask=None):
    return lambda *x: fastformers.ops.rel_attention(*x, scale, causal=causal, mask=mask, backend="cpp")


def reference(scale, causal=True, mask=None):
    return lambda *x: naive.rel_attention(*x, scale, causal=causal, mask=mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpp_matches_reference(shape, dtype):
    if dtype == torch.bfloat16 and shape[0] * (shape[0] + shape[1]) > 64 * 69:
        pytest.skip("bfloat16 covered on the smaller shapes (the float64 oracle is the slow part)")
    inputs = make_inputs(*shape, dtype=dtype, generator=torch.Generator().manual_seed(sum(shape)))
    scale = shape[-1] ** -0.5
    assert_parity(cpp(scale), reference(scale), inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(7, 5, 3, 4, 24), (70, 0, 1, 1, 24)], ids=str)
def test_cpp_not_causal(shape, dtype):
    inputs = make_inputs(*shape, dtype=dtype)
    assert_parity(cpp(0.2, causal=False), reference(0.2, causal=False), inputs)


@pytest.mark.parametrize("mask_shape", [(7, 12, 3), (1, 12, 1), (7, 12, 1)], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_cpp_explicit_mask(mask_shape, causal):
    inputs = make_inputs(7, 5, 3, 2, 24)
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[:, 0] = True  # every query keeps a visible key
    assert_parity(cpp(0.3, causal, mask), reference(0.3, causal, mask), inputs)


def test_cpp_strided_inputs():
    """Key and value as views of one fused projection [K, B, 2, H, d] (no copies)."""
    q, k, v, pe, pb, u = make_inputs(7, 5, 3, 4, 24)
    kv = torch.stack((k, v), dim=2)

    def fused(q, kv, pe, pb, u):
        return fastformers.ops.rel_attention(q, kv[:, :, 0], kv[:, :, 1], pe, pb, u, 0.2, backend="cpp")

    def ref(q, kv, pe, pb, u):
        return naive.rel_attention(q, kv[:, :, 0], kv[:, :, 1], pe, pb, u, 0.2)

    assert_parity(fused, ref, (q, kv, pe, pb, u))


@pytest.mark.parametrize("causal,masked", [(True, False), (False, True)])
def test_reference_formulas_match_kernel(causal, masked):
    """The op's reference registration (other devices, CPU without the extension)."""
    inputs = make_inputs(7, 5, 3, 2, 24)
    mask = (torch.rand(7, 12, 3) > 0.4) if masked else None
    if mask is not None:
        mask[:, 0] = True
    out, lse = torch.ops.fastformers.rel_attention(*inputs, 0.3, causal, mask)
    ref_out, ref_lse = op.reference_forward(*inputs, 0.3, causal, mask)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    torch.testing.assert_close(out, naive.rel_attention(*inputs, 0.3, mask=mask, causal=causal))
    grad = torch.randn_like(out)
    kernel_grads = torch.ops.fastformers.rel_attention_backward(grad, *inputs, out, lse, 0.3, causal, mask)
    reference_grads = op.reference_backward(grad, *inputs, out, lse, 0.3, causal, mask)
    for got, expected in zip(kernel_grads, reference_grads):
        torch.testing.assert_close(got, expected)


def test_lse_precision():
    for dtype, lse_dtype in [(torch.float64, torch.float64), (torch.float32, torch.float32),
                             (torch.bfloat16, torch.float32)]:
        _, lse = torch.ops.fastformers.rel_attention(*make_inputs(3, 2, 1, 1, 8, dtype), 0.5, True, None)
        assert lse.dtype == lse_dtype and lse.shape == (1, 1, 3)


@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(masked):
    inputs = make_inputs(5, 3, 2, 2, 8, torch.float32)
    mask = None
    if masked:
        mask = torch.rand(5, 8, 1) > 0.3
        mask[:, 0] = True
    opcheck(torch.ops.fastformers.rel_attention.default,
            (*[t.requires_grad_() for t in inputs], 0.35, not masked, mask))
    detached = [t.detach() for t in inputs]
    out, lse = torch.ops.fastformers.rel_attention(*detached, 0.35, not masked, mask)
    opcheck(torch.ops.fastformers.rel_attention_backward.default,
            (torch.randn_like(out), *detached, out, lse, 0.35, not masked, mask))


def test_torch_compile_fullgraph():
    inputs = [t.float().requires_grad_() for t in make_inputs(7, 5, 2, 2, 8)]

    @torch.compile(fullgraph=True)
    def step(q, k, v, pe, pb, u):
        out, _ = torch.ops.fastformers.rel_attention(q * 2, k, v, pe, pb, u, 0.3, True, None)
        return (out * out).sum()

    compiled = step(*inputs)
    compiled.backward()
    compiled_grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    q, k, v, pe, pb, u = inputs
    expected = (naive.rel_attention(q * 2, k, v, pe, pb, u, 0.3) ** 2).sum()
    expected.backward()
    torch.testing.assert_close(compiled, expected)
    for got, t in zip(compiled_grads, inputs):
        torch.testing.assert_close(got, t.grad)


def test_double_backward_raises():
    q, *rest = make_inputs(3, 2, 1, 1, 4)
    q.requires_grad_()
    out, _ = torch.ops.fastformers.rel_attention(q, *rest, 0.5, True, None)
    (grad,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grad.sum().backward()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_bad_input(backend):
    q, k, v, pe, pb, u = make_inputs(3, 2, 2, 2, 4, torch.float32)

    def call(*args, **kwargs):
        return fastformers.ops.rel_attention(*args, 0.5, backend=backend, **kwargs)

    with pytest.raises(ValueError, match=r"query must be \[L, B, H, d\]"):
        call(q[0], k, v, pe, pb, u)
    with pytest.raises(ValueError, match=r"key must be \[K, B, H, d\] = \[K, 2, 2, 4\]"):
        call(q, k[:, :1], v, pe, pb, u)
    with pytest.raises(ValueError, match="value must be"):
        call(q, k, v[1:], pe, pb, u)
    with pytest.raises(ValueError, match=r"pos_emb must be the position window \[K \+ L - 1, H, d\] = \[7, 2, 4\]"):
        call(q, k, v, pe[1:], pb, u)
    with pytest.raises(ValueError, match=r"pos_bias must be \[K \+ L - 1, H\] = \[7, 2\]"):
        call(q, k, v, pe, pb[:, :1], u)
    with pytest.raises(ValueError, match=r"query_pos_bias must be \[H, d\]"):
        call(q, k, v, pe, pb, u[0])
    with pytest.raises(ValueError, match="causal attention needs K = M \\+ L >= L"):
        call(q, k[:2], v[:2], pe[:4], pb[:4], u)
    with pytest.raises(TypeError, match="key dtype torch.float64 must equal query dtype"):
        call(q, k.double(), v, pe, pb, u)
    with pytest.raises(TypeError, match="must be a floating tensor"):
        call(q.long(), k.long(), v.long(), pe.long(), pb.long(), u.long())
    with pytest.raises(ValueError, match="all inputs must share a device"):
        call(q, k, v, pe.to("meta"), pb, u)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        call(q, k, v, pe, pb, u, mask=torch.ones(3, 5, 2))
    with pytest.raises(ValueError, match=r"mask must be \[L or 1, K, B or 1\] = \[3, 5, 2\]"):
        call(q, k, v, pe, pb, u, mask=torch.ones(3, 4, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="key must be a torch.Tensor"):
        call(q, [1.0], v, pe, pb, u)


def test_cpp_kernel_checks_inputs():
    q, k, v, pe, pb, u = make_inputs(3, 2, 2, 2, 4, torch.float32)
    with pytest.raises(RuntimeError, match=r"pos_emb must be \[K \+ L - 1, H, d\]"):
        torch.ops.fastformers.rel_attention(q, k, v, pe[1:], pb, u, 0.5, True, None)
    with pytest.raises(RuntimeError, match="causal attention needs"):
        torch.ops.fastformers.rel_attention(q, k[:2], v[:2], pe[:4], pb[:4], u, 0.5, True, None)
    out, lse = torch.ops.fastformers.rel_attention(q, k, v, pe, pb, u, 0.5, True, None)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.fastformers.rel_attention_backward(out, q, k, v, pe, pb, u, out, lse.double(), 0.5, True, None)


def test_fully_masked_row_is_nan_like_softmax():
    inputs = make_inputs(2, 1, 1, 1, 4)
    mask = torch.ones(2, 3, 1, dtype=torch.bool)
    mask[0] = False
    out = fastformers.ops.rel_attention(*inputs, 0.5, causal=False, mask=mask, backend="cpp")
    ref = naive.rel_attention(*inputs, 0.5, causal=False, mask=mask)
    assert out[0].isnan().all() and ref[0].isnan().all()
    torch.testing.assert_close(out[1], ref[1])


def test_triton_without_kernel_module_is_a_clear_error(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("fastformers.ops.xl.triton_kernel") is not None:
        pytest.skip("the Triton kernels are present")
    monkeypatch.setattr(fastformers._backend, "resolve_backend", lambda device, requested=None: "triton")
    with pytest.raises(RuntimeError, match="triton_kernel is missing"):
        fastformers.ops.rel_attention(*make_inputs(2, 1, 1, 1, 4), 0.5, backend="triton")


# ---------------------------------------------------------------- whole model

def test_transformer_xl_cpp_matches_labml_float32():
    """Whole TransformerXL (4 layers, memory) on the cpp backend vs labml_nn, float32."""
    pytest.importorskip("labml_nn")
    from labml import tracker
    from labml_nn.transformers import feed_forward as labml_ff
    from labml_nn.transformers import xl as labml_xl

    if not hasattr(tracker, "debug"):
        tracker.debug = lambda *args, **kwargs: None
    d_model, heads, L, M, B = 64, 4, 16, 24, 3

    def build(ns_attn, ns_ff, ns_xl):
        layer = ns_xl.TransformerXLLayer(d_model=d_model, self_attn=ns_attn(heads, d_model, 0.0),
                                         feed_forward=ns_ff(d_model, 128, 0.0), dropout_prob=0.0)
        return ns_xl.TransformerXL(layer, 4)

    ref = build(labml_xl.RelativeMultiHeadAttention, labml_ff.FeedForward, labml_xl)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    ours = build(fastformers.nn.RelativeMultiHeadAttention, fastformers.nn.FeedForward, fastformers.nn)
    ours.load_state_dict(ref.state_dict())
    for m in ours.modules():
        if isinstance(m, fastformers.nn.RelativeMultiHeadAttention):
            m.backend = "cpp"
    x = torch.randn(L, B, d_model, generator=generator)
    mem = [torch.randn(M, B, d_model, generator=generator) for _ in range(4)]
    mask = torch.cat((torch.ones(L, M, 1, dtype=torch.bool), torch.tril(torch.ones(L, L)).bool()[:, :, None]), dim=1)
    grad = torch.randn(L, B, d_model, generator=generator)
    outputs = []
    for model in (ref, ours):
        xi = x.clone().requires_grad_()
        out, _ = model(xi, mem, mask)
        out.backward(grad)
        outputs.append((out.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    assert all(m.last_backend == "cpp" for m in ours.modules() if hasattr(m, "last_backend"))
    (ref_out, ref_xgrad, ref_grads), (our_out, our_xgrad, our_grads) = outputs
    torch.testing.assert_close(our_out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(our_xgrad, ref_xgrad, atol=1e-4, rtol=1e-4)
    for name, expected in ref_grads.items():
        torch.testing.assert_close(our_grads[name], expected, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype,d,masked,expected", [
    (torch.float64, 24, True, "got torch.float64"),
    (torch.float32, 80, False, "d <= 64 for torch.float32"),
    (torch.bfloat16, 160, False, "d <= 128 for torch.bfloat16"),
], ids=["float64-masked", "float32-d80", "bfloat16-d160"])
def test_cuda_reference_route_warns_once_per_reason(monkeypatch, dtype, d, masked, expected):
    """The function registered for CUDA runs the reference for calls the
    kernels do not take (run here on CPU tensors: the route needs no GPU) and
    says so with one FallbackWarning per reason, not a log line."""
    from fastformers import _backend

    monkeypatch.setattr(_backend, "_warned_fallbacks", set())
    inputs = make_inputs(3, 2, 1, 2, d, dtype=dtype)
    mask = torch.ones(3, 5, 1, dtype=torch.bool) if masked else None
    with pytest.warns(_backend.FallbackWarning, match="op rel_attention runs the reference path") as record:
        out, _ = op._cuda_forward(*inputs, 0.3, True, mask)
    assert len(record) == 1 and expected in str(record[0].message)
    torch.testing.assert_close(out, op.reference_forward(*inputs, 0.3, True, mask)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op._cuda_forward(*inputs, 0.3, True, mask)
