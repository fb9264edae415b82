"""SwitchFeedForward and switch_mlp under ``torch.autocast("cpu", bfloat16)``
on every backend: they run, match the reference backend under autocast and
labml_nn in float32 (relative error of the output < 2%), and gradients reach
every parameter; plus every labml FeedForward configuration converted and
fused against labml_nn."""
import pytest
import torch
from torch import nn

from fastformers.convert import convert
from fastformers.nn import SwitchFeedForward
from fastformers.ops.switch import route, switch_mlp
from harness import labml_layout
from test_switch_ops import make_weights

pytestmark = pytest.mark.usefixtures("triton_interpreter", "one_thread")

D, D_FF, N_EXPERTS = 32, 48, 4


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def labml_switch(activation=None, is_gated=False, bias=True, dropout=0.0):
    pytest.importorskip("labml_nn")
    from labml_nn.transformers.feed_forward import FeedForward
    from labml_nn.transformers.switch import SwitchFeedForward as LabmlSwitch

    torch.manual_seed(0)
    expert = FeedForward(D, D_FF, dropout, activation=activation or nn.ReLU(), is_gated=is_gated, bias1=bias,
                         bias2=bias, bias_gate=bias)
    # capacity 2.0: every token kept, so that a bf16 router that flips a near-tie drops nothing extra
    return LabmlSwitch(capacity_factor=2.0, drop_tokens=True, is_scale_prob=True, n_experts=N_EXPERTS, expert=expert,
                       d_model=D)


def routes(module, x, autocast):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return module.switch(x.view(-1, D)).argmax(-1)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_module_under_bf16_autocast(backend, dropout):
    labml = labml_switch(nn.SiLU(), is_gated=True, dropout=dropout)
    labml.eval()
    x = torch.randn(12, 4, D)
    expected = labml(x)[0]
    # the bf16 router must pick the experts the float32 one picks, or the comparison is meaningless
    assert torch.equal(routes(labml, x, False), routes(labml, x, True))
    module = convert(labml, backend=backend)
    assert type(module) is SwitchFeedForward

    def run(backend, training):
        module.backend = backend
        module.train(training)
        module.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)[0]
        assert out.dtype == torch.float32  # labml's output dtype under autocast
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), {name: p.grad for name, p in module.named_parameters()}

    out, grads = run(backend, training=False)
    assert module.last_backend == backend
    assert relative_error(out, expected) < 0.02
    reference_out, reference_grads = run("reference", training=False)
    assert relative_error(out, reference_out) < 0.02
    for name, grad in grads.items():
        assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
        assert relative_error(grad, reference_grads[name]) < 0.05, name
    # training: the fused dropout path under autocast, gradients again reach every parameter
    out, grads = run(backend, training=True)
    assert module.last_backend == backend and torch.isfinite(out).all()
    assert all(grad is not None and grad.abs().sum() > 0 for grad in grads.values())


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_op_under_bf16_autocast_matches_bf16_inputs(backend):
    x = torch.randn(30, 24)
    routing = route(torch.randn(30, 4), 1.0, True, "deterministic")
    weights = make_weights(4, 24, 40, torch.float32, gated=True)
    scale = routing.route_prob_max
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = switch_mlp(x, routing, *weights[:4], scale, "silu", *weights[4:], backend=backend)
    assert y.dtype == torch.bfloat16
    bf16 = [None if w is None else w.bfloat16() for w in weights]
    expected = switch_mlp(x.bfloat16(), routing, *bf16[:4], scale.bfloat16(), "silu", *bf16[4:], backend=backend)
    assert torch.equal(y, expected)


def test_registered_op_follows_autocast():
    x = torch.randn(30, 24)
    routing = route(torch.randn(30, 4), 1.0, True, "deterministic")
    groups = [[w for w in group] for group in make_weights(4, 24, 40, torch.float32)[:4]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, hidden = torch.ops.fastformers.switch_mlp(x, routing.order, routing.offsets, routing.kept, *groups, [], [],
                                                     routing.route_prob_max, "relu", 0.0, 0, 0)
    assert y.dtype == torch.bfloat16 and hidden.dtype == torch.float32


def test_cpp_bf16_kernel_accumulates_in_float32():
    """bf16 inputs through the C++ kernel against float32 math on the same bf16-rounded values."""
    x = torch.randn(64, 128).bfloat16()
    routing = route(torch.randn(64, 4), 1.0, True, "deterministic")
    weights = [w.bfloat16() for w in make_weights(4, 128, 256, torch.float32)[:4]]
    scale = routing.route_prob_max.bfloat16()
    got = switch_mlp(x, routing, *weights, scale, backend="cpp")
    exact = switch_mlp(x.float(), routing, *[w.float() for w in weights], scale.float(), backend="cpp")
    # one bf16 rounding of the output: relative error <= 2^-8 per element
    assert ((got.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()


# labml_nn's FeedForward configurations (glu_variants): FFN_ReLU, FFN_GELU,
# FFN_SwiGLU... and their plain forms, with and without biases
LABML_FEED_FORWARDS = [
    (nn.ReLU(), False, True), (nn.GELU(), False, True), (nn.SiLU(), False, True), (nn.Sigmoid(), False, True),
    (nn.Identity(), False, True), (nn.ReLU(), True, False), (nn.GELU(), True, False), (nn.SiLU(), True, False),
    (nn.Sigmoid(), True, False), (nn.Identity(), True, False),
]


@pytest.mark.parametrize("activation,is_gated,bias", LABML_FEED_FORWARDS,
                         ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v))
def test_every_labml_feed_forward_runs_fused(activation, is_gated, bias):
    labml = labml_switch(activation, is_gated, bias).double()
    x = torch.randn(9, 4, D, dtype=torch.float64, requires_grad=True)
    expected = labml(x)[0]
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *labml.parameters()])
    module = convert(labml)
    out = module(x)[0]
    assert module.last_backend == "cpp"
    assert module.fused_backend(x.device, training=True) == ("cpp", None)
    grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
    grads = [grads[0], *labml_layout(module, dict(zip(dict(module.named_parameters()), grads[1:]))).values()]
    assert len(grads) == len(expected_grads)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-9)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
