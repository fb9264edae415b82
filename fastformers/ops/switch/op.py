"""Switch Transformer ops: top-1 routing with capacity, and the grouped expert
FFN registered in ``torch.ops.fastformers``.

``switch_mlp(x [T, d], order [T], offsets [E + 1], kept [E], w1 [E, d_ff, d],
b1, w2 [E, d, d_ff], b2, w_gate, b_gate, scale [T], activation, dropout_p,
seed, offset) -> (y [T, d], hidden [T, n · d_ff])`` (weights as lists of
per-expert tensors, dropout mask ``[T, d_ff]`` by token row, see
:func:`naive.switch_mlp`) and its ``switch_mlp_backward``, which regenerates
the mask from ``(seed, offset)``; ``switch_mlp_stacked`` and
``switch_mlp_stacked_backward`` are the same ops with each weight kind one
``[E, ...]`` tensor (None when absent) and the weight gradients returned as
``[E, ...]`` tensors. CPU kernels come from ``csrc/switch.cpp``, CUDA kernels
from :mod:`.triton_kernel`, every other device (and CPU without the
extension) from :mod:`.naive`.
"""
from typing import NamedTuple, Optional, Sequence, Union

import torch

from ... import _backend
from ..._library import lib, qualname
from .. import _autocast, dropout
from . import naive

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
DROP_POLICIES = ("labml", "deterministic")
Weights = Union[torch.Tensor, Sequence[torch.Tensor]]

# switch_mlp's expert weights are lists of per-expert tensors (an empty list: no
# bias / no gate) so that modules holding one nn.Linear per expert pass their
# parameters as they are: no stacking copy per call on CPU, and each gradient
# lands in its own tensor (the Triton launchers stack them, see triton_kernel).
# switch_mlp_stacked takes stacked [E, ...] weights (SwitchFeedForward's
# Parameters) and returns stacked gradients: one autograd input and one
# gradient per tensor kind whatever E, no per-expert tensors to stack.
KERNELS = ("reference", "cpp", "triton")

lib.define(
    "switch_mlp(Tensor x, Tensor order, Tensor offsets, Tensor kept, Tensor[] w1, Tensor[] b1, Tensor[] w2, "
    "Tensor[] b2, Tensor[] w_gate, Tensor[] b_gate, Tensor scale, str activation, float dropout_p, int seed, "
    "int offset) -> (Tensor, Tensor)"
)
lib.define(
    "switch_mlp_backward(Tensor grad_y, Tensor x, Tensor order, Tensor offsets, Tensor kept, Tensor[] w1, "
    "Tensor[] b1, Tensor[] w2, Tensor[] b2, Tensor[] w_gate, Tensor[] b_gate, Tensor scale, Tensor hidden, "
    "str activation, float dropout_p, int seed, int offset) -> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[], "
    "Tensor[], Tensor[], Tensor)"
)

lib.define(
    "switch_mlp_stacked(Tensor x, Tensor order, Tensor offsets, Tensor kept, Tensor w1, Tensor? b1, Tensor w2, "
    "Tensor? b2, Tensor? w_gate, Tensor? b_gate, Tensor scale, str activation, float dropout_p, int seed, "
    "int offset) -> (Tensor, Tensor)"
)
lib.define(
    "switch_mlp_stacked_backward(Tensor grad_y, Tensor x, Tensor order, Tensor offsets, Tensor kept, Tensor w1, "
    "Tensor? b1, Tensor w2, Tensor? b2, Tensor? w_gate, Tensor? b_gate, Tensor scale, Tensor hidden, "
    "str activation, float dropout_p, int seed, int offset) -> (Tensor, Tensor, Tensor?, Tensor, Tensor?, "
    "Tensor?, Tensor?, Tensor)"
)


class Routing(NamedTuple):
    """Top-1 routing of T tokens over E experts (see :func:`route`)."""

    probs: torch.Tensor  # [T, E] softmax of the router logits
    route: torch.Tensor  # [T] int64, the chosen expert
    route_prob_max: torch.Tensor  # [T] probability of the chosen expert
    counts: torch.Tensor  # [E] int64, tokens routed per expert before dropping
    capacity: int  # int(capacity_factor * T / E)
    order: torch.Tensor  # [T] int64, token indices grouped by expert, kept first
    offsets: torch.Tensor  # [E + 1] int64, start of each expert's segment in order
    kept: torch.Tensor  # [E] int64, kept tokens per expert
    dropped: torch.Tensor  # [] int64, on the device of the logits: tokens dropped in all

    @property
    def n_dropped(self) -> int:
        """``dropped`` as a host int: reading it waits for the device (one sync, not one per expert)."""
        return int(self.dropped)


def route(
    logits: torch.Tensor,
    capacity_factor: float,
    drop_tokens: bool,
    drop_policy: str = "labml",
    generator: Optional[torch.Generator] = None,
) -> Routing:
    """Top-1 routing with an expert capacity, as labml_nn's ``SwitchFeedForward``.

    logits: ``[T, E]`` router outputs. ``probs = softmax(logits)``, each token
    goes to ``argmax`` and ``capacity = int(capacity_factor · T / E)``. Tokens
    are grouped by expert in ``order`` (segment ``offsets[e] : offsets[e + 1]``),
    in token order unless reshuffled by the drop policy. With ``drop_tokens``
    an expert keeps at most ``capacity`` tokens: the first ``kept[e]`` of its
    segment; the rest are dropped (the FFN passes them through). Which ones are
    kept depends on ``drop_policy``:

    - ``"labml"``: labml's rule. For each expert whose count exceeds the
      capacity, in increasing expert index, ``torch.randperm(count,
      generator=generator)`` permutes its tokens (in token order) and the first
      ``capacity`` of the permutation are kept. With ``generator=None`` and the
      same global seed this drops exactly the tokens labml drops. Reads the
      counts on the host once, and draws each permutation on the host (on
      ``generator``'s device) as labml does, so on a GPU it costs one sync
      and one small copy per call.
    - ``"deterministic"``: the first ``capacity`` tokens of each expert in
      token order are kept; no random numbers are drawn, and everything stays
      on the device of ``logits`` (no host sync).

    Without ``drop_tokens`` every token is kept and the policy is unused.
    ``dropped`` is a device tensor; ``n_dropped`` reads it on the host.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [tokens, n_experts] with n_experts >= 1, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    n_tokens, n_experts = logits.shape
    probs = torch.softmax(logits, dim=-1)
    route_prob_max, routes = torch.max(probs, dim=-1)
    capacity = int(capacity_factor * n_tokens / n_experts)
    order = torch.argsort(routes, stable=True)
    # segment starts by binary search in the sorted routes: bincount would read
    # max(routes) on the host to size its output, a sync on a GPU
    experts = torch.arange(n_experts + 1, device=routes.device)
    offsets = torch.searchsorted(routes[order], experts)
    counts = offsets[1:] - offsets[:-1]
    kept = counts.clamp(max=capacity) if drop_tokens else counts.clone()
    if drop_tokens and drop_policy == "labml":
        _shuffle_overflowing_experts(order, counts.tolist(), capacity, generator)
    dropped = (counts - kept).sum()
    return Routing(probs, routes, route_prob_max, counts, capacity, order, offsets, kept, dropped)


def _shuffle_overflowing_experts(order, host_counts, capacity, generator) -> None:
    """Permute, in place, the segment of each expert over capacity the way labml
    does, drawing one ``randperm`` per such expert in increasing expert index."""
    # labml draws on the CPU whatever the device of x, so the same seed gives the same permutation
    perm_device = generator.device if generator is not None else torch.device("cpu")
    # one gather through a position table whose overflowing segments are
    # permuted in place: two small ops per overflowing expert (about 30 per
    # call at E = 64) and none for the others
    positions, start = None, 0
    for count in host_counts:
        if count > capacity:
            if positions is None:
                positions = torch.arange(len(order), device=perm_device)
            segment = positions[start : start + count]
            torch.randperm(count, generator=generator, device=perm_device, out=segment)
            segment.add_(start)
        start += count
    if positions is not None:
        order.copy_(order[positions.to(order.device)])


WEIGHT_NAMES = ("w1", "b1", "w2", "b2", "w_gate", "b_gate")


def expert_lists(w1, b1, w2, b2, w_gate, b_gate) -> tuple:
    """The six weight groups as lists of per-expert tensors (unbinding stacked ones, [] for None)."""
    return tuple(
        [] if group is None else list(group.unbind(0)) if isinstance(group, torch.Tensor) else list(group)
        for group in (w1, b1, w2, b2, w_gate, b_gate)
    )


def check_inputs(x, routing, w1, b1, w2, b2, scale, activation, w_gate, b_gate, dropout_p=0.0) -> None:
    """Raise a clear TypeError/ValueError for inputs the kernels cannot take.

    Each weight is a stacked tensor ``[E, ...]`` or a sequence of E per-expert
    tensors; the optional ones may be None."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, d_model], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a floating tensor {_FLOAT_DTYPES}, got {x.dtype}")
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be the Routing returned by route(), got {type(routing).__name__}")
    if activation not in naive.ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(naive.ACTIVATIONS)}, got {activation!r}")
    if w_gate is None and b_gate is not None:
        raise ValueError("b_gate is given without w_gate")
    dropout.check_p(dropout_p, "dropout_p")
    n_tokens, d_model = x.shape
    first_w1 = w1 if isinstance(w1, torch.Tensor) else (w1[0] if len(w1) else None)
    w1_dims = 3 if isinstance(w1, torch.Tensor) else 2
    if not isinstance(first_w1, torch.Tensor) or first_w1.dim() != w1_dims or first_w1.shape[-1] != d_model:
        layout = "[n_experts, d_ff, d_model" if w1_dims == 3 else "E tensors [d_ff, d_model"
        raise ValueError(f"w1 must be {layout}={d_model}], got {_describe(w1)}")
    n_experts = w1.shape[0] if isinstance(w1, torch.Tensor) else len(w1)
    d_ff = first_w1.shape[-2]
    expected = {
        "w1": (w1, (d_ff, d_model)),
        "b1": (b1, (d_ff,)),
        "w2": (w2, (d_model, d_ff)),
        "b2": (b2, (d_model,)),
        "w_gate": (w_gate, (d_ff, d_model)),
        "b_gate": (b_gate, (d_ff,)),
    }
    for name, (group, shape) in expected.items():
        if group is None and name != "w1" and name != "w2":
            continue
        if isinstance(group, torch.Tensor):
            _check_tensor(name, group, (n_experts, *shape), x)
        elif isinstance(group, (list, tuple)) and len(group) == n_experts:
            for expert, tensor in enumerate(group):
                _check_tensor(f"{name}[{expert}]", tensor, shape, x)
        else:
            raise ValueError(
                f"{name} must be a [{n_experts}, {', '.join(map(str, shape))}] tensor or a list of "
                f"{n_experts} tensors {list(shape)}, got {_describe(group)}"
            )
    _check_tensor("scale", scale, (n_tokens,), x)
    index_shapes = {"order": (n_tokens,), "offsets": (n_experts + 1,), "kept": (n_experts,)}
    for name, shape in index_shapes.items():
        tensor = getattr(routing, name)
        if tuple(tensor.shape) != shape or tensor.dtype != torch.int64:
            raise ValueError(
                f"routing.{name} must be int64 {list(shape)} (routing of {n_tokens} tokens over {n_experts} "
                f"experts), got {tensor.dtype} {list(tensor.shape)}"
            )
        if tensor.device != x.device:
            raise ValueError(f"routing.{name} is on {tensor.device} but x is on {x.device}; all must share a device")


def _check_tensor(name: str, tensor, shape: tuple, x: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must be {list(shape)}, got {_describe(tensor)}")
    if tensor.dtype != x.dtype:
        raise TypeError(f"{name} dtype {tensor.dtype} must equal x dtype {x.dtype}")
    if tensor.device != x.device:
        raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}; all must share a device")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {list(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def on_expert_lists(forward, backward) -> tuple:
    """The (forward, backward) of ``switch_mlp_stacked`` from those of
    ``switch_mlp``: stacked weights passed as their E row views, the
    per-expert gradients stacked back into ``[E, ...]`` tensors (without a
    copy when they are the rows of one buffer, as the Triton launchers return
    them; None for an absent weight). For the reference and the Triton
    launchers, which compute on per-expert lists or on one stacked buffer
    anyway; the C++ kernels implement the stacked ops themselves."""

    def stacked_forward(x, order, offsets, kept, w1, b1, w2, b2, w_gate, b_gate, scale, activation, dropout_p,
                        seed, offset):
        return forward(x, order, offsets, kept, *expert_lists(w1, b1, w2, b2, w_gate, b_gate), scale, activation,
                       dropout_p, seed, offset)

    def stacked_backward(grad_y, x, order, offsets, kept, w1, b1, w2, b2, w_gate, b_gate, scale, hidden, activation,
                         dropout_p, seed, offset):
        grad_x, *grad_groups, grad_scale = backward(
            grad_y, x, order, offsets, kept, *expert_lists(w1, b1, w2, b2, w_gate, b_gate), scale, hidden, activation,
            dropout_p, seed, offset
        )
        return (grad_x, *[restack(grads) if grads else None for grads in grad_groups], grad_scale)

    return stacked_forward, stacked_backward


lib.impl("switch_mlp", naive.switch_mlp, "CompositeExplicitAutograd")
lib.impl("switch_mlp_backward", naive.switch_mlp_backward, "CompositeExplicitAutograd")
_stacked_reference = on_expert_lists(naive.switch_mlp, naive.switch_mlp_backward)
lib.impl("switch_mlp_stacked", _stacked_reference[0], "CompositeExplicitAutograd")
lib.impl("switch_mlp_stacked_backward", _stacked_reference[1], "CompositeExplicitAutograd")


@torch.library.register_fake(qualname("switch_mlp"))
def _switch_mlp_fake(x, order, offsets, kept, w1, b1, w2, b2, w_gate, b_gate, scale, activation, dropout_p, seed,
                     offset):
    n_hidden = 2 if w_gate else 1
    hidden = x.new_empty(x.shape[0], n_hidden * w1[0].shape[0], dtype=naive.hidden_dtype(x.dtype, x.device))
    return x.new_empty(x.shape), hidden


@torch.library.register_fake(qualname("switch_mlp_backward"))
def _switch_mlp_backward_fake(
    grad_y, x, order, offsets, kept, w1, b1, w2, b2, w_gate, b_gate, scale, hidden, activation, dropout_p, seed, offset
):
    groups = [[torch.empty_like(w) for w in group] for group in (w1, b1, w2, b2, w_gate, b_gate)]
    return (torch.empty_like(x), *groups, torch.empty_like(scale))


@torch.library.register_fake(qualname("switch_mlp_stacked"))
def _switch_mlp_stacked_fake(x, order, offsets, kept, w1, b1, w2, b2, w_gate, b_gate, scale, activation, dropout_p,
                             seed, offset):
    n_hidden = 2 if w_gate is not None else 1
    hidden = x.new_empty(x.shape[0], n_hidden * w1.shape[1], dtype=naive.hidden_dtype(x.dtype, x.device))
    return x.new_empty(x.shape), hidden


@torch.library.register_fake(qualname("switch_mlp_stacked_backward"))
def _switch_mlp_stacked_backward_fake(grad_y, x, order, offsets, kept, w1, b1, w2, b2, w_gate, b_gate, scale, hidden,
                                      activation, dropout_p, seed, offset):
    grads = [None if w is None else torch.empty_like(w) for w in (w1, b1, w2, b2, w_gate, b_gate)]
    return (torch.empty_like(x), *grads, torch.empty_like(scale))


# Both ops' autograd, telling the layouts apart by w1: a tensor (stacked) or a list.
def _setup_context(ctx, inputs, output):
    x, order, offsets, kept, *groups, scale, activation, dropout_p, seed, offset = inputs
    _, hidden = output
    ctx.mark_non_differentiable(hidden)
    # otherwise autograd fills a zero [T, d_ff] gradient for hidden every backward
    ctx.set_materialize_grads(False)
    ctx.activation, ctx.dropout = activation, (dropout_p, seed, offset)
    ctx.group_sizes = None if isinstance(groups[0], torch.Tensor) else [len(group) for group in groups]
    ctx.save_for_backward(x, order, offsets, kept, scale, hidden, *_flat_weights(groups, ctx.group_sizes))


def _backward(ctx, grad_y, _grad_hidden):
    x, order, offsets, kept, scale, hidden, *flat = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    backward = _backward_op(ctx.group_sizes is None)
    grad_x, *grad_groups, grad_scale = backward(
        grad_y.contiguous(), x, order, offsets, kept, *_weight_groups(flat, ctx.group_sizes), scale, hidden,
        ctx.activation, *ctx.dropout
    )
    return (grad_x, None, None, None, *grad_groups, grad_scale, None, None, None, None)


def _backward_op(stacked: bool):
    ops = torch.ops.fastformers
    return ops.switch_mlp_stacked_backward if stacked else ops.switch_mlp_backward


def _flat_weights(groups: Sequence, group_sizes: Optional[Sequence[int]]) -> list:
    """The weight groups as one flat sequence: the six stacked tensors (None
    when absent) when ``group_sizes`` is None, else every list's tensors."""
    return list(groups) if group_sizes is None else [w for group in groups for w in group]


def _weight_groups(flat: Sequence, group_sizes: Optional[Sequence[int]]) -> list:
    """The inverse of :func:`_flat_weights`."""
    if group_sizes is None:
        return list(flat)
    groups, start = [], 0
    for size in group_sizes:
        groups.append(list(flat[start : start + size]))
        start += size
    return groups


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("fastformers::switch_mlp does not support double backward")


for _name in ("switch_mlp", "switch_mlp_stacked"):
    torch.library.register_autograd(qualname(_name), _backward, setup_context=_setup_context)
    torch.library.register_autograd(
        qualname(f"{_name}_backward"), _no_double_backward, setup_context=lambda ctx, inputs, output: None
    )
    # the backward is not registered: autograd runs it on the forward's dtypes
    # (its saved hidden stays float32 for bfloat16 inputs on CPU)
    _autocast.register(_name)


if _backend.triton_available():
    from . import triton_kernel

    lib.impl("switch_mlp", triton_kernel.switch_mlp_forward, "CUDA")
    lib.impl("switch_mlp_backward", triton_kernel.switch_mlp_backward, "CUDA")
    # the launchers index one [E, ...] buffer, which they take without a copy
    # from the row views of a stacked weight. Gated, the w1 and w_gate
    # gradients come back as disjoint halves of one buffer.
    _triton_stacked = on_expert_lists(triton_kernel.switch_mlp_forward, triton_kernel.switch_mlp_backward)
    lib.impl("switch_mlp_stacked", _triton_stacked[0], "CUDA")
    lib.impl("switch_mlp_stacked_backward", _triton_stacked[1], "CUDA")


class _SwitchMLPFunction(torch.autograd.Function):
    """``switch_mlp`` / ``switch_mlp_stacked`` with the same backward op as
    their registered autograd, for eager calls. torch.library's generated
    autograd wrapper rebuilds the per-expert weight lists through pytree on
    every forward and backward (~1.3 ms per forward at E = 64 in the
    profile); this Function takes them as one flat argument tuple. Under
    torch.compile the registered autograd is used (see :func:`switch_mlp`).

    ``group_sizes`` says how the six weight groups sit in ``flat_weights`` (see
    :func:`_flat_weights`): None for the stacked op (the six ``[E, ...]``
    tensors, None when absent: one autograd input per tensor kind whatever E,
    gradients written stacked by the kernel), else the number of per-expert
    tensors in each group (0 when absent).

    ``kernels`` is the (forward, backward) pair to run: the registered ops, or
    the Triton launchers themselves for CPU tensors under the interpreter
    (which the ops' CPU dispatch would send to the C++ kernels)."""

    @staticmethod
    def forward(ctx, kernels, x, order, offsets, kept, scale, activation, dropout_args, group_sizes, *flat_weights):
        groups = _weight_groups(flat_weights, group_sizes)
        y, hidden = kernels[0](x, order, offsets, kept, *groups, scale, activation, *dropout_args)
        ctx.save_for_backward(x, order, offsets, kept, scale, hidden, *flat_weights)
        ctx.kernels, ctx.activation, ctx.dropout_args, ctx.group_sizes = kernels, activation, dropout_args, group_sizes
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, order, offsets, kept, scale, hidden, *flat_weights = ctx.saved_tensors
        grad_x, *grad_groups, grad_scale = ctx.kernels[1](
            grad_y.contiguous(), x, order, offsets, kept, *_weight_groups(flat_weights, ctx.group_sizes), scale,
            hidden, ctx.activation, *ctx.dropout_args
        )
        return (None, grad_x, None, None, None, grad_scale, None, None, None,
                *_flat_weights(grad_groups, ctx.group_sizes))


def restack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)``, without the copy when they already are the
    consecutive ``[E, ...]`` rows of one contiguous buffer (the Triton
    launchers' per-expert gradients)."""
    first = tensors[0]
    step = first.numel()
    contiguous_rows = all(
        t.is_contiguous() and t.shape == first.shape and t.dtype == first.dtype
        and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and t.storage_offset() == first.storage_offset() + i * step
        for i, t in enumerate(tensors)
    )
    if first.is_contiguous() and contiguous_rows:
        return first.as_strided((len(tensors), *first.shape), (step, *first.stride()), first.storage_offset())
    return torch.stack(list(tensors))


def _kernels(backend: str, device: torch.device, stacked: bool) -> tuple:
    if backend == "triton" and device.type == "cpu":
        return _triton_stacked if stacked else (triton_kernel.switch_mlp_forward, triton_kernel.switch_mlp_backward)
    ops = torch.ops.fastformers
    return (ops.switch_mlp_stacked if stacked else ops.switch_mlp), _backward_op(stacked)


def switch_mlp(
    x: torch.Tensor,
    routing: Routing,
    w1: Weights,
    b1: Optional[Weights],
    w2: Weights,
    b2: Optional[Weights],
    scale: torch.Tensor,
    activation: str = "relu",
    w_gate: Optional[Weights] = None,
    b_gate: Optional[Weights] = None,
    *,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Each token through the FFN of the expert ``routing`` chose, times ``scale``.

    x: ``[T, d]``; routing: from :func:`route` on the same T tokens; w1:
    ``[E, d_ff, d]``, b1: ``[E, d_ff]``, w2: ``[E, d, d_ff]``, b2: ``[E, d]``
    (``layer1`` / ``layer2`` of labml's FeedForward stacked over experts;
    biases may be None); optional gate ``w_gate [E, d_ff, d]``, ``b_gate
    [E, d_ff]`` (``linear_v``, for ``is_gated``); scale: ``[T]`` (``p_max``, or
    ``p_max / p_max.detach()``); activation: one of ``naive.ACTIVATIONS``
    (``"relu"``, exact ``"gelu"``, ``"silu"``, ``"sigmoid"``, ``"identity"``:
    with a gate, ReGLU, GEGLU, SwiGLU, GLU and bilinear).
    Every weight may instead be a sequence of E per-expert tensors (``w1[e]``
    ``[d_ff, d]``, ...), e.g. the parameters of one ``nn.Linear`` per expert:
    they are used in place, without stacking, by the reference and C++
    kernels (the Triton launchers stack lists that are not already views of
    one ``[E, ...]`` buffer: see :mod:`.triton_kernel`).

    Returns ``y [T, d]``: ``scale[t] · layer2(dropout(act(layer1(x[t])) [·
    linear_v(x[t])]))`` for kept tokens, ``scale[t] · x[t]`` for dropped ones
    (no dropout on them). The dropout mask (``dropout_p`` > 0) is ``[T, d_ff]``
    by token row (see :func:`naive.switch_mlp`); its ``(seed, offset)`` come from
    :func:`fastformers.ops.dropout.draw` (torch's default generator, unless
    ``seed`` is given), and ``dropout.record()`` gives the mask back.
    Under ``torch.autocast`` every floating input is cast to the autocast
    dtype (the kernels accumulate in float32). ``backend`` overrides the
    backend selection for this call.
    """
    x, scale, w1, b1, w2, b2, w_gate, b_gate = _autocast_inputs(x, scale, w1, b1, w2, b2, w_gate, b_gate)
    check_inputs(x, routing, w1, b1, w2, b2, scale, activation, w_gate, b_gate, dropout_p)
    name = _backend.resolve_backend(x.device, backend, implemented=KERNELS)
    return switch_mlp_on(name, x, routing, w1, b1, w2, b2, scale, activation, w_gate, b_gate, dropout_p=dropout_p,
                         seed=seed)


def _autocast_inputs(x, scale, *weights):
    """x, scale and the weight groups cast to the active autocast dtype (unchanged without autocast)."""
    if not isinstance(x, torch.Tensor):
        return (x, scale, *weights)
    return _autocast.cast(x.device.type, x, scale, *weights)


def switch_mlp_on(backend: str, x, routing, w1, b1, w2, b2, scale, activation, w_gate=None, b_gate=None, *,
                  dropout_p: float = 0.0, seed: Optional[int] = None):
    """:func:`switch_mlp` on the resolved ``backend`` without its Python input
    checks, for callers whose inputs are valid by construction
    (``SwitchFeedForward``, whose router made ``routing``): with E = 64 the
    checks visit 256 weight tensors per call. The C++ kernel still checks
    every tensor's shape, dtype and device; the Triton launchers trust them.
    Follows autocast and draws the dropout's ``(seed, offset)`` as
    :func:`switch_mlp` does."""
    weights = (w1, b1, w2, b2, w_gate, b_gate)
    x, scale, *weights = _autocast.cast(x.device.type, x, scale, *weights)
    d_ff = w1.shape[-2] if isinstance(w1, torch.Tensor) else w1[0].shape[0]
    seed, offset = dropout.draw("switch_mlp", dropout_p, (x.shape[0], d_ff), x.device, seed=seed)
    dropout_args = (dropout_p, seed, offset)
    if backend == "reference":
        return naive.switch_mlp(x, routing.order, routing.offsets, routing.kept, *expert_lists(*weights), scale,
                                activation, *dropout_args)[0]
    # all-stacked weights (None for absent ones) take the stacked op; lists,
    # or a mix, the list op
    stacked = all(group is None or isinstance(group, torch.Tensor) for group in weights)
    if stacked:
        groups, group_sizes = [None if w is None else w.contiguous() for w in weights], None
    else:
        groups = [[w.contiguous() for w in group] for group in expert_lists(*weights)]
        group_sizes = tuple(len(group) for group in groups)
    kernels = _kernels(backend, x.device, stacked)
    args = (x.contiguous(), routing.order, routing.offsets, routing.kept)
    if torch.compiler.is_compiling():
        op = torch.ops.fastformers.switch_mlp_stacked if stacked else torch.ops.fastformers.switch_mlp
        if kernels[0] is not op:
            raise NotImplementedError("the Triton switch kernels run on CPU tensors (interpreter) only in eager mode")
        return op(*args, *groups, scale.contiguous(), activation, *dropout_args)[0]
    return _SwitchMLPFunction.apply(kernels, *args, scale.contiguous(), activation, dropout_args, group_sizes,
                                    *_flat_weights(groups, group_sizes))
