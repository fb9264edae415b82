"""Transformer-XL and Compressive modules in real training configurations:
attention dropout on the fused path, ``torch.autocast`` (bfloat16 on CPU) on
every backend against labml_nn in float32, and the explain protocol
(``fused_backend``) with its visible fallbacks."""
import copy
import warnings

import pytest
import torch

import fastformers
from fastformers.convert import convert
from fastformers.nn import AttentionReconstructionLoss, Conv1dCompression, RelativeMultiHeadAttention
from fastformers.ops import dropout
from fastformers.ops.xl import naive

labml_xl = pytest.importorskip("labml_nn.transformers.xl")
from labml_nn.transformers import compressive as labml_compressive  # noqa: E402
from labml_nn.transformers import feed_forward as labml_feed_forward  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_CPP = "cpp" in fastformers.available_backends()
BACKENDS = ["reference", "cpp", "triton"] if HAS_CPP else ["reference", "triton"]
FUSED = [name for name in BACKENDS if name != "reference"]
D, H = 32, 4


def use_backend(model, backend):
    for module in model.modules():
        if hasattr(module, "last_backend"):
            module.backend = backend


def randomize(module, seed=1, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


def causal_mask(L, M):
    return torch.cat((torch.ones(L, M, 1, dtype=torch.bool), torch.tril(torch.ones(L, L)).bool()[:, :, None]), dim=1)


def relative_error(got, want):
    return ((got.float() - want).norm() / want.norm()).item()


# ---------------------------------------------------------------- dropout in the module


def _expected_attention(module, x, mem, call):
    """The module's attention written with the reference op and the recorded dropout bits."""
    keys = torch.cat((mem, x))
    L, K = x.shape[0], keys.shape[0]
    rows = slice(module.P - K + 1, module.P + L)
    out = naive.rel_attention(
        module.query(x), module.key(keys), module.value(keys), module.key_pos_embeddings[rows],
        module.key_pos_bias[rows], module.query_pos_bias, module.scale,
        dropout_p=call.p, seed=call.seed, offset=call.offset,
    )
    return module.output(out.reshape(L, x.shape[1], -1))


@pytest.mark.parametrize("backend", FUSED)
def test_training_dropout_runs_fused_and_replays(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    module = RelativeMultiHeadAttention(H, D, dropout_prob=0.3).double().train()
    randomize(module)
    module.backend = backend
    x, mem = torch.randn(5, 2, D, dtype=torch.float64), torch.randn(3, 2, D, dtype=torch.float64)
    keys = torch.cat((mem, x))
    with dropout.record() as calls:
        out = module(query=x, key=keys, value=keys, mask=causal_mask(5, 3))
    assert module.last_backend == backend and module.attn is None
    (call,) = calls
    assert call.p == 0.3 and call.shape == (2, H, 5, 8)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, list(module.parameters()), grad)
    expected_out = _expected_attention(module, x, mem, call)
    expected = torch.autograd.grad(expected_out, list(module.parameters()), grad)
    torch.testing.assert_close(out, expected_out)
    for (name, _), a, b in zip(module.named_parameters(), got, expected):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("backend", FUSED)
def test_eval_applies_no_dropout_and_zero_p_is_exact(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    with_dropout = RelativeMultiHeadAttention(H, D, dropout_prob=0.1)
    randomize(with_dropout)
    without = copy.deepcopy(with_dropout)
    without.dropout.p = 0.0
    use_backend(with_dropout, backend)
    use_backend(without, backend)
    x = torch.randn(4, 2, D)
    mask = causal_mask(4, 0)
    with dropout.record() as calls:
        evaluated = with_dropout.eval()(query=x, key=x, value=x, mask=mask)
    assert calls == []
    assert torch.equal(evaluated, without.train()(query=x, key=x, value=x, mask=mask))
    assert torch.equal(evaluated, without.eval()(query=x, key=x, value=x, mask=mask))


# ---------------------------------------------------------------- explain protocol


def test_fused_backend_is_what_forward_takes():
    module = RelativeMultiHeadAttention(H, D, dropout_prob=0.1)
    x = torch.randn(3, 1, D)
    for training in (True, False):
        module.train(training)
        expected, reason = module.fused_backend(torch.device("cpu"), training)
        assert reason is None and expected == ("cpp" if HAS_CPP else "reference")
        module(query=x, key=x, value=x, mask=causal_mask(3, 0))
        assert module.last_backend == expected
    module.backend = "reference"
    assert module.fused_backend(torch.device("cpu"), True) == ("reference", None)


def test_fused_backend_reasons_say_what_to_change(monkeypatch):
    module = RelativeMultiHeadAttention(H, D)
    backend, reason = module.fused_backend(torch.device("meta"), True)
    assert backend == "reference" and "use CPU, or CUDA with triton" in reason
    backend, reason = module.double().fused_backend(torch.device("cuda"), True)
    assert backend == "reference" and "got torch.float64: use one of those" in reason
    for training in (False, True):
        assert module.float().fused_backend(torch.device("cuda"), training) == ("triton", None)
    with monkeypatch.context() as patch:  # CUDA autocast needs a GPU: its dtype as it would report it
        patch.setattr(fastformers.ops._autocast, "dtype_for", lambda device_type: torch.float16)
        assert module.fused_backend(torch.device("cuda"), True) == ("triton", None)
    wide = RelativeMultiHeadAttention(1, 256)
    backend, reason = wide.fused_backend(torch.device("cuda"), True)
    assert backend == "reference" and "got d=256: use more heads" in reason

    conv = Conv1dCompression(2, D)
    assert conv.fused_backend(torch.device("cuda"), True) == ("triton", None)
    backend, reason = conv.half().fused_backend(torch.device("cuda"), True)
    assert backend == "reference" and "float16: use float32" in reason

    layers = torch.nn.ModuleList([_compressive_layer(fastformers.nn)])
    loss = AttentionReconstructionLoss(layers)
    assert loss.fused_backend(torch.device("cuda"), True) == ("triton", None)
    backend, reason = loss.fused_backend(torch.device("meta"), True)
    assert backend == "reference" and "meta" in reason


def test_explicit_mask_stays_on_triton(triton_interpreter):
    """The kernels read explicit masks: no fallback, no warning, the reference's output."""
    module = RelativeMultiHeadAttention(H, D, dropout_prob=0.0)
    x = torch.randn(3, 2, D)
    mask = causal_mask(3, 0).expand(3, 3, 2).clone()
    mask[2, 0, 1] = False
    expected = {}
    for backend in ("reference", "triton"):
        module.backend = backend
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            expected[backend] = module(query=x, key=x, value=x, mask=mask)
        assert module.last_backend == backend
    torch.testing.assert_close(expected["triton"], expected["reference"])


# ---------------------------------------------------------------- autocast, whole models


def _xl_models(n_layers=2, dropout_prob=0.0):
    layer = labml_xl.TransformerXLLayer(
        d_model=D, self_attn=labml_xl.RelativeMultiHeadAttention(H, D, dropout_prob),
        feed_forward=labml_feed_forward.FeedForward(D, 2 * D, dropout_prob), dropout_prob=dropout_prob)
    labml = labml_xl.TransformerXL(layer, n_layers)
    randomize(labml)
    return labml, convert(copy.deepcopy(labml))


def _compressive_layer(ns):
    return ns.CompressiveTransformerLayer(
        d_model=D, self_attn=ns.RelativeMultiHeadAttention(H, D, 0.0), feed_forward=ns.FeedForward(D, 2 * D, 0.0),
        dropout_prob=0.0, compress=ns.Conv1dCompression(2, D))


def _autocast_run(model, run):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = run(model)
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outputs)
    loss.backward()
    return [o.detach().float() for o in outputs]


def _check_autocast(labml, ours, run, backend):
    with torch.no_grad():
        want = [o.float() for o in run(labml)]
    use_backend(ours, "reference")
    reference = _autocast_run(ours, run)
    use_backend(ours, backend)
    got = _autocast_run(ours, run)
    assert all(m.last_backend == backend for m in ours.modules() if hasattr(m, "last_backend"))
    for g, r, w in zip(got, reference, want):
        assert relative_error(g, w) < 0.02
        assert relative_error(g, r) < 0.02
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformer_xl_under_autocast(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    labml, ours = _xl_models()
    generator = torch.Generator().manual_seed(2)
    L, M, B = 6, 5, 2
    x = torch.randn(L, B, D, generator=generator)
    mem = [torch.randn(M, B, D, generator=generator) for _ in range(2)]

    def run(model):
        return [model(x, mem, causal_mask(L, M))[0]]

    _check_autocast(labml, ours, run, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compressive_transformer_and_loss_under_autocast(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    labml = labml_compressive.CompressiveTransformer(_compressive_layer(_LabmlCompressive), 2)
    randomize(labml)
    ours = convert(copy.deepcopy(labml))
    generator = torch.Generator().manual_seed(2)
    L, M, N, B = 5, 4, 2, 2
    x = torch.randn(L, B, D, generator=generator)
    mem = [torch.randn(M, B, D, generator=generator) for _ in range(2)]
    c_mem = [torch.randn(N, B, D, generator=generator) for _ in range(2)]
    loss_classes = {id(labml): labml_compressive.AttentionReconstructionLoss, id(ours): AttentionReconstructionLoss}
    losses = {}

    def run(model):
        out, new_mem = model(x, mem, c_mem, causal_mask(L, M + N))
        compressed = torch.cat([layer.compress(m) for layer, m in zip(model.layers, mem)])
        loss_fn = losses[id(model)] = loss_classes[id(model)](model.layers)
        if isinstance(loss_fn, AttentionReconstructionLoss):
            loss_fn.backend = model.layers[0].compress.backend
        return [out, compressed, loss_fn(new_mem, mem)[None]]

    _check_autocast(labml, ours, run, backend)
    assert losses[id(ours)].last_backend == backend


class _LabmlCompressive:
    RelativeMultiHeadAttention = labml_xl.RelativeMultiHeadAttention
    FeedForward = labml_feed_forward.FeedForward
    CompressiveTransformerLayer = labml_compressive.CompressiveTransformerLayer
    Conv1dCompression = labml_compressive.Conv1dCompression


def test_ops_follow_autocast():
    """Direct dispatcher calls cast every floating input (tables, weights) to bfloat16."""
    generator = torch.Generator().manual_seed(0)
    q, k, v, pe, pb, u = (torch.randn(*shape, generator=generator) for shape in
                          ((3, 1, 2, 4), (5, 1, 2, 4), (5, 1, 2, 4), (7, 2, 4), (7, 2), (2, 4)))
    mem, weight, bias = torch.randn(4, 1, 8), torch.randn(8, 8, 2), torch.randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = torch.ops.fastformers.rel_attention(q, k, v, pe, pb, u, 0.5, True, None)
        mixed = fastformers.ops.rel_attention(q.bfloat16(), k, v, pe, pb, u, 0.5)
        compressed = torch.ops.fastformers.conv_compress(mem, weight, bias)
        loss, diff, _ = torch.ops.fastformers.attention_reconstruction_loss(
            torch.randn(3, 1, 8), mem, compressed.float(), None, None, 1e-5, weight[:, :, 0], None,
            weight[:, :, 1], None, weight[:, :, 0], None, 2, 0.5)
    assert out.dtype == mixed.dtype == compressed.dtype == loss.dtype == torch.bfloat16
    assert lse.dtype == diff.dtype == torch.float32
    torch.testing.assert_close(out, mixed)
