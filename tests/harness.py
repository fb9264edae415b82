"""Parity helpers every fused-op test uses: forward output and every gradient
of a fused implementation against the plain-PyTorch reference.

float64 and float32 compare directly with per-dtype tolerances. Low-precision
dtypes follow flash-attention's rule: the fused error against a float64 oracle
may be at most ``LOW_PRECISION_FACTOR`` times the error of the same-dtype
reference against that oracle (plus a small floor).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-5, rtol=1e-4),
}
LOW_PRECISION = (torch.bfloat16, torch.float16)
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = {torch.bfloat16: 1e-2, torch.float16: 1e-3}


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _forward_and_grads(fn: Callable, inputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor]):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outputs = _as_tuple(fn(*leaves))
    differentiable = [o for o in outputs if o.requires_grad]
    grads = torch.autograd.grad(
        differentiable,
        [leaf for leaf in leaves if leaf.requires_grad],
        [g.to(o.dtype) for g, o in zip(grad_outputs, outputs) if o.requires_grad],
        allow_unused=True,
    )
    return [o.detach() for o in outputs], list(grads)


def _names(n_outputs: int, n_grads: int) -> list[str]:
    return [f"output[{i}]" for i in range(n_outputs)] + [f"grad(input[{i}])" for i in range(n_grads)]


def assert_parity(
    fused: Callable,
    reference: Callable,
    inputs: Sequence[torch.Tensor],
    *,
    seed: int = 1234,
) -> None:
    """Check ``fused(*inputs)`` against ``reference(*inputs)``: every output and
    the gradient of every floating input, for the same random output gradients."""
    dtype = next(t.dtype for t in inputs if t.is_floating_point())
    generator = torch.Generator().manual_seed(seed)
    probe = _as_tuple(reference(*[t.detach() for t in inputs]))
    grad_outputs = [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.device) for o in probe]

    fused_out, fused_grads = _forward_and_grads(fused, inputs, grad_outputs)
    ref_out, ref_grads = _forward_and_grads(reference, inputs, grad_outputs)
    fused_all = fused_out + fused_grads
    ref_all = ref_out + ref_grads
    names = _names(len(fused_out), len(fused_grads))

    if dtype in LOW_PRECISION:
        oracle_inputs = [t.double() if t.is_floating_point() else t for t in inputs]
        oracle_out, oracle_grads = _forward_and_grads(reference, oracle_inputs, grad_outputs)
        for name, got, ref, exact in zip(names, fused_all, ref_all, oracle_out + oracle_grads):
            if exact.numel() == 0:  # a zero-size input: only the shape can differ
                assert got.shape == exact.shape, f"{name} ({dtype}): shape {tuple(got.shape)}, expected {tuple(exact.shape)}"
                continue
            fused_error = (got.double() - exact).abs().max().item()
            ref_error = (ref.double() - exact).abs().max().item()
            scale = max(exact.abs().max().item(), 1.0)
            bound = LOW_PRECISION_FACTOR * ref_error + LOW_PRECISION_FLOOR[dtype] * scale
            assert fused_error <= bound, (
                f"{name} ({dtype}): fused error {fused_error:.3g} vs float64 oracle exceeds "
                f"{LOW_PRECISION_FACTOR} x reference error {ref_error:.3g} (+ floor)"
            )
        return

    tolerance = TOLERANCES[dtype]
    for name, got, ref in zip(names, fused_all, ref_all):
        if ref is None:
            assert got is None, f"{name}: fused gives a gradient the reference does not"
            continue
        assert got is not None, f"{name}: fused gives no gradient"
        torch.testing.assert_close(got, ref, **tolerance, msg=lambda m, name=name: f"{name} ({dtype}): {m}")


def labml_layout(module: torch.nn.Module, tensors: dict) -> dict:
    """``tensors`` keyed by ``module``'s parameter names, re-keyed (and split per
    expert) as labml's ``state_dict`` lays out a SwitchFeedForward's parameters,
    in labml's order: stacked experts' ``w1 [E, ...]`` becomes
    ``experts.{e}.layer1.weight``; a module without stacked experts is unchanged."""
    from fastformers.nn.switch import _save_experts_as_labml

    laid_out = dict(tensors)
    if getattr(module, "stacked", False):
        _save_experts_as_labml(module, laid_out, "", None)
    return laid_out


def named_grads_in_labml_layout(model: torch.nn.Module) -> dict:
    """``{name: gradient or None}`` of every parameter of ``model``, the
    stacked experts of each SwitchFeedForward inside it split per expert under
    labml's names (``...experts.{e}.layer1.weight``), in ``named_parameters`` order."""
    from fastformers.nn.switch import _STACKED_TENSORS

    labml_names = {name: f"{layer}.{kind}" for name, layer, kind in _STACKED_TENSORS}
    stacked = {prefix for prefix, m in model.named_modules() if getattr(m, "stacked", False)}
    grads = {}
    for name, p in model.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        if prefix not in stacked or leaf not in labml_names:
            grads[name] = p.grad
            continue
        for e in range(p.shape[0]):
            grads[f"{prefix + '.' if prefix else ''}experts.{e}.{labml_names[leaf]}"] = \
                None if p.grad is None else p.grad[e]
    return grads


def labml_layout_grads(module: torch.nn.Module) -> list:
    """Every parameter's gradient (zeros where None) in labml's parameter order (see :func:`labml_layout`)."""
    grads = {name: torch.zeros_like(p) if p.grad is None else p.grad for name, p in module.named_parameters()}
    return list(labml_layout(module, grads).values())
