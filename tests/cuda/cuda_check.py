"""What every test of the CUDA suite shares: the device and backend it runs on,
the precisions, and the comparison with a float64 oracle.

On a GPU machine (``python -m pytest tests/cuda``, interpreter off) the suite
runs on ``cuda`` with the Triton kernels compiled for the GPU. With
``FASTFORMERS_GPU_CHECK_DRY_RUN=1`` (``bench/gpu_check.sh --dry-run``) the same
tests run on CPU tensors through the Triton interpreter, at tiny shapes only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, Sequence

import torch

DRY_RUN = os.environ.get("FASTFORMERS_GPU_CHECK_DRY_RUN") == "1"
DEVICE = "cpu" if DRY_RUN else "cuda"
# Forced, not automatic: on CPU the automatic choice would be the C++ kernels.
BACKEND = "triton"


@dataclasses.dataclass(frozen=True)
class Precision:
    """A dtype, and for float32 whether torch's matmuls may use TF32 (the
    Triton kernels choose their own dot precision either way)."""

    name: str
    dtype: torch.dtype
    tf32: bool = False
    # Error floor relative to the output's scale: about the unit roundoff of the
    # products' input precision.
    floor: float = 1e-5

    @contextlib.contextmanager
    def active(self):
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


FP32 = Precision("float32-ieee", torch.float32)
PRECISIONS = [
    FP32,
    Precision("float32-tf32", torch.float32, tf32=True, floor=2e-3),
    Precision("bfloat16", torch.bfloat16, floor=1e-2),
    Precision("float16", torch.float16, floor=2e-3),
]
# The fused result may be this many times further from the float64 oracle than
# the reference computed in the same precision (flash-attention's rule).
ERROR_FACTOR = 2.0


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def forward_and_grads(fn: Callable, inputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor],
                      dtype: torch.dtype, differentiable: Sequence[bool]):
    """Outputs of ``fn`` on ``inputs`` cast to ``dtype``, and the gradients of
    the inputs flagged in ``differentiable`` for ``grad_outputs``."""
    leaves = [t.detach().to(dtype).requires_grad_(wants) if t.is_floating_point() else t
              for t, wants in zip(inputs, differentiable)]
    outputs = _as_tuple(fn(*leaves))
    wanted = [leaf for leaf, wants in zip(leaves, differentiable) if wants]
    grads = torch.autograd.grad(outputs, wanted, [g.to(o.dtype) for g, o in zip(grad_outputs, outputs)],
                                allow_unused=True) if wanted else ()
    return [o.detach() for o in outputs], list(grads)


def assert_close_to_oracle(fused: Callable, reference: Callable, inputs: Sequence[torch.Tensor],
                           precision: Precision, differentiable: Sequence[bool] | None = None,
                           seed: int = 1234) -> None:
    """``fused`` and ``reference`` on ``inputs`` (float64 on the device) cast to
    ``precision``: every output and gradient of ``fused`` must be within
    ``ERROR_FACTOR`` x the same-precision reference's error against the float64
    reference, plus ``precision.floor`` x the oracle's scale."""
    differentiable = list(differentiable or [t.is_floating_point() for t in inputs])
    with precision.active():
        oracle_out, oracle_grads = forward_and_grads(reference, inputs, [], torch.float64, [False] * len(inputs))
        generator = torch.Generator().manual_seed(seed)
        grad_outputs = [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.device)
                        for o in oracle_out]
        oracle_out, oracle_grads = forward_and_grads(reference, inputs, grad_outputs, torch.float64, differentiable)
        ref_out, ref_grads = forward_and_grads(reference, inputs, grad_outputs, precision.dtype, differentiable)
        got_out, got_grads = forward_and_grads(fused, inputs, grad_outputs, precision.dtype, differentiable)
    names = [f"output[{i}]" for i in range(len(oracle_out))] + [
        f"grad(input[{i}])" for i, wants in enumerate(differentiable) if wants]
    failures = []
    for name, got, ref, exact in zip(names, got_out + got_grads, ref_out + ref_grads, oracle_out + oracle_grads):
        if exact is None:
            if got is not None:
                failures.append(f"{name}: fused gives a gradient the reference does not")
            continue
        if got is None:
            failures.append(f"{name}: fused gives no gradient")
            continue
        assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
        fused_error = (got.double() - exact).abs().max().item()
        ref_error = (ref.double() - exact).abs().max().item()
        scale = max(exact.abs().max().item(), 1.0)
        bound = ERROR_FACTOR * ref_error + precision.floor * scale
        if not fused_error <= bound:  # also catches NaN
            failures.append(f"{name} ({precision.name}): fused error {fused_error:.3g} against float64 exceeds "
                            f"{ERROR_FACTOR} x reference error {ref_error:.3g} + {precision.floor:g} x {scale:.3g}")
    assert not failures, "\n".join(failures)


def assert_deterministic(fn: Callable, inputs: Sequence[torch.Tensor], dtype: torch.dtype,
                         differentiable: Sequence[bool] | None = None) -> list[str]:
    """Run forward+backward of ``fn`` twice with identical inputs; return the
    names of the outputs and gradients that are not bit-identical."""
    differentiable = list(differentiable or [t.is_floating_point() for t in inputs])
    probe, _ = forward_and_grads(fn, inputs, [], dtype, [False] * len(inputs))
    generator = torch.Generator().manual_seed(99)
    grad_outputs = [torch.randn(o.shape, generator=generator).to(o.device) for o in probe]
    first = forward_and_grads(fn, inputs, grad_outputs, dtype, differentiable)
    second = forward_and_grads(fn, inputs, grad_outputs, dtype, differentiable)
    names = [f"output[{i}]" for i in range(len(probe))] + [
        f"grad(input[{i}])" for i, wants in enumerate(differentiable) if wants]
    differing = []
    for name, a, b in zip(names, first[0] + first[1], second[0] + second[1]):
        if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
            differing.append(name)
    return differing


def randn(*shape, scale: float = 1.0, seed: int | None = None) -> torch.Tensor:
    """float64 normal values on the suite's device (drawn on CPU so that a
    seed gives the same values on every device)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(DEVICE)


def free_device_bytes() -> int:
    if DEVICE != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info()
    return free
