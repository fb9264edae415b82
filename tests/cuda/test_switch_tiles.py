"""The Triton switch kernels' GPU-only choices: the autotuner picks its tile
from the call's tile class (dtype, float32 precision, whether d and d_ff are
multiples of 16), hidden is saved in the input dtype, and float16 and both
float32 precisions with dropout match the reference given the same mask.
Parity over shapes and dtypes is in test_cuda_ops.py; the interpreter runs
the kernels' arithmetic in tests/test_switch_triton.py."""
import pytest
import torch

from cuda_check import BACKEND, DEVICE, PRECISIONS, assert_close_to_oracle, randn
from fastformers.ops.switch import route, switch_mlp
from fastformers.ops.switch import triton_kernel

AUTOTUNED = [triton_kernel.switch_in_kernel, triton_kernel.switch_out_kernel, triton_kernel.switch_grad_hidden_kernel,
             triton_kernel.switch_grad_x_kernel, triton_kernel.switch_grad_w_in_kernel,
             triton_kernel.switch_grad_w_out_kernel]


def problem(T, d, d_ff, E, gated, seed=0):
    inputs = [randn(T, d, seed=seed), randn(E, d_ff, d, scale=d ** -0.5, seed=seed + 1),
              randn(E, d_ff, scale=0.1, seed=seed + 2), randn(E, d, d_ff, scale=d_ff ** -0.5, seed=seed + 3),
              randn(E, d, scale=0.1, seed=seed + 4), randn(T, seed=seed + 5).sigmoid()]
    if gated:
        inputs += [randn(E, d_ff, d, scale=d ** -0.5, seed=seed + 6), randn(E, d_ff, scale=0.1, seed=seed + 7)]
    routing = route(randn(T, E, scale=2.0, seed=seed + 8), 1.0, True, "deterministic")
    return routing, inputs


@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: p.name)
@pytest.mark.parametrize("d, d_ff", [(256, 512), (72, 200)], ids=["aligned", "odd"])
def test_autotuner_picks_a_tile_of_the_call_class(precision, d, d_ff):
    routing, inputs = problem(512, d, d_ff, 8, gated=True)
    with precision.active():
        tensors = [t.to(precision.dtype).requires_grad_() for t in inputs]
        x, w1, b1, w2, b2, scale, w_gate, b_gate = tensors
        y = switch_mlp(x, routing, w1, b1, w2, b2, scale, "gelu", w_gate, b_gate, backend=BACKEND)
        y.backward(torch.randn_like(y))
        group = triton_kernel.tile_class(precision.dtype, triton_kernel.matmul_precision(precision.dtype), d, d_ff)
    assert group == ("mma-odd" if d_ff == 200 else "mma") if precision.dtype != torch.float32 or precision.tf32 \
        else group == "ieee"
    for kernel in AUTOTUNED:
        allowed = [config.kwargs for config in triton_kernel._tile_configs(kernel.fn.__name__)[group]]
        assert kernel.best_config.kwargs in allowed, (kernel.fn.__name__, group, kernel.best_config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_hidden_is_saved_in_the_input_dtype(dtype):
    routing, inputs = problem(100, 64, 128, 4, gated=False)
    x, w1, b1, w2, b2, scale = [t.to(dtype) for t in inputs]
    _, hidden = torch.ops.fastformers.switch_mlp(x, routing.order, routing.offsets, routing.kept, list(w1), list(b1),
                                                 list(w2), list(b2), [], [], scale, "relu", 0.0, 0, 0)
    assert hidden.dtype == dtype and hidden.device.type == DEVICE


@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: p.name)
def test_dropout_matches_the_reference_with_the_same_mask(precision):
    """The same (seed, offset) gives the reference the kernels' mask (the interpreter tests replay it)."""
    routing, inputs = problem(300, 128, 256, 8, gated=True)

    def on(backend):
        def run(x, w1, b1, w2, b2, scale, w_gate, b_gate):
            return switch_mlp(x, routing, w1, b1, w2, b2, scale, "silu", w_gate, b_gate, dropout_p=0.2, seed=1234,
                              backend=backend)
        return run

    assert_close_to_oracle(on(BACKEND), on("reference"), inputs, precision)
