"""The flash-decoding split of the Feedback attention step's memory walk (Triton,
under the interpreter): each program covers one chunk of memory steps, partial
(max, normaliser, weighted values) are merged in split order."""
import pytest
import torch

from fastformers.ops.feedback import naive
from harness import assert_parity
from test_feedback_step_op import ORDER, make_inputs

pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.fixture
def kernels():
    from fastformers.ops.feedback import triton_kernel

    return triton_kernel


@pytest.fixture
def small_blocks(kernels, monkeypatch):
    """4 memory steps per block, so tiny shapes split into many chunks."""
    monkeypatch.setattr(kernels, "_TILE_ELEMENTS", {8: 64, 4: 128, 2: 128})
    monkeypatch.setattr(kernels, "SPLIT_TARGET_PROGRAMS", 64)


def test_memory_chunk(kernels):
    target = kernels.SPLIT_TARGET_PROGRAMS
    assert kernels.memory_chunk(target, 1000, 32) == 1000  # enough programs: no split
    assert kernels.memory_chunk(4, 20, 32) == 20  # one block of steps: no split
    for pairs, steps, block_t in [(1, 1000, 32), (4, 33, 32), (7, 4097, 16), (target - 1, 999, 8)]:
        chunk = kernels.memory_chunk(pairs, steps, block_t)
        splits = -(-steps // chunk)
        assert chunk % block_t == 0 and splits > 1
        assert (splits - 1) * chunk < steps  # no empty chunk
        assert pairs * splits <= max(target, pairs) + pairs  # about the target, never far beyond


def _step(steps, scale, dropout_p=0.0, seed=0):
    def run(*args):
        from fastformers.ops.feedback import step_op

        return step_op._InterpretedTriton.apply(*args[:3], steps, *args[3:], scale, dropout_p, seed, 0)

    return run


def _reference(steps, scale, dropout_p=0.0, seed=0):
    def run(*args):
        return naive.feedback_attention_step(*args[:3], steps, *args[3:], scale, dropout_p, seed, 0)

    return run


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
# p = 0.5: the kernels take 1/(1-p) as float32, exact only for such p (float64 tolerances are tight).
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
@pytest.mark.parametrize("shape", [(13, 1, 2, 24), (9, 3, 1, 8)], ids=str)
def test_split_matches_reference(small_blocks, kernels, dtype, dropout_p, shape):
    """Forward and every gradient of the split path (odd step counts: a short last
    chunk; strided caches) against the reference with the same dropout mask."""
    steps, B, H, d = shape
    assert kernels.memory_chunk(B * H, steps, 4) < steps
    inputs = make_inputs(steps, B, H, d, dtype, strided=True)
    assert_parity(_step(steps, d ** -0.5, dropout_p, seed=7), _reference(steps, d ** -0.5, dropout_p, seed=7),
                  [inputs[k] for k in ORDER])


def test_split_equals_unsplit(small_blocks, kernels, monkeypatch):
    """The split and the single-program walk compute the same step (float64), dropout bits included."""
    steps, B, H, d = 11, 2, 1, 16
    inputs = [make_inputs(steps, B, H, d, torch.float64)[k] for k in ORDER]
    grad = torch.randn(B, H, d, dtype=torch.float64)

    def forward_and_grads():
        out = kernels.attention_step_forward(*inputs[:3], steps, *inputs[3:], 0.25, 0.5, 5, 3)
        return (out, *kernels.attention_step_backward(grad, *inputs[:3], steps, *inputs[3:], 0.25, 0.5, 5, 3))

    split = forward_and_grads()
    monkeypatch.setattr(kernels, "SPLIT_TARGET_PROGRAMS", 1)
    whole = forward_and_grads()
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("split", [True, False])
def test_backward_is_deterministic(small_blocks, kernels, monkeypatch, split):
    """Two identical backward calls give bit-identical gradients (no atomics; merges in split order)."""
    if not split:
        monkeypatch.setattr(kernels, "SPLIT_TARGET_PROGRAMS", 1)
    steps, B, H, d = 10, 1, 3, 24
    inputs = [make_inputs(steps, B, H, d, torch.float32)[k] for k in ORDER]
    grad = torch.randn(B, H, d)
    first = kernels.attention_step_backward(grad, *inputs[:3], steps, *inputs[3:], 0.2, 0.1, 1, 0)
    second = kernels.attention_step_backward(grad, *inputs[:3], steps, *inputs[3:], 0.2, 0.1, 1, 0)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
