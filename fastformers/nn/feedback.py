"""Feedback Transformer: token-by-token recurrence where every layer of step
``t`` attends to the feedback memory of all earlier steps.

The memory of step ``t`` is one vector per token, ``m_t = Σ_l softmax(w)_l · x_l``
over the embedding and every layer's output (``n_layers + 1`` of them),
computed by the fused :func:`fastformers.ops.feedback_memory`.

Shape letters: ``T`` sequence length, ``t`` steps so far, ``B`` batch,
``H`` heads, ``d_k`` features per head, ``D`` = ``d_model``, ``P`` = ``n_positions`` (default ``2**12``).
"""
import dataclasses
import math
from typing import Optional, Tuple

import torch
from torch import nn

from .. import ops
from .._backend import available_backends, forced_backend, resolve_backend, warn_fallback
from ..ops import _autocast
from ..ops.feedback import cuda_graph, recurrence
from ._utils import check_sequence, clone_module_list, init_pre_norm_layer
from .attention import FeedForward, PrepareForMultiHeadAttention, check_positions


class FeedbackAttention(nn.Module):
    r"""Attention of one query per sequence to the ``t`` memory steps before it.

    Score of memory step ``j`` (``j = t - 1`` is the most recent):
    ``((Q + u) · K_j + Q · R_{r} + S_{r}) / sqrt(d_k)`` with ``r = P - t + j``,
    so the most recent step uses the last row of ``R = key_pos_embeddings``
    ``[P, H, d_k]`` and ``S = key_pos_bias`` ``[P, H]``; ``u = query_pos_bias``
    ``[H, d_k]``. Supports ``t <= P``, ``P = n_positions`` (labml's ``2**12`` by
    default, which keeps labml_nn's ``state_dict`` shapes).

    With ``is_kv_precomputed`` the module has no key/value projections
    (``key`` and ``value`` are None) and takes keys and values already split
    into heads, as :class:`FeedbackTransformerKV` shares them across layers.
    """

    def __init__(self, heads: int, d_model: int, dropout_prob: float = 0.1, *,
                 is_kv_precomputed: bool = False, n_positions: int = 2 ** 12):
        super().__init__()
        self.d_k = d_model // heads
        self.heads = heads
        self.query = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=False)
        if not is_kv_precomputed:
            self.key = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=False)
            self.value = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=True)
        else:
            self.key = None
            self.value = None
        self.output = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout_prob)
        self.scale = 1 / math.sqrt(self.d_k)
        # Scores are [t, B, H]: normalise over the memory steps.
        self.softmax = nn.Softmax(dim=0)
        self.P = check_positions(n_positions)
        self.key_pos_embeddings = nn.Parameter(torch.zeros((self.P, heads, self.d_k)), requires_grad=True)
        self.key_pos_bias = nn.Parameter(torch.zeros((self.P, heads)), requires_grad=True)
        self.query_pos_bias = nn.Parameter(torch.zeros((heads, self.d_k)), requires_grad=True)

    def get_scores(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Unscaled scores ``[t, B, H]`` from ``query`` ``[B, H, d_k]`` and ``key`` ``[t, B, H, d_k]``."""
        steps = key.shape[0]
        if steps > self.P:
            raise ValueError(
                f"FeedbackAttention supports at most P={self.P} memory steps "
                f"(rows of key_pos_embeddings), got {steps}"
            )
        rows = slice(self.P - steps, self.P)
        ac = torch.einsum("bhd,jbhd->jbh", query + self.query_pos_bias[None], key)
        bd = torch.einsum("bhd,jhd->jbh", query, self.key_pos_embeddings[rows])
        return ac + (bd + self.key_pos_bias[rows, None, :])

    def forward(self, *,
                query: torch.Tensor,
                key: torch.Tensor,
                value: torch.Tensor) -> torch.Tensor:
        """``query`` ``[B, D]``; ``key`` and ``value`` ``[t, B, D]``, or
        ``[t, B, H, d_k]`` when ``is_kv_precomputed``. Returns ``[B, D]``."""
        if self.key is not None:
            key = self.key(key)
        if self.value is not None:
            value = self.value(value)
        return self.attend_projected(query, key, value)

    def attend_projected(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with ``key``/``value`` ``[t, B, H, d_k]`` already
        projected (by this module's own projections, as the models' K/V cache
        holds them). ``query`` ``[B, D]`` -> ``[B, D]``."""
        query = self.query(query)
        attn = self.dropout(self.softmax(self.get_scores(query, key) * self.scale))
        x = torch.einsum("jbh,jbhd->bhd", attn, value)
        return self.output(x.reshape(x.shape[0], -1))


class FeedbackTransformerLayer(nn.Module):
    """One pre-norm layer for a single step: ``x + attn(norm(x), memory)`` (skipped
    at the first step, which has no memory) then ``x + ffn(norm(x))``."""

    def __init__(self, *,
                 d_model: int,
                 attn: FeedbackAttention,
                 feed_forward: FeedForward,
                 dropout_prob: float):
        super().__init__()
        self.size = d_model
        self.attn = attn
        init_pre_norm_layer(self, d_model, feed_forward, dropout_prob)

    def forward(self, *,
                x: torch.Tensor,
                key: Optional[torch.Tensor],
                value: Optional[torch.Tensor]) -> torch.Tensor:
        """``x`` ``[B, D]``; ``key``/``value`` the memory ``[t, B, D]`` (or
        ``[t, B, H, d_k]`` if precomputed), None at the first step. Returns ``[B, D]``."""
        if key is not None:
            x = x + self.dropout(self.attn(query=self.norm_self_attn(x), key=key, value=value))
        return x + self.dropout(self.feed_forward(self.norm_ff(x)))

    def step_projected(self, x: torch.Tensor, key: Optional[torch.Tensor], value: Optional[torch.Tensor]
                       ) -> torch.Tensor:
        """:meth:`forward` with ``key``/``value`` ``[t, B, H, d_k]`` already
        projected by this layer's attention (the models' K/V cache holds
        them; see :meth:`FeedbackAttention.attend_projected`)."""
        if key is not None:
            x = x + self.dropout(self.attn.attend_projected(self.norm_self_attn(x), key, value))
        return x + self.dropout(self.feed_forward(self.norm_ff(x)))


def _append_step(steps: Optional[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    """``steps`` ``[t, ...]`` (None for ``t = 0``) and ``new`` ``[...]`` -> ``[t + 1, ...]``.

    A fresh tensor per step rather than a shared buffer, so every forward call
    owns its memory; one concatenation per step (instead of re-stacking all
    steps) keeps the autograd graph linear in the sequence length.
    """
    new = new.unsqueeze(0)
    return new if steps is None else torch.cat((steps, new), dim=0)


@dataclasses.dataclass
class FeedbackState:
    """What a :class:`FeedbackTransformer` / :class:`FeedbackTransformerKV` needs to
    continue after ``steps`` steps (generation, streaming); both the fused and the
    op-by-op recurrence read and write it.

    ``cache`` ``[capacity, B, 2C, H, d_k]`` holds, for each of ``C`` caches
    (1 shared cache for ``FeedbackTransformerKV``; one per layer for
    ``FeedbackTransformer``, projected with that layer's own key/value
    projections), keys then values; rows ``offset .. offset+steps-1`` are the
    valid steps, oldest first. :meth:`key` / :meth:`value` give them as
    ``[steps, B, H, d_k]``; :meth:`window` keeps only the most recent steps.
    The cache carries no autograd history: gradients never flow into a state.
    """

    cache: torch.Tensor
    steps: int
    offset: int = 0
    # Rows of ``cache`` written by any state sharing it: a state may extend the
    # buffer in place only if it ends there, so older states stay valid.
    _filled: list = dataclasses.field(default_factory=lambda: [0], repr=False)

    def rows(self) -> torch.Tensor:
        """The valid steps ``[steps, B, 2C, H, d_k]``."""
        return self.cache[self.offset:self.offset + self.steps]

    def key(self, cache_index: int = 0) -> torch.Tensor:
        return self.rows()[:, :, 2 * cache_index]

    def value(self, cache_index: int = 0) -> torch.Tensor:
        return self.rows()[:, :, 2 * cache_index + 1]

    def window(self, max_steps: int) -> "FeedbackState":
        """The state restricted to its last ``max_steps`` steps (a view of the same
        buffer: sliding the window copies nothing)."""
        if max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {max_steps}")
        if max_steps >= self.steps:
            return self
        dropped = self.steps - max_steps
        return FeedbackState(self.cache, max_steps, self.offset + dropped, self._filled)


# Feed-forward activations the fused recurrence implements, by module type.
_FUSED_ACTIVATIONS = {nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Identity: "identity"}


def _activation_name(activation: nn.Module) -> Optional[str]:
    """The fused recurrence's name for ``activation``; None if it has no fused form."""
    name = _FUSED_ACTIVATIONS.get(type(activation))
    if name == "gelu" and activation.approximate != "none":
        return None
    return name


def _fused_blocker(model: nn.Module, shared_kv: bool) -> Optional[str]:
    """Why the fused recurrence cannot run this model (None if it can): the layouts
    it does not implement. Every dropout, labml feed-forward variant and bias is fused."""
    first_ff = model.layers[0].feed_forward
    for index, layer in enumerate(model.layers):
        ff, attn = layer.feed_forward, layer.attn
        if not all(hasattr(ff, name) for name in ("layer1", "layer2", "activation", "dropout")):
            return (f"layer {index}: the feed-forward {type(ff).__name__} is not a FeedForward "
                    "(layer1, activation, dropout, layer2); use fastformers.nn.FeedForward")
        if not all(isinstance(module, nn.Dropout) for module in (attn.dropout, layer.dropout, ff.dropout)):
            return f"layer {index}: every dropout must be an nn.Dropout (the fused kernels draw its mask)"
        if _activation_name(ff.activation) is None:
            return (f"layer {index}: the feed-forward activation {ff.activation!r} has no fused form; use ReLU, "
                    "GELU (exact), SiLU, Sigmoid or Identity")
        if type(ff.activation) is not type(first_ff.activation) or \
                getattr(ff, "is_gated", False) != getattr(first_ff, "is_gated", False):
            return f"layer {index}: every layer's feed-forward must share layer 0's activation and gating"
        if (attn.key is None) != shared_kv:
            return f"layer {index}: attention is_kv_precomputed must be {shared_kv}"
        for norm in (layer.norm_self_attn, layer.norm_ff):
            if norm.weight is None or norm.bias is None:
                return f"layer {index}: layer norms must have a weight and a bias (elementwise_affine=True)"
    return None


def _dropout_probabilities(model: nn.Module) -> tuple:
    """Per layer (attention probabilities, residual, feed-forward hidden) dropout
    probabilities in effect (0 for a module in eval mode)."""
    def active_p(dropout: nn.Dropout) -> float:
        return dropout.p if dropout.training else 0.0

    return tuple(p for layer in model.layers
                 for p in (active_p(layer.attn.dropout), active_p(layer.dropout), active_p(layer.feed_forward.dropout)))


def _layer_weights(layer: "FeedbackTransformerLayer") -> recurrence.LayerWeights:
    attn, ff = layer.attn, layer.feed_forward
    # The op reads the last rows of its tables: the first attn.P rows, as get_scores does.
    # The whole table is passed as itself: a slice's backward would zero-fill and
    # copy a table-sized gradient per layer.
    def first_rows(table):
        return table if table.shape[0] == attn.P else table[:attn.P]

    gate = ff.linear_v if getattr(ff, "is_gated", False) else None
    return recurrence.LayerWeights(
        layer.norm_self_attn.weight, layer.norm_self_attn.bias, attn.query.linear.weight,
        first_rows(attn.key_pos_embeddings), first_rows(attn.key_pos_bias), attn.query_pos_bias, attn.output.weight,
        attn.output.bias, layer.norm_ff.weight, layer.norm_ff.bias, ff.layer1.weight, ff.layer1.bias,
        ff.layer2.weight, ff.layer2.bias, attn.query.linear.bias, None if gate is None else gate.weight,
        None if gate is None else gate.bias,
    )


def _stacked_projection(linears) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``linears``' weights stacked along the output axis, and their biases
    (zeros for a linear without one; None if none has a bias)."""
    weight = torch.cat([linear.weight for linear in linears])
    if all(linear.bias is None for linear in linears):
        return weight, None
    return weight, torch.cat([linear.weight.new_zeros(linear.out_features) if linear.bias is None else linear.bias
                              for linear in linears])


def _check_state(model, x_seq: torch.Tensor, state: Optional[FeedbackState], n_caches: int) -> int:
    """Steps already in ``state``; ValueError if it cannot continue with ``x_seq`` or
    the sequence would need more than ``P`` positional rows."""
    T, B, _ = x_seq.shape
    attn = model.layers[0].attn
    start = 0 if state is None else state.steps
    if state is not None:
        expected = (B, 2 * n_caches, attn.heads, attn.d_k)
        if tuple(state.cache.shape[1:]) != expected or state.cache.dtype != x_seq.dtype \
                or state.cache.device != x_seq.device:
            raise ValueError(
                f"state cache must be [capacity, {', '.join(map(str, expected))}] {x_seq.dtype} on {x_seq.device} "
                f"for this model and input, got {tuple(state.cache.shape)} {state.cache.dtype} on {state.cache.device}"
            )
    if start + T - 1 > attn.P:
        raise ValueError(
            f"{type(model).__name__} supports at most P={attn.P} memory steps (rows of key_pos_embeddings); "
            f"{start} cached + {T} new tokens need {start + T - 1}"
        )
    return start


def _run_fused(model, x_seq: torch.Tensor, state: Optional[FeedbackState], backend: str, shared_kv: bool,
               kv_weight: torch.Tensor, kv_bias: Optional[torch.Tensor]):
    """The model's recurrence on the fused path: outputs ``[T, B, D]`` (after the
    final norm) and the state after the last step.

    Under ``torch.autocast`` every floating input (weights, tables, biases, the
    input) is rounded to the autocast dtype, as autocast rounds a linear
    layer's weight; the cpp backend's C++ loops then compute in float32 (they
    run sgemm/dgemm), the other backends in the autocast dtype with float32
    accumulation. Outputs come back in the autocast dtype; the state holds the
    compute dtype."""
    device_type = x_seq.device.type
    autocast_dtype = _autocast.dtype_for(device_type)
    if autocast_dtype is None:
        return _run_fused_in(model, x_seq, state, backend, shared_kv, kv_weight, kv_bias, lambda t: t)
    compute_dtype = torch.float32 if backend == "cpp" else autocast_dtype

    def cast(t):
        return None if t is None else t.to(autocast_dtype).to(compute_dtype)

    with torch.autocast(device_type, enabled=False):
        out, new_state = _run_fused_in(model, cast(x_seq), state, backend, shared_kv, cast(kv_weight), cast(kv_bias),
                                       cast)
    return out.to(autocast_dtype), new_state


def _run_fused_in(model, x_seq, state, backend, shared_kv, kv_weight, kv_bias, cast):
    """:func:`_run_fused` with ``cast`` (None-preserving; identity outside autocast) applied to every parameter."""
    T, B, D = x_seq.shape
    first = model.layers[0].attn
    n_caches = 1 if shared_kv else len(model.layers)
    start = _check_state(model, x_seq, state, n_caches)
    cfg = recurrence.make_config(
        n_layers=len(model.layers), heads=first.heads, d_k=first.d_k, shared_kv=shared_kv,
        norm_eps=[(layer.norm_self_attn.eps, layer.norm_ff.eps) for layer in model.layers], scale=first.scale,
        start=start, backend=backend, device=x_seq.device,
        activation=_activation_name(model.layers[0].feed_forward.activation),
        dropout_p=_dropout_probabilities(model),
    )
    layers = [_layer_weights(layer) for layer in model.layers]
    layers = [recurrence.LayerWeights(*(cast(getattr(lw, name)) for name in recurrence.LayerWeights.FIELDS))
              for lw in layers]
    mix_weights = cast(model.weights)
    norm = model.norm

    def final_norm(out):
        return nn.functional.layer_norm(out, norm.normalized_shape, cast(norm.weight), cast(norm.bias), norm.eps)

    if torch.is_grad_enabled():
        _recurrence_graphs(model, cfg, x_seq, needs_grad=True)  # warns when cuda_graph is on
        initial = None if state is None else state.rows()
        out, kv = recurrence.run_recurrence(cfg, x_seq, initial, mix_weights, kv_weight, kv_bias, layers)
        return final_norm(out), FeedbackState(kv, start + T, 0, [start + T])
    # Without autograd the new rows go straight into the state's buffer when it
    # ends at this state and has room; otherwise the valid rows are copied once
    # into a buffer of doubled capacity (amortised O(1) per generated token, also
    # while a window slides through the buffer).
    if state is not None and state.offset + start == state._filled[0] and \
            state.cache.shape[0] >= state.offset + start + T:
        buffer, offset, filled = state.cache, state.offset, state._filled
    else:
        capacity = max(start + T, 2 * start)
        buffer = x_seq.new_empty((capacity, B, 2 * n_caches, first.heads, first.d_k))
        if start:
            buffer[:start] = state.rows()
        offset, filled = 0, [start]
    out, _ = recurrence.run_recurrence(cfg, x_seq, buffer[offset:], mix_weights, kv_weight, kv_bias, layers,
                                       write_in_place=True,
                                       graphs=_recurrence_graphs(model, cfg, x_seq, needs_grad=False))
    filled[0] = offset + start + T
    return final_norm(out), FeedbackState(buffer, start + T, offset, filled)


def _recurrence_graphs(model, cfg, x_seq, needs_grad: bool):
    """With ``model.cuda_graph`` on, the model's captured token loops when this call
    can replay one: no-grad forwards (``eval()``, ``torch.no_grad()``) of the triton
    backend on CUDA. The first call of each shape captures the loop
    into a ``torch.cuda.CUDAGraph``, later ones replay it (one launch per sequence;
    :mod:`fastformers.ops.feedback.cuda_graph`). Otherwise None, with a
    ``FallbackWarning`` that says why the loop runs eagerly."""
    if not getattr(model, "cuda_graph", False):
        return None
    reason = cuda_graph.graph_blocker(cfg, x_seq, needs_grad)
    if reason is not None:
        warn_fallback(model, f"cuda_graph=True, but {reason}")
        return None
    if model._graphs is None:
        model._graphs = cuda_graph.RecurrenceGraphs()
    return model._graphs


def _run_per_op(model, x_seq: torch.Tensor, state: Optional[FeedbackState], backend: str,
                kv_projections: list, want_state: bool):
    """The recurrence one module call at a time (any dropout, feed-forward or bias).

    ``kv_projections`` holds one ``(key, value)`` projection pair per cache
    (``[B, D] -> [B, H, d_k]``); layer ``l`` attends with cache ``l`` (or the
    only one). Returns normalised outputs ``[T, B, D]`` and, if ``want_state``,
    the state after the last step.
    """
    n_caches = len(kv_projections)
    start = _check_state(model, x_seq, state, n_caches)
    if start:
        keys = [state.key(c).detach() for c in range(n_caches)]
        values = [state.value(c).detach() for c in range(n_caches)]
    else:
        keys, values = [None] * n_caches, [None] * n_caches
    res = []
    for x in torch.unbind(x_seq, dim=0):
        layer_outputs = [x]
        for index, layer in enumerate(model.layers):
            c = index if n_caches > 1 else 0
            x = layer.step_projected(x, keys[c], values[c])
            layer_outputs.append(x)
        mem = ops.feedback_memory(torch.stack(layer_outputs), model.weights, backend=backend)
        for c, (key_projection, value_projection) in enumerate(kv_projections):
            keys[c] = _append_step(keys[c], key_projection(mem))
            values[c] = _append_step(values[c], value_projection(mem))
        res.append(x)
    out = model.norm(torch.stack(res))
    if not want_state:
        return out, None
    cache = torch.stack([t for pair in zip(keys, values) for t in pair], dim=2).detach()
    return out, FeedbackState(cache, start + x_seq.shape[0], 0, [cache.shape[0]])


def _choose_backend(model, device: torch.device) -> Tuple[str, Optional[str], Optional[str]]:
    """``(ops backend, path, reason)``: the ops' backend on ``device``, ``"fused"``
    or ``"per-op"``, and why the automatic choice left the fused path (None when
    it did not, or when the reference backend was asked for)."""
    backend = resolve_backend(device, model.backend)
    if backend == "reference":
        if model.backend is not None or forced_backend() is not None:
            return backend, "per-op", None
        return backend, "per-op", (f"no fused backend for {device.type} tensors in this installation "
                                   f"(available: {', '.join(available_backends())})")
    reason = _fused_blocker(model, isinstance(model, FeedbackTransformerKV))
    return backend, ("per-op" if reason else "fused"), reason


def _fused_backend(model, device: torch.device, training: bool) -> Tuple[str, Optional[str]]:
    # Every dropout is fused, so train and eval mode take the same path.
    backend, path, reason = _choose_backend(model, device)
    if path == "fused":
        return backend, None
    return "reference", reason or ("backend 'reference' was requested (model.backend, fastformers.use_backend or "
                                   "FASTFORMERS_BACKEND)")


def _forward(model, x_seq: torch.Tensor, state: Optional[FeedbackState], want_state: bool):
    # T = 0 or B = 0 is refused before any backend is chosen: the reference's
    # stack of no steps fails where the fused recurrence would return nothing.
    check_sequence(x_seq, model.layers[0].size, "x_seq")
    shared_kv = isinstance(model, FeedbackTransformerKV)
    backend, path, reason = _choose_backend(model, x_seq.device)
    model.last_backend, model.last_path = backend, path
    if path == "fused":
        return _run_fused(model, x_seq, state, backend, shared_kv, *model._kv_projection())
    if reason is not None:
        warn_fallback(model, reason)
    if shared_kv:
        projections = [(model.key, model.value)]
    else:
        projections = [(layer.attn.key, layer.attn.value) for layer in model.layers]
    return _run_per_op(model, x_seq, state, backend, projections, want_state)


class FeedbackTransformer(nn.Module):
    """Feedback Transformer whose layers project the memory ``[t, B, D]`` to keys
    and values themselves.

    ``backend`` (settable; None = automatic) selects the implementation of the
    feedback-memory op; ``last_backend`` records the one the last forward used.
    ``cuda_graph`` (settable, default False): no-grad forwards on CUDA (triton
    backend, no active dropout) replay the whole token loop from a CUDA graph
    captured on the first call of each shape; where that cannot apply a
    ``FallbackWarning`` says why and the loop runs eagerly.
    """

    def __init__(self, layer: FeedbackTransformerLayer, n_layers: int):
        super().__init__()
        self.layers = clone_module_list(layer, n_layers)
        self.norm = nn.LayerNorm([layer.size])
        # Logits of the per-layer memory mixing weights, over the embedding and each layer.
        self.weights = nn.Parameter(torch.ones(n_layers + 1), requires_grad=True)
        self.backend: Optional[str] = None
        self.last_backend: Optional[str] = None
        self.last_path: Optional[str] = None
        self.cuda_graph = False
        self._graphs: Optional[cuda_graph.RecurrenceGraphs] = None

    def _kv_projection(self):
        """All layers' key/value projections stacked: weight ``[2 · n_layers · D, D]``, bias ``[2 · n_layers · D]``."""
        return _stacked_projection([linear for layer in self.layers
                                    for linear in (layer.attn.key.linear, layer.attn.value.linear)])

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """``x_seq`` ``[T, B, D]`` -> normalised outputs ``[T, B, D]``.

        Off the reference backend the whole recurrence runs as one fused
        autograd function (``last_path == "fused"``), dropout included, for
        every labml layout (any of ReLU, exact GELU, SiLU, Sigmoid, Identity,
        gated or not, with or without biases); otherwise op by op
        (``last_path == "per-op"``, with a ``FallbackWarning`` that says why;
        :meth:`fused_backend` tells it without running).
        """
        return _forward(self, x_seq, None, want_state=False)[0]

    def fused_backend(self, device: torch.device, training: bool) -> Tuple[str, Optional[str]]:
        """The backend :meth:`forward` would use on ``device`` (``"cpp"``/``"triton"``
        for the fused recurrence, ``"reference"`` op by op) and, for ``"reference"``,
        why; the same decision as forward, without running it."""
        return _fused_backend(self, torch.device(device), training)

    def forward_with_state(self, x_seq: torch.Tensor, state: Optional[FeedbackState] = None
                           ) -> Tuple[torch.Tensor, FeedbackState]:
        """Continue the recurrence from ``state`` (None: from the first step).

        ``x_seq`` ``[T, B, D]`` -> (normalised outputs ``[T, B, D]``, the state
        after its last step, caching each layer's keys and values). Running a
        sequence in pieces, passing the state along, gives the same outputs as
        one call on the whole sequence. Without autograd the fused path
        extends the state's buffer in place, so generation costs one step per
        token. Gradients do not flow into the initial state.
        """
        return _forward(self, x_seq, state, want_state=True)


class FeedbackTransformerKV(nn.Module):
    """Feedback Transformer with key/value projections shared by all layers.

    Each step's memory is projected once to a key and a value ``[B, H, d_k]``;
    the layers' :class:`FeedbackAttention` must be built with
    ``is_kv_precomputed=True``. Keys and values (``[t, B, H, d_k]``) are
    tensors local to each forward call, not a buffer shared between calls, so
    several forwards may share one backward; any sequence length up to
    ``P`` (the attention's ``n_positions``) works (longer ones raise ValueError).

    ``backend`` (settable; None = automatic) selects the implementation of the
    feedback-memory op; ``last_backend`` records the one the last forward used.
    ``cuda_graph`` (settable, default False): no-grad forwards on CUDA (triton
    backend, no active dropout) replay the whole token loop from a CUDA graph
    captured on the first call of each shape; where that cannot apply a
    ``FallbackWarning`` says why and the loop runs eagerly.
    """

    def __init__(self, layer: FeedbackTransformerLayer, n_layers: int, d_model: int, heads: int):
        super().__init__()
        self.layers = clone_module_list(layer, n_layers)
        self.norm = nn.LayerNorm([layer.size])
        # Logits of the per-layer memory mixing weights, over the embedding and each layer.
        self.weights = nn.Parameter(torch.ones(n_layers + 1), requires_grad=True)
        d_k = d_model // heads
        self.key = PrepareForMultiHeadAttention(d_model, heads, d_k, bias=False)
        self.value = PrepareForMultiHeadAttention(d_model, heads, d_k, bias=False)
        self.backend: Optional[str] = None
        self.last_backend: Optional[str] = None
        self.last_path: Optional[str] = None
        self.cuda_graph = False
        self._graphs: Optional[cuda_graph.RecurrenceGraphs] = None

    def _kv_projection(self):
        """The shared key and value projections stacked: ``[2 · D, D]`` and their biases."""
        return _stacked_projection([self.key.linear, self.value.linear])

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """``x_seq`` ``[T, B, D]`` -> normalised outputs ``[T, B, D]``.

        Off the reference backend the whole recurrence runs as one fused
        autograd function (``last_path == "fused"``), dropout included, for
        every labml layout (any of ReLU, exact GELU, SiLU, Sigmoid, Identity,
        gated or not, with or without biases); otherwise op by op
        (``last_path == "per-op"``, with a ``FallbackWarning`` that says why;
        :meth:`fused_backend` tells it without running).
        """
        return _forward(self, x_seq, None, want_state=False)[0]

    def fused_backend(self, device: torch.device, training: bool) -> Tuple[str, Optional[str]]:
        """The backend :meth:`forward` would use on ``device`` (``"cpp"``/``"triton"``
        for the fused recurrence, ``"reference"`` op by op) and, for ``"reference"``,
        why; the same decision as forward, without running it."""
        return _fused_backend(self, torch.device(device), training)

    def forward_with_state(self, x_seq: torch.Tensor, state: Optional[FeedbackState] = None
                           ) -> Tuple[torch.Tensor, FeedbackState]:
        """Continue the recurrence from ``state`` (None: from the first step).

        ``x_seq`` ``[T, B, D]`` -> (normalised outputs ``[T, B, D]``, the state
        after its last step, caching the shared keys and values). Running a
        sequence in pieces, passing the state along, gives the same outputs as
        one call on the whole sequence. Without autograd the fused path
        extends the state's buffer in place, so generation costs one step per
        token. Gradients do not flow into the initial state.
        """
        return _forward(self, x_seq, state, want_state=True)

    def free(self) -> None:
        """Kept for labml_nn API compatibility: no state outlives a forward call."""
