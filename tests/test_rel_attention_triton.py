"""Triton relative-position attention kernels under the interpreter, against
the reference: output, log-sum-exp and every gradient."""
import itertools
import types

import pytest
import torch

from fastformers.ops.xl import naive, triton_kernel
from harness import assert_parity

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (L, M, batch, heads, d, causal): every value of L {1, 7, 33}, M {0, 5, 40},
# d {24, 32, 64, 128}, heads {1, 3}, batch {1, 2}; decode steps (L = 1) with
# memory; L and K = M + L not multiples of the 16-row interpreter tiles; causal and not.
CASES = [
    (1, 5, 2, 3, 64, True),
    (1, 40, 1, 1, 24, True),
    (7, 5, 2, 3, 32, True),
    (7, 0, 1, 1, 128, False),
    (33, 5, 1, 1, 24, False),
    (33, 40, 1, 1, 64, True),
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
    def forward(ctx, query, key, value, pos_emb, pos_bias, query_pos_bias, scale, causal, mask=None):
        out, lse = _kernels().rel_attention_forward(
            query, key, value, pos_emb, pos_bias, query_pos_bias, scale, causal, mask=mask
        )
        ctx.save_for_backward(query, key, value, pos_emb, pos_bias, query_pos_bias, out, lse)
        ctx.scale, ctx.causal, ctx.mask = scale, causal, mask
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grads = _kernels().rel_attention_backward(grad_out, *ctx.saved_tensors, ctx.scale, ctx.causal, mask=ctx.mask)
        return (*grads, None, None, None)


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


@pytest.mark.parametrize(
    "mask_shape, causal", [((9, 13, 2), False), ((1, 13, 2), True), ((9, 13, 1), False)], ids=["LKB", "1KB", "LK1"]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_explicit_mask(mask_shape, causal, dtype):
    """Explicit bool masks (padding, per query or broadcast) run in the kernels."""
    L, M, B, H, d = 9, 4, 2, 2, 24
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[:, 0] = True  # every query sees a key
    scale = d**-0.5
    assert_parity(
        lambda *inputs: TritonRelAttention.apply(*inputs, scale, causal, mask),
        lambda *inputs: naive.rel_attention(*inputs, scale, mask=mask, causal=causal),
        make_inputs(L, M, B, H, d, dtype),
    )


def test_query_without_visible_key_is_nan_like_the_reference():
    """A fully masked query row: NaN output, -inf log-sum-exp, the other rows
    unharmed (also when whole key tiles before its visible keys are masked)."""
    L, M, B, H, d = 5, 30, 1, 1, 16
    inputs = make_inputs(L, M, B, H, d, torch.float64)
    mask = torch.ones(L, L + M, B, dtype=torch.bool)
    mask[1] = False
    mask[3, :33] = False  # the first key tile (32 keys) and more hidden
    out, lse = _kernels().rel_attention_forward(*inputs, d**-0.5, False, mask=mask)
    expected = naive.rel_attention(*inputs, d**-0.5, mask=mask, causal=False)
    assert torch.isnan(out[1]).all() and torch.isinf(lse[..., 1]).all() and (lse[..., 1] < 0).all()
    keep = [0, 2, 3, 4]
    torch.testing.assert_close(out[keep], expected[keep])


@pytest.fixture(params=[
    # tiles taller than wide: each score tile reads its band in three chunks
    dict(fwd=(64, 32), dkdv=(64, 32), dq=(64, 32), table=(64, 32)),
    # tiles wider than tall (sm_90's dk/dv and d-128 table tiles): two chunks
    dict(fwd=(64, 64), dkdv=(32, 64), dq=(32, 32), table=(32, 64)),
    # five chunks: more than the forward keeps, it computes every chunk of every tile
    dict(fwd=(128, 32), dkdv=(16, 32), dq=(128, 32), table=(16, 32)),
], ids=["three_band_chunks", "two_band_chunks", "five_band_chunks"])
def tile_shapes(monkeypatch, request):
    kernels = _kernels()
    for kernel_name, tile in request.param.items():
        monkeypatch.setitem(kernels.INTERPRETER_TILES, kernel_name, tile)


@pytest.fixture(params=[True, False], ids=["table_adds_band", "dq_adds_band"])
def splits_dq(monkeypatch, request):
    """Either launch of the dq kernel adding dT·band to the query gradient (tensor-core and IEEE float32 GPUs)."""
    monkeypatch.setattr(_kernels(), "INTERPRETER_SPLITS_DQ", request.param)


@pytest.fixture(params=[(True, True), (False, False)], ids=["kept_band-table_adds_band", "band_per_tile-dq_adds_band"])
def loop_modes(monkeypatch, request):
    """The key loops (forward, dq and table launches) keeping their band
    products across key tiles or computing every chunk of every tile, with
    either launch of the dq kernel adding dT·band (independent choices: each
    is tested both ways)."""
    slides_band, splits_dq = request.param
    monkeypatch.setattr(_kernels(), "INTERPRETER_SLIDES_BAND", slides_band)
    monkeypatch.setattr(_kernels(), "INTERPRETER_SPLITS_DQ", splits_dq)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_tall_and_wide_tiles(tile_shapes, loop_modes, causal):
    shape, scale = (70, 6, 1, 2, 24), 24**-0.5
    assert_parity(
        lambda *inputs: TritonRelAttention.apply(*inputs, scale, causal),
        lambda *inputs: naive.rel_attention(*inputs, scale, causal=causal),
        make_inputs(*shape, torch.float64),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_is_deterministic(splits_dq, dtype):
    """Two identical backward calls give bit-identical gradients (no atomics:
    the positional-table gradient is summed in a fixed order)."""
    L, M, B, H, d = 20, 13, 2, 2, 32
    inputs = make_inputs(L, M, B, H, d, dtype)
    kernels = _kernels()
    out, lse = kernels.rel_attention_forward(*inputs, d**-0.5, True, 0.2, 7, 11)
    grad_out = torch.randn_like(out)
    first = kernels.rel_attention_backward(grad_out, *inputs, out, lse, d**-0.5, True, 0.2, 7, 11)
    second = kernels.rel_attention_backward(grad_out, *inputs, out, lse, d**-0.5, True, 0.2, 7, 11)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.fixture(params=["sm80", "sm90"])
def gpu_configs(monkeypatch, request):
    """The launchers' configuration choice as on a GPU of each arch (outside the interpreter)."""
    kernels = _kernels()
    monkeypatch.setattr(kernels, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(kernels, "_arch", lambda device: request.param)
    kernels.arch_under_test = request.param
    yield kernels
    del kernels.arch_under_test


# The head dims each arch's tiles take, by tile class (see _TILES; the rest
# falls back to the reference with a reason).
GPU_HEAD_DIMS = {
    (arch, tile_class): 64 if tile_class.startswith("ieee") else 128
    for arch in ("sm80", "sm90")
    for tile_class in ("16bit", "16bit,dropout", "tf32", "tf32,dropout", "ieee", "ieee,dropout")
}


@pytest.mark.parametrize("dtype, precision", [(torch.bfloat16, "highest"), (torch.float16, "highest"),
                                              (torch.float32, "high"), (torch.float32, "highest")], ids=str)
def test_every_gpu_launch_is_an_aot_spec(gpu_configs, dtype, precision, monkeypatch):
    """Every configuration the GPU may launch (each autotuning candidate, for
    every head dim it takes, with and without dropout) is one the AOT check
    compiled for that arch: same tiles, warps, stages, padded head dim and modes."""
    kernels = gpu_configs
    arch = kernels.arch_under_test
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision)
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(allow_tf32=False))
    specs = {spec.name: spec for spec in kernels.AOT_SPECS}
    variant = kernels._variant(dtype)
    for dropout in (False, True):
        head_dims = [head_dim for head_dim in range(1, 129)
                     if kernels.gpu_unsupported_reason(dtype, head_dim, dropout) is None]
        assert head_dims == list(range(1, GPU_HEAD_DIMS[arch, kernels._tile_class(variant, dropout)] + 1))
        for head_dim, (kernel_name, kernel) in itertools.product(head_dims, kernels._KERNELS.items()):
            query = torch.empty(7, 1, 1, head_dim, dtype=dtype, device="meta")
            tiles, block_d = kernels._gpu_tiles(kernel_name, query, dropout)
            assert block_d >= head_dim
            for tile in tiles:
                config = kernels._config(kernel_name, tile, block_d)
                launch = {key: config.pop(key) for key in ("num_warps", "num_stages")}
                mode, mode_label = kernels._mode(kernel_name, kernels._variant_splits_dq(variant))
                label = kernels._aot_label(arch, variant, block_d, tile, mode_label, dropout)
                spec = specs[f"{kernel.fn.__name__}[{label}]"]
                assert spec.archs == (kernels._ARCH_NUMBERS[arch],)
                assert launch == {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
                assert {key: spec.constexprs[key] for key in {**config, **mode}} == {**config, **mode}
                assert spec.constexprs["PRECISION"] == ("tf32" if variant == "tf32" else "ieee")
                assert spec.constexprs["DROPOUT"] is dropout


def test_arch_picks_the_tile_table(monkeypatch):
    """Compute capability 9.x launches sm_90's tiles, every other sm_80's."""
    kernels = _kernels()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, arch in (((9, 0), "sm90"), ((8, 0), "sm80"), ((8, 9), "sm80"), ((10, 0), "sm80")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert kernels._arch(torch.device("cuda")) == arch
    assert kernels._arch(torch.device("meta")) == "sm80"


@pytest.mark.parametrize(
    "dtype, head_dim, error, match",
    [
        (torch.float64, 32, TypeError, "float32, bfloat16 and float16"),
        (torch.float32, 65, ValueError, r"d <= 64 for torch.float32 .*got d=65"),
        (torch.float16, 129, ValueError, "d <= 128"),
    ],
)
def test_gpu_refuses_unchecked_configurations(gpu_configs, dtype, head_dim, error, match):
    query = torch.empty(7, 1, 1, head_dim, dtype=dtype, device="meta")
    with pytest.raises(error, match=match):
        gpu_configs._gpu_tiles("fwd", query, False)


def test_gpu_unsupported_reason_names_what_runs_the_reference(gpu_configs, monkeypatch):
    kernels = gpu_configs
    arch = kernels.arch_under_test
    for dtype, dropout in itertools.product((torch.bfloat16, torch.float16, torch.float32), (False, True)):
        assert kernels.gpu_unsupported_reason(dtype, 64, dropout) is None
    assert "got torch.float64: use one of those" in kernels.gpu_unsupported_reason(torch.float64, 64)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(allow_tf32=False))
    reason = kernels.gpu_unsupported_reason(torch.float32, 128, True)
    assert f"d <= 64 for torch.float32 at 'highest' matmul precision with dropout on {arch}, got d=128" in reason
    assert "torch.autocast('cuda', dtype=torch.bfloat16)" in reason
    # an arch without tiles for a class says so
    monkeypatch.setitem(kernels._TILES, arch, {})
    assert f"no checked GPU configuration for torch.bfloat16 on {arch}" in kernels.gpu_unsupported_reason(
        torch.bfloat16, 64
    )


def test_float32_precision_follows_torch(monkeypatch):
    """TF32 products when torch allows TF32 matmuls, IEEE at "highest"."""
    for allow_tf32, precision, expected in (
        (False, "highest", "ieee"), (False, "high", "tf32"), (False, "medium", "tf32"), (True, "highest", "tf32"),
    ):  # fmt: skip
        monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(allow_tf32=allow_tf32))
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda precision=precision: precision)
        assert _kernels().float32_precision() == expected


@pytest.mark.parametrize("head_dim", [24, 32], ids=lambda d: f"d{d}")
def test_inputs_of_any_layout(head_dim):
    """The launchers hand the kernels unit-stride, 16-aligned, 16-wide tensors
    (padding d, copying misaligned or strided inputs), whatever they get."""
    L, M, B, H = 9, 4, 2, 3
    query, key, value, pos_emb, pos_bias, query_pos_bias = make_inputs(L, M, B, H, head_dim, torch.float64)
    misaligned = torch.empty(query.numel() + 1, dtype=query.dtype)[1:].view(query.shape).copy_(query)
    strided_d = key.transpose(0, 3).contiguous().transpose(0, 3)  # stride 1 on the sequence, not on d
    inputs = (misaligned, strided_d, value.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3), pos_emb, pos_bias,
              query_pos_bias)
    assert misaligned.data_ptr() % 16 and strided_d.stride(-1) != 1
    scale = head_dim**-0.5
    assert_parity(
        lambda *x: TritonRelAttention.apply(*x, scale, True),
        lambda *x: naive.rel_attention(*x, scale, causal=True),
        inputs,
    )
