"""The Feedback recurrence's GPU loop on a GPU: the split attention step against
the reference, the token loop without host synchronisation
(``torch.cuda.set_sync_debug_mode("error")``), and CUDA-graph replay
(``cuda_graph=True``) against the eager loop."""
import contextlib
import warnings

import pytest
import torch

pytest.importorskip("labml_nn")

from fastformers.nn import feedback as ours  # noqa: E402
from fastformers.ops.feedback import naive, recurrence, triton_kernel  # noqa: E402

DEVICE = "cuda"


def build(kv=True, d_model=64, heads=4, n_layers=3, dropout_p=0.0):
    torch.manual_seed(0)
    ff = ours.FeedForward(d_model, 4 * d_model, dropout_p)
    layer = ours.FeedbackTransformerLayer(
        d_model=d_model, attn=ours.FeedbackAttention(heads, d_model, dropout_p, is_kv_precomputed=kv),
        feed_forward=ff, dropout_prob=dropout_p)
    model = ours.FeedbackTransformerKV(layer, n_layers, d_model, heads) if kv else \
        ours.FeedbackTransformer(layer, n_layers)
    model.backend = "triton"
    return model.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_split_step_matches_reference(dtype, dropout_p):
    """B·H = 2 pairs over 3000 memory steps: the walk is split into many chunks."""
    steps, B, H, d = 3000, 1, 2, 64
    assert triton_kernel.memory_chunk(B * H, steps, 32) < steps
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=DEVICE, dtype=dtype)

    inputs = [randn(B, H, d), randn(steps, B, H, d), randn(steps, B, H, d), randn(steps, H, d), randn(steps, H),
              randn(H, d)]
    args = (*inputs[:3], steps, *inputs[3:], d ** -0.5, dropout_p, 3, 0)
    grad = randn(B, H, d)
    got = (triton_kernel.attention_step_forward(*args), *triton_kernel.attention_step_backward(grad, *args))
    wide = [t.double() for t in inputs]
    wide_args = (*wide[:3], steps, *wide[3:], d ** -0.5, dropout_p, 3, 0)
    expected = (naive.feedback_attention_step(*wide_args),
                *naive.feedback_attention_step_backward(grad.double(), *wide_args))
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-3)
    for value, ref in zip(got, expected):
        torch.testing.assert_close(value.double(), ref, **tol)
    again = triton_kernel.attention_step_backward(grad, *args)
    assert all(torch.equal(a, b) for a, b in zip(got[1:], again))


@contextlib.contextmanager
def sync_debug_error():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.parametrize("training", [False, True])
def test_token_loop_never_waits_for_the_device(monkeypatch, training):
    """The forward loop (eval, and training with dropout) under the sync guard."""
    model = build(kv=False, dropout_p=0.1).train(training)
    x = torch.randn(16, 2, 64, device=DEVICE)
    model(x)  # compiles the kernels outside the guard
    loop = recurrence._run

    def guarded(*args, **kwargs):
        with sync_debug_error():
            return loop(*args, **kwargs)

    monkeypatch.setattr(recurrence, "_run", guarded)
    with torch.set_grad_enabled(training):
        model(x)


@pytest.mark.parametrize("kv", [True, False], ids=["kv", "plain"])
def test_cuda_graph_replay_matches_eager(kv):
    model = build(kv).eval()
    with torch.no_grad():
        for seed in range(3):
            x = torch.randn(24, 3, 64, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(seed))
            model.cuda_graph = False
            expected, expected_state = model.forward_with_state(x)
            model.cuda_graph = True
            got, state = model.forward_with_state(x)
            torch.testing.assert_close(got, expected)
            torch.testing.assert_close(state.rows(), expected_state.rows())
            # Continuing a state (start > 0) replays its own graph.
            follow = torch.randn(8, 3, 64, device=DEVICE)
            model.cuda_graph = False
            expected_next, _ = model.forward_with_state(follow, expected_state)
            model.cuda_graph = True
            got_next, _ = model.forward_with_state(follow, state)
            torch.testing.assert_close(got_next, expected_next)
    assert model._graphs.captures == 2  # (T = 24, start 0) and (T = 8, start 24), each captured once


def test_cuda_graph_warns_in_training():
    model = build(dropout_p=0.1).train()
    model.cuda_graph = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(4, 2, 64, device=DEVICE)).sum().backward()
    assert any("cuda_graph=True" in str(w.message) for w in caught)
