"""Plain-PyTorch reference of the Switch Transformer ops: the oracle of tests
and the baseline of benchmarks.

Routing itself is not here: :func:`fastformers.ops.switch.route` is plain
PyTorch already and serves every backend.
"""
from typing import Optional

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
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    w_gate: Optional[torch.Tensor],
    b_gate: Optional[torch.Tensor],
    scale: torch.Tensor,
    activation: str,
):
    """Every token through its expert's FFN, one expert at a time, as labml does.

    x: ``[T, d]``; order: ``[T]`` token indices grouped by expert, kept tokens
    first within each expert; offsets: ``[E + 1]`` segment starts in order;
    kept: ``[E]`` kept tokens per expert; w1: ``[E, d_ff, d]``, b1: ``[E, d_ff]``,
    w2: ``[E, d, d_ff]``, b2: ``[E, d]``, w_gate: ``[E, d_ff, d]``, b_gate:
    ``[E, d_ff]`` (gate and biases optional); scale: ``[T]``.

    Returns ``y [T, d]`` with ``y[t] = scale[t] · FFN_e(x[t])`` for kept tokens
    and ``scale[t] · x[t]`` for dropped ones, and ``hidden [T, n · d_ff]``
    (n = 2 with a gate, else 1): the pre-activation ``layer1(x)`` then the gate
    ``linear_v(x)`` of the kept tokens in order layout, zero on dropped rows.
    """
    act = ACTIVATIONS[activation]
    n_experts, d_ff, _ = w1.shape
    gated = w_gate is not None
    starts = offsets.tolist()
    kept_per_expert = kept.tolist()
    # one unbind per weight: indexing w1[expert] per expert would make autograd
    # build a full [E, ...] gradient for every expert
    w1, w2 = w1.unbind(0), w2.unbind(0)
    b1, b2, w_gate, b_gate = (None if w is None else w.unbind(0) for w in (b1, b2, w_gate, b_gate))
    kept_rows, kept_outputs = [], []
    hidden = x.new_zeros(x.shape[0], (2 if gated else 1) * d_ff, dtype=hidden_dtype(x.dtype))
    for expert in range(n_experts):
        positions = torch.arange(starts[expert], starts[expert] + kept_per_expert[expert], device=x.device)
        rows = order[positions]
        tokens = x[rows]
        pre_activation = F.linear(tokens, w1[expert], None if b1 is None else b1[expert])
        activated = act(pre_activation)
        saved = [pre_activation]
        if gated:
            gate = F.linear(tokens, w_gate[expert], None if b_gate is None else b_gate[expert])
            activated = activated * gate
            saved.append(gate)
        out = F.linear(activated, w2[expert], None if b2 is None else b2[expert])
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
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    w_gate: Optional[torch.Tensor],
    b_gate: Optional[torch.Tensor],
    scale: torch.Tensor,
    hidden: torch.Tensor,
    activation: str,
):
    """Gradients of :func:`switch_mlp` for x, w1, b1, w2, b2, w_gate, b_gate and
    scale (None where the input is None), by autograd through the forward;
    ``hidden`` is not needed by the reference."""
    params = [x, w1, b1, w2, b2, w_gate, b_gate, scale]
    leaves = [None if p is None else p.detach().requires_grad_() for p in params]
    x_, w1_, b1_, w2_, b2_, w_gate_, b_gate_, scale_ = leaves
    present = [leaf for leaf in leaves if leaf is not None]
    with torch.enable_grad():
        y, _ = switch_mlp(x_, order, offsets, kept, w1_, b1_, w2_, b2_, w_gate_, b_gate_, scale_, activation)
        grads = iter(torch.autograd.grad(y, present, grad_y, allow_unused=True))
    # an input no kept token reaches (e.g. every token dropped) gets a zero gradient
    return tuple(
        None if leaf is None else _zeros_if_none(next(grads), leaf) for leaf in leaves
    )


def _zeros_if_none(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad
