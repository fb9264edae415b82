"""The Feedback recurrence's GPU loop (Triton row kernels, under the interpreter):
launches per token and layer, no host synchronisation inside the token loop, and
the CUDA-graph replay's bookkeeping (with a stand-in capture on CPU)."""
import ast
import inspect
import textwrap
import warnings

import pytest
import torch

from fastformers._backend import FallbackWarning
from fastformers.nn import feedback as nn_feedback
from fastformers.ops.feedback import cuda_graph, recurrence
from feedback_loop_helpers import HostSyncError, count_launches
from test_feedback_dropout import build

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _inputs(model, T, B=2, dtype=torch.float64):
    x = torch.randn(T, B, 16, dtype=dtype)
    layers = [nn_feedback._layer_weights(layer) for layer in model.layers]
    return x, layers, model.weights.detach(), *(None if t is None else t.detach() for t in model._kv_projection())


def _config(model, backend, start=0, dropout=True, kv=True):
    return recurrence.make_config(
        n_layers=len(model.layers), heads=2, d_k=8, shared_kv=kv, norm_eps=[(1e-5, 1e-5)] * len(model.layers),
        scale=8 ** -0.5, start=start, backend=backend, device=torch.device("cpu"),
        dropout_p=nn_feedback._dropout_probabilities(model) if dropout else ())


def _loop_launches(model, backend, T, fused, dropout, backward=False):
    """Launches of one forward loop, or with ``backward`` of one backward loop (``fused``: the
    Triton row kernels, else one ATen call at a time)."""
    x, layers, mix, kv_weight, kv_bias = _inputs(model, T, dtype=torch.float32)
    cfg = recurrence._draw_dropout(_config(model, backend, dropout=dropout), x, layers)
    kv = recurrence._new_cache(cfg, x, None)
    rows = recurrence._TritonRows if fused else recurrence._AtenRows
    original = recurrence._row_ops
    recurrence._row_ops = lambda cfg, x: rows(cfg, x) if fused else rows(cfg)
    try:
        with torch.no_grad():
            if not backward:
                with count_launches() as counter:
                    recurrence._run(cfg, x, layers, mix, kv_weight, kv_bias, kv, record=False)
                return counter.total
            layer_outputs, _, activations, hidden, stats = recurrence._run(cfg, x, layers, mix, kv_weight, kv_bias,
                                                                           kv, record=True)
            with count_launches() as counter:
                recurrence._backward_loop(cfg, torch.randn_like(x), layer_outputs, activations, hidden, stats, kv, mix,
                                          kv_weight, layers)
            return counter.total
    finally:
        recurrence._row_ops = original


def launches_per_token_and_layer(fused, dropout, backward=False):
    """``(per layer, per token besides the layers)`` of a token with memory, from
    loops of 2 and 3 tokens with 1 and 2 layers."""
    per_token = {}
    for n_layers in (1, 2):
        torch.manual_seed(0)
        model = build(True, n_layers=n_layers, dtype=torch.float32, dropout_p=0.2 if dropout else 0.0)
        per_token[n_layers] = (_loop_launches(model, "triton", 3, fused, dropout, backward)
                               - _loop_launches(model, "triton", 2, fused, dropout, backward))
    per_layer = per_token[2] - per_token[1]
    return per_layer, per_token[1] - per_layer


@pytest.mark.parametrize("dropout", [False, True], ids=["p0", "dropout"])
def test_launches_per_token_and_layer(dropout):
    """The fused forward loop: layer norm, query GEMM, attention step, output GEMM,
    its epilogue (bias, dropout, residual, feed-forward norm), first linear, hidden
    kernel (activation, dropout), second GEMM and its epilogue: 9 per layer with or
    without dropout; per token the memory and its K/V projection."""
    fused = launches_per_token_and_layer(True, dropout)
    unfused = launches_per_token_and_layer(False, dropout)
    print(f"forward launches (per layer, per token besides layers), dropout={dropout}: "
          f"fused {fused}, one ATen call at a time {unfused}")
    assert fused == (9, 2)
    assert unfused[0] > fused[0]


@pytest.mark.parametrize("dropout", [False, True], ids=["p0", "dropout"])
def test_backward_launches_per_token_and_layer(dropout):
    """The fused backward loop: second-linear GEMM, hidden backward kernel, first-linear
    GEMM, feed-forward norm backward (+ residual, attention residual mask), output GEMM,
    the attention step backward (its kernel, the positional-gradient kernel and two small
    reductions), query GEMM, attention norm backward (+ residual, memory, next mask)."""
    fused = launches_per_token_and_layer(True, dropout, backward=True)
    unfused = launches_per_token_and_layer(False, dropout, backward=True)
    print(f"backward launches (per layer, per token besides layers), dropout={dropout}: "
          f"fused {fused}, one ATen call at a time {unfused}")
    assert fused[0] < unfused[0]
    assert fused[0] == launches_per_token_and_layer(True, False, backward=True)[0]  # dropout adds none


def test_no_host_synchronisation_in_the_loop():
    """The fused loop (dropout on, a state to continue) runs under a guard that fails
    on any call waiting for the device; its Python never pulls a device value to the host."""
    model = build(False, n_layers=2, dtype=torch.float32)
    x, layers, mix, kv_weight, kv_bias = _inputs(model, 3, dtype=torch.float32)
    cfg = recurrence._draw_dropout(_config(model, "triton", start=2, kv=False), x, layers)
    kv = recurrence._new_cache(cfg, x, torch.randn(2, 2, 4, 2, 8))
    with torch.no_grad(), count_launches():
        recurrence._run(cfg, x, layers, mix, kv_weight, kv_bias, kv, record=True)
    with pytest.raises(HostSyncError), count_launches():
        torch.ones(2).sum().item()


def _syncing_calls(function) -> list:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("item", "tolist", "cpu", "numpy", "bool", "synchronize", "nonzero"):
                found.append(f"{function.__qualname__}: {name}()")
    return found


def test_loop_code_calls_nothing_that_synchronises():
    from fastformers.ops.feedback import triton_kernel as kernels

    functions = [recurrence._run, *(getattr(recurrence._TritonRows, name) for name in
                                    ("norm", "attend", "residual", "hidden", "memory")),
                 kernels.attention_step_forward, kernels._forward_launch, kernels.residual_norm, kernels.ffn_hidden,
                 kernels.feedback_memory_forward, cuda_graph.RecurrenceGraphs.run]
    assert [call for f in functions for call in _syncing_calls(f)] == []


# ------------------------------------------------------------------ CUDA-graph bookkeeping


def capture_eagerly(run):
    """Stand-in for cuda_graph.capture_cuda on CPU: "replay" reruns the loop and copies
    its results into the first call's outputs, as a graph replay rewrites them."""
    outputs = run()

    def replay():
        for static, fresh in zip(outputs, run()):
            static.copy_(fresh)

    return replay, outputs


@pytest.mark.parametrize("start", [0, 3])
def test_graph_replays_match_eager_calls(start):
    torch.manual_seed(0)
    model = build(True, dtype=torch.float64, dropout_p=0.0).eval()
    graphs = cuda_graph.RecurrenceGraphs(capture=capture_eagerly)
    cfg = _config(model, "cpp", start=start, dropout=False)
    for call in range(3):
        x, layers, mix, kv_weight, kv_bias = _inputs(model, 4)
        initial = torch.randn(start + 4, 2, 2, 2, 8, dtype=torch.float64)
        with torch.no_grad():
            expected = recurrence.run_recurrence(cfg, x, initial, mix, kv_weight, kv_bias, layers)
            in_place = initial.clone()
            got = recurrence.run_recurrence(cfg, x, in_place, mix, kv_weight, kv_bias, layers, write_in_place=True,
                                            graphs=graphs)
        torch.testing.assert_close(got[0], expected[0])
        torch.testing.assert_close(in_place, expected[1])
        assert got[1] is in_place
    assert graphs.captures == 1


def test_graph_recaptures_for_new_shapes_and_keeps_a_bounded_cache():
    torch.manual_seed(0)
    model = build(True, dtype=torch.float64, dropout_p=0.0).eval()
    graphs = cuda_graph.RecurrenceGraphs(capture=capture_eagerly, max_graphs=2)
    cfg = _config(model, "cpp", dropout=False)
    with torch.no_grad():
        for T in (2, 3, 2, 4, 2):
            x, layers, mix, kv_weight, kv_bias = _inputs(model, T)
            out, kv = recurrence.run_recurrence(cfg, x, None, mix, kv_weight, kv_bias, layers, graphs=graphs)
            expected_out, expected_kv = recurrence.run_recurrence(cfg, x, None, mix, kv_weight, kv_bias, layers)
            torch.testing.assert_close(out, expected_out)
            torch.testing.assert_close(kv, expected_kv)
    assert graphs.captures == 3 and len(graphs.graphs) == 2  # T = 2, 3 (reused), 4


def test_graph_replays_weights_updated_in_place():
    """An optimizer step updates the weights in place: the graph reads their new values."""
    torch.manual_seed(0)
    model = build(True, dtype=torch.float64, dropout_p=0.0).eval()
    graphs = cuda_graph.RecurrenceGraphs(capture=capture_eagerly)
    cfg = _config(model, "cpp", dropout=False)
    x, layers, mix, kv_weight, kv_bias = _inputs(model, 3)
    with torch.no_grad():
        recurrence.run_recurrence(cfg, x, None, mix, kv_weight, kv_bias, layers, graphs=graphs)
        layers[0].ff1_weight.mul_(1.5)
        got = recurrence.run_recurrence(cfg, x, None, mix, kv_weight, kv_bias, layers, graphs=graphs)[0]
        expected = recurrence.run_recurrence(cfg, x, None, mix, kv_weight, kv_bias, layers)[0]
    torch.testing.assert_close(got, expected)
    assert graphs.captures == 1


def test_graph_refuses_grad_calls():
    model = build(True, dtype=torch.float64, dropout_p=0.0)
    x, layers, _, kv_weight, kv_bias = _inputs(model, 2)
    with pytest.raises(ValueError, match="no-grad"):
        recurrence.run_recurrence(_config(model, "cpp", dropout=False), x, None, model.weights, kv_weight, kv_bias,
                                  layers, graphs=cuda_graph.RecurrenceGraphs(capture=capture_eagerly))


def test_graph_blocker_reasons():
    model = build(True, dtype=torch.float32, dropout_p=0.1)
    x = torch.randn(2, 2, 16)
    triton_cfg = _config(model, "triton")
    assert "CUDA tensors" in cuda_graph.graph_blocker(triton_cfg, x, False)
    fake_cuda = type("FakeCuda", (), {"device": torch.device("cuda", 0)})()
    assert "dropout" in cuda_graph.graph_blocker(triton_cfg, fake_cuda, False)
    assert "no-grad" in cuda_graph.graph_blocker(triton_cfg, fake_cuda, True)
    assert "'cpp'" in cuda_graph.graph_blocker(_config(model, "cpp"), fake_cuda, False)
    assert cuda_graph.graph_blocker(_config(model, "triton", dropout=False), fake_cuda, False) is None


def test_module_option_warns_where_it_cannot_replay():
    model = build(True, dtype=torch.float32, dropout_p=0.0).eval()
    model.backend = "cpp"
    x = torch.randn(3, 2, 16)
    expected = model(x)
    model.cuda_graph = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = model(x)
    torch.testing.assert_close(got, expected)
    assert any(issubclass(w.category, FallbackWarning) and "cuda_graph=True" in str(w.message)
               and "CUDA tensors" in str(w.message) for w in caught)
