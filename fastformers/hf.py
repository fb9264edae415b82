"""Drop-in for Hugging Face ``transformers``' Switch Transformers sparse MLP.

:func:`fastformers.convert` replaces every ``SwitchTransformersSparseMLP``
(recognised by its class name and defining package, so ``transformers`` is
never imported here) by a :class:`FusedSwitchSparseMLP`: HF's router module
itself, kept as it is, then the experts as one grouped FFN
(:func:`fastformers.ops.switch.switch_mlp`) over stacked weights instead of
HF's Python loop over ``nn.Linear`` pairs.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .nn.switch import choose_switch_backend, switch_backend
from .ops.switch.op import Routing, switch_mlp_on

HF_SPARSE_MLP = "SwitchTransformersSparseMLP"

# HF activation modules (``ACT2FN[config.dense_act_fn]``) by class name, with the fused kernels' name
_ACTIVATIONS = {"ReLU": "relu", "SiLU": "silu", "SiLUActivation": "silu", "Sigmoid": "sigmoid",
                "LinearActivation": "identity", "Identity": "identity"}


def is_hf_sparse_mlp(module: nn.Module) -> bool:
    """Whether ``module`` is exactly transformers' ``SwitchTransformersSparseMLP`` (not a subclass)."""
    cls = type(module)
    return cls.__name__ == HF_SPARSE_MLP and cls.__module__.split(".")[0] == "transformers"


def _activation_name(act: nn.Module) -> Optional[str]:
    """The fused kernel's name for HF's activation module, None when there is none."""
    name = type(act).__name__
    if name == "GELUActivation":
        # exact erf GELU, either through torch or HF's Python formula
        return "gelu" if getattr(act, "act", None) in (F.gelu, getattr(act, "_gelu_python", None)) else None
    return _ACTIVATIONS.get(name)


def check_hf_sparse_mlp(module: nn.Module) -> List[str]:
    """What keeps ``module`` (an HF ``SwitchTransformersSparseMLP``) from
    converting, as messages naming the offending attribute (empty: it converts)."""
    router, experts = getattr(module, "router", None), getattr(module, "experts", None)
    if router is None or experts is None or not hasattr(router, "classifier"):
        return ["expected a router (with a classifier) and experts"]
    n_experts = router.num_experts
    if n_experts < 2:
        return [f"router.num_experts is {n_experts}: a Switch layer needs at least 2 experts (with one it is a "
                "dense FFN; use SwitchTransformersDenseActDense)"]
    capacity = router.expert_capacity
    if not isinstance(capacity, int) or capacity < 1:
        return [f"router.expert_capacity must be an int >= 1 (tokens per expert and sequence), got {capacity!r}"]
    names = [f"expert_{e}" for e in range(n_experts)]
    if list(experts.keys()) != names:
        return [f"experts must hold {names[0]} .. {names[-1]} for num_experts={n_experts}, got "
                f"{list(experts.keys())}"]
    first = experts[names[0]]
    for name in names:
        expert = experts[name]
        if not all(hasattr(expert, part) for part in ("wi", "wo", "act", "dropout")):
            return [f"experts.{name} is not a SwitchTransformersDenseActDense (wi, act, dropout, wo)"]
        if expert.wi.bias is not None or expert.wo.bias is not None:
            return [f"experts.{name} has biased wi/wo; HF's experts are bias-free"]
        shapes = (tuple(expert.wi.weight.shape), tuple(expert.wo.weight.shape))
        expected = (tuple(first.wi.weight.shape), tuple(first.wo.weight.shape))
        if shapes != expected or shapes[0][::-1] != shapes[1]:
            return [f"experts.{name} has wi {list(shapes[0])} and wo {list(shapes[1])}; every expert needs "
                    f"wi {list(expected[0])} and wo {list(expected[1])} (= wi transposed)"]
        if type(expert.act) is not type(first.act) or expert.dropout.p != first.dropout.p:
            return [f"experts.{name} differs from expert_0 in activation or dropout"]
    return []


class _ExpertWeights:
    """``wi``/``wo`` of one expert as HF lays them out, views of the stacked Parameters."""

    def __init__(self, wi: torch.Tensor, wo: torch.Tensor):
        self.wi, self.wo = _Linear(wi), _Linear(wo)


class _Linear:
    def __init__(self, weight: torch.Tensor):
        self.weight, self.bias = weight, None


class FusedSwitchSparseMLP(nn.Module):
    """HF 5.x ``SwitchTransformersSparseMLP`` semantics on the fused grouped FFN.

    ``router`` is HF's ``SwitchTransformersTop1Router`` module itself: it runs
    in ``router_dtype`` (float32) with its jitter noise in training, applies
    ``expert_capacity`` per sequence in HF's priority order (token order
    within a sequence), and its outputs (router logits) are what HF records
    for the z-loss and the auxiliary loss, unchanged. Each kept token goes
    through its expert's bias-free ``wo(dropout(act(wi x)))`` times its
    routing probability; a token over capacity gets a zero output, as in HF.

    Expert weights are stacked: ``wi [E, d_ff, d_model]``, ``wo [E, d_model,
    d_ff]``; ``state_dict`` keeps HF's keys (``experts.expert_{e}.wi.weight``,
    ...) and ``load_state_dict`` takes them; ``experts[f"expert_{e}"]`` reads
    ``wi``/``wo`` views. The expert dropout (``config.dropout_rate``) is the
    fused kernel's (same p, its own Philox stream, see
    :mod:`fastformers.ops.dropout`), not ``nn.Dropout``'s. Activations with a
    fused kernel: relu, gelu (exact), silu/swish, sigmoid, linear; others
    run the reference loop with HF's activation module, with a
    :class:`fastformers._backend.FallbackWarning`. ``backend`` (None =
    automatic) and ``last_backend`` work as in
    :class:`fastformers.nn.SwitchFeedForward`.
    """

    def __init__(self, router: nn.Module, wi: torch.Tensor, wo: torch.Tensor, act: nn.Module, dropout_p: float):
        super().__init__()
        self.router = router
        self.wi = nn.Parameter(wi)
        self.wo = nn.Parameter(wo)
        self.act = act
        self.dropout_p = dropout_p
        self.backend: Optional[str] = None
        self.last_backend: Optional[str] = None
        self.register_state_dict_post_hook(_save_experts_as_hf)
        self.register_load_state_dict_pre_hook(_load_hf_experts)

    @classmethod
    def from_hf(cls, module: nn.Module, backend: Optional[str] = None) -> "FusedSwitchSparseMLP":
        """``module`` (HF ``SwitchTransformersSparseMLP``) converted: its router
        object shared, its experts' weights copied into the stacked layout
        (new Parameters: build the optimizer afterwards). ValueError with the
        reason when it cannot be converted."""
        problems = check_hf_sparse_mlp(module)
        if problems:
            raise ValueError(f"cannot convert {type(module).__name__}: {'; '.join(problems)}")
        experts = [module.experts[f"expert_{e}"] for e in range(module.router.num_experts)]
        stack = lambda get: torch.stack([get(e).detach() for e in experts])  # noqa: E731
        fused = cls(module.router, stack(lambda e: e.wi.weight), stack(lambda e: e.wo.weight), experts[0].act,
                    float(experts[0].dropout.p))
        fused.train(module.training)
        fused.wi.requires_grad_(experts[0].wi.weight.requires_grad)
        fused.wo.requires_grad_(experts[0].wo.weight.requires_grad)
        fused.backend = backend
        return fused

    @property
    def experts(self) -> dict:
        """``{"expert_{e}": expert}`` with ``expert.wi.weight`` / ``expert.wo.weight`` views of the stacked weights."""
        return {f"expert_{e}": _ExpertWeights(self.wi[e], self.wo[e]) for e in range(self.wi.shape[0])}

    def extra_repr(self) -> str:
        n_experts, d_ff, d_model = self.wi.shape
        return f"n_experts={n_experts}, d_model={d_model}, d_ff={d_ff}, dropout={self.dropout_p} (stacked experts)"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states`` ``[batch, seq, d_model]`` -> ``[batch, seq, d_model]`` (HF's contract)."""
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be [batch, seq_len, d_model], got shape {tuple(hidden_states.shape)}")
        batch_size, seq_len, d_model = hidden_states.shape
        backend = self.last_backend = self._choose_backend(hidden_states.device)
        # routed on [batch, seq, d] so that the capacity counts per sequence; the router
        # jitters its float32 input in place, which HF's experts then read too
        selected_experts, routing_weights, _ = self.router(hidden_states)
        tokens = hidden_states.reshape(-1, d_model)
        routing, scale = _routing(selected_experts.reshape(-1, selected_experts.shape[-1]),
                                  routing_weights.reshape(-1))
        dropout_p = self.dropout_p if self.training else 0.0
        if backend == "reference":
            out = self._experts_one_by_one(tokens, routing, scale, dropout_p)
        else:
            out = switch_mlp_on(backend, tokens, routing, self.wi, None, self.wo, None, scale,
                                _activation_name(self.act), dropout_p=dropout_p).to(hidden_states.dtype)
        return out.view(batch_size, seq_len, d_model)

    def _experts_one_by_one(self, tokens, routing, scale, dropout_p) -> torch.Tensor:
        """HF's loop: each expert on its kept tokens with HF's activation module, dropped tokens zero."""
        starts, kept = routing.offsets.tolist(), routing.kept.tolist()
        out = torch.zeros_like(tokens)
        for e in range(self.wi.shape[0]):
            rows = routing.order[starts[e]:starts[e] + kept[e]]
            hidden = F.dropout(self.act(F.linear(tokens[rows], self.wi[e])), dropout_p, self.training)
            out = out.index_add(0, rows, (F.linear(hidden, self.wo[e]) * scale[rows, None]).to(out.dtype))
        return out

    def fused_backend(self, device: torch.device, training: bool) -> Tuple[str, Optional[str]]:
        """The backend :meth:`forward` would use on ``device`` (in training or
        eval mode: the same here), and why when that is ``"reference"``. Raises
        ValueError when a fused backend is requested for an activation without kernel."""
        def unfusable_reason() -> Optional[str]:
            if _activation_name(self.act) is not None:
                return None
            return (f"activation {type(self.act).__name__} has no fused kernel; use dense_act_fn 'relu', 'gelu', "
                    "'silu', 'swish', 'sigmoid' or 'linear'")

        return switch_backend(self, device, unfusable_reason)

    def _choose_backend(self, device: torch.device) -> str:
        return choose_switch_backend(self, device)


def _routing(selected: torch.Tensor, routing_weights: torch.Tensor) -> Tuple[Routing, torch.Tensor]:
    """The op's routing from HF's router outputs: ``selected`` ``[T, E]``
    one-hot of the chosen expert, all zero for a token over capacity;
    ``routing_weights`` ``[T]``. Kept tokens are grouped by expert in token
    order; tokens over capacity sit after them (in the last expert's segment)
    with scale 0, so that the op's pass-through gives them HF's zero output."""
    n_tokens, n_experts = selected.shape
    is_kept = selected.bool().any(-1)
    expert = torch.where(is_kept, selected.argmax(-1), n_experts - 1)
    # stable sort by (expert, dropped): each expert's kept tokens first, in token order
    order = torch.argsort(expert * 2 + (~is_kept).long(), stable=True)
    offsets = torch.searchsorted(expert[order], torch.arange(n_experts + 1, device=selected.device))
    kept = selected.sum(0).to(torch.int64)
    counts = offsets[1:] - offsets[:-1]
    scale = torch.where(is_kept, routing_weights, torch.zeros_like(routing_weights))
    routing = Routing(probs=None, route=expert, route_prob_max=routing_weights, counts=counts, capacity=0,
                      order=order, offsets=offsets, kept=kept, dropped=(~is_kept).sum())
    return routing, scale


_HF_KEYS = (("wi", "wi.weight"), ("wo", "wo.weight"))


def _save_experts_as_hf(module: FusedSwitchSparseMLP, state_dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: the stacked weights under HF's keys, after the router's as HF orders them."""
    stacked = {name: state_dict.pop(prefix + name) for name, _ in _HF_KEYS}
    for e in range(stacked["wi"].shape[0]):
        for name, key in _HF_KEYS:
            state_dict[f"{prefix}experts.expert_{e}.{key}"] = stacked[name][e]


def _load_hf_experts(module: FusedSwitchSparseMLP, state_dict, prefix, local_metadata, strict, missing_keys,
                     unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: HF's per-expert entries stacked under the Parameters' keys."""
    for name, key in _HF_KEYS:
        keys = [f"{prefix}experts.expert_{e}.{key}" for e in range(module.wi.shape[0])]
        if all(k in state_dict for k in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])
