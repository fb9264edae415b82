"""Plain-PyTorch reference of the Switch Transformer ops: the oracle of tests
and the baseline of benchmarks.

Routing itself is not here: :func:`fastformers.ops.switch.route` is plain
PyTorch already and serves every backend.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..dropout import naive as dropout_naive

# labml_nn's FeedForward configurations: ReLU / GELU FFNs and their gated
# forms, SwiGLU (silu), GLU (sigmoid) and bilinear (identity)
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid, "identity": lambda h: h}


def hidden_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Dtype of the saved pre-activations for inputs of ``dtype`` on ``device``:
    the input dtype on CUDA (the Triton kernels accumulate in float32 and
    store it rounded, half the memory of float32 for bf16 / float16); float32
    for low-precision inputs elsewhere (the C++ kernels keep it)."""
    if torch.device(device).type == "cuda":
        return dtype
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
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
):
    """Every token through its expert's FFN, one expert at a time, as labml does.

    x: ``[T, d]``; order: ``[T]`` token indices grouped by expert, kept tokens
    first within each expert; offsets: ``[E + 1]`` segment starts in order;
    kept: ``[E]`` kept tokens per expert. Weights are per expert, E tensors
    each: w1 ``[d_ff, d]``, b1 ``[d_ff]``, w2 ``[d, d_ff]``, b2 ``[d]``,
    w_gate ``[d_ff, d]``, b_gate ``[d_ff]``; an empty list means absent (no
    bias, no gate). scale: ``[T]``.

    Dropout on the hidden activations (labml's ``layer2(dropout(act(layer1 x)
    [· linear_v x]))``): element ``(t, f)`` of the activation of token row
    ``t`` of x is kept iff element ``t · d_ff + f`` of
    ``dropout.naive.keep_mask(seed, offset, T · d_ff, dropout_p)`` is (mask
    layout ``[T, d_ff]`` by token row, so every backend draws the same mask),
    and kept elements are scaled by ``1 / (1 - dropout_p)``. ``dropout_p = 0``
    is the computation without dropout.

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
    keep = hidden_keep_mask(x.shape[0], d_ff, dropout_p, seed, offset, x.device)
    kept_rows, kept_outputs = [], []
    hidden = x.new_zeros(x.shape[0], (2 if gated else 1) * d_ff, dtype=hidden_dtype(x.dtype, x.device))
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
        if keep is not None:
            activated = dropout_naive.apply(activated, keep[rows], dropout_p)
        out = F.linear(activated, w2[expert], b2[expert] if b2 else None)
        kept_rows.append(rows)
        kept_outputs.append(out)
        hidden[positions] = torch.cat(saved, dim=1).detach().to(hidden.dtype)
    # dropped tokens pass x through
    unscaled = x.index_copy(0, torch.cat(kept_rows), torch.cat(kept_outputs))
    return unscaled * scale.unsqueeze(1), hidden


def hidden_keep_mask(n_tokens: int, d_ff: int, dropout_p: float, seed: int, offset: int,
                     device=None) -> Optional[torch.Tensor]:
    """Bool ``[T, d_ff]`` keep mask of the hidden activations by token row; None when ``dropout_p == 0``."""
    if dropout_p == 0:
        return None
    return dropout_naive.keep_mask(seed, offset, n_tokens * d_ff, dropout_p, device).view(n_tokens, d_ff)


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
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
):
    """Gradients of :func:`switch_mlp` for x, w1, b1, w2, b2, w_gate, b_gate
    (lists like the inputs, empty where the input is) and scale, by autograd
    through the forward; ``hidden`` is not needed by the reference."""
    x_, scale_ = (t.detach().requires_grad_() for t in (x, scale))
    groups = [[w.detach().requires_grad_() for w in group] for group in (w1, b1, w2, b2, w_gate, b_gate)]
    leaves = [x_, *[w for group in groups for w in group], scale_]
    with torch.enable_grad():
        y, _ = switch_mlp(x_, order, offsets, kept, *groups, scale_, activation, dropout_p, seed, offset)
        grads = torch.autograd.grad(y, leaves, grad_y, allow_unused=True)
    # an input no kept token reaches (e.g. every token dropped) gets a zero gradient
    grads = iter([_zeros_if_none(grad, leaf) for grad, leaf in zip(grads, leaves)])
    grad_x = next(grads)
    grad_groups = [[next(grads) for _ in group] for group in groups]
    return (grad_x, *grad_groups, next(grads))


def _zeros_if_none(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad
