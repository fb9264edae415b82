"""Switch Transformer: the feed-forward network is replaced by ``n_experts``
FFNs and a router that sends every token to exactly one of them.

Shape letters: ``L`` sequence length, ``B`` batch, ``N = L * B`` tokens,
``E`` experts, ``D`` = ``d_model``.
"""
from typing import List, Optional, Tuple

import torch
from torch import nn

from .. import _backend
from ..ops.switch import route
from ..ops.switch.op import DROP_POLICIES, KERNELS as SWITCH_KERNELS, switch_mlp_on
from ._utils import clone_module_list, init_pre_norm_layer
from .attention import FeedForward, MultiHeadAttention


class SwitchFeedForward(nn.Module):
    """Top-1 routed mixture of ``n_experts`` copies of ``expert``.

    Each token goes to the expert of highest routing probability ``p_max``.
    An expert takes at most ``capacity = int(capacity_factor * N / E)``
    tokens; with ``drop_tokens`` the surplus of an overloaded expert is
    dropped and passes through unchanged. Which tokens are dropped follows the
    ``drop_policy`` attribute (see :func:`fastformers.ops.switch.route`):

    * ``"labml"`` (default): ``torch.randperm(n)`` (n = tokens routed to the
      expert) on ``generator``, or on the global CPU generator when
      ``generator`` (attribute, default None) is None, one draw per overloaded expert in expert order,
      exactly as labml_nn 0.5.1 draws it, so under the same
      ``torch.manual_seed`` the same tokens are dropped;
    * ``"deterministic"``: each expert keeps its first ``capacity`` tokens in
      token order; no random numbers are drawn.

    The output is scaled by ``p_max`` when ``is_scale_prob``; otherwise by
    ``p_max / p_max.detach()`` (value 1) so the router still gets gradients.

    The experts stay ``n_experts`` separate :class:`FeedForward` modules (same
    ``state_dict`` keys as labml, ``experts.{e}.layer1.weight``, ...); the
    fused backends read their parameters in place, without stacking them.
    ``backend`` (settable; None = automatic) selects the implementation:
    ``"cpp"``/``"triton"`` run routing plus one grouped expert-FFN op
    (:func:`fastformers.ops.switch.switch_mlp`), ``"reference"`` loops over
    the expert modules as labml does. The fused op covers every labml
    FeedForward: ReLU, exact GELU, SiLU, Sigmoid or Identity, gated or not,
    with or without biases, and the hidden-activation dropout in training
    (drawn by the kernel from torch's default generator, mask ``[N, d_ff]``
    by token; tokens over capacity get none, they pass x through) when every
    expert has the same dropout probability. For other experts the automatic
    choice is the reference, with a :class:`fastformers._backend.FallbackWarning` that
    says why (:meth:`fused_backend` tells it without running), and an
    explicitly requested fused backend raises. Under ``torch.autocast`` the
    fused op runs in the autocast dtype (float32 accumulation) and the output
    has the dtype of ``x``, as labml's. The Triton kernels take the
    expert weights stacked, so on CUDA each forward and backward stacks the
    ``nn.Linear`` parameters (a copy of every expert weight; see
    :mod:`fastformers.ops.switch.triton_kernel`). ``last_backend`` records the backend the last forward used.
    """

    def __init__(self, *,
                 capacity_factor: float,
                 drop_tokens: bool,
                 is_scale_prob: bool,
                 n_experts: int,
                 expert: FeedForward,
                 d_model: int):
        super().__init__()
        self.capacity_factor = capacity_factor
        self.is_scale_prob = is_scale_prob
        self.n_experts = n_experts
        self.drop_tokens = drop_tokens
        self.experts = clone_module_list(expert, n_experts)
        self.switch = nn.Linear(d_model, n_experts)
        self.softmax = nn.Softmax(dim=-1)
        # labml's constructor signature is kept: these are set after construction
        self.drop_policy = "labml"
        self.generator: Optional[torch.Generator] = None
        self.backend: Optional[str] = None
        self.last_backend: Optional[str] = None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """``x`` ``[L, B, D]``. Returns

        * the output ``[L, B, D]``,
        * ``counts`` ``[E]`` (dtype of ``x``): tokens routed to each expert, before dropping,
        * the routing probabilities summed over tokens ``[E]``,
        * the number of dropped tokens (a Python ``int``),
        * ``p_max`` ``[N]``, each token's highest routing probability.
        """
        if x.dim() != 3:
            raise ValueError(f"x must be [seq_len, batch, d_model], got shape {tuple(x.shape)}")
        seq_len, batch_size, d_model = x.shape
        tokens = x.reshape(-1, d_model)
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}")
        backend = self.last_backend = self._choose_backend(tokens.device)
        routing = route(self.switch(tokens), self.capacity_factor, self.drop_tokens, self.drop_policy,
                        self.generator)
        p_max = routing.route_prob_max
        scale = p_max if self.is_scale_prob else p_max / p_max.detach()
        if backend == "reference":
            out = self._experts_one_by_one(tokens, routing) * scale.view(-1, 1)
        else:
            activation, weights = self._fused_weights()
            out = switch_mlp_on(backend, tokens, routing, *weights[:4], scale, activation, *weights[4:],
                                dropout_p=self.hidden_dropout_p(self.training)).to(tokens.dtype)
        counts = routing.counts.to(x.dtype)
        return out.view(seq_len, batch_size, d_model), counts, routing.probs.sum(0), routing.n_dropped, p_max

    def _experts_one_by_one(self, tokens: torch.Tensor, routing) -> torch.Tensor:
        """Unscaled output ``[N, D]``: each expert module on its kept tokens, dropped tokens copied."""
        starts = routing.offsets.tolist()
        kept = routing.kept.tolist()
        out = tokens.new_zeros(tokens.shape)
        for e, expert in enumerate(self.experts):
            rows = routing.order[starts[e]:starts[e] + kept[e]]
            # under autocast the experts compute in the autocast dtype; out keeps the dtype of x
            out[rows, :] = expert(tokens[rows, :]).to(out.dtype)
        if routing.n_dropped:
            dropped = torch.cat([routing.order[starts[e] + kept[e]:starts[e + 1]] for e in range(self.n_experts)])
            out[dropped, :] = tokens[dropped, :]
        return out

    def fused_backend(self, device: torch.device, training: bool) -> Tuple[str, Optional[str]]:
        """The backend :meth:`forward` would use on ``device`` in training
        (``training=True``) or eval mode, without running it, and why when that
        is ``"reference"`` (None otherwise). Raises the ValueError forward
        raises when a fused backend is requested for experts it cannot run."""
        requested = self.backend if self.backend is not None else _backend.forced_backend()
        name = _backend.resolve_backend(device, requested, implemented=SWITCH_KERNELS)
        if name == "reference":
            if requested == "reference":
                return name, "backend 'reference' was requested"
            return name, (f"no fused switch kernel for {device.type} tensors in this installation (backends: "
                          f"{', '.join(_backend.available_backends())})")
        reason = self._unfusable_reason(training)
        if reason is None:
            return name, None
        if requested is not None:
            raise ValueError(f"SwitchFeedForward backend {name!r} cannot run these experts: {reason}")
        return "reference", reason

    def _choose_backend(self, device: torch.device) -> str:
        """:meth:`fused_backend` for this forward, warning when the automatic choice is the reference."""
        name, reason = self.fused_backend(device, self.training)
        if name == "reference" and self.backend is None and _backend.forced_backend() is None:
            _backend.warn_fallback(self, reason)
        return name

    def hidden_dropout_p(self, training: bool) -> float:
        """The experts' hidden-activation dropout probability in training (0 in eval mode)."""
        return float(_member(self.experts[0], "dropout").p) if training else 0.0

    def _unfusable_reason(self, training: bool) -> Optional[str]:
        first = self.experts[0]
        if not all(hasattr(first, name) for name in ("layer1", "layer2", "activation", "dropout", "is_gated")):
            return "the experts are not FeedForward modules (layer1, activation, dropout, layer2); use labml's"
        activation = _activation_name(first.activation)
        if activation is None:
            return (f"activation {first.activation!r} has no fused kernel; use nn.ReLU, exact nn.GELU, nn.SiLU, "
                    "nn.Sigmoid or nn.Identity")
        layout = _expert_layout(first)
        dropout_p = _member(first, "dropout").p
        for expert in self.experts:
            if _expert_layout(expert) != layout or _activation_name(_member(expert, "activation")) != activation:
                return "the experts differ in activation, gating or biases; give them all the same"
            if training and _member(expert, "dropout").p != dropout_p:
                return "the experts' dropout probabilities differ (training mode); give them all the same p"
        return None

    def _fused_weights(self) -> Tuple[str, List[Optional[List[torch.Tensor]]]]:
        """Activation name and the per-expert ``w1, b1, w2, b2, w_gate, b_gate`` lists (None when absent)."""
        first = self.experts[0]
        linears = [("layer1", "weight"), ("layer1", "bias"), ("layer2", "weight"), ("layer2", "bias")]
        if first.is_gated:
            linears += [("linear_v", "weight"), ("linear_v", "bias")]
        weights: List[Optional[List[torch.Tensor]]] = []
        for layer, name in linears:
            present = getattr(getattr(first, layer), name) is not None
            weights.append([_member(_member(e, layer), name) for e in self.experts] if present else None)
        weights += [None] * (6 - len(weights))
        return _activation_name(first.activation), weights


def _member(module: nn.Module, name: str):
    """``getattr(module, name)`` for a child module or parameter, read from the
    module's own tables: ``nn.Module.__getattr__`` is slow enough that the ~900
    lookups collecting 64 experts' parameters took ~0.5 ms of every forward."""
    for table in (module._modules, module._parameters):
        if name in table:
            return table[name]
    return getattr(module, name)


# labml_nn's FeedForward configurations: FFN_ReLU / FFN_GELU and the GLU
# variants (SwiGLU: SiLU, GLU: Sigmoid, Bilinear: Identity), gated or not
_ACTIVATION_NAMES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Identity: "identity"}


def _activation_name(activation: nn.Module) -> Optional[str]:
    if type(activation) is nn.GELU:
        return "gelu" if activation.approximate == "none" else None
    return _ACTIVATION_NAMES.get(type(activation))


def _expert_layout(expert: nn.Module) -> tuple:
    gate = getattr(expert, "linear_v", None) if expert.is_gated else None
    return (expert.is_gated, _member(_member(expert, "layer1"), "bias") is not None,
            _member(_member(expert, "layer2"), "bias") is not None,
            gate is not None and _member(gate, "bias") is not None)


def load_balancing_loss(counts: torch.Tensor, route_prob_sum: torch.Tensor, n_experts: int) -> torch.Tensor:
    r"""Switch Transformer load-balancing loss, as labml_nn's switch experiment computes it.

    counts: ``[E]`` or ``[n_layers, E]`` tokens routed per expert (the
    ``counts`` :class:`SwitchFeedForward` returns, stacked over layers by
    :class:`SwitchTransformer`); route_prob_sum: same shape, the summed
    routing probabilities. With ``f_i = counts_i / Σ_j counts_j`` and
    ``P_i = route_prob_sum_i / Σ_j counts_j`` per layer, returns the scalar
    ``n_experts · Σ_layers Σ_i f_i · P_i`` (1 per layer when perfectly balanced).
    """
    if counts.shape != route_prob_sum.shape or counts.dim() not in (1, 2) or counts.shape[-1] != n_experts:
        raise ValueError(
            f"counts and route_prob_sum must both be [{n_experts}] or [n_layers, {n_experts}], "
            f"got {tuple(counts.shape)} and {tuple(route_prob_sum.shape)}"
        )
    total = counts.sum(dim=-1, keepdim=True)
    return n_experts * ((counts / total) * (route_prob_sum / total)).sum()


class SwitchTransformerLayer(nn.Module):
    """Pre-norm layer: ``x + attn(norm(x))`` then ``x + switch_ffn(norm(x))``,
    passing the router statistics through."""

    def __init__(self, *,
                 d_model: int,
                 attn: MultiHeadAttention,
                 feed_forward: SwitchFeedForward,
                 dropout_prob: float):
        super().__init__()
        self.size = d_model
        self.attn = attn
        init_pre_norm_layer(self, d_model, feed_forward, dropout_prob)

    def forward(self, *,
                x: torch.Tensor,
                mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """``x`` ``[L, B, D]``, ``mask`` ``[L, L, B or 1]``. Returns ``x`` ``[L, B, D]``
        and the :class:`SwitchFeedForward` statistics ``(counts, route_prob_sum, n_dropped, p_max)``."""
        z = self.norm_self_attn(x)
        x = x + self.dropout(self.attn(query=z, key=z, value=z, mask=mask))
        ff, counts, route_prob, n_dropped, route_prob_max = self.feed_forward(self.norm_ff(x))
        x = x + self.dropout(ff)
        return x, counts, route_prob, n_dropped, route_prob_max


class SwitchTransformer(nn.Module):
    """A stack of ``n_layers`` copies of ``layer`` followed by a final LayerNorm."""

    def __init__(self, layer: SwitchTransformerLayer, n_layers: int):
        super().__init__()
        self.layers = clone_module_list(layer, n_layers)
        self.norm = nn.LayerNorm([layer.size])

    def forward(self, x: torch.Tensor, mask: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[int], torch.Tensor]:
        """``x`` ``[L, B, D]``, ``mask`` ``[L, L, B or 1]``. Returns the normalised
        output ``[L, B, D]``, ``counts`` ``[n_layers, E]``, summed routing
        probabilities ``[n_layers, E]``, dropped-token counts (list of ``int``,
        one per layer) and ``p_max`` ``[n_layers, N]``."""
        counts, route_prob, n_dropped, route_prob_max = [], [], [], []
        for layer in self.layers:
            x, f, p, n_d, p_max = layer(x=x, mask=mask)
            counts.append(f)
            route_prob.append(p)
            n_dropped.append(n_d)
            route_prob_max.append(p_max)
        return self.norm(x), torch.stack(counts), torch.stack(route_prob), n_dropped, torch.stack(route_prob_max)
