"""The Triton kernels of the Compressive Transformer ops under the interpreter,
against the reference: conv_compress (output and the memory, weight and bias
gradients) and the attention-reconstruction loss (loss and the c_mem gradient)."""
import math

import pytest
import torch

import fastformers
from fastformers import _backend
from fastformers.ops.compressive import naive
from fastformers.ops.compressive import op as compressive_op
import test_compressive_ops as cpu_tests
from harness import assert_parity
from test_compressive_ops import conv_inputs, loss_fn, loss_inputs

pytestmark = pytest.mark.usefixtures("one_thread", "triton_interpreter")


def triton_conv(mem, weight, bias=None):
    return fastformers.ops.conv_compress(mem, weight, bias, backend="triton")


# (c, M, B, d): every c in {1, 2, 3, 4} with M in {c, 4c, ~32} (30 for c = 3),
# B in {1, 3}, d = 24 (not a power of 2: partial feature tiles) and a few d = 128
# (several feature tiles); 32 rows of (group, batch) fill more than one row tile
# at B = 3 and M / c = 32.
CONV_CASES = [
    (1, 1, 1, 24), (1, 4, 3, 24), (1, 32, 3, 24),
    (2, 2, 3, 24), (2, 8, 1, 128), (2, 32, 1, 24),
    (3, 3, 1, 24), (3, 12, 3, 24), (3, 30, 3, 128),
    (4, 4, 3, 128), (4, 16, 1, 24), (4, 32, 3, 24),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda case: "c{}-M{}-B{}-d{}".format(*case))
def test_conv_compress_matches_reference(case, dtype):
    rate, mem_len, batch, d_model = case
    assert_parity(triton_conv, naive.conv_compress, conv_inputs(rate, mem_len, batch, d_model, dtype))


@pytest.mark.parametrize("case", [(2, 8, 3, 24), (3, 12, 1, 128)], ids=lambda case: "c{}-M{}-B{}-d{}".format(*case))
def test_conv_compress_bfloat16(case):
    assert_parity(triton_conv, naive.conv_compress, conv_inputs(*case, torch.bfloat16))


def test_conv_compress_without_bias():
    assert_parity(triton_conv, lambda m, w: naive.conv_compress(m, w, None), conv_inputs(2, 6, 3, 24, torch.float64,
                                                                                         bias=False))


def test_conv_compress_reads_strided_memory():
    _, weight, bias = conv_inputs(2, 8, 3, 24, torch.float64)
    strided = torch.randn(3, 8, 48, dtype=torch.float64).transpose(0, 1)[..., ::2]
    assert_parity(lambda m: triton_conv(m, weight, bias), lambda m: naive.conv_compress(m, weight, bias), (strided,))


def test_conv_weight_gradient_splits_rows():
    # 256 rows of (group, batch) at one feature tile: the weight and bias
    # gradients are summed over several row splits.
    from fastformers.ops.compressive import triton_kernel

    rows_per_split, splits = triton_kernel._row_splits(256, 64, 1)
    assert splits == 4 and rows_per_split == 64
    assert_parity(triton_conv, naive.conv_compress, conv_inputs(1, 64, 4, 8, torch.float64))


# (L, M, c, B, D) with 4 heads: L in {1, 8, 64}; d_k = 6 (padded to 16) and 32;
# 130 memories and 65 compressed ones span several key tiles, the last partial.
LOSS_SHAPES = [
    (1, 4, 2, 1, 24),
    (8, 8, 2, 3, 24),
    (64, 24, 3, 3, 24),
    (8, 130, 2, 1, 128),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=lambda shape: "L{}-M{}-c{}-B{}-D{}".format(*shape))
def test_loss_matches_reference(shape, dtype):
    # Every input is offered a gradient: only c_mem may get one.
    assert_parity(loss_fn(4, "triton"), loss_fn(4, reference=True), loss_inputs(*shape, dtype))


def test_loss_bfloat16():
    h, mem, c_mem, *layer = loss_inputs(8, 8, 2, 3, 24, torch.bfloat16)

    def like(c, fn):  # the float64 oracle run gets float64 copies of the same values
        return fn(*(t.to(c.dtype) for t in (h, mem)), c, *(t.to(c.dtype) for t in layer))

    assert_parity(lambda c: like(c, loss_fn(4, "triton")), lambda c: like(c, loss_fn(4, reference=True)), (c_mem,))


def test_loss_without_affine_norm_or_biases():
    h, mem, c_mem, *_ = loss_inputs(5, 6, 2, 2, 24, torch.float64)
    weights = [torch.randn(24, 24, dtype=torch.float64) / 5 for _ in range(3)]

    def run(backend):
        def fn(h, mem, c_mem):
            args = (h, mem, c_mem, None, None, 1e-6, weights[0], None, weights[1], None, weights[2], None, 3, 0.4)
            if backend == "reference":
                return naive.attention_reconstruction_loss(*args)
            return fastformers.ops.attention_reconstruction_loss(*args, backend=backend)

        return fn

    assert_parity(run("triton"), run("reference"), (h, mem, c_mem))


def test_loss_with_every_bias_and_projections_narrower_than_the_model():
    # E = H * d_k = 12 features from d_model = 20, query/key/value biases all present.
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    d_model, features, heads = 20, 12, 3

    def run(backend):
        def fn(h, mem, c_mem, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv):
            args = (h, mem, c_mem, norm_weight, norm_bias, 1e-5, wq, bq, wk, bk, wv, bv, heads, 0.5)
            if backend == "reference":
                return naive.attention_reconstruction_loss(*args)
            return fastformers.ops.attention_reconstruction_loss(*args, backend=backend)

        return fn

    projections = [t for _ in range(3) for t in (rand(features, d_model) / 4, rand(features))]
    inputs = (rand(5, 2, d_model), rand(6, 2, d_model), rand(3, 2, d_model), rand(d_model), rand(d_model), *projections)
    assert_parity(run("triton"), run("reference"), inputs)


def test_only_the_compression_gets_gradients_from_the_loss():
    cpu_tests.test_only_the_compression_gets_gradients("triton")


def test_cuda_implementations_keep_the_op_contract():
    """The functions registered for CUDA, run on CPU tensors by the interpreter:
    the same outputs (and residuals) as the reference implementation of the op."""
    dtype = torch.float64
    mem, weight, bias = conv_inputs(3, 12, 3, 24, dtype)
    torch.testing.assert_close(compressive_op._cuda_conv_compress(mem, weight, bias),
                               naive.conv_compress(mem, weight, bias))
    grad = torch.randn(4, 3, 24, dtype=dtype)
    for has_bias in (True, False):
        got = compressive_op._cuda_conv_compress_backward(grad, mem, weight, has_bias)
        expected = naive.conv_compress_backward(grad, mem, weight, has_bias)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)
            assert a.shape == b.shape and a.dtype == b.dtype

    h, mem, c_mem, ln_w, ln_b, wq, wk, wv, bv = loss_inputs(8, 8, 2, 3, 24, dtype)
    args = (h, mem, c_mem, ln_w, ln_b, 1e-5, wq, None, wk, None, wv, bv, 4, 1 / math.sqrt(6))
    got = compressive_op._cuda_loss(*args)
    expected = naive.attention_reconstruction_loss_forward(*args)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
        assert a.shape == b.shape and a.dtype == b.dtype
    backward_args = (torch.tensor(1.5, dtype=dtype), h, c_mem, *args[3:], *expected[1:])
    torch.testing.assert_close(compressive_op._cuda_loss_backward(*backward_args),
                               naive.attention_reconstruction_loss_backward(*backward_args))


def test_cuda_implementations_route_unchecked_configurations_to_the_reference(monkeypatch):
    """Each reason warns once (FallbackWarning), for the forward and backward alike."""
    monkeypatch.setattr(_backend, "_warned_fallbacks", set())
    mem, weight, bias = conv_inputs(2, 4, 1, 8, torch.float16)
    with pytest.warns(_backend.FallbackWarning, match="op conv_compress runs the reference path") as record:
        out = compressive_op._cuda_conv_compress(mem, weight, bias)
        compressive_op._cuda_conv_compress_backward(torch.ones_like(out), mem, weight, True)
    torch.testing.assert_close(out, naive.conv_compress(mem, weight, bias))
    assert len(record) == 1 and "float16" in str(record[0].message)

    h, mem, c_mem, ln_w, ln_b, wq, wk, wv, bv = loss_inputs(2, 4, 2, 1, 256, torch.float32)
    args = (h, mem, c_mem, ln_w, ln_b, 1e-5, wq, None, wk, None, wv, bv, 1, 1 / 16)
    with pytest.warns(_backend.FallbackWarning, match="op attention_reconstruction_loss runs the reference") as record:
        got = compressive_op._cuda_loss(*args)
        compressive_op._cuda_loss(*args)
    for a, b in zip(got, naive.attention_reconstruction_loss_forward(*args)):
        torch.testing.assert_close(a, b)
    assert len(record) == 1 and "d_k <= 128" in str(record[0].message) and "d_k=256" in str(record[0].message)


def test_half_precision_is_refused():
    mem, weight, bias = conv_inputs(2, 4, 1, 8, torch.float16)
    with pytest.raises(TypeError, match="Triton conv_compress kernels run"):
        triton_conv(mem, weight, bias)


@pytest.mark.parametrize("check", ["test_conv_bad_input", "test_loss_bad_input"])
def test_bad_input(check):
    getattr(cpu_tests, check)("triton")
