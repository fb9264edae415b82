"""Dropout inside the Feedback Transformer's fused kernels: the attention step
op and the whole-recurrence ops. Each kernel's output and every gradient equal
a plain autograd computation that replays the masks ``dropout.record()``
reports; p = 0 is the plain computation bit for bit; eval mode applies none;
the same seed gives the same result."""
import copy

import pytest
import torch
from torch import nn
from torch.library import opcheck

import fastformers
import fastformers.nn as ours
from fastformers.ops import dropout
from fastformers.ops.feedback import naive, recurrence

pytestmark = pytest.mark.usefixtures("one_thread")

FUSED_BACKENDS = [name for name in ("cpp", "triton") if name in fastformers.available_backends()]
TOLERANCES = {torch.float64: dict(atol=1e-9, rtol=1e-7), torch.float32: dict(atol=2e-4, rtol=2e-3)}


def use_backend(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")


# ---------------------------------------------------------------- the attention step

def step_inputs(steps, B, H, d, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)

    P = steps + 3
    return [rand(B, H, d), rand(steps + 2, B, H, d), rand(steps + 2, B, H, d), rand(P, H, d), rand(P, H), rand(H, d)]


def replayed_step(mask, p):
    """The step as plain autograd ops with the recorded ``[B, H, steps]`` mask."""
    def step(query, key_cache, value_cache, steps, pos_emb, pos_bias, query_pos_bias, scale):
        key, value = key_cache[:steps], value_cache[:steps]
        scores = torch.einsum("bhd,jbhd->jbh", query + query_pos_bias, key)
        scores = scores + torch.einsum("bhd,jhd->jbh", query, pos_emb[-steps:]) + pos_bias[-steps:, None, :]
        attn = torch.softmax(scores * scale, dim=0) * mask.permute(2, 0, 1).to(query.dtype) / (1 - p)
        return torch.einsum("jbh,jbhd->bhd", attn, value)
    return step


def outputs_and_grads(fn, inputs, steps, grad):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves[:3], steps, *leaves[3:], 0.4)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_step_dropout_replays_the_recorded_mask(backend, dtype, request):
    use_backend(backend, request)
    steps, B, H, d, p = 7, 3, 2, 24, 0.3
    inputs = step_inputs(steps, B, H, d, dtype)
    grad = torch.randn(B, H, d, dtype=dtype)
    with dropout.record() as calls:
        got = outputs_and_grads(
            lambda *args: fastformers.ops.feedback_attention_step(*args, dropout_p=p, backend=backend),
            inputs, steps, grad)
    assert [(c.op, c.shape) for c in calls] == [("feedback_attention_step", (B, H, steps))]
    mask = calls[0].mask()
    assert 0 < mask.sum() < mask.numel()
    expected = outputs_and_grads(replayed_step(mask, p), inputs, steps, grad)
    for name, value, ref in zip(["out", "query", "key", "value", "R", "S", "u"], got, expected):
        torch.testing.assert_close(value, ref, **TOLERANCES[dtype], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
def test_step_p0_is_the_plain_step_and_seed_reproduces(backend, request):
    use_backend(backend, request)
    inputs = step_inputs(5, 2, 2, 16, torch.float32)
    call = fastformers.ops.feedback_attention_step
    plain = call(*inputs[:3], 5, *inputs[3:], 0.4, backend=backend)
    assert torch.equal(call(*inputs[:3], 5, *inputs[3:], 0.4, 0.0, backend=backend), plain)
    dropped = call(*inputs[:3], 5, *inputs[3:], 0.4, 0.5, seed=11, backend=backend)
    assert torch.equal(call(*inputs[:3], 5, *inputs[3:], 0.4, 0.5, seed=11, backend=backend), dropped)
    assert not torch.equal(call(*inputs[:3], 5, *inputs[3:], 0.4, 0.5, seed=12, backend=backend), dropped)
    with pytest.raises(ValueError, match="dropout_p"):
        call(*inputs[:3], 5, *inputs[3:], 0.4, 1.0, backend=backend)


def test_step_keep_rate():
    steps, B, H = 64, 16, 8
    with dropout.record() as calls:
        fastformers.ops.feedback_attention_step(*step_inputs(steps, B, H, 8, torch.float32)[:3], steps,
                                                *step_inputs(steps, B, H, 8, torch.float32)[3:], 0.3, 0.25)
    assert abs(calls[0].mask().float().mean().item() - 0.75) < 0.02


@pytest.mark.skipif(not fastformers.extension_available(), reason="the C++ extension is not built")
def test_step_opcheck_with_dropout():
    steps, B, H, d = 3, 2, 2, 8
    inputs = step_inputs(steps, B, H, d, torch.float64)
    args = (*inputs[:3], steps, *inputs[3:], 0.25, 0.3, 5, 17)
    opcheck(torch.ops.fastformers.feedback_attention_step.default,
            tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args))
    grad = torch.randn(B, H, d, dtype=torch.float64)
    opcheck(torch.ops.fastformers.feedback_attention_step_backward.default, (grad, *args))


# ---------------------------------------------------------------- the whole recurrence

def build(kv, heads=2, d_k=8, n_layers=2, dtype=torch.float64, dropout_p=0.2, activation=None, gated=False,
          biases=False, seed=1):
    d_model = heads * d_k
    ff = ours.FeedForward(d_model, 3 * d_model, dropout_p, activation=activation or nn.ReLU(), is_gated=gated)
    layer = ours.FeedbackTransformerLayer(
        d_model=d_model, attn=ours.FeedbackAttention(heads, d_model, dropout_p, is_kv_precomputed=kv),
        feed_forward=ff, dropout_prob=dropout_p)
    model = ours.FeedbackTransformerKV(layer, n_layers, d_model, heads) if kv else \
        ours.FeedbackTransformer(layer, n_layers)
    if biases:
        add_biases(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.5 if p.dim() == 1 else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model.to(dtype).train()


def add_biases(model):
    """Query biases in every layer, key biases (per layer) or shared key/value biases."""
    def with_bias(linear):
        return nn.Linear(linear.in_features, linear.out_features, bias=True)

    for layer in model.layers:
        layer.attn.query.linear = with_bias(layer.attn.query.linear)
        if layer.attn.key is not None:
            layer.attn.key.linear = with_bias(layer.attn.key.linear)
    if isinstance(model, ours.FeedbackTransformerKV):
        model.key.linear = with_bias(model.key.linear)
        model.value.linear = with_bias(model.value.linear)


def replay(model, x, calls):
    """The model as plain autograd ops, one token at a time, with the masks the
    fused recurrence reported (``dropout.record()``)."""
    masks = {call.op: (call.mask().to(x.dtype) / (1 - call.p)) for call in calls}
    T, B, D = x.shape
    shared = isinstance(model, ours.FeedbackTransformerKV)
    n_caches = 1 if shared else len(model.layers)
    keys, values = [[] for _ in range(n_caches)], [[] for _ in range(n_caches)]
    outs = []
    for i in range(T):
        h = x[i]
        layer_outputs = [h]
        for l, layer in enumerate(model.layers):
            def mask(site, *shape):
                key = f"feedback_recurrence[layer {l}].{site}"
                if key not in masks:
                    return 1.0
                size = torch.Size(shape).numel()
                return masks[key][i, :size].view(shape)

            attn, ff = layer.attn, layer.feed_forward
            c = 0 if shared else l
            if i > 0:
                key, value = torch.stack(keys[c]), torch.stack(values[c])
                q = attn.query(layer.norm_self_attn(h))
                probs = torch.softmax(attn.get_scores(q, key) * attn.scale, dim=0)
                probs = probs * mask("attention", B, attn.heads, i).permute(2, 0, 1)
                a = torch.einsum("jbh,jbhd->bhd", probs, value).reshape(B, D)
                h = h + attn.output(a) * mask("attention_residual", B, D)
            z = layer.norm_ff(h)
            hidden = ff.activation(ff.layer1(z))
            if ff.is_gated:
                hidden = hidden * ff.linear_v(z)
            hidden = hidden * mask("hidden", *hidden.shape)
            h = h + ff.layer2(hidden) * mask("ff_residual", B, D)
            layer_outputs.append(h)
        memory = torch.einsum("l,lbd->bd", torch.softmax(model.weights, 0), torch.stack(layer_outputs))
        projections = [(model.key, model.value)] if shared else [(lr.attn.key, lr.attn.value) for lr in model.layers]
        for c, (key_projection, value_projection) in enumerate(projections):
            keys[c].append(key_projection(memory))
            values[c].append(value_projection(memory))
        outs.append(h)
    return model.norm(torch.stack(outs))


def forward_and_grads(model, x, grad, run):
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = run(model, x)
    (out * grad).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def assert_same(got, expected, dtype):
    (out, x_grad, params), (ref_out, ref_x_grad, ref_params) = got, expected
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(x_grad, ref_x_grad, **tol)
    for name, ref in ref_params.items():
        if ref is None:
            assert params[name] is None, f"{name}: the fused path gives a gradient autograd does not"
            continue
        torch.testing.assert_close(params[name], ref, **tol, msg=lambda m, name=name: f"{name}: {m}")


def fused_against_replay(model, backend, T=6, B=3):
    model.backend = backend
    dtype = next(model.parameters()).dtype
    x = torch.randn(T, B, model.norm.normalized_shape[0], dtype=dtype)
    grad = torch.randn_like(x)
    with dropout.record() as calls:
        got = forward_and_grads(model, x, grad, lambda m, v: m(v))
    assert model.last_path == "fused"
    reference = copy.deepcopy(model)
    expected = forward_and_grads(reference, x, grad, lambda m, v: replay(m, v, calls))
    assert_same(got, expected, dtype)
    return calls


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("kv", [True, False], ids=["kv", "plain"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_recurrence_dropout_replays_recorded_masks(backend, kv, dtype, request):
    use_backend(backend, request)
    calls = fused_against_replay(build(kv, dtype=dtype), backend)
    sites = {call.op.split(".")[-1] for call in calls}
    assert sites == set(recurrence.DROPOUT_SITES) and len(calls) == 2 * len(recurrence.DROPOUT_SITES)


@pytest.mark.parametrize("kv", [True, False], ids=["kv", "plain"])
def test_python_loop_replays_recorded_masks(kv):
    """The Python loop (the ops' reference, and every non-cpp backend's loop) with dropout."""
    model = build(kv)
    x = torch.randn(5, 2, 16, dtype=torch.float64)
    layers = [ours.feedback._layer_weights(layer) for layer in model.layers]
    cfg = recurrence.make_config(
        n_layers=2, heads=2, d_k=8, shared_kv=kv, norm_eps=[(1e-5, 1e-5)] * 2, scale=8 ** -0.5, start=0,
        backend="reference", device=x.device, dropout_p=ours.feedback._dropout_probabilities(model))
    with dropout.record() as calls:
        out, _ = recurrence.run_recurrence(cfg, x, None, model.weights, *model._kv_projection(), layers)
    torch.testing.assert_close(model.norm(out), replay(model, x, calls), **TOLERANCES[torch.float64])


@pytest.mark.parametrize("kv", [True, False], ids=["kv", "plain"])
def test_continuing_a_state_with_dropout(kv):
    """Token i of a call that starts after ``start`` cached steps attends start + i steps."""
    model = build(kv)
    model.backend = "cpp"
    x = torch.randn(7, 2, 16, dtype=torch.float64)
    _, state = model.forward_with_state(x[:3])
    with dropout.record() as calls:
        out, _ = model.forward_with_state(x[3:], state)
    assert model.last_path == "fused"
    attention = [c for c in calls if c.op.endswith(".attention")]
    assert attention[0].shape == (4, 2 * 2 * (3 + 4 - 1))
    hidden = torch.cat([c.mask().flatten() for c in calls if c.op.endswith(".hidden")])
    assert abs(hidden.float().mean().item() - 0.8) < 0.05  # p = 0.2


def test_p0_is_bit_identical_and_eval_applies_none():
    torch.manual_seed(0)
    dropped = build(True, dropout_p=0.5)
    plain = build(True, dropout_p=0.0)
    x = torch.randn(6, 3, 16, dtype=torch.float64)
    for model in (dropped, plain):
        model.backend = "cpp"
    expected = plain(x)
    dropped.eval()
    with dropout.record() as calls:
        assert torch.equal(dropped(x), expected)
    assert calls == [] and dropped.last_path == "fused"
    dropped.train()
    assert not torch.equal(dropped(x), expected)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_same_seed_same_result(backend, request):
    use_backend(backend, request)
    model = build(False, dtype=torch.float32)
    model.backend = backend
    x = torch.randn(5, 2, 16)
    torch.manual_seed(3)
    first = model(x)
    torch.manual_seed(3)
    assert torch.equal(model(x), first)
    assert not torch.equal(model(x), first)


def test_cpp_and_python_loops_draw_the_same_bits():
    """The C++ loop and the Python loop (its registered reference) with one (seed, offset)."""
    model = build(True)
    x = torch.randn(5, 2, 16, dtype=torch.float64)
    outs = []
    for backend in ("cpp", "reference"):
        layers = [ours.feedback._layer_weights(layer) for layer in model.layers]
        cfg = recurrence.make_config(
            n_layers=2, heads=2, d_k=8, shared_kv=True, norm_eps=[(1e-5, 1e-5)] * 2, scale=8 ** -0.5, start=0,
            backend=backend, device=x.device, dropout_p=ours.feedback._dropout_probabilities(model))
        torch.manual_seed(9)
        with torch.no_grad():
            outs.append(recurrence.run_recurrence(cfg, x, None, model.weights, *model._kv_projection(), layers)[0])
    torch.testing.assert_close(outs[0], outs[1], **TOLERANCES[torch.float64])


def test_step_with_dropout_under_torch_compile():
    steps, B, H, d = 4, 2, 2, 8
    inputs = step_inputs(steps, B, H, d, torch.float32)
    query = inputs[0].clone().requires_grad_()

    @torch.compile(fullgraph=True)
    def step(q):
        return torch.ops.fastformers.feedback_attention_step(q * 2, *inputs[1:3], steps, *inputs[3:], 0.5, 0.3, 7, 64)

    compiled = step(query)
    compiled.sum().backward()
    grad = query.grad.clone()
    query.grad = None
    expected = naive.feedback_attention_step(query * 2, *inputs[1:3], steps, *inputs[3:], 0.5, 0.3, 7, 64)
    expected.sum().backward()
    torch.testing.assert_close(compiled, expected)
    torch.testing.assert_close(grad, query.grad)
