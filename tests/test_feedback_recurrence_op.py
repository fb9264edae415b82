"""The C++ recurrence ops (``feedback_recurrence_forward`` / ``_backward``, the
cpp backend's whole token loop) against the Python loop on the reference
kernels: outputs, the written cache and every gradient; opcheck; bad input."""
import pytest
import torch
from torch.library import opcheck

import fastformers
from fastformers.ops.feedback import recurrence

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not fastformers.extension_available(), reason="the C++ extension is not built"),
]
TOLERANCES = {torch.float64: dict(atol=1e-9, rtol=1e-7), torch.float32: dict(atol=2e-4, rtol=2e-3)}
HEADS, D_K, P = 2, 12, 32


def make_problem(T, n_layers, shared_kv, dtype, start=0, batch=3, seed=0, gated=False):
    """Random weights (every optional bias present), inputs and an initial cache of ``start`` steps."""
    generator = torch.Generator().manual_seed(seed)
    D, F = HEADS * D_K, 40
    n_caches = 1 if shared_kv else n_layers

    def rand(*shape, scale=None):
        scale = (shape[-1] ** -0.5 if len(shape) > 1 else 0.5) if scale is None else scale
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    shapes = dict(norm_attn_weight=(D,), norm_attn_bias=(D,), query_weight=(D, D), key_pos_embeddings=(P, HEADS, D_K),
                  key_pos_bias=(P, HEADS), query_pos_bias=(HEADS, D_K), output_weight=(D, D), output_bias=(D,),
                  norm_ff_weight=(D,), norm_ff_bias=(D,), ff1_weight=(F, D), ff1_bias=(F,), ff2_weight=(D, F),
                  ff2_bias=(D,), query_bias=(D,))
    if gated:
        shapes.update(gate_weight=(F, D), gate_bias=(F,))
    layers = [recurrence.LayerWeights(**{name: rand(*shape) for name, shape in shapes.items()})
              for _ in range(n_layers)]
    x = rand(T, batch, D, scale=1.0)
    mix = rand(n_layers + 1)
    kv_weight = rand(2 * n_caches * D, D)
    kv_bias = None if shared_kv else rand(2 * n_caches * D)
    initial = rand(start, batch, 2 * n_caches, HEADS, D_K, scale=1.0) if start else None
    return x, initial, mix, kv_weight, kv_bias, layers


def config(n_layers, shared_kv, start, backend, activation="relu", dropout_p=0.0):
    return recurrence.make_config(n_layers=n_layers, heads=HEADS, d_k=D_K, shared_kv=shared_kv,
                                  norm_eps=[(1e-5, 1e-6)] * n_layers, scale=D_K ** -0.5, start=start, backend=backend,
                                  device=torch.device("cpu"), activation=activation,
                                  dropout_p=[dropout_p, dropout_p / 2, dropout_p * 1.5] * n_layers)


def leaves(problem):
    x, initial, mix, kv_weight, kv_bias, layers = problem
    fields = recurrence.LayerWeights.FIELDS
    copies = [{name: None if getattr(lw, name) is None else getattr(lw, name).detach().clone().requires_grad_()
               for name in fields} for lw in layers]
    return (x.detach().clone().requires_grad_(), initial, mix.detach().clone().requires_grad_(),
            kv_weight.detach().clone().requires_grad_(),
            None if kv_bias is None else kv_bias.detach().clone().requires_grad_(),
            [recurrence.LayerWeights(**c) for c in copies])


def run_and_grads(problem, n_layers, shared_kv, start, backend, calls=1, seed=None, **options):
    """Output(s), caches and the gradient of every differentiable input (None where
    unused); ``seed`` seeds torch before each call (dropout's generator)."""
    x, initial, mix, kv_weight, kv_bias, layers = leaves(problem)
    cfg = config(n_layers, shared_kv, start, backend, **options)
    loss, outs = 0, []
    for call in range(calls):  # several forwards, one backward
        if seed is not None:
            torch.manual_seed(seed + call)
        out, kv = recurrence.run_recurrence(cfg, x * (call + 1), initial, mix, kv_weight, kv_bias, layers)
        loss = loss + (out.sin() * (call + 1)).sum()
        outs.append((out.detach(), kv))
    loss.backward()
    params = [x, mix, kv_weight, kv_bias, *(getattr(lw, n) for lw in layers for n in recurrence.LayerWeights.FIELDS)]
    return outs, [None if p is None else p.grad for p in params]


@pytest.mark.parametrize("shared_kv", [True, False], ids=["kv", "plain"])
@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
@pytest.mark.parametrize("activation", recurrence.ACTIVATION_FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpp_loop_matches_python_loop_every_feed_forward_with_dropout(dtype, activation, gated, shared_kv):
    """Every feed-forward variant and dropout site: the C++ loop and the Python loop
    draw the same bits (same seed) and give the same outputs and gradients."""
    problem = make_problem(6, 2, shared_kv, dtype, start=2, gated=gated)
    options = dict(activation=activation, dropout_p=0.2, seed=5, calls=2)
    got = run_and_grads(problem, 2, shared_kv, 2, "cpp", **options)
    assert_same(got, run_and_grads(problem, 2, shared_kv, 2, "reference", **options), dtype)


def assert_same(got, expected, dtype):
    (outs, grads), (ref_outs, ref_grads) = got, expected
    tol = TOLERANCES[dtype]
    for (out, kv), (ref_out, ref_kv) in zip(outs, ref_outs):
        torch.testing.assert_close(out, ref_out, **tol)
        torch.testing.assert_close(kv, ref_kv, **tol)
    for index, (grad, ref) in enumerate(zip(grads, ref_grads)):
        if ref is None:
            assert grad is None, f"input {index}: the C++ loop gives a gradient the Python loop does not"
        else:
            torch.testing.assert_close(grad, ref, **tol, msg=lambda m, index=index: f"input {index}: {m}")


@pytest.mark.parametrize("shared_kv", [True, False], ids=["kv", "plain"])
@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("T", [1, 2, 17])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpp_loop_matches_python_loop(dtype, T, n_layers, shared_kv):
    problem = make_problem(T, n_layers, shared_kv, dtype)
    got = run_and_grads(problem, n_layers, shared_kv, 0, "cpp")
    assert_same(got, run_and_grads(problem, n_layers, shared_kv, 0, "reference"), dtype)


@pytest.mark.parametrize("shared_kv", [True, False], ids=["kv", "plain"])
@pytest.mark.parametrize("T", [1, 5])
def test_continuing_from_a_cache(T, shared_kv):
    problem = make_problem(T, 2, shared_kv, torch.float64, start=4)
    got = run_and_grads(problem, 2, shared_kv, 4, "cpp")
    assert_same(got, run_and_grads(problem, 2, shared_kv, 4, "reference"), torch.float64)


@pytest.mark.parametrize("shared_kv", [True, False], ids=["kv", "plain"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_two_forwards_one_backward(dtype, shared_kv):
    problem = make_problem(6, 2, shared_kv, dtype)
    got = run_and_grads(problem, 2, shared_kv, 0, "cpp", calls=2)
    assert_same(got, run_and_grads(problem, 2, shared_kv, 0, "reference", calls=2), dtype)


def op_args(problem, shared_kv, record=True):
    x, initial, mix, kv_weight, kv_bias, layers = problem
    T, B, _ = x.shape
    cfg = config(len(layers), shared_kv, 0, "cpp")
    kv = x.new_zeros((T, B, 2 * cfg.n_caches, HEADS, D_K))
    flat = [getattr(lw, name) for lw in layers for name in recurrence.LayerWeights.FIELDS]
    layer_args = ([*flat], [eps for pair in cfg.norm_eps for eps in pair], HEADS, cfg.scale, shared_kv, "gelu",
                  [0.1, 0.2, 0.3] * len(layers), 3, 40)
    return (x, kv, 0, mix, kv_weight, kv_bias, *layer_args, record), layer_args


def test_opcheck():
    shared_kv = False  # the general case: one cache per layer, a key/value bias
    problem = make_problem(3, 2, shared_kv, torch.float64)
    forward_args, layer_args = op_args(problem, shared_kv)
    ops = torch.ops.fastformers
    opcheck(ops.feedback_recurrence_forward.default, forward_args)
    opcheck(ops.feedback_recurrence_forward.default, op_args(problem, shared_kv, record=False)[0])
    kv = forward_args[1]
    layer_outputs, _, activations, hidden, stats = ops.feedback_recurrence_forward(*forward_args)
    grad = torch.randn_like(problem[0])
    opcheck(ops.feedback_recurrence_backward.default,
            (grad, layer_outputs, activations, hidden, stats, kv, 0, problem[2], problem[3], *layer_args))


def test_bad_input_is_rejected():
    problem = make_problem(2, 1, True, torch.float64)
    args, _ = op_args(problem, True)
    forward = torch.ops.fastformers.feedback_recurrence_forward
    half = [a.to(torch.bfloat16) if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(RuntimeError, match="float32 or float64"):
        forward(*half)
    strided = list(args)
    strided[1] = args[1].transpose(0, 1)
    with pytest.raises(RuntimeError, match="kv must be a contiguous"):
        forward(*strided)
    wrong_heads = list(args)
    wrong_heads[8] = 5
    with pytest.raises(RuntimeError, match="heads"):
        forward(*wrong_heads)
    short_list = list(args)
    short_list[6] = args[6][:-1]
    with pytest.raises(RuntimeError, match="entries per layer"):
        forward(*short_list)
    bad_activation = list(args)
    bad_activation[11] = "tanh"
    with pytest.raises(RuntimeError, match="activation must be relu, gelu"):
        forward(*bad_activation)
    bad_p = list(args)
    bad_p[12] = [1.0] * len(args[12])
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        forward(*bad_p)
    with pytest.raises(ValueError, match="dropout_p"):
        config(1, True, 0, "cpp", dropout_p=-0.5)
    with pytest.raises(ValueError, match="activation must be one of"):
        config(1, True, 0, "cpp", activation="tanh")
