"""fastformers.convert.convert: labml_nn modules swapped for fastformers.nn in place."""
import pytest
import torch
from torch import nn

import fastformers.nn as ffnn
from fastformers.convert import convert

D, H = 16, 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def labml():
    pytest.importorskip("labml_nn")
    from types import SimpleNamespace

    from labml_nn.transformers import compressive, feed_forward, feedback, mha, switch, xl

    return SimpleNamespace(mha=mha, feed_forward=feed_forward, xl=xl, feedback=feedback,
                           compressive=compressive, switch=switch)


def randomize(module):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return module


def causal_mask(seq_len, mem_len=0):
    tril = torch.tril(torch.ones(seq_len, seq_len)).to(torch.bool).unsqueeze(-1)
    return torch.cat((torch.ones(seq_len, mem_len, 1, dtype=torch.bool), tril), dim=1)


class Wrapper(nn.Module):
    """Stands for an experiment's model: the transformer is a child."""

    def __init__(self, transformer):
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.transformer = transformer

    def forward(self, x, *args):
        return self.transformer(self.embed(x), *args)


def _xl(lib):
    layer = lib.xl.TransformerXLLayer(d_model=D, self_attn=lib.xl.RelativeMultiHeadAttention(H, D, 0.0),
                                      feed_forward=lib.feed_forward.FeedForward(D, 2 * D, 0.0), dropout_prob=0.0)
    return lib.xl.TransformerXL(layer, 2)


def _feedback(lib, kv):
    layer = lib.feedback.FeedbackTransformerLayer(
        d_model=D, attn=lib.feedback.FeedbackAttention(H, D, 0.0, is_kv_precomputed=kv),
        feed_forward=lib.feed_forward.FeedForward(D, 2 * D, 0.0), dropout_prob=0.0)
    if kv:
        return lib.feedback.FeedbackTransformerKV(layer, 2, D, H)
    return lib.feedback.FeedbackTransformer(layer, 2)


def _compressive(lib):
    layer = lib.compressive.CompressiveTransformerLayer(
        d_model=D, self_attn=lib.xl.RelativeMultiHeadAttention(H, D, 0.0),
        feed_forward=lib.feed_forward.FeedForward(D, 2 * D, 0.0), dropout_prob=0.0,
        compress=lib.compressive.Conv1dCompression(2, D))
    return lib.compressive.CompressiveTransformer(layer, 2)


def _switch(lib):
    ff = lib.switch.SwitchFeedForward(capacity_factor=0.5, drop_tokens=True, is_scale_prob=True, n_experts=3,
                                      expert=lib.feed_forward.FeedForward(D, 2 * D, 0.0), d_model=D)
    layer = lib.switch.SwitchTransformerLayer(d_model=D, attn=lib.mha.MultiHeadAttention(H, D, 0.0),
                                              feed_forward=ff, dropout_prob=0.0)
    return lib.switch.SwitchTransformer(layer, 2)


def _inputs(kind):
    x = torch.randn(5, 2, D, dtype=torch.float64)
    if kind == "xl":
        return (x, [torch.randn(3, 2, D, dtype=torch.float64) for _ in range(2)], causal_mask(5, 3))
    if kind == "compressive":
        mem = [torch.randn(4, 2, D, dtype=torch.float64) for _ in range(2)]
        c_mem = [torch.randn(2, 2, D, dtype=torch.float64) for _ in range(2)]
        return (x, mem, c_mem, causal_mask(5, 6))
    if kind == "switch":
        return (x, causal_mask(5))
    return (x,)


MODELS = {
    "xl": _xl,
    "feedback": lambda lib: _feedback(lib, kv=False),
    "feedback_kv": lambda lib: _feedback(lib, kv=True),
    "compressive": _compressive,
    "switch": _switch,
}


def _first_tensor(out):
    return out[0] if isinstance(out, tuple) else out


def _assert_all_ours(model):
    for name, m in model.named_modules():
        module = type(m).__module__
        assert not module.startswith("labml_nn.transformers"), f"{name} is still {module}.{type(m).__qualname__}"


@pytest.mark.parametrize("kind", list(MODELS))
def test_convert_labml_model(labml, kind):
    model = Wrapper(randomize(MODELS[kind](labml))).double().eval()
    keys = list(model.state_dict().keys())
    params = dict(model.named_parameters())
    inputs = _inputs(kind)
    torch.manual_seed(5)
    before = model(*inputs)

    converted = convert(model, backend="reference")

    assert converted is model
    _assert_all_ours(model)
    assert list(model.state_dict().keys()) == keys
    # Parameters are shared, except the Switch experts: copied into the stacked layout
    for name, p in model.named_parameters():
        if kind == "switch" and name.rsplit(".", 1)[-1] in ("w1", "b1", "w2", "b2"):
            assert name not in params
        else:
            assert p is params[name], name
    torch.manual_seed(5)
    after = model(*inputs)
    assert (_first_tensor(after) - _first_tensor(before)).abs().max() <= 1e-12
    if kind == "switch":
        assert after[3] == before[3]
    if kind.startswith("feedback"):
        assert model.transformer.backend == "reference"
        assert model.transformer.last_backend == "reference"


def test_convert_replaces_root_and_drops_labml_buffers(labml):
    old = randomize(_feedback(labml, kv=True)).double()
    x = torch.randn(4, 1, D, dtype=torch.float64)
    expected = old(x)
    model = convert(old, backend="cpp")
    assert type(model) is ffnn.FeedbackTransformerKV and model is not old
    assert not hasattr(model, "mem_key") and not hasattr(model, "mem_value")
    assert "softmax" not in dict(model.named_children())
    assert model.backend == "cpp" and model.last_backend is None
    assert model.state_dict().keys() == old.state_dict().keys()
    assert all(p is q for p, q in zip(model.parameters(), old.parameters()))
    assert (model(x) - expected).abs().max() <= 1e-12
    assert model.last_backend == "cpp"
    # The old module keeps its own containers and still runs.
    assert torch.equal(old(x), expected)


def test_convert_keeps_shared_modules_shared(labml):
    ff = labml.feed_forward.FeedForward(D, 2 * D, 0.0)
    model = nn.Sequential(ff, ff)
    convert(model)
    assert type(model[0]) is ffnn.FeedForward and model[0] is model[1]


def test_convert_leaves_subclasses_and_other_labml_classes(labml):
    class Custom(labml.mha.MultiHeadAttention):
        pass

    custom = Custom(H, D, 0.0)
    model = nn.ModuleDict({"custom": custom, "plain": labml.mha.MultiHeadAttention(H, D, 0.0)})
    convert(model)
    assert model["custom"] is custom
    assert type(model["custom"].query) is ffnn.PrepareForMultiHeadAttention
    assert type(model["plain"]) is ffnn.MultiHeadAttention


def test_reconstruction_loss_follows_converted_layers(labml):
    model = randomize(_compressive(labml)).double()
    loss = labml.compressive.AttentionReconstructionLoss(model.layers)
    h = [torch.randn(3, 2, D, dtype=torch.float64) for _ in range(2)]
    mem = [torch.randn(4, 2, D, dtype=torch.float64) for _ in range(2)]
    expected = loss(h, mem)
    model = convert(model)
    assert all(type(layer) is ffnn.CompressiveTransformerLayer for layer in loss.layers)
    ours = ffnn.AttentionReconstructionLoss(model.layers)(h, mem)
    assert abs(ours.item() - expected.item()) <= 1e-12


def test_convert_labml_structure_mismatch(labml):
    model = Wrapper(_feedback(labml, kv=False))
    model.transformer.weights = nn.Parameter(torch.ones(5))
    with pytest.raises(ValueError, match=r"model\.transformer \(labml_nn\.transformers\.feedback\."
                                         r"FeedbackTransformer\): weights has shape \(5,\), expected \(3,\)"):
        convert(model)


# ---------------------------------------------------------------- without labml_nn

def test_convert_rejects_non_module():
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got dict"):
        convert({"layer": nn.Linear(2, 2)})


@pytest.mark.parametrize("backend", ["cuda", "Reference", ""])
def test_convert_rejects_unknown_backend(backend):
    with pytest.raises(ValueError, match=r"backend must be None or one of \('reference', 'cpp', 'triton'\)"):
        convert(nn.Linear(2, 2), backend=backend)


def test_convert_recognises_labml_by_name_only():
    """A class named like labml's is matched without importing labml_nn; a
    layout that does not fit is reported with its path."""

    class Impostor(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList()

    Impostor.__module__ = "labml_nn.transformers.feedback"
    Impostor.__qualname__ = "FeedbackTransformer"
    model = nn.Sequential(nn.Linear(2, 2), Impostor())
    with pytest.raises(ValueError, match=r"model\.1 \(labml_nn\.transformers\.feedback\.FeedbackTransformer\): "
                                         r"missing attribute\(s\) norm, weights"):
        convert(model)


def _our_feedback(kv):
    layer = ffnn.FeedbackTransformerLayer(d_model=D, attn=ffnn.FeedbackAttention(H, D, 0.0, is_kv_precomputed=kv),
                                          feed_forward=ffnn.FeedForward(D, 2 * D, 0.0), dropout_prob=0.0)
    return ffnn.FeedbackTransformerKV(layer, 1, D, H) if kv else ffnn.FeedbackTransformer(layer, 1)


def test_convert_our_modules_sets_backend():
    model = nn.ModuleList([_our_feedback(False), _our_feedback(True)])
    inner = list(model)
    assert convert(model, backend="triton") is model
    assert [m is n for m, n in zip(model, inner)] == [True, True]
    assert [m.backend for m in model] == ["triton", "triton"]
    convert(model)
    assert [m.backend for m in model] == [None, None]


def test_convert_checks_our_modules_too():
    model = _our_feedback(False)
    model.weights = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"model \(fastformers\.nn\.feedback\.FeedbackTransformer\): weights"):
        convert(model)
