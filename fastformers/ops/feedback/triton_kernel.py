"""Triton kernels of the feedback-memory weighted sum.

Launchers take CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set
before import (the Triton interpreter; how they are tested without a GPU).
"""
import torch
import triton
import triton.language as tl

from ...triton_utils import AotSpec

BLOCK_N = 1024


@triton.jit
def _softmax_stats(w_ptr, L, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    offs = tl.arange(0, BLOCK_L)
    w = tl.load(w_ptr + offs, mask=offs < L, other=-float("inf")).to(ACC)
    w_max = tl.max(w, axis=0)
    denom = tl.sum(tl.exp(w - w_max), axis=0)
    return w_max, denom


@triton.jit
def feedback_memory_fwd_kernel(
    x_ptr,  # [L, N]
    w_ptr,  # [L]
    out_ptr,  # [N]
    L,
    N,
    BLOCK_L: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype: float64 for float64 inputs, else float32
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    w_max, denom = _softmax_stats(w_ptr, L, BLOCK_L, ACC)
    acc = tl.zeros([BLOCK_N], dtype=ACC)
    for l in range(L):
        p = tl.exp(tl.load(w_ptr + l).to(ACC) - w_max) / denom
        x = tl.load(x_ptr + l * N + offs, mask=mask, other=0.0).to(ACC)
        acc += p * x
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def feedback_memory_bwd_kernel(
    grad_ptr,  # [N]
    x_ptr,  # [L, N]
    w_ptr,  # [L]
    grad_x_ptr,  # [L, N]
    partial_ptr,  # [n_blocks, L] in ACC: per-block sum_n grad[n] * x[l, n]
    L,
    N,
    BLOCK_L: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype: float64 for float64 inputs, else float32
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    w_max, denom = _softmax_stats(w_ptr, L, BLOCK_L, ACC)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
    for l in range(L):
        p = tl.exp(tl.load(w_ptr + l).to(ACC) - w_max) / denom
        x = tl.load(x_ptr + l * N + offs, mask=mask, other=0.0).to(ACC)
        tl.store(grad_x_ptr + l * N + offs, (p * g).to(grad_x_ptr.dtype.element_ty), mask=mask)
        tl.store(partial_ptr + pid * L + l, tl.sum(g * x, axis=0))


def _block_l(L: int) -> int:
    return max(triton.next_power_of_2(L), 2)


def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def feedback_memory_forward(layer_outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """layer_outputs ``[L, B, D]``, weights ``[L]`` -> ``[B, D]``."""
    layer_outputs = layer_outputs.contiguous()
    weights = weights.contiguous()
    L = layer_outputs.shape[0]
    N = layer_outputs[0].numel()
    out = layer_outputs.new_empty(layer_outputs.shape[1:])
    grid = (triton.cdiv(N, BLOCK_N),)
    feedback_memory_fwd_kernel[grid](
        layer_outputs, weights, out, L, N, BLOCK_L=_block_l(L), BLOCK_N=BLOCK_N, ACC=_acc_dtype(out.dtype)[0]
    )
    return out


def feedback_memory_backward(grad: torch.Tensor, layer_outputs: torch.Tensor, weights: torch.Tensor):
    """Gradients for ``layer_outputs [L, B, D]`` and ``weights [L]``."""
    grad = grad.contiguous()
    layer_outputs = layer_outputs.contiguous()
    weights = weights.contiguous()
    L = layer_outputs.shape[0]
    N = layer_outputs[0].numel()
    n_blocks = triton.cdiv(N, BLOCK_N)
    grad_layer_outputs = torch.empty_like(layer_outputs)
    acc_tl, acc_torch = _acc_dtype(layer_outputs.dtype)
    partial = torch.empty((n_blocks, L), dtype=acc_torch, device=layer_outputs.device)
    feedback_memory_bwd_kernel[(n_blocks,)](
        grad, layer_outputs, weights, grad_layer_outputs, partial, L, N, BLOCK_L=_block_l(L), BLOCK_N=BLOCK_N, ACC=acc_tl
    )
    # The [L]-sized softmax backward is too small to deserve a kernel.
    probs = torch.softmax(weights.to(acc_torch), dim=0)
    grad_probs = partial.sum(0)
    grad_weights = probs * (grad_probs - (probs * grad_probs).sum())
    return grad_layer_outputs, grad_weights.to(weights.dtype)


def _aot_specs():
    specs = []
    for dtype, acc in (("fp32", "fp32"), ("bf16", "fp32"), ("fp64", "fp64")):
        common = {"L": "i32", "N": "i32", "BLOCK_L": "constexpr", "BLOCK_N": "constexpr", "ACC": "constexpr"}
        constexprs = {"BLOCK_L": 8, "BLOCK_N": BLOCK_N, "ACC": getattr(tl, {"fp32": "float32", "fp64": "float64"}[acc])}
        specs.append(
            AotSpec(
                feedback_memory_fwd_kernel,
                {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", **common},
                constexprs,
                label=dtype,
            )
        )
        specs.append(
            AotSpec(
                feedback_memory_bwd_kernel,
                {
                    "grad_ptr": f"*{dtype}",
                    "x_ptr": f"*{dtype}",
                    "w_ptr": f"*{dtype}",
                    "grad_x_ptr": f"*{dtype}",
                    "partial_ptr": f"*{acc}",
                    **common,
                },
                constexprs,
                label=dtype,
            )
        )
    return specs


AOT_SPECS = _aot_specs()
