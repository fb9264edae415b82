"""Triton relative-position attention kernels under the interpreter, against
the reference: output, log-sum-exp and every gradient."""
import pytest
import torch

from fastformers.ops.xl import naive, triton_kernel
from harness import assert_parity

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# (L, M, batch, heads, d, causal): every value of L {1, 7, 64}, M {0, 5, 128},
# d {24, 64}, heads {1, 4}, batch {1, 3}; decode steps (L = 1) with memory;
# K = M + L not a multiple of the key tile (12, 69, 129); causal and not.
CASES = [
    (1, 5, 3, 4, 64, True),
    (1, 128, 1, 1, 24, True),
    (7, 5, 3, 4, 24, True),
    (7, 0, 1, 1, 64, False),
    (64, 5, 1, 1, 24, False),
    (64, 128, 1, 1, 64, True),
]


@pytest.fixture(autouse=True)
def _interpreter(triton_interpreter):
    pass


def _kernels():
    # Imported here: the module is built for the interpreter only once the
    # conftest has set TRITON_INTERPRET.
    from fastformers.ops.xl import triton_kernel

    return triton_kernel


class TritonRelAttention(torch.autograd.Function):
    """The two launchers as one differentiable function, the way the op uses them."""

    @staticmethod
    def forward(ctx, query, key, value, pos_emb, pos_bias, query_pos_bias, scale, causal):
        out, lse = _kernels().rel_attention_forward(query, key, value, pos_emb, pos_bias, query_pos_bias, scale, causal)
        ctx.save_for_backward(query, key, value, pos_emb, pos_bias, query_pos_bias, out, lse)
        ctx.scale, ctx.causal = scale, causal
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grads = _kernels().rel_attention_backward(grad_out, *ctx.saved_tensors, ctx.scale, ctx.causal)
        return (*grads, None, None)


def make_inputs(L, M, B, H, d, dtype):
    K = M + L
    return (
        torch.randn(L, B, H, d, dtype=dtype),
        torch.randn(K, B, H, d, dtype=dtype),
        torch.randn(K, B, H, d, dtype=dtype),
        torch.randn(K + L - 1, H, d, dtype=dtype),
        torch.randn(K + L - 1, H, dtype=dtype),
        torch.randn(H, d, dtype=dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda case: "L{}-M{}-B{}-H{}-d{}-{}".format(*case[:5], "causal" if case[5] else "full"))
def test_matches_reference(case, dtype):
    *shape, causal = case
    scale = shape[-1] ** -0.5
    assert_parity(
        lambda *inputs: TritonRelAttention.apply(*inputs, scale, causal),
        lambda *inputs: naive.rel_attention(*inputs, scale, causal=causal),
        make_inputs(*shape, dtype),
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_log_sum_exp(causal):
    L, M, d = 7, 5, 24
    inputs = make_inputs(L, M, 3, 4, d, torch.float64)
    scale = d**-0.5
    _, lse = _kernels().rel_attention_forward(*inputs, scale, causal)
    query, key, _, pos_emb, pos_bias, query_pos_bias = inputs
    scores = naive.relative_scores(query, key, pos_emb, pos_bias, query_pos_bias) * scale  # [L, K, B, H]
    if causal:
        scores = scores.masked_fill(~naive.causal_mask(L, L + M)[:, :, None, None], float("-inf"))
    assert lse.dtype == torch.float64 and lse.shape == (3, 4, L)
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=1).permute(1, 2, 0))


def test_float32_statistics_for_bfloat16():
    out, lse = _kernels().rel_attention_forward(*make_inputs(7, 5, 1, 1, 24, torch.bfloat16), 24**-0.5, True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


def test_strided_inputs_need_no_copies():
    """Views straight out of fused projections ([L, B, 3, H, d] sliced) and a
    transposed table give the same results as contiguous copies."""
    L, M, B, H, d = 7, 5, 1, 4, 24
    K = L + M
    scale = d**-0.5
    query = torch.randn(L, B, 3, H, d, dtype=torch.float64)[:, :, 1]
    key_value = torch.randn(K, B, H, 2, d, dtype=torch.float64)
    key, value = key_value[..., 0, :], key_value[..., 1, :]
    pos_emb = torch.randn(H, K + L - 1, d, dtype=torch.float64).transpose(0, 1)
    pos_bias = torch.randn(H, K + L - 1, dtype=torch.float64).t()
    query_pos_bias = torch.randn(d, H, dtype=torch.float64).t()
    strided = (query, key, value, pos_emb, pos_bias, query_pos_bias)
    assert not any(t.is_contiguous() for t in strided)
    dense = tuple(t.contiguous() for t in strided)
    kernels = _kernels()

    out, lse = kernels.rel_attention_forward(*strided, scale, True)
    dense_out, dense_lse = kernels.rel_attention_forward(*dense, scale, True)
    torch.testing.assert_close(out, dense_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, dense_lse, rtol=0, atol=0)

    grad_out = torch.randn(L, B, d, H, dtype=torch.float64).transpose(2, 3)
    grads = kernels.rel_attention_backward(grad_out, *strided, out, lse, scale, True)
    dense_grads = kernels.rel_attention_backward(grad_out.contiguous(), *dense, dense_out, dense_lse, scale, True)
    for got, expected in zip(grads, dense_grads):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.fixture
def gpu_configs(monkeypatch):
    """The launchers' configuration choice as on a GPU (outside the interpreter)."""
    kernels = _kernels()
    monkeypatch.setattr(kernels, "interpreter_enabled", lambda: False)
    return kernels


@pytest.mark.parametrize("dtype, head_dims", [(torch.float32, range(1, 65)), (torch.bfloat16, range(1, 129))], ids=str)
def test_every_gpu_launch_is_an_aot_spec(gpu_configs, dtype, head_dims):
    """What the GPU launches is exactly what the AOT check compiled: same tiles,
    warps, stages and padded head dim, for every head dim the GPU takes."""
    kernels = gpu_configs
    specs = {spec.name: spec for spec in kernels.AOT_SPECS}
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    for head_dim in head_dims:
        query = torch.empty(7, 1, 1, head_dim, dtype=dtype, device="meta")
        for short, kernel_name in kernels._KERNEL_NAMES.items():
            config = kernels._block_config(short, query)
            launch = {key: config.pop(key) for key in ("num_warps", "num_stages")}
            for dropout in (False, True):
                spec = specs[f"{kernel_name}[{dtype_name},d{config['BLOCK_D']}{',dropout' if dropout else ''}]"]
                assert launch == {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
                assert {key: spec.constexprs[key] for key in config} == config
                assert spec.constexprs["UPCAST_DOTS"] is False and spec.constexprs["DROPOUT"] is dropout


@pytest.mark.parametrize(
    "dtype, head_dim, error, match",
    [
        (torch.float64, 32, TypeError, "float32 and bfloat16"),
        (torch.float16, 32, TypeError, "float32 and bfloat16"),
        (torch.float32, 65, ValueError, "d <= 64"),
        (torch.bfloat16, 129, ValueError, "d <= 128"),
    ],
)
def test_gpu_refuses_unchecked_configurations(gpu_configs, dtype, head_dim, error, match):
    query = torch.empty(7, 1, 1, head_dim, dtype=dtype, device="meta")
    with pytest.raises(error, match=match):
        gpu_configs._block_config("fwd", query)


def test_gpu_unsupported_reason_names_what_runs_the_reference():
    assert triton_kernel.gpu_unsupported_reason(torch.float32, 64) is None
    assert triton_kernel.gpu_unsupported_reason(torch.bfloat16, 128) is None
    assert "got torch.float64: use float32" in triton_kernel.gpu_unsupported_reason(torch.float64, 64)
    assert "got d=128: use bfloat16 autocast" in triton_kernel.gpu_unsupported_reason(torch.float32, 128)
