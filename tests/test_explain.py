"""fastformers.explain and the one-time fallback warning.

Every labml_nn 0.5.1 model built with its default constructor arguments
(dropout 0.1, ungated ReLU feed-forward) runs its fused path after convert, in
train and in eval mode; a module that cannot says why, once.
"""
import warnings

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
from fastformers._backend import FallbackWarning  # noqa: E402

D, H, D_FF = 32, 4, 64


def _xl():
    layer = labml_xl.TransformerXLLayer(d_model=D, self_attn=labml_xl.RelativeMultiHeadAttention(H, D),
                                        feed_forward=labml_feed_forward.FeedForward(D, D_FF), dropout_prob=0.1)
    return labml_xl.TransformerXL(layer, 2)


def _compressive():
    layer = labml_compressive.CompressiveTransformerLayer(
        d_model=D, self_attn=labml_xl.RelativeMultiHeadAttention(H, D),
        feed_forward=labml_feed_forward.FeedForward(D, D_FF), dropout_prob=0.1,
        compress=labml_compressive.Conv1dCompression(2, D))
    return labml_compressive.CompressiveTransformer(layer, 2)


def _feedback_layer(kv: bool):
    return labml_feedback.FeedbackTransformerLayer(
        d_model=D, attn=labml_feedback.FeedbackAttention(H, D, is_kv_precomputed=kv),
        feed_forward=labml_feed_forward.FeedForward(D, D_FF), dropout_prob=0.1)


def _feedback():
    return labml_feedback.FeedbackTransformer(_feedback_layer(False), 2)


def _feedback_kv():
    return labml_feedback.FeedbackTransformerKV(_feedback_layer(True), 2, D, H)


def _switch_ffn(expert=None):
    return labml_switch.SwitchFeedForward(capacity_factor=1.0, drop_tokens=True, is_scale_prob=True, n_experts=4,
                                          expert=expert or labml_feed_forward.FeedForward(D, D_FF), d_model=D)


def _switch():
    layer = labml_switch.SwitchTransformerLayer(d_model=D, attn=labml_mha.MultiHeadAttention(H, D),
                                                feed_forward=_switch_ffn(), dropout_prob=0.1)
    return labml_switch.SwitchTransformer(layer, 2)


MODELS = {
    "xl": (_xl, {"RelativeMultiHeadAttention"}),
    "compressive": (_compressive, {"RelativeMultiHeadAttention", "Conv1dCompression"}),
    "feedback": (_feedback, {"FeedbackTransformer"}),
    "feedback_kv": (_feedback_kv, {"FeedbackTransformerKV"}),
    "switch": (_switch, {"SwitchFeedForward"}),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_labml_models_run_fused_in_train_and_eval(name):
    build, fused_classes = MODELS[name]
    model = fastformers.convert(build())
    plans = fastformers.explain(model, show=False)
    assert fused_classes <= {plan.cls for plan in plans}
    for plan in plans:
        assert not plan.falls_back, plan
        assert plan.why == "fused"


def test_explain_lists_unconverted_labml_modules(capsys):
    plans = fastformers.explain(_xl())
    assert plans and all(plan.train_backend == "labml_nn (not converted)" for plan in plans)
    assert "fastformers.convert" in capsys.readouterr().out


def test_fallback_warns_once_with_its_reason_and_explain_shows_it():
    expert = labml_feed_forward.FeedForward(D, D_FF, activation=nn.Tanh())
    module = fastformers.convert(_switch_ffn(expert))
    plan, = [p for p in fastformers.explain(module, show=False) if p.cls == "SwitchFeedForward"]
    assert plan.train_backend == plan.eval_backend == "reference"
    assert "Tanh" in plan.why
    x = torch.randn(5, 3, D)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module(x)
        module(x)
        fastformers.convert(_switch_ffn(labml_feed_forward.FeedForward(D, D_FF, activation=nn.Tanh())))(x)
    fallbacks = [w for w in caught if issubclass(w.category, FallbackWarning)]
    assert len(fallbacks) == 1
    assert "Tanh" in str(fallbacks[0].message)
