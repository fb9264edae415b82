"""Switch Transformer: the feed-forward network is replaced by ``n_experts``
FFNs and a router that sends every token to exactly one of them.

Shape letters: ``L`` sequence length, ``B`` batch, ``N = L * B`` tokens,
``E`` experts, ``D`` = ``d_model``.
"""
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
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

    Expert storage (stacked unless the class attribute ``stacked_experts`` is
    False, as in a subclass; labml's constructor signature is kept): one Parameter per
    tensor kind, ``w1 [E, d_ff, D]``, ``b1 [E, d_ff]``, ``w2 [E, D, d_ff]``,
    ``b2 [E, D]`` and for gated experts ``w_gate [E, d_ff, D]``, ``b_gate
    [E, d_ff]`` (absent biases are None), so a step costs one autograd node
    and one gradient per kind whatever E. ``state_dict`` still has labml's
    keys (``experts.{e}.layer1.weight``, ...), and ``load_state_dict`` takes
    them (a labml checkpoint loads as is); ``experts[e]`` reads expert ``e``
    as a labml-shaped view (``experts[e].layer1.weight`` is ``w1[e]``,
    writable in place). Unstacked (``unstack_experts_()``, or
    ``fastformers.convert(labml_model, stacked_experts=False)``) the experts
    are ``n_experts`` separate :class:`FeedForward` modules, as in labml, and
    the fused backends read their parameters in place; ``stack_experts_()``
    and ``unstack_experts_()`` switch layouts with new Parameter objects
    (build the optimizer afterwards). Stacked, the fused backends run the
    ``switch_mlp_stacked`` ops, whose backward writes each weight gradient
    straight into one ``[E, ...]`` tensor.
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

    # whether the constructor stacks the experts (labml's constructor signature is kept)
    stacked_experts = True

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
        if self.stacked_experts:
            self.stack_experts_()

    @property
    def stacked(self) -> bool:
        """Whether the experts are stored stacked (see the class docstring)."""
        return "experts" not in self._modules

    @property
    def experts(self):
        """The experts: the ``ModuleList`` of :class:`FeedForward` (unstacked
        layout) or a sequence of labml-shaped :class:`StackedExpert` views."""
        if "experts" in self._modules:
            return self._modules["experts"]
        return StackedExperts(self)

    def stack_experts_(self) -> "SwitchFeedForward":
        """Move the experts into the stacked layout, in place (new Parameter
        objects: build the optimizer afterwards). Raises ValueError naming the
        first expert whose structure differs from expert 0. Returns ``self``."""
        if self.stacked:
            return self
        experts = self._modules["experts"]
        self.expert_spec = ExpertSpec.of(experts)
        del self._modules["experts"]
        for name, layer, kind in _STACKED_TENSORS:
            tensors = [_member(_member(e, layer), kind) for e in experts] if hasattr(experts[0], layer) else [None]
            if tensors[0] is None:
                self.register_parameter(name, None)
            else:
                stacked = torch.stack([t.detach() for t in tensors])
                self.register_parameter(name, nn.Parameter(stacked, requires_grad=tensors[0].requires_grad))
        if not getattr(self, "_labml_key_hooks", False):
            # the hooks do nothing while the experts are unstacked
            self.register_state_dict_post_hook(_save_experts_as_labml)
            self.register_load_state_dict_pre_hook(_load_labml_experts)
            self._labml_key_hooks = True
        return self

    def unstack_experts_(self) -> "SwitchFeedForward":
        """Move the experts into ``n_experts`` separate :class:`FeedForward`
        modules, in place (new Parameters: build the optimizer afterwards).
        Returns ``self``."""
        if not self.stacked:
            return self
        experts = nn.ModuleList(expert.as_feed_forward() for expert in self.experts)
        for name, _, _ in _STACKED_TENSORS:
            del self._parameters[name]
        del self.expert_spec
        self._modules["experts"] = experts
        return self

    def extra_repr(self) -> str:
        if not self.stacked:
            return ""
        spec = self.expert_spec
        return (f"n_experts={self.n_experts}, d_ff={self.w1.shape[1]}, activation={spec.activation!r}, "
                f"is_gated={spec.is_gated}, dropout={spec.dropout.p} (stacked experts)")

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
        return switch_backend(self, device, lambda: self._unfusable_reason(training))

    def _choose_backend(self, device: torch.device) -> str:
        return choose_switch_backend(self, device)

    def hidden_dropout_p(self, training: bool) -> float:
        """The experts' hidden-activation dropout probability in training (0 in eval mode)."""
        if not training:
            return 0.0
        return float(self.expert_spec.dropout.p if self.stacked else _member(self.experts[0], "dropout").p)

    def _unfusable_reason(self, training: bool) -> Optional[str]:
        if self.stacked:
            # one activation and one dropout for all experts by construction
            return _activation_reason(self.expert_spec.activation)
        first = self.experts[0]
        if not all(hasattr(first, name) for name in ("layer1", "layer2", "activation", "dropout", "is_gated")):
            return "the experts are not FeedForward modules (layer1, activation, dropout, layer2); use labml's"
        reason = _activation_reason(first.activation)
        if reason is not None:
            return reason
        activation = _activation_name(first.activation)
        layout = _expert_layout(first)
        dropout_p = _member(first, "dropout").p
        for expert in self.experts:
            if _expert_layout(expert) != layout or _activation_name(_member(expert, "activation")) != activation:
                return "the experts differ in activation, gating, biases or shapes; give them all the same"
            if training and _member(expert, "dropout").p != dropout_p:
                return "the experts' dropout probabilities differ (training mode); give them all the same p"
        return None

    def _fused_weights(self) -> Tuple[str, list]:
        """Activation name and ``w1, b1, w2, b2, w_gate, b_gate``: stacked
        Parameters, or per-expert lists (None when absent)."""
        if self.stacked:
            return (_activation_name(self.expert_spec.activation),
                    [self._parameters[name] for name, _, _ in _STACKED_TENSORS])
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


# stacked Parameter name, labml FeedForward submodule and its tensor
_STACKED_TENSORS = (("w1", "layer1", "weight"), ("b1", "layer1", "bias"), ("w2", "layer2", "weight"),
                    ("b2", "layer2", "bias"), ("w_gate", "linear_v", "weight"), ("b_gate", "linear_v", "bias"))


class ExpertSpec:
    """What the stacked experts share besides their weights: activation, dropout and gating."""

    def __init__(self, activation: nn.Module, dropout: nn.Module, is_gated: bool):
        self.activation, self.dropout, self.is_gated = activation, dropout, is_gated

    @classmethod
    def of(cls, experts) -> "ExpertSpec":
        """The spec of ``experts`` (labml FeedForward modules); ValueError naming
        the first expert that cannot share one stacked layout with expert 0."""
        first = experts[0]
        missing = [n for n in ("layer1", "layer2", "activation", "dropout", "is_gated") if not hasattr(first, n)]
        if missing:
            raise ValueError(f"cannot stack the experts: expert 0 is not a FeedForward (no {', '.join(missing)})")
        if first.is_gated and not hasattr(first, "linear_v"):
            raise ValueError("cannot stack the experts: expert 0 is gated but has no linear_v")
        shapes = _tensor_shapes(first)
        for index, expert in enumerate(experts):
            problem = None
            if _tensor_shapes(expert) != shapes:
                problem = f"tensor shapes {_tensor_shapes(expert)} differ from expert 0's {shapes}"
            elif type(expert.activation) is not type(first.activation) or \
                    getattr(expert.activation, "approximate", None) != getattr(first.activation, "approximate", None):
                problem = f"activation {expert.activation!r} differs from expert 0's {first.activation!r}"
            elif expert.dropout.p != first.dropout.p:
                problem = f"dropout p={expert.dropout.p} differs from expert 0's p={first.dropout.p}"
            if problem is not None:
                raise ValueError(f"cannot stack the experts: expert {index}'s {problem}; stacked experts share "
                                 "one layout (or convert with stacked_experts=False)")
        return cls(first.activation, first.dropout, bool(first.is_gated))


def _tensor_shapes(expert: nn.Module) -> dict:
    shapes = {}
    for _, layer, kind in _STACKED_TENSORS:
        if layer == "linear_v" and not expert.is_gated:
            continue
        tensor = _member(_member(expert, layer), kind)
        shapes[f"{layer}.{kind}"] = None if tensor is None else tuple(tensor.shape)
    return shapes


class _ExpertLinear:
    """``weight`` and ``bias`` of one expert's linear layer, views into the stacked Parameters."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class StackedExpert:
    """Expert ``e`` of a stacked :class:`SwitchFeedForward`, shaped like labml's
    FeedForward: ``layer1``, ``layer2`` (and ``linear_v`` when gated) with
    ``weight``/``bias`` views of the stacked Parameters (in-place writes reach
    them), ``activation``, ``dropout``, ``is_gated``; calling it runs that
    expert's FFN (dropout follows the owning module's training mode)."""

    def __init__(self, owner: SwitchFeedForward, e: int):
        p = owner._parameters
        row = lambda name: None if p[name] is None else p[name][e]  # noqa: E731
        spec = owner.expert_spec
        self.training = owner.training
        self.activation, self.dropout, self.is_gated = spec.activation, spec.dropout, spec.is_gated
        self.layer1 = _ExpertLinear(row("w1"), row("b1"))
        self.layer2 = _ExpertLinear(row("w2"), row("b2"))
        if spec.is_gated:
            self.linear_v = _ExpertLinear(row("w_gate"), row("b_gate"))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.activation(self.layer1(x))
        if self.is_gated:
            hidden = hidden * self.linear_v(x)
        return self.layer2(F.dropout(hidden, self.dropout.p, self.training))

    def as_feed_forward(self) -> FeedForward:
        """A :class:`FeedForward` module holding a copy of this expert's weights (new Parameters)."""
        layer1, layer2 = self.layer1, self.layer2
        gate = getattr(self, "linear_v", None)
        module = FeedForward(layer1.in_features, layer1.out_features, self.dropout.p, activation=self.activation,
                             is_gated=self.is_gated, bias1=layer1.bias is not None, bias2=layer2.bias is not None,
                             bias_gate=gate is not None and gate.bias is not None)
        module = module.to(device=layer1.weight.device, dtype=layer1.weight.dtype)
        with torch.no_grad():
            for name, source in (("layer1", layer1), ("layer2", layer2), ("linear_v", gate)):
                if source is not None:
                    getattr(module, name).weight.copy_(source.weight)
                    if source.bias is not None:
                        getattr(module, name).bias.copy_(source.bias)
        return module


class StackedExperts:
    """``module.experts`` of a stacked :class:`SwitchFeedForward`: a read-only
    sequence of :class:`StackedExpert` views."""

    def __init__(self, owner: SwitchFeedForward):
        self._owner = owner

    def __len__(self) -> int:
        return self._owner.w1.shape[0]

    def __getitem__(self, index: int) -> StackedExpert:
        if not -len(self) <= index < len(self):
            raise IndexError(f"expert index {index} out of range for {len(self)} experts")
        return StackedExpert(self._owner, index % len(self))

    def __iter__(self) -> Iterator[StackedExpert]:
        return (self[e] for e in range(len(self)))


def _save_experts_as_labml(module: SwitchFeedForward, state_dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: the stacked Parameters saved under labml's keys, in labml's order."""
    if not module.stacked:
        return
    own = [key for key in state_dict if key.startswith(prefix) and key[len(prefix):].split(".")[0] in
           {"switch", *[name for name, _, _ in _STACKED_TENSORS]}]
    values = {key: state_dict.pop(key) for key in own}
    for e in range(module.n_experts):
        for name, layer, kind in _STACKED_TENSORS:
            if prefix + name in values:
                state_dict[f"{prefix}experts.{e}.{layer}.{kind}"] = values[prefix + name][e]
    for key, value in values.items():
        if key[len(prefix):].startswith("switch."):
            state_dict[key] = value


def _load_labml_experts(module: SwitchFeedForward, state_dict, prefix, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: labml's per-expert entries stacked into the Parameters' keys."""
    if not module.stacked:
        return
    for name, layer, kind in _STACKED_TENSORS:
        keys = [f"{prefix}experts.{e}.{layer}.{kind}" for e in range(module.n_experts)]
        if module._parameters.get(name) is not None and all(key in state_dict for key in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(key) for key in keys])


def switch_backend(module: nn.Module, device: torch.device,
                   unfusable_reason: Callable[[], Optional[str]]) -> Tuple[str, Optional[str]]:
    """``(backend, reason)`` of a Switch module (``SwitchFeedForward`` or the
    Hugging Face drop-in) whose ``backend`` attribute is ``module.backend``:
    the resolved backend, or the reference with why (``unfusable_reason()``
    for experts the kernels cannot run). A fused backend requested for such
    experts raises ValueError."""
    requested = module.backend if module.backend is not None else _backend.forced_backend()
    name = _backend.resolve_backend(device, requested, implemented=SWITCH_KERNELS)
    if name == "reference":
        if requested == "reference":
            return name, "backend 'reference' was requested"
        return name, (f"no fused switch kernel for {device.type} tensors in this installation (backends: "
                      f"{', '.join(_backend.available_backends())})")
    reason = unfusable_reason()
    if reason is None:
        return name, None
    if requested is not None:
        raise ValueError(f"{type(module).__name__} backend {name!r} cannot run these experts: {reason}")
    return "reference", reason


def choose_switch_backend(module: nn.Module, device: torch.device) -> str:
    """``module.fused_backend`` for its next forward, warning once when the automatic choice is the reference."""
    name, reason = module.fused_backend(device, module.training)
    if name == "reference" and module.backend is None and _backend.forced_backend() is None:
        _backend.warn_fallback(module, reason)
    return name


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


def _activation_reason(activation: nn.Module) -> Optional[str]:
    if _activation_name(activation) is None:
        return (f"activation {activation!r} has no fused kernel; use nn.ReLU, exact nn.GELU, nn.SiLU, "
                "nn.Sigmoid or nn.Identity")
    return None


def _activation_name(activation: nn.Module) -> Optional[str]:
    if type(activation) is nn.GELU:
        return "gelu" if activation.approximate == "none" else None
    return _ACTIVATION_NAMES.get(type(activation))


def _expert_layout(expert: nn.Module) -> tuple:
    """Gating, and each tensor's shape (None for an absent bias)."""
    return (expert.is_gated, *_tensor_shapes(expert).values())


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
