"""Edge cases found by trying what users and reviewers try: zero-size inputs give the same
result on every backend, and a conversion that fails changes nothing."""
import pytest
import torch
from torch import nn

import fastformers
import fastformers.nn as ffnn
from fastformers.convert import convert
from fastformers.ops import feedback_memory

BACKENDS = [name for name in ("reference", "cpp") if name in fastformers.available_backends()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 8), (0, 0, 8), (3, 0, 8), (2, 3, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_feedback_memory_zero_size_matches_the_reference(backend, shape, dtype):
    # garbage from uninitialised memory would not be deterministic: fill the heap with a pattern first
    torch.full((1 << 16,), 6.7e15, dtype=dtype)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    w = torch.randn(shape[0], dtype=dtype, requires_grad=True)
    out = feedback_memory(x, w, backend=backend)
    expected = torch.zeros(shape[1:], dtype=dtype)
    assert torch.equal(out.detach(), expected)
    out.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


class Holder(nn.Module):
    """Two convertible siblings; the second one is broken."""

    def __init__(self):
        super().__init__()
        self.first = ffnn.FeedbackTransformer(_layer(), 1)
        self.second = ffnn.FeedbackTransformer(_layer(), 1)


def _layer():
    d, heads = 8, 2
    return ffnn.FeedbackTransformerLayer(d_model=d, attn=ffnn.FeedbackAttention(heads, d, 0.0),
                                         feed_forward=ffnn.FeedForward(d, 2 * d, 0.0), dropout_prob=0.0)


def test_a_failed_convert_leaves_the_model_untouched():
    pytest.importorskip("labml_nn")
    from labml_nn.transformers import feedback

    model = nn.ModuleDict({
        "good": feedback.FeedbackTransformer(_labml_layer(feedback), 1),
        "bad": feedback.FeedbackTransformer(_labml_layer(feedback), 1),
    })
    model["bad"].weights = nn.Parameter(torch.ones(5))
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"model\.bad .*weights has shape \(5,\)"):
        convert(model, backend="reference")
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert not hasattr(model["good"], "backend")


def _labml_layer(feedback):
    from labml_nn.transformers.feed_forward import FeedForward

    d, heads = 8, 2
    return feedback.FeedbackTransformerLayer(d_model=d, attn=feedback.FeedbackAttention(heads, d, 0.0),
                                             feed_forward=FeedForward(d, 2 * d, 0.0), dropout_prob=0.0)


def test_a_failed_convert_of_our_modules_sets_no_backend():
    model = Holder()
    model.second.weights = nn.Parameter(torch.ones(5))
    with pytest.raises(ValueError, match=r"model\.second"):
        convert(model, backend="reference")
    assert model.first.backend is None


def _xl(n_layers=2, d=8):
    layer = ffnn.TransformerXLLayer(d_model=d, self_attn=ffnn.RelativeMultiHeadAttention(2, d, 0.0),
                                    feed_forward=ffnn.FeedForward(d, 2 * d, 0.0), dropout_prob=0.0)
    return ffnn.TransformerXL(layer, n_layers)


def _mask(L, M):
    return torch.ones(L, M + L, 1, dtype=torch.bool).tril(M)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, message", [((0, 2, 8), "seq_len 0"), ((3, 0, 8), "batch 0"),
                                            ((3, 8), r"rank 3\), got shape \(3, 8\)"), ((3, 2, 6), "d_model 6")])
def test_transformer_xl_refuses_unusable_segments_the_same_way_on_every_backend(backend, shape, message):
    model = _xl()
    with fastformers.use_backend(backend), pytest.raises(ValueError, match=message):
        model(torch.randn(shape), [], _mask(max(shape[0], 1), 0))
    with fastformers.use_backend(backend), pytest.raises(ValueError, match=message):
        model.layers[0](x=torch.randn(shape), mem=None, mask=_mask(max(shape[0], 1), 0))


def test_transformer_xl_checks_its_memory():
    model = _xl()
    x = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match=r"mem\[1\] must be \[mem_len, batch = 2, d_model = 8\]"):
        model(x, [torch.randn(4, 2, 8), torch.randn(4, 3, 8)], _mask(3, 4))
    with pytest.raises(ValueError, match="mem has 1 entries, expected one per layer"):
        model(x, [torch.randn(4, 2, 8)], _mask(3, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rel_attention_fully_masked_row_is_nan_on_every_backend(backend):
    # labml_nn's softmax over no visible key gives NaN; every backend keeps that behaviour
    L, M, B, H, d = 3, 2, 2, 2, 4
    K = L + M
    inputs = (torch.randn(L, B, H, d), torch.randn(K, B, H, d), torch.randn(K, B, H, d),
              torch.randn(K + L - 1, H, d), torch.randn(K + L - 1, H), torch.randn(H, d))
    mask = torch.ones(L, K, B, dtype=torch.bool)
    mask[1] = False
    out = fastformers.ops.rel_attention(*inputs, 0.5, causal=True, mask=mask, backend=backend)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


@pytest.mark.skipif("triton" not in fastformers.available_backends(), reason="needs triton")
@pytest.mark.usefixtures("triton_interpreter")
def test_feedback_memory_triton_zero_layers_gives_zeros():
    # found by tests/test_properties.py (an IndexError once)
    out = feedback_memory(torch.randn(0, 2, 3), torch.randn(0), backend="triton")
    assert torch.equal(out, torch.zeros(2, 3))


@pytest.mark.skipif("triton" not in fastformers.available_backends(), reason="needs triton")
@pytest.mark.usefixtures("triton_interpreter")
def test_conv_compress_triton_reads_a_strided_bias_by_its_stride():
    # found by tests/test_properties.py (the bias was read as contiguous once)
    from fastformers.ops import conv_compress
    from fastformers.ops.compressive import naive

    mem, weight = torch.randn(2, 1, 3, dtype=torch.float64), torch.randn(4, 3, 2, dtype=torch.float64)
    bias = torch.randn(8, dtype=torch.float64)[::2]
    torch.testing.assert_close(conv_compress(mem, weight, bias, backend="triton"),
                               naive.conv_compress(mem, weight, bias))


@pytest.mark.skipif("triton" not in fastformers.available_backends(), reason="needs triton")
@pytest.mark.usefixtures("triton_interpreter")
def test_feedback_memory_triton_zero_layers_backward():
    x, w = torch.randn(0, 2, 3, requires_grad=True), torch.randn(0, requires_grad=True)
    feedback_memory(x, w, backend="triton").sum().backward()
    assert x.grad.shape == (0, 2, 3) and w.grad.shape == (0,)


def _feedback_kv(d=8, heads=2):
    layer = ffnn.FeedbackTransformerLayer(d_model=d, attn=ffnn.FeedbackAttention(heads, d, 0.0, is_kv_precomputed=True),
                                         feed_forward=ffnn.FeedForward(d, 2 * d, 0.0), dropout_prob=0.0)
    return ffnn.FeedbackTransformerKV(layer, 2, d, heads)


FEEDBACK_MODELS = {"FeedbackTransformer": lambda: ffnn.FeedbackTransformer(_layer(), 2),
                   "FeedbackTransformerKV": _feedback_kv}
UNUSABLE_SEQUENCES = [((0, 2, 8), "seq_len 0"), ((3, 0, 8), "batch 0"),
                      ((3, 8), r"rank 3\), got shape \(3, 8\)"), ((3, 2, 6), "d_model 6")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", FEEDBACK_MODELS)
@pytest.mark.parametrize("shape, message", UNUSABLE_SEQUENCES)
def test_feedback_refuses_empty_sequences_the_same_way_on_every_backend(backend, model, shape, message):
    # the reference raised a `stack` error for T = 0 or B = 0 where cpp returned an empty output
    module = FEEDBACK_MODELS[model]()
    with fastformers.use_backend(backend), pytest.raises(ValueError, match=message):
        module(torch.randn(shape))
    with fastformers.use_backend(backend), pytest.raises(ValueError, match=message):
        module.forward_with_state(torch.randn(shape))


def _compressive(d=8, heads=2, rate=2):
    layer = ffnn.CompressiveTransformerLayer(
        d_model=d, self_attn=ffnn.RelativeMultiHeadAttention(heads, d, 0.0),
        feed_forward=ffnn.FeedForward(d, 2 * d, 0.0), dropout_prob=0.0,
        compress=ffnn.Conv1dCompression(rate, d))
    return ffnn.CompressiveTransformer(layer, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, message", UNUSABLE_SEQUENCES)
def test_compressive_refuses_unusable_segments_the_same_way_on_every_backend(backend, shape, message):
    model = _compressive()
    mask = _mask(max(shape[0], 1), 0)
    with fastformers.use_backend(backend), pytest.raises(ValueError, match=message):
        model(torch.randn(shape), [], [], mask)
    with fastformers.use_backend(backend), pytest.raises(ValueError, match=message):
        model.layers[0](x=torch.randn(shape), mem=None, c_mem=None, mask=mask)
    loss = ffnn.AttentionReconstructionLoss(model.layers)
    with fastformers.use_backend(backend), pytest.raises(ValueError, match=message.replace("x", "h")):
        loss([torch.randn(shape)] * 2, [torch.randn(4, 2, 8)] * 2)


BLAS_DIM_NAMES = ("m", "n", "k", "lda", "ldb", "ldc")


@pytest.mark.skipif("cpp" not in fastformers.available_backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("name", BLAS_DIM_NAMES)
@pytest.mark.parametrize("value", [2**31, 2**40, -1])
def test_every_gemm_size_and_stride_is_checked_before_narrowing_to_int(name, value):
    # every C++ GEMM passes its sizes and row strides through this check; a
    # tensor (or a view's stride) past 2^31 cannot be allocated in a test
    dims = dict(zip(BLAS_DIM_NAMES, (3, 4, 5, 6, 7, 8)))
    assert torch.ops.fastformers._blas_dims(*dims.values()) == list(dims.values())
    dims[name] = value
    with pytest.raises(RuntimeError, match=rf"GEMM {name} = {value} does not fit the BLAS int"):
        torch.ops.fastformers._blas_dims(*dims.values())


@pytest.mark.skipif("cpp" not in fastformers.available_backends(), reason="needs the C++ extension")
def test_the_largest_blas_int_is_accepted():
    assert torch.ops.fastformers._blas_dims(2**31 - 1, 1, 1, 1, 1, 1)[0] == 2**31 - 1
