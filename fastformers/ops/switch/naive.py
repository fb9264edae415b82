"""Plain-PyTorch reference of the Switch Transformer ops: the oracle of tests
and the baseline of benchmarks.

Routing itself is not here: :func:`fastformers.ops.switch.route` is plain
PyTorch already and serves every backend.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def hidden_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the saved pre-activations: low-precision inputs keep them in float32."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def switch_mlp(
    x: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    kept: torch.Tensor,
    w1: Sequence[torch.Tensor],
    b1: Sequence[torch.Tensor],
    w2: Sequence[torch.Tensor],
    b2: Sequence[torch.Tensor],
    w_gate: Sequence[torch.Tensor],
    b_gate: Sequence[torch.Tensor],
    scale: torch.Tensor,
    activation: str,
):
    """Every token through its expert's FFN, one expert at a time, as labml does.

    x: ``[T, d]``; order: ``[T]`` token indices grouped by expert, kept tokens
    first within each expert; offsets: ``[E + 1]`` segment starts in order;
    kept: ``[E]`` kept tokens per expert. Weights are per expert, E tensors
    each: w1 ``[d_ff, d]``, b1 ``[d_ff]``, w2 ``[d, d_ff]``, b2 ``[d]``,
    w_gate ``[d_ff, d]``, b_gate ``[d_ff]``; an empty list means absent (no
    bias, no gate). scale: ``[T]``.

    Returns ``y [T, d]`` with ``y[t] = scale[t] · FFN_e(x[t])`` for kept tokens
    and ``scale[t] · x[t]`` for dropped ones, and ``hidden [T, n · d_ff]``
    (n = 2 with a gate, else 1): the pre-activation ``layer1(x)`` then the gate
    ``linear_v(x)`` of the kept tokens in order layout, zero on dropped rows.
    """
    act = ACTIVATIONS[activation]
    n_experts = len(w1)
    d_ff = w1[0].shape[0]
    gated = len(w_gate) > 0
    starts = offsets.tolist()
    kept_per_expert = kept.tolist()
    kept_rows, kept_outputs = [], []
    hidden = x.new_zeros(x.shape[0], (2 if gated else 1) * d_ff, dtype=hidden_dtype(x.dtype))
    for expert in range(n_experts):
        positions = torch.arange(starts[expert], starts[expert] + kept_per_expert[expert], device=x.device)
        rows = order[positions]
        tokens = x[rows]
        pre_activation = F.linear(tokens, w1[expert], b1[expert] if b1 else None)
        activated = act(pre_activation)
        saved = [pre_activation]
        if gated:
            gate = F.linear(tokens, w_gate[expert], b_gate[expert] if b_gate else None)
            activated = activated * gate
            saved.append(gate)
        out = F.linear(activated, w2[expert], b2[expert] if b2 else None)
        kept_rows.append(rows)
        kept_outputs.append(out)
        hidden[positions] = torch.cat(saved, dim=1).detach().to(hidden.dtype)
    # dropped tokens pass x through
    unscaled = x.index_copy(0, torch.cat(kept_rows), torch.cat(kept_outputs))
    return unscaled * scale.unsqueeze(1), hidden


def switch_mlp_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    kept: torch.Tensor,
    w1: Sequence[torch.Tensor],
    b1: Sequence[torch.Tensor],
    w2: Sequence[torch.Tensor],
    b2: Sequence[torch.Tensor],
    w_gate: Sequence[torch.Tensor],
    b_gate: Sequence[torch.Tensor],
    scale: torch.Tensor,
    hidden: torch.Tensor,
    activation: str,
):
    """Gradients of :func:`switch_mlp` for x, w1, b1, w2, b2, w_gate, b_gate
    (lists like the inputs, empty where the input is) and scale, by autograd
    through the forward; ``hidden`` is not needed by the reference."""
    x_, scale_ = (t.detach().requires_grad_() for t in (x, scale))
    groups = [[w.detach().requires_grad_() for w in group] for group in (w1, b1, w2, b2, w_gate, b_gate)]
    leaves = [x_, *[w for group in groups for w in group], scale_]
    with torch.enable_grad():
        y, _ = switch_mlp(x_, order, offsets, kept, *groups, scale_, activation)
        grads = torch.autograd.grad(y, leaves, grad_y, allow_unused=True)
    # an input no kept token reaches (e.g. every token dropped) gets a zero gradient
    grads = iter([_zeros_if_none(grad, leaf) for grad, leaf in zip(grads, leaves)])
    grad_x = next(grads)
    grad_groups = [[next(grads) for _ in group] for group in groups]
    return (grad_x, *grad_groups, next(grads))


def _zeros_if_none(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad
