"""fastformers.nn against labml_nn 0.5.1: same state_dict, outputs and gradients.

Every parameter of the labml module is overwritten with random values
(including the zero-initialised positional tables and feedback weights), the
state_dict is loaded into ours with strict=True, and both run in float64
without dropout. Outputs, every parameter gradient and the input gradients
must agree to 1e-9.
"""
import importlib.util
import inspect
from types import SimpleNamespace

import pytest

pytest.importorskip("labml_nn")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from labml_nn.transformers import compressive as labml_compressive  # noqa: E402
from labml_nn.transformers import feed_forward as labml_feed_forward  # noqa: E402
from labml_nn.transformers import feedback as labml_feedback  # noqa: E402
from labml_nn.transformers import mha as labml_mha  # noqa: E402
from labml_nn.transformers import switch as labml_switch  # noqa: E402
from labml_nn.transformers import xl as labml_xl  # noqa: E402

import fastformers  # noqa: E402
import fastformers.nn as ours_ns  # noqa: E402
from harness import named_grads_in_labml_layout  # noqa: E402

TOL = 1e-9
D, H = 24, 4

LABML = SimpleNamespace(
    PrepareForMultiHeadAttention=labml_mha.PrepareForMultiHeadAttention,
    MultiHeadAttention=labml_mha.MultiHeadAttention,
    FeedForward=labml_feed_forward.FeedForward,
    RelativeMultiHeadAttention=labml_xl.RelativeMultiHeadAttention,
    TransformerXLLayer=labml_xl.TransformerXLLayer,
    TransformerXL=labml_xl.TransformerXL,
    FeedbackAttention=labml_feedback.FeedbackAttention,
    FeedbackTransformerLayer=labml_feedback.FeedbackTransformerLayer,
    FeedbackTransformer=labml_feedback.FeedbackTransformer,
    FeedbackTransformerKV=labml_feedback.FeedbackTransformerKV,
    Conv1dCompression=labml_compressive.Conv1dCompression,
    CompressiveTransformerLayer=labml_compressive.CompressiveTransformerLayer,
    CompressiveTransformer=labml_compressive.CompressiveTransformer,
    AttentionReconstructionLoss=labml_compressive.AttentionReconstructionLoss,
    SwitchFeedForward=labml_switch.SwitchFeedForward,
    SwitchTransformerLayer=labml_switch.SwitchTransformerLayer,
    SwitchTransformer=labml_switch.SwitchTransformer,
)
OURS = ours_ns

BACKENDS = fastformers.available_backends()
# The Triton kernels of rel_attention live in their own module (fastformers/ops/xl/triton_kernel.py).
XL_BACKENDS = [
    name for name in BACKENDS
    if name != "triton" or importlib.util.find_spec("fastformers.ops.xl.triton_kernel") is not None
]


def use_attention_backend(model, backend):
    """Set ``backend`` on every relative attention of ``model``; returns them."""
    attentions = [m for m in model.modules() if isinstance(m, ours_ns.RelativeMultiHeadAttention)]
    for attention in attentions:
        attention.backend = backend
    return attentions


# ---------------------------------------------------------------- harness

pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(module: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


def make_pair(build):
    """labml module with random weights and ours loaded from its state_dict, both float64."""
    ref = build(LABML)
    randomize(ref)
    ref = ref.double().eval()
    ours = build(OURS).double().eval()
    assert list(ours.state_dict().keys()) == list(ref.state_dict().keys())
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def rand(*shape, grad=True):
    return torch.randn(*shape, dtype=torch.float64).requires_grad_(grad)


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _assert_close(a, b, what):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), what
        assert a.shape == b.shape and a.dtype == b.dtype, what
        assert a.numel() == 0 or (a - b).abs().max().item() <= TOL, what
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{what}[{i}]")
    else:
        assert type(a) is type(b) and a == b, what


def _run(module, call, inputs, seed):
    torch.manual_seed(seed)
    out = call(module, inputs)
    loss = 0
    for i, t in enumerate(_tensors(out)):
        if t.requires_grad:
            gen = torch.Generator().manual_seed(100 + i)
            loss = loss + (t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum()
    loss.backward()
    return out


def assert_parity(ref, ours, call, inputs, seed=0):
    """Run ``call(module, inputs)`` on both modules with identical cloned inputs
    and RNG state; compare outputs, parameter and input gradients. Returns the
    names of our parameters that received no nonzero gradient."""
    ref_inputs, our_inputs = _clone(inputs), _clone(inputs)
    ref_out = _run(ref, call, ref_inputs, seed)
    our_out = _run(ours, call, our_inputs, seed)
    _assert_close(our_out, ref_out, "output")
    ref_params = dict(ref.named_parameters())
    idle = []
    for name, grad in named_grads_in_labml_layout(ours).items():
        want = ref_params[name].grad
        if want is None and grad is not None and ".experts." in f".{name}":
            # labml leaves an expert without tokens at None; a stacked expert's row is zero
            want = torch.zeros_like(grad)
        assert (grad is None) == (want is None), name
        if grad is not None:
            _assert_close(grad, want, f"grad of {name}")
        if grad is None or not grad.any():
            idle.append(name)
    for i, (a, b) in enumerate(zip(_tensors(our_inputs), _tensors(ref_inputs))):
        if a.requires_grad:
            _assert_close(a.grad, b.grad, f"grad of input {i}")
    return idle


def causal_mask(seq_len, mem_len=0):
    """Mask as labml's XL/compressive experiments build it: ``[L, M + L, 1]``."""
    tril = torch.tril(torch.ones(seq_len, seq_len)).to(torch.bool).unsqueeze(-1)
    return torch.cat((torch.ones(seq_len, mem_len, 1, dtype=torch.bool), tril), dim=1)


# ---------------------------------------------------------------- attention

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3)])
def test_prepare_for_mha(bias, shape):
    ref, ours = make_pair(lambda ns: ns.PrepareForMultiHeadAttention(D, H, D // H, bias))
    assert_parity(ref, ours, lambda m, i: m(i[0]), [rand(*shape, D)])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", ["single", "causal", "cross"])
def test_multi_head_attention(bias, case):
    ref, ours = make_pair(lambda ns: ns.MultiHeadAttention(H, D, dropout_prob=0.0, bias=bias))
    if case == "single":
        q = kv = rand(1, 1, D)
        mask = None
    elif case == "causal":
        q = kv = rand(7, 3, D)
        mask = causal_mask(7)
    else:
        q, kv = rand(3, 2, D), rand(5, 2, D)
        mask = torch.rand(1, 5, 2) > 0.3
        mask[:, 0] = True
    idle = assert_parity(ref, ours, lambda m, i: m(query=i[0], key=i[1], value=i[1], mask=i[2]), [q, kv, mask])
    # With a single key the softmax is constant: queries and keys get zero gradients.
    assert all(name.split(".")[0] in ("query", "key") for name in idle) if case == "single" else idle == []
    assert torch.equal(ours.attn, ref.attn)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3)])
def test_feed_forward(gated, shape):
    def build(ns):
        if gated:
            return ns.FeedForward(D, 40, dropout=0.0, activation=nn.GELU(), is_gated=True,
                                  bias1=False, bias2=True, bias_gate=False)
        return ns.FeedForward(D, 40, dropout=0.0)

    ref, ours = make_pair(build)
    assert assert_parity(ref, ours, lambda m, i: m(i[0]), [rand(*shape, D)]) == []


@pytest.mark.parametrize("backend", XL_BACKENDS)
@pytest.mark.parametrize("seq_len,mem_len,batch", [(1, 0, 1), (7, 0, 3), (3, 5, 2), (1, 6, 2)])
def test_relative_multi_head_attention(seq_len, mem_len, batch, backend):
    ref, ours = make_pair(lambda ns: ns.RelativeMultiHeadAttention(H, D, dropout_prob=0.0))
    use_attention_backend(ours, backend)
    q, kv = rand(seq_len, batch, D), rand(mem_len + seq_len, batch, D)
    idle = assert_parity(ref, ours, lambda m, i: m(query=i[0], key=i[1], value=i[1], mask=i[2]),
                         [q, kv, causal_mask(seq_len, mem_len)])
    assert idle == [] or mem_len + seq_len == 1
    assert ours.last_backend == backend


@pytest.mark.parametrize("backend", XL_BACKENDS)
def test_relative_attention_explicit_mask(backend):
    """A non-causal mask (labml's layout [L, K, B]) runs as an explicit mask in
    the fused kernels of every backend."""
    ref, ours = make_pair(lambda ns: ns.RelativeMultiHeadAttention(H, D, dropout_prob=0.0))
    use_attention_backend(ours, backend)
    mask = causal_mask(3, 4).expand(3, 7, 2).clone()
    mask[1, 0, 1] = False
    assert_parity(ref, ours, lambda m, i: m(query=i[0], key=i[1], value=i[1], mask=i[2]),
                  [rand(3, 2, D), rand(7, 2, D), mask])
    assert ours.last_backend == backend


def test_relative_attention_dropout_runs_fused():
    """Attention dropout runs inside the fused kernels (tests/test_xl_modules.py checks its values)."""
    ours = ours_ns.RelativeMultiHeadAttention(H, D, dropout_prob=0.5).double()
    ours.backend = "cpp" if "cpp" in BACKENDS else "reference"
    x = rand(3, 2, D, grad=False)
    for training in (True, False):
        ours.train(training)
        ours(query=x, key=x, value=x, mask=causal_mask(3))
        assert ours.last_backend == ours.backend


def test_relative_attention_position_limit():
    ours = ours_ns.RelativeMultiHeadAttention(1, 2, dropout_prob=0.0)
    q = torch.randn(1, 1, 2)
    ours(query=q, key=torch.randn(ours.P, 1, 2), value=torch.randn(ours.P, 1, 2))
    kv = torch.randn(ours.P + 1, 1, 2)
    with pytest.raises(ValueError, match="at most P=4096"):
        ours(query=q, key=kv, value=kv)


# ---------------------------------------------------------------- Transformer-XL

def _xl_layer(ns):
    return ns.TransformerXLLayer(d_model=D, self_attn=ns.RelativeMultiHeadAttention(H, D, 0.0),
                                 feed_forward=ns.FeedForward(D, 2 * D, 0.0), dropout_prob=0.0)


@pytest.mark.parametrize("backend", XL_BACKENDS)
@pytest.mark.parametrize("seq_len,mem_len,batch", [(1, 0, 1), (7, 0, 3), (4, 5, 3)])
def test_transformer_xl_layer(seq_len, mem_len, batch, backend):
    ref, ours = make_pair(_xl_layer)
    use_attention_backend(ours, backend)
    mem = rand(mem_len, batch, D) if mem_len else None
    idle = assert_parity(ref, ours, lambda m, i: m(x=i[0], mem=i[1], mask=i[2]),
                         [rand(seq_len, batch, D), mem, causal_mask(seq_len, mem_len)])
    assert idle == [] or mem_len + seq_len == 1


@pytest.mark.parametrize("backend", XL_BACKENDS)
@pytest.mark.parametrize("seq_len,mem_len,batch", [(1, 0, 1), (5, 0, 2), (3, 4, 3)])
def test_transformer_xl(seq_len, mem_len, batch, backend):
    ref, ours = make_pair(lambda ns: ns.TransformerXL(_xl_layer(ns), 2))
    attentions = use_attention_backend(ours, backend)
    mem = [rand(mem_len, batch, D) for _ in range(2)] if mem_len else []
    idle = assert_parity(ref, ours, lambda m, i: m(i[0], i[1], i[2]),
                         [rand(seq_len, batch, D), mem, causal_mask(seq_len, mem_len)])
    assert idle == [] or mem_len + seq_len == 1
    assert [a.last_backend for a in attentions] == [backend, backend]


# ---------------------------------------------------------------- feedback

@pytest.mark.parametrize("precomputed", [False, True])
@pytest.mark.parametrize("steps,batch", [(1, 1), (6, 3)])
def test_feedback_attention(precomputed, steps, batch):
    ref, ours = make_pair(lambda ns: ns.FeedbackAttention(H, D, 0.0, is_kv_precomputed=precomputed))
    kv_shape = (steps, batch, H, D // H) if precomputed else (steps, batch, D)
    idle = assert_parity(ref, ours, lambda m, i: m(query=i[0], key=i[1], value=i[2]),
                         [rand(batch, D), rand(*kv_shape), rand(*kv_shape)])
    assert idle == [] or steps == 1


def test_feedback_attention_position_limit():
    ours = ours_ns.FeedbackAttention(1, 2, 0.0, is_kv_precomputed=True)
    kv = torch.zeros(ours.P + 1, 1, 1, 2)
    with pytest.raises(ValueError, match="at most P=4096 memory steps"):
        ours(query=torch.zeros(1, 2), key=kv, value=kv)


@pytest.mark.parametrize("steps,batch", [(0, 1), (4, 3), (2, 1)])
def test_feedback_transformer_layer(steps, batch):
    def build(ns):
        return ns.FeedbackTransformerLayer(d_model=D, attn=ns.FeedbackAttention(H, D, 0.0),
                                           feed_forward=ns.FeedForward(D, 2 * D, 0.0), dropout_prob=0.0)

    ref, ours = make_pair(build)
    mem = rand(steps, batch, D) if steps else None
    idle = assert_parity(ref, ours, lambda m, i: m(x=i[0], key=i[1], value=i[1]), [rand(batch, D), mem])
    assert (idle == []) == (steps > 0)


def _feedback_layer(ns, d_model, heads, precomputed):
    return ns.FeedbackTransformerLayer(
        d_model=d_model,
        attn=ns.FeedbackAttention(heads, d_model, 0.0, is_kv_precomputed=precomputed),
        feed_forward=ns.FeedForward(d_model, 2 * d_model, 0.0), dropout_prob=0.0)


def _feedback_model(ns, kv, d_model=D, heads=H, n_layers=2):
    layer = _feedback_layer(ns, d_model, heads, kv)
    if kv:
        return ns.FeedbackTransformerKV(layer, n_layers, d_model, heads)
    return ns.FeedbackTransformer(layer, n_layers)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv", [False, True], ids=["plain", "kv"])
@pytest.mark.parametrize("seq_len,batch", [(1, 1), (5, 3)])
def test_feedback_transformer(backend, kv, seq_len, batch):
    ref, ours = make_pair(lambda ns: _feedback_model(ns, kv))
    assert ours.backend is None
    ours.backend = backend
    idle = assert_parity(ref, ours, lambda m, i: m(i[0]), [rand(seq_len, batch, D)])
    assert ours.last_backend == backend
    if seq_len > 1:
        assert idle == []
    if kv:
        ref.free()
        ours.free()


def test_feedback_transformer_automatic_backend():
    model = _feedback_model(OURS, kv=True, n_layers=1).double()
    model(rand(2, 1, D, grad=False))
    assert model.last_backend == fastformers.resolve_backend(torch.device("cpu"))


def test_feedback_kv_two_forwards_one_backward():
    """Keys/values are per call: two forwards sharing a backward give the sum of
    the separate gradients (labml's shared Stack buffer does not)."""
    x1, x2 = rand(4, 2, D, grad=False), rand(4, 2, D, grad=False)
    ref, ours = make_pair(lambda ns: _feedback_model(ns, kv=True))

    def grads(model, together):
        model.zero_grad()
        if together:
            (model(x1).sum() + (model(x2) * 2).sum()).backward()
            return {n: p.grad.clone() for n, p in model.named_parameters()}
        model(x1).sum().backward()
        first = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        (model(x2) * 2).sum().backward()
        return {n: first[n] + p.grad for n, p in model.named_parameters()}

    separate, together = grads(ours, False), grads(ours, True)
    for name in separate:
        assert (separate[name] - together[name]).abs().max() <= TOL, name

    labml_separate, labml_together = grads(ref, False), grads(ref, True)
    for name in separate:
        assert (labml_separate[name] - separate[name]).abs().max() <= TOL, name
    assert max((labml_separate[n] - labml_together[n]).abs().max() for n in separate) > 1e-6


def test_feedback_kv_longer_than_512_steps():
    """labml's Stack holds 512 steps; ours has no such cap."""
    model = _feedback_model(OURS, kv=True, d_model=4, heads=1, n_layers=1)
    model.backend = "cpp" if "cpp" in BACKENDS else "reference"
    x = torch.randn(520, 1, 4, requires_grad=True)
    out = model(x)
    assert out.shape == (520, 1, 4)
    # Not out[-1].sum(): the sum of a LayerNorm output with unit gain is constant.
    (out[-1] * torch.randn(1, 4)).sum().backward()
    assert x.grad[0].abs().sum() > 0


# ---------------------------------------------------------------- compressive

@pytest.mark.parametrize("rate,mem_len,batch", [(2, 2, 1), (4, 8, 3), (3, 7, 2)])
def test_conv1d_compression(rate, mem_len, batch):
    ref, ours = make_pair(lambda ns: ns.Conv1dCompression(rate, D))
    assert assert_parity(ref, ours, lambda m, i: m(i[0]), [rand(mem_len, batch, D)]) == []


def _compressive_layer(ns):
    return ns.CompressiveTransformerLayer(
        d_model=D, self_attn=ns.RelativeMultiHeadAttention(H, D, 0.0),
        feed_forward=ns.FeedForward(D, 2 * D, 0.0), dropout_prob=0.0,
        compress=ns.Conv1dCompression(2, D))


@pytest.mark.parametrize("backend", XL_BACKENDS)
@pytest.mark.parametrize("seq_len,mem_len,c_mem_len,batch", [(1, 0, 0, 1), (3, 4, 0, 2), (5, 4, 3, 3)])
def test_compressive_transformer_layer(seq_len, mem_len, c_mem_len, batch, backend):
    ref, ours = make_pair(_compressive_layer)
    use_attention_backend(ours, backend)
    mem = rand(mem_len, batch, D) if mem_len else None
    c_mem = rand(c_mem_len, batch, D) if c_mem_len else None
    idle = assert_parity(ref, ours, lambda m, i: m(x=i[0], mem=i[1], c_mem=i[2], mask=i[3]),
                         [rand(seq_len, batch, D), mem, c_mem, causal_mask(seq_len, mem_len + c_mem_len)])
    # The compression is not part of the forward pass.
    assert idle[:2] == ["compress.conv.weight", "compress.conv.bias"]
    assert len(idle) == 2 or mem_len + seq_len == 1


@pytest.mark.parametrize("backend", XL_BACKENDS)
@pytest.mark.parametrize("seq_len,mem_len,c_mem_len,batch", [(1, 0, 0, 1), (4, 6, 2, 3)])
def test_compressive_transformer(seq_len, mem_len, c_mem_len, batch, backend):
    ref, ours = make_pair(lambda ns: ns.CompressiveTransformer(_compressive_layer(ns), 2))
    use_attention_backend(ours, backend)
    mem = [rand(mem_len, batch, D) for _ in range(2)] if mem_len else []
    c_mem = [rand(c_mem_len, batch, D) for _ in range(2)] if c_mem_len else []
    assert_parity(ref, ours, lambda m, i: m(i[0], i[1], i[2], i[3]),
                  [rand(seq_len, batch, D), mem, c_mem, causal_mask(seq_len, mem_len + c_mem_len)])


@pytest.mark.parametrize("seq_len,mem_len,batch", [(1, 2, 1), (5, 8, 3)])
def test_attention_reconstruction_loss(seq_len, mem_len, batch):
    ref, ours = make_pair(lambda ns: ns.CompressiveTransformer(_compressive_layer(ns), 2))
    assert not isinstance(ours_ns.AttentionReconstructionLoss(ours.layers), nn.Module)
    h = [rand(seq_len, batch, D) for _ in range(2)]
    mem = [rand(mem_len, batch, D) for _ in range(2)]
    ref_loss = LABML.AttentionReconstructionLoss(ref.layers)(h, mem)
    our_loss = OURS.AttentionReconstructionLoss(ours.layers)(h, mem)
    assert abs(our_loss.item() - ref_loss.item()) <= TOL
    ref_loss.backward()
    our_loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if ".compress." in name:
            assert (p.grad - ref_params[name].grad).abs().max() <= TOL, name
            assert p.grad.abs().sum() > 0
        else:
            assert p.grad is None and ref_params[name].grad is None, name
    assert all(t.grad is None for t in h + mem)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the C++ extension")
def test_compressive_modules_on_the_fused_backend_float32():
    """Conv1dCompression, the layers' relative attention and AttentionReconstructionLoss
    run the C++ kernels (``last_backend`` says so) and match labml_nn in float32:
    outputs, compressions, the loss and every parameter gradient."""
    ref, ours = (m.float() for m in make_pair(lambda ns: ns.CompressiveTransformer(_compressive_layer(ns), 2)))
    for module in ours.modules():
        if hasattr(module, "last_backend"):
            module.backend = "cpp"
    ours_loss = OURS.AttentionReconstructionLoss(ours.layers)
    ours_loss.backend = "cpp"
    gen = torch.Generator().manual_seed(3)
    x, mem, c_mem = (torch.randn(*shape, generator=gen) for shape in ((5, 3, D), (2, 6, 3, D), (2, 2, 3, D)))
    mask = causal_mask(5, 6 + 2)

    def run(model, loss_of):
        out, new_mem = model(x, list(mem), list(c_mem), mask)
        compressed = torch.stack([layer.compress(m) for layer, m in zip(model.layers, mem)])
        loss = loss_of(new_mem, list(mem))
        weights = torch.Generator().manual_seed(4)
        total = loss + sum((t * torch.randn(t.shape, generator=weights)).sum() for t in (out, compressed))
        total.backward()
        return out, compressed, loss

    for got, want in zip(run(ours, ours_loss), run(ref, LABML.AttentionReconstructionLoss(ref.layers))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert ours_loss.last_backend == "cpp"
    assert all(layer.compress.last_backend == "cpp" and layer.self_attn.last_backend == "cpp"
               for layer in ours.layers)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-4, msg=name)


# ---------------------------------------------------------------- switch

def _switch_ff(ns, capacity_factor=0.5, drop_tokens=True, is_scale_prob=True):
    return ns.SwitchFeedForward(capacity_factor=capacity_factor, drop_tokens=drop_tokens,
                                is_scale_prob=is_scale_prob, n_experts=4,
                                expert=ns.FeedForward(D, 2 * D, 0.0), d_model=D)


@pytest.mark.parametrize("drop_tokens,is_scale_prob", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("seq_len,batch", [(1, 1), (7, 3)])
def test_switch_feed_forward(drop_tokens, is_scale_prob, seq_len, batch):
    ref, ours = make_pair(lambda ns: _switch_ff(ns, 0.5, drop_tokens, is_scale_prob))
    x = rand(seq_len, batch, D)
    for seed in (0, 1, 2):
        out = ours(x)
        assert_parity(ref, ours, lambda m, i: m(i[0]), [x], seed=seed)
    assert isinstance(out[3], int)
    assert (out[3] > 0) == drop_tokens


def test_switch_feed_forward_drops_same_tokens_as_labml():
    """Several drop draws in one call consume the global RNG in labml's order."""
    ref, ours = make_pair(lambda ns: _switch_ff(ns, 0.25))
    x = rand(9, 4, D, grad=False)
    torch.manual_seed(7)
    ref_out = ref(x)
    torch.manual_seed(7)
    our_out = ours(x)
    assert our_out[3] == ref_out[3] > 0
    assert (our_out[0] - ref_out[0]).abs().max() <= TOL
    torch.manual_seed(7)
    ref(x)
    after_ref = torch.rand(4)
    torch.manual_seed(7)
    ours(x)
    assert torch.equal(torch.rand(4), after_ref)


def _switch_layer(ns):
    return ns.SwitchTransformerLayer(d_model=D, attn=ns.MultiHeadAttention(H, D, 0.0),
                                     feed_forward=_switch_ff(ns, 0.75), dropout_prob=0.0)


@pytest.mark.parametrize("seq_len,batch", [(1, 1), (7, 3)])
def test_switch_transformer_layer(seq_len, batch):
    ref, ours = make_pair(_switch_layer)
    assert_parity(ref, ours, lambda m, i: m(x=i[0], mask=i[1]), [rand(seq_len, batch, D), causal_mask(seq_len)])


@pytest.mark.parametrize("seq_len,batch", [(1, 1), (7, 3)])
def test_switch_transformer(seq_len, batch):
    ref, ours = make_pair(lambda ns: ns.SwitchTransformer(_switch_layer(ns), 2))
    x = rand(seq_len, batch, D)
    assert_parity(ref, ours, lambda m, i: m(i[0], i[1]), [x, causal_mask(seq_len)], seed=3)
    torch.manual_seed(3)
    out = ours(x, causal_mask(seq_len))
    assert isinstance(out[3], list) and all(isinstance(n, int) for n in out[3])
    if seq_len * batch > 1:
        assert sum(out[3]) > 0


# ---------------------------------------------------------------- API

def _public_methods(cls):
    return sorted(n for n, v in vars(cls).items()
                  if callable(v) and (not n.startswith("_") or n in ("__init__", "__call__")))


def _params(signature):
    # A module default (FeedForward's activation) is compared by type and configuration.
    return [(p.name, p.kind, repr(p.default) if isinstance(p.default, nn.Module) else p.default)
            for p in signature.parameters.values()]


@pytest.mark.parametrize("name", ours_ns.__all__)
def test_same_signatures(name):
    ref_cls, our_cls = getattr(LABML, name), getattr(OURS, name)
    assert issubclass(our_cls, nn.Module) == issubclass(ref_cls, nn.Module)
    for method in _public_methods(ref_cls):
        ref_params = _params(inspect.signature(getattr(ref_cls, method)))
        our_params = _params(inspect.signature(getattr(our_cls, method)))
        # labml's parameters exactly, then only keyword-only extensions with defaults (n_positions),
        # so that every labml call is also a fastformers call with the same meaning
        assert our_params[:len(ref_params)] == ref_params, f"{name}.{method}"
        for extra, kind, default in our_params[len(ref_params):]:
            assert kind == inspect.Parameter.KEYWORD_ONLY and default is not inspect.Parameter.empty, \
                f"{name}.{method}: {extra}"
