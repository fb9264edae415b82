"""Property-based tests: hypothesis draws shapes (size 1, odd sizes, zero-size where an op
allows it), strides (transposed and sliced views) and dtypes, and every C++ kernel must match
its reference, forward and every gradient. Examples are few and derandomized so that the file
runs in well under a minute and CI sees the same cases on every run."""
import pytest
import torch

import fastformers
from fastformers.ops.compressive import naive as compressive_naive
from fastformers.ops.feedback import naive as feedback_naive
from fastformers.ops.xl import naive as xl_naive
from harness import assert_parity

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = [
    pytest.mark.skipif("cpp" not in fastformers.available_backends(), reason="needs the C++ extension"),
    pytest.mark.usefixtures("one_thread"),
]

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = st.sampled_from([torch.float64, torch.float32, torch.bfloat16])
LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced"])


def tensor(draw, shape, dtype, layout=None):
    """A random ``shape`` tensor laid out as ``layout``: contiguous, a transposed view of a
    tensor stored the other way round, or every other element of a larger one."""
    layout = layout or draw(LAYOUTS)
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    if layout == "transposed" and len(shape) >= 2:
        stored = torch.randn(*shape[::-1], generator=generator, dtype=torch.float64)
        return stored.permute(*range(len(shape) - 1, -1, -1)).to(dtype)
    if layout == "sliced" and len(shape) >= 1:
        stored = torch.randn(*shape[:-1], 2 * shape[-1], generator=generator, dtype=torch.float64).to(dtype)
        return stored[..., ::2]
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


@st.composite
def feedback_memory_inputs(draw):
    dtype = draw(DTYPES)
    L, B, D = draw(st.integers(0, 7)), draw(st.integers(0, 5)), draw(st.integers(1, 37))
    return tensor(draw, (L, B, D), dtype), tensor(draw, (L,), dtype)


@SETTINGS
@given(feedback_memory_inputs())
def test_feedback_memory(inputs):
    assert_parity(lambda x, w: fastformers.ops.feedback_memory(x, w, backend="cpp"),
                  feedback_naive.feedback_memory, inputs)


@st.composite
def conv_compress_inputs(draw):
    dtype = draw(DTYPES)
    rate, groups = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    B, D, D_out = draw(st.integers(1, 4)), draw(st.integers(1, 33)), draw(st.integers(1, 33))
    mem = tensor(draw, (rate * groups, B, D), dtype)
    weight = tensor(draw, (D_out, D, rate), dtype)
    bias = tensor(draw, (D_out,), dtype) if draw(st.booleans()) else None
    return mem, weight, bias


def check_conv_compress(backend, mem, weight, bias):
    if bias is None:
        assert_parity(lambda m, w: fastformers.ops.conv_compress(m, w, None, backend=backend),
                      lambda m, w: compressive_naive.conv_compress(m, w, None), (mem, weight))
    else:
        assert_parity(lambda m, w, b: fastformers.ops.conv_compress(m, w, b, backend=backend),
                      compressive_naive.conv_compress, (mem, weight, bias))


@SETTINGS
@given(conv_compress_inputs())
def test_conv_compress(inputs):
    check_conv_compress("cpp", *inputs)


@st.composite
def rel_attention_inputs(draw):
    dtype = draw(DTYPES)
    L, M, B = draw(st.integers(1, 9)), draw(st.integers(0, 9)), draw(st.integers(1, 3))
    H, d = draw(st.integers(1, 3)), draw(st.integers(1, 21))
    K = M + L
    inputs = (tensor(draw, (L, B, H, d), dtype), tensor(draw, (K, B, H, d), dtype), tensor(draw, (K, B, H, d), dtype),
              tensor(draw, (K + L - 1, H, d), dtype), tensor(draw, (K + L - 1, H), dtype), tensor(draw, (H, d), dtype))
    causal = draw(st.booleans())
    mask = None
    if draw(st.booleans()):
        rows, columns = draw(st.sampled_from([L, 1])), draw(st.sampled_from([B, 1]))
        seed = draw(st.integers(0, 2**31 - 1))
        mask = torch.rand(rows, K, columns, generator=torch.Generator().manual_seed(seed)) < 0.6
        # every query keeps its own position: a fully masked row is NaN by definition (softmax of nothing)
        for i in range(L):
            mask[min(i, rows - 1), M + i] = True
    scale = draw(st.floats(0.05, 1.0))
    return inputs, scale, causal, mask


@SETTINGS
@given(rel_attention_inputs())
def test_rel_attention(case):
    inputs, scale, causal, mask = case
    assert_parity(lambda *x: fastformers.ops.rel_attention(*x, scale, causal=causal, mask=mask, backend="cpp"),
                  lambda *x: xl_naive.rel_attention(*x, scale, causal=causal, mask=mask), inputs)


# The Triton kernels through the interpreter: a few small cases each (interpreted kernels are slow).
TRITON_SETTINGS = settings(SETTINGS, max_examples=8)
def needs_triton(test):
    test = pytest.mark.usefixtures("triton_interpreter")(test)
    return pytest.mark.skipif("triton" not in fastformers.available_backends(), reason="needs triton")(test)


@needs_triton
@TRITON_SETTINGS
@given(feedback_memory_inputs())
def test_feedback_memory_triton(inputs):
    assert_parity(lambda x, w: fastformers.ops.feedback_memory(x, w, backend="triton"),
                  feedback_naive.feedback_memory, inputs)


@needs_triton
@TRITON_SETTINGS
@given(conv_compress_inputs())
def test_conv_compress_triton(inputs):
    check_conv_compress("triton", *inputs)


@needs_triton
@settings(SETTINGS, max_examples=6)
@given(rel_attention_inputs(), st.sampled_from([torch.float32, torch.float64]))
def test_rel_attention_triton(case, dtype):
    # the Triton kernel's own cases (causal, no explicit mask); others run the reference by design
    inputs, scale, _, _ = case
    inputs = tuple(t.to(dtype) for t in inputs)
    assert_parity(lambda *x: fastformers.ops.rel_attention(*x, scale, causal=True, backend="triton"),
                  lambda *x: xl_naive.rel_attention(*x, scale, causal=True), inputs)
