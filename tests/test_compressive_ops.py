"""The Compressive Transformer ops, conv_compress and attention_reconstruction_loss:
every fused backend against the labml-formulated reference."""
import math

import pytest
import torch
from torch.library import opcheck

import fastformers
from fastformers.nn import AttentionReconstructionLoss, CompressiveTransformer, CompressiveTransformerLayer
from fastformers.nn import Conv1dCompression, FeedForward, RelativeMultiHeadAttention
from fastformers.ops.compressive import naive
from harness import assert_parity

FUSED_BACKENDS = [name for name in ("cpp",) if name in fastformers.available_backends()]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ conv_compress


def conv_inputs(rate, mem_len, batch, d_model, dtype, bias=True):
    # The weight gradient sums M/c * B products: scaling the memory by its square
    # root keeps that sum O(1), where the fixed float32 tolerances are meaningful.
    mem = (torch.randn(mem_len, batch, d_model) / math.sqrt(mem_len // rate * batch)).to(dtype)
    weight = (torch.randn(d_model, d_model, rate) / math.sqrt(d_model * rate)).to(dtype)
    return (mem, weight, torch.randn(d_model, dtype=dtype)) if bias else (mem, weight)


def _conv_lengths():
    # M in {c, 4c, 128}; 128 is not a multiple of 3, so that rate uses 126.
    return [(c, m) for c in (1, 2, 3, 4) for m in sorted({c, 4 * c, 128 // c * c})]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("d_model", [24, 128])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("rate,mem_len", _conv_lengths())
def test_conv_compress_matches_reference(backend, dtype, d_model, batch, rate, mem_len):
    assert_parity(
        lambda m, w, b: fastformers.ops.conv_compress(m, w, b, backend=backend),
        naive.conv_compress,
        conv_inputs(rate, mem_len, batch, d_model, dtype),
    )


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("rate,mem_len,batch,d_model", [(2, 8, 3, 24), (3, 9, 1, 128)])
def test_conv_compress_bfloat16(backend, rate, mem_len, batch, d_model):
    assert_parity(
        lambda m, w, b: fastformers.ops.conv_compress(m, w, b, backend=backend),
        naive.conv_compress,
        conv_inputs(rate, mem_len, batch, d_model, torch.bfloat16),
    )


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_conv_compress_without_bias(backend):
    assert_parity(
        lambda m, w: fastformers.ops.conv_compress(m, w, backend=backend),
        lambda m, w: naive.conv_compress(m, w, None),
        conv_inputs(2, 6, 3, 24, torch.float64, bias=False),
    )


def test_conv_compress_reads_strided_memory():
    mem, weight, bias = conv_inputs(2, 8, 3, 24, torch.float64)
    strided = torch.randn(3, 8, 48, dtype=torch.float64).transpose(0, 1)[..., ::2]
    expected = naive.conv_compress(strided, weight, bias)
    torch.testing.assert_close(fastformers.ops.conv_compress(strided, weight, bias, backend="cpp"), expected)
    assert mem.is_contiguous()


# ------------------------------------------------------------------ reconstruction loss


def loss_inputs(seq_len, mem_len, rate, batch, d_model, dtype, heads=4):
    """(h, mem, c_mem, norm weight, norm bias, Wq, Wk, Wv, bv) as labml's layer holds them:
    no query/key bias in relative attention, a value bias."""
    gen = torch.Generator().manual_seed(seq_len * 1000 + mem_len)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    w_scale = 1 / math.sqrt(d_model)
    return (
        rand(seq_len, batch, d_model), rand(mem_len, batch, d_model), rand(mem_len // rate, batch, d_model),
        1 + rand(d_model, scale=0.3), rand(d_model, scale=0.3),
        rand(d_model, d_model, scale=w_scale), rand(d_model, d_model, scale=w_scale),
        rand(d_model, d_model, scale=w_scale), rand(d_model, scale=0.3),
    )


def loss_fn(heads, backend=None, reference=False):
    def run(h, mem, c_mem, ln_w, ln_b, wq, wk, wv, bv):
        args = (h, mem, c_mem, ln_w, ln_b, 1e-5, wq, None, wk, None, wv, bv, heads, 1 / math.sqrt(h.shape[-1] // heads))
        if reference:
            return naive.attention_reconstruction_loss(*args)
        return fastformers.ops.attention_reconstruction_loss(*args, backend=backend)

    return run


LOSS_SHAPES = [  # (L, M, c, B, D)
    (1, 4, 2, 1, 24),
    (8, 8, 2, 3, 24),
    (8, 8, 2, 1, 128),
    (64, 24, 3, 3, 24),
    (64, 128, 4, 1, 128),
    (8, 130, 2, 3, 24),  # more than two key tiles, a partial last one
]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=str)
def test_loss_matches_reference(backend, dtype, shape):
    seq_len, mem_len, rate, batch, d_model = shape
    h, mem, c_mem, *layer = loss_inputs(seq_len, mem_len, rate, batch, d_model, dtype)
    if dtype in (torch.float64, torch.float32):
        # Every input is offered a gradient: only c_mem may get one.
        assert_parity(loss_fn(4, backend), loss_fn(4, reference=True), (h, mem, c_mem, *layer))
        return
    # The low-precision rule compares every gradient with a float64 oracle, so
    # only the one input that has a gradient is passed as an input.
    fused, reference = loss_fn(4, backend), loss_fn(4, reference=True)
    others = (h, mem)

    def like(c, fn):  # the float64 oracle run gets float64 copies of the same values
        h_, mem_, *layer_ = (t.to(c.dtype) for t in (*others, *layer))
        return fn(h_, mem_, c, *layer_)

    assert_parity(lambda c: like(c, fused), lambda c: like(c, reference), (c_mem,))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_loss_without_affine_norm_or_biases(backend):
    h, mem, c_mem, *_ = loss_inputs(5, 6, 2, 2, 24, torch.float64)
    weights = [torch.randn(24, 24, dtype=torch.float64) / 5 for _ in range(3)]

    def run(reference):
        def fn(h, mem, c_mem):
            args = (h, mem, c_mem, None, None, 1e-6, weights[0], None, weights[1], None, weights[2], None, 3, 0.4)
            if reference:
                return naive.attention_reconstruction_loss(*args)
            return fastformers.ops.attention_reconstruction_loss(*args, backend=backend)

        return fn

    assert_parity(run(False), run(True), (h, mem, c_mem))


def _compressive_model(d_model=24, heads=4, rate=2):
    layer = CompressiveTransformerLayer(
        d_model=d_model, self_attn=RelativeMultiHeadAttention(heads, d_model, 0.0),
        feed_forward=FeedForward(d_model, 2 * d_model, 0.0), dropout_prob=0.0,
        compress=Conv1dCompression(rate, d_model))
    return CompressiveTransformer(layer, 2).double()


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
def test_only_the_compression_gets_gradients(backend):
    model = _compressive_model()
    loss_module = AttentionReconstructionLoss(model.layers)
    loss_module.backend = backend
    h = [torch.randn(8, 3, 24, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    mem = [torch.randn(8, 3, 24, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    loss_module(h, mem).backward()
    assert loss_module.last_backend == backend
    assert all(layer.compress.last_backend == backend for layer in model.layers)
    for name, param in model.named_parameters():
        if ".compress." in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    assert all(t.grad is None for t in h + mem)


def test_module_backends_agree():
    model = _compressive_model()
    h = [torch.randn(8, 3, 24, dtype=torch.float64) for _ in range(2)]
    mem = [torch.randn(8, 3, 24, dtype=torch.float64) for _ in range(2)]
    grads = {}
    for backend in ["reference", *FUSED_BACKENDS]:
        model.zero_grad(set_to_none=True)
        loss_module = AttentionReconstructionLoss(model.layers)
        loss_module.backend = backend
        loss = loss_module(h, mem)
        loss.backward()
        grads[backend] = (loss.detach(), [p.grad.clone() for p in model.layers[0].compress.parameters()])
    ref_loss, ref_grads = grads["reference"]
    for backend, (loss, got) in grads.items():
        torch.testing.assert_close(loss, ref_loss)
        for a, b in zip(got, ref_grads):
            torch.testing.assert_close(a, b)


def test_conv1d_compression_module_backend():
    module = Conv1dCompression(3, 24).double()
    mem = torch.randn(7, 2, 24, dtype=torch.float64)
    expected = module.conv(mem.permute(1, 2, 0)).permute(2, 0, 1)
    for backend in ["reference", *FUSED_BACKENDS]:
        module.backend = backend
        # 7 memories at rate 3: like nn.Conv1d, the incomplete last group is left out.
        torch.testing.assert_close(module(mem), expected)
        assert module.last_backend == backend
    module.backend = None
    module(mem)
    assert module.last_backend == fastformers.resolve_backend(mem.device)


# ------------------------------------------------------------------ op contract


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype):
    mem, weight, bias = conv_inputs(2, 6, 3, 8, dtype)
    opcheck(torch.ops.fastformers.conv_compress.default,
            (mem.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()))
    opcheck(torch.ops.fastformers.conv_compress.default, (mem.detach(), weight.detach(), None))
    grad = torch.randn(3, 3, 8, dtype=dtype)
    opcheck(torch.ops.fastformers.conv_compress_backward.default, (grad, mem.detach(), weight.detach(), True))

    h, mem, c_mem, ln_w, ln_b, wq, wk, wv, bv = loss_inputs(5, 6, 2, 2, 8, dtype, heads=2)
    args = (h, mem, c_mem.requires_grad_(), ln_w, ln_b, 1e-5, wq, None, wk, None, wv, bv, 2, 0.5)
    opcheck(torch.ops.fastformers.attention_reconstruction_loss.default, args)
    _, diff, stats = torch.ops.fastformers.attention_reconstruction_loss(*args)
    opcheck(torch.ops.fastformers.attention_reconstruction_loss_backward.default,
            (torch.tensor(1.5, dtype=dtype), h, c_mem.detach(), *args[3:14], diff, stats))


def test_torch_compile_fullgraph():
    mem, weight, bias = conv_inputs(2, 8, 3, 24, torch.float32)
    h, _, _, ln_w, ln_b, wq, wk, wv, bv = loss_inputs(8, 8, 2, 3, 24, torch.float32)
    weight.requires_grad_()

    def step(compress, m, w):
        c_mem = compress(m, w, bias)
        args = (h, m, c_mem, ln_w, ln_b, 1e-5, wq, None, wk, None, wv, bv, 4, 1 / math.sqrt(6))
        return attention(*args)

    compress = lambda m, w, b: torch.ops.fastformers.conv_compress(m, w, b)  # noqa: E731
    attention = lambda *args: torch.ops.fastformers.attention_reconstruction_loss(*args)[0]  # noqa: E731
    compiled = torch.compile(lambda m, w: step(compress, m * 1, w), fullgraph=True)(mem, weight)
    (compiled_grad,) = torch.autograd.grad(compiled, weight)
    compress, attention = naive.conv_compress, naive.attention_reconstruction_loss
    expected = step(compress, mem, weight)
    (expected_grad,) = torch.autograd.grad(expected, weight)
    torch.testing.assert_close(compiled, expected)
    torch.testing.assert_close(compiled_grad, expected_grad)


def test_double_backward_raises():
    mem, weight, bias = conv_inputs(2, 4, 2, 8, torch.float64)
    mem.requires_grad_()
    out = torch.ops.fastformers.conv_compress(mem, weight, bias)
    (grad,) = torch.autograd.grad(out.sum(), mem, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grad.sum().backward()


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
def test_conv_bad_input(backend):
    op = lambda *a: fastformers.ops.conv_compress(*a, backend=backend)  # noqa: E731
    mem, weight, bias = conv_inputs(3, 6, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="mem length 7 is not a positive multiple of the compression rate 3"):
        op(torch.randn(7, 2, 8), weight, bias)
    with pytest.raises(ValueError, match=r"mem must be \[mem_len, batch, d_model\]"):
        op(torch.randn(6, 8), weight, bias)
    with pytest.raises(ValueError, match=r"weight must be \[d_out, d_model = 8, compression_rate\]"):
        op(mem, torch.randn(8, 7, 3), bias)
    with pytest.raises(ValueError, match=r"bias must be \[d_out\] = \[8\]"):
        op(mem, weight, torch.randn(5))
    with pytest.raises(TypeError, match="weight dtype torch.float64 must equal"):
        op(mem, weight.double(), bias)
    with pytest.raises(TypeError, match="must be a floating tensor"):
        op(mem.long(), weight, bias)
    with pytest.raises(ValueError, match="all tensors must share a device"):
        op(mem, weight.to("meta"), bias)
    with pytest.raises(TypeError, match="mem must be a torch.Tensor"):
        op([[1.0]], weight, bias)


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
def test_loss_bad_input(backend):
    h, mem, c_mem, ln_w, ln_b, wq, wk, wv, bv = loss_inputs(5, 6, 2, 2, 8, torch.float32, heads=2)

    def op(**changes):
        args = dict(h=h, mem=mem, c_mem=c_mem, norm_weight=ln_w, norm_bias=ln_b, eps=1e-5, query_weight=wq,
                    query_bias=None, key_weight=wk, key_bias=None, value_weight=wv, value_bias=bv, heads=2, scale=0.5)
        args.update(changes)
        return fastformers.ops.attention_reconstruction_loss(**args, backend=backend)

    with pytest.raises(ValueError, match=r"h must be \[seq_len, batch, d_model\]"):
        op(h=h[0])
    with pytest.raises(ValueError, match=r"c_mem must be \[c_mem_len > 0, batch = 2, d_model = 8\]"):
        op(c_mem=c_mem[:, :1])
    with pytest.raises(ValueError, match=r"mem must be \[mem_len > 0"):
        op(mem=mem[:0])
    with pytest.raises(ValueError, match=r"query_weight must be \[heads \* d_k, d_model = 8\] with heads = 3"):
        op(heads=3)
    with pytest.raises(ValueError, match=r"key_weight must be \[8, 8\]"):
        op(key_weight=wk[:4])
    with pytest.raises(ValueError, match=r"value_bias must be \[8\]"):
        op(value_bias=bv[:3])
    with pytest.raises(TypeError, match="c_mem dtype torch.float64 must equal"):
        op(c_mem=c_mem.double())
    with pytest.raises(ValueError, match="heads must be a positive int"):
        op(heads=0)


def test_cpp_kernels_check_inputs():
    with pytest.raises(RuntimeError, match="is not a multiple of the compression rate 3"):
        torch.ops.fastformers.conv_compress(torch.randn(7, 2, 8), torch.randn(8, 8, 3), None)
    with pytest.raises(RuntimeError, match="grad must be"):
        torch.ops.fastformers.conv_compress_backward(torch.randn(3, 2, 8), torch.randn(6, 2, 8), torch.randn(8, 8, 3),
                                                     True)
    h = torch.randn(4, 2, 8)
    w = torch.randn(8, 8)
    with pytest.raises(RuntimeError, match=r"c_mem must be \[c_mem_len, 2, 8\]"):
        torch.ops.fastformers.attention_reconstruction_loss(h, h, torch.randn(3, 1, 8), None, None, 1e-5, w, None, w,
                                                            None, w, None, 2, 0.5)
