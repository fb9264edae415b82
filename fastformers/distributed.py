"""Multi-process training on ``torch.distributed``: expert-parallel Switch
feed-forward, checkpoint sharding helpers and configuration checks.

Expert parallelism shards the ``E`` experts of every Switch layer over the
``W`` ranks of a process group: rank ``r`` owns experts ``r·E/W ..
(r+1)·E/W - 1``. Each rank routes its own tokens, sends the kept ones to the
ranks owning their experts with one variable-size ``all_to_all_single``, runs
its local experts with the fused grouped FFN, and receives the results back
with a second one. Everything else (router, attention, embeddings) is
replicated and kept in sync by ``DistributedDataParallel``.

Process groups must be created with a timeout (``init_process_group(...,
timeout=...)``): a rank that fails or stalls then makes the others raise a
:class:`CollectiveError` instead of waiting forever.
"""
from __future__ import annotations

import datetime
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .nn.attention import FeedForward
from .nn.switch import SwitchFeedForward
from .ops.switch import route
from .ops.switch.op import Routing, switch_mlp_on

DEFAULT_TIMEOUT = 300.0  # seconds
_EXPERT_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?experts\.)(?P<index>\d+)(?P<rest>\..*)$")


class CollectiveError(RuntimeError):
    """A collective failed: another rank raised, died, or did not reach it within the timeout."""


def launched_by_torchrun() -> bool:
    """True when the environment describes a process group (``torchrun`` sets ``RANK`` and ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_process_group(timeout: float = DEFAULT_TIMEOUT, device: Optional[torch.device] = None) -> None:
    """``torch.distributed.init_process_group`` from the ``torchrun`` environment with a
    ``timeout`` in seconds: gloo for CPU, NCCL for CUDA."""
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))


def _group_size_rank(group) -> Tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def run_collective(what: str, group, call):
    """Run ``call()``; turn a failed collective into a :class:`CollectiveError` saying what to look for."""
    try:
        return call()
    except (RuntimeError, dist.DistError) as error:
        if isinstance(error, CollectiveError):
            raise
        rank = dist.get_rank(group)
        raise CollectiveError(
            f"rank {rank}: {what} failed: another rank raised, died or did not reach it within the "
            f"process-group timeout. See that rank's error. ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})"
        ) from error


def check_same_across_ranks(values: Dict[str, object], group=None, what: str = "configuration") -> None:
    """Raise ValueError on every rank if any entry of ``values`` differs between the ranks of
    ``group``, naming the field and each rank's value. Collective: every rank must call it."""
    world_size, _ = _group_size_rank(group)
    gathered: List[Optional[Dict[str, object]]] = [None] * world_size
    run_collective(f"comparing the {what}", group, lambda: dist.all_gather_object(gathered, values, group=group))
    fields = sorted(set().union(*(g.keys() for g in gathered)))
    for field in fields:
        per_rank = [g.get(field) for g in gathered]
        if any(value != per_rank[0] for value in per_rank[1:]):
            listing = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(per_rank))
            raise ValueError(f"the ranks disagree on the {what}: {field} differs ({listing})")


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows with variable split sizes, differentiable: the backward
    sends the gradient rows back along the same routes (the exchange with the splits swapped).

    Synchronous (``dist.all_to_all_single`` waits), so a failure or timeout raises here, on
    the forward or the backward exchange, as a :class:`CollectiveError`. (torch 2.13 deprecates
    ``torch.distributed.nn.functional.all_to_all_single``, its autograd-aware equivalent.)
    """

    @staticmethod
    def forward(ctx, rows, receive_splits, send_splits, group, what):
        ctx.splits, ctx.group, ctx.what = (receive_splits, send_splits), group, what
        return _exchange_rows(rows, receive_splits, send_splits, group, what)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        receive_splits, send_splits = ctx.splits
        return _exchange_rows(grad, send_splits, receive_splits, ctx.group, f"{ctx.what}, backward"), \
            None, None, None, None


def _exchange_rows(rows: torch.Tensor, receive_splits: List[int], send_splits: List[int], group, what: str):
    """Send ``rows[sum(send_splits[:r]) : ...]`` to rank r; returns the rows received, source rank by rank."""
    received = rows.new_empty((sum(receive_splits), *rows.shape[1:]))
    run_collective(what, group, lambda: dist.all_to_all_single(received, rows.contiguous(), receive_splits,
                                                               send_splits, group=group))
    return received


class ExpertParallelSwitchFeedForward(SwitchFeedForward):
    """:class:`fastformers.nn.SwitchFeedForward` with its experts sharded over ``process_group``.

    Same constructor (plus ``process_group``, default the world group) and
    same ``forward`` contract: for ``x`` ``[L, B, D]`` on rank ``r`` the
    output and statistics equal those of the single-process module holding
    all ``E`` experts applied to ``x``. Routing and the capacity
    (``int(capacity_factor · L·B / E)``) are per rank, as in the Switch
    paper; dropped tokens never leave their rank. The router (``switch``) is
    replicated; ``experts`` holds the ``E/W`` experts this rank owns, rank
    ``r`` owning global experts ``first_expert .. first_expert + E/W - 1``.
    Its ``state_dict`` is this rank's shard (local indices
    ``experts.{i}``); :func:`gather_expert_state_dict` builds the
    single-process layout.

    Backward reaches the experts through both exchanges: an expert's weight
    gradient on its owning rank is the sum, over ranks, of what each rank's
    tokens contribute. Every rank must call ``forward`` (and ``backward``) the
    same number of times. Construction is collective: it checks that all ranks
    agree on ``n_experts``, ``d_model``, ``d_ff``, ``capacity_factor``,
    ``drop_tokens`` and ``is_scale_prob``.
    """

    # the rank's experts stay separate modules (a slice of the global experts)
    stacked_experts = False

    def __init__(self, *,
                 capacity_factor: float,
                 drop_tokens: bool,
                 is_scale_prob: bool,
                 n_experts: int,
                 expert: FeedForward,
                 d_model: int,
                 process_group=None):
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelSwitchFeedForward needs torch.distributed.init_process_group() first")
        world_size, rank = _group_size_rank(process_group)
        if n_experts % world_size:
            raise ValueError(f"n_experts ({n_experts}) must be divisible by the number of ranks ({world_size}) "
                             "to shard the experts evenly")
        check_same_across_ranks({
            "n_experts": n_experts, "d_model": d_model, "d_ff": expert.layer1.out_features,
            "capacity_factor": float(capacity_factor), "drop_tokens": bool(drop_tokens),
            "is_scale_prob": bool(is_scale_prob),
        }, process_group, "Switch layer configuration")
        super().__init__(capacity_factor=capacity_factor, drop_tokens=drop_tokens, is_scale_prob=is_scale_prob,
                         n_experts=n_experts, expert=expert, d_model=d_model)
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.world_size, self.rank = world_size, rank
        self.n_local_experts = n_experts // world_size
        self.first_expert = rank * self.n_local_experts
        self.experts = nn.ModuleList(self.experts[self.first_expert:self.first_expert + self.n_local_experts])
        # rows the last forward sent to / received from each rank (the benchmark's traffic figure)
        self.last_send_splits: List[int] = []
        self.last_receive_splits: List[int] = []

    @classmethod
    def from_switch(cls, module: SwitchFeedForward, process_group=None) -> "ExpertParallelSwitchFeedForward":
        """The expert-parallel version of ``module`` on this rank: shares its router and the
        experts this rank owns (the parameters themselves, not copies; experts of a stacked
        ``module`` are copied into FeedForward modules: build the optimizer afterwards)."""
        experts = module.experts
        if module.stacked:
            experts = [expert.as_feed_forward() for expert in experts]
        parallel = cls(capacity_factor=module.capacity_factor, drop_tokens=module.drop_tokens,
                       is_scale_prob=module.is_scale_prob, n_experts=module.n_experts, expert=experts[0],
                       d_model=module.switch.in_features, process_group=process_group)
        parallel.switch = module.switch
        owned = range(parallel.first_expert, parallel.first_expert + parallel.n_local_experts)
        parallel.experts = nn.ModuleList(experts[e] for e in owned)
        parallel.drop_policy, parallel.generator, parallel.backend = (
            module.drop_policy, module.generator, module.backend)
        return parallel

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """``x`` ``[L, B, D]`` (this rank's tokens). Returns what
        :meth:`SwitchFeedForward.forward` returns for them: output ``[L, B, D]``,
        ``counts`` ``[E]``, summed routing probabilities ``[E]``, dropped tokens
        (int) and ``p_max`` ``[L·B]``, all about this rank's tokens."""
        if x.dim() != 3:
            raise ValueError(f"x must be [seq_len, batch, d_model], got shape {tuple(x.shape)}")
        seq_len, batch_size, d_model = x.shape
        tokens = x.reshape(-1, d_model)
        backend = self.last_backend = self._choose_backend(tokens.device)
        routing = route(self.switch(tokens), self.capacity_factor, self.drop_tokens, self.drop_policy,
                        self.generator)
        p_max = routing.route_prob_max
        scale = p_max if self.is_scale_prob else p_max / p_max.detach()
        kept_rows = _kept_rows(routing)
        received, received_routing, send_splits, receive_splits = self._dispatch(tokens, kept_rows, routing.kept)
        if backend == "reference":
            expert_out = self._experts_one_by_one(received, received_routing)
        else:
            activation, weights = self._fused_weights()
            unit = received.new_ones(received.shape[0])
            expert_out = switch_mlp_on(backend, received, received_routing, *weights[:4], unit, activation,
                                       *weights[4:], dropout_p=self.hidden_dropout_p(self.training))
        returned = _AllToAll.apply(expert_out, send_splits, receive_splits, self.process_group,
                                   "the expert-parallel all-to-all of the results")
        # dropped tokens keep x, as in the single-process module
        out = tokens.index_copy(0, kept_rows, returned) * scale.unsqueeze(1)
        counts = routing.counts.to(x.dtype)
        return out.view(seq_len, batch_size, d_model), counts, routing.probs.sum(0), routing.n_dropped, p_max

    def _dispatch(self, tokens: torch.Tensor, kept_rows: torch.Tensor, kept: torch.Tensor):
        """Send the kept rows ``tokens[kept_rows]`` (grouped by expert) to the ranks owning
        their experts. Returns the rows this rank received ``[R, D]``, a routing of them
        over the local experts, and the per-rank send and receive row counts."""
        group, world_size, n_local = self.process_group, self.world_size, self.n_local_experts
        # received_kept[s, i]: tokens rank s sends to local expert i; the receiving side must
        # know them before the variable-size exchange can be posted
        received_kept = torch.empty_like(kept)
        run_collective("the expert-parallel count exchange", group,
                       lambda: dist.all_to_all_single(received_kept, kept.contiguous(), group=group))
        received_kept = received_kept.view(world_size, n_local)
        send_splits = kept.view(world_size, n_local).sum(1).tolist()
        receive_splits = received_kept.sum(1).tolist()
        received = _AllToAll.apply(tokens[kept_rows], receive_splits, send_splits, group,
                                   "the expert-parallel all-to-all of the tokens")
        self.last_send_splits, self.last_receive_splits = send_splits, receive_splits
        # received rows come source rank by source rank, each grouped by local expert
        local_expert = torch.arange(n_local, device=tokens.device).repeat(world_size)
        row_expert = torch.repeat_interleave(local_expert, received_kept.flatten())
        per_expert = received_kept.sum(0)
        offsets = per_expert.new_zeros(n_local + 1)
        torch.cumsum(per_expert, 0, out=offsets[1:])
        order = torch.argsort(row_expert, stable=True)
        local_routing = Routing(probs=None, route=row_expert, route_prob_max=None, counts=per_expert,
                                capacity=received.shape[0], order=order, offsets=offsets, kept=per_expert,
                                dropped=per_expert.new_zeros(()))
        return received, local_routing, send_splits, receive_splits


def _kept_rows(routing: Routing) -> torch.Tensor:
    """Indices ``[K]`` of the kept tokens, grouped by expert in increasing expert order."""
    expert_of_position = routing.route[routing.order]
    position_in_expert = torch.arange(routing.order.shape[0], device=routing.order.device) - \
        routing.offsets[expert_of_position]
    return routing.order[position_in_expert < routing.kept[expert_of_position]]


def to_expert_parallel(model: nn.Module, process_group=None) -> nn.Module:
    """Replace, in place, every :class:`SwitchFeedForward` in ``model`` by its
    :class:`ExpertParallelSwitchFeedForward` on ``process_group``; returns ``model``.
    Build ``model`` identically (same seed) on every rank first."""
    for name, child in list(model.named_children()):
        if isinstance(child, SwitchFeedForward) and not isinstance(child, ExpertParallelSwitchFeedForward):
            setattr(model, name, ExpertParallelSwitchFeedForward.from_switch(child, process_group))
        else:
            to_expert_parallel(child, process_group)
    return model


def expert_parameter_names(model: nn.Module) -> List[str]:
    """Names (as in ``model.named_parameters()``) of the sharded expert parameters: the ones
    ``DistributedDataParallel`` must not average."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, ExpertParallelSwitchFeedForward):
            prefix = f"{module_name}.experts." if module_name else "experts."
            names += [prefix + name for name, _ in module.experts.named_parameters()]
    return names


def clip_grad_norm_(model: nn.Module, max_norm: float, expert_names: Sequence[str], group=None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole expert-parallel model: the replicated
    gradients (equal on every rank) count once, each rank's expert gradients are summed over
    ranks, so every rank computes the same norm and the replicas stay identical."""
    expert_names = set(expert_names)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    replicated = [g for name, g in grads.items() if name not in expert_names]
    sharded = [g for name, g in grads.items() if name in expert_names]

    device = next(model.parameters()).device  # NCCL reduces device tensors only

    def squared_norm(tensors):
        return sum((t.detach().double().pow(2).sum() for t in tensors),
                   torch.zeros((), dtype=torch.float64, device=device))

    sharded_square = squared_norm(sharded)
    run_collective("the gradient-norm all-reduce", group, lambda: dist.all_reduce(sharded_square, group=group))
    total = (squared_norm(replicated) + sharded_square).sqrt()
    factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads.values():
        g.mul_(factor.to(g.dtype))
    return total


def shard_expert_state_dict(state: Dict[str, torch.Tensor], rank: int, world_size: int) -> Dict[str, torch.Tensor]:
    """This rank's shard of a single-process (labml layout) ``state``: the entries
    ``...experts.{e}...`` of the experts rank ``rank`` owns, renumbered from 0, and every
    other entry. The inverse of :func:`merge_expert_shards`."""
    experts_per_prefix = _experts_per_prefix(state)
    shard = {}
    for key, value in state.items():
        match = _EXPERT_KEY.match(key)
        if match is None:
            shard[key] = value
            continue
        n_experts = experts_per_prefix[match["prefix"]]
        if n_experts % world_size:
            raise ValueError(f"{match['prefix'][:-1]} has {n_experts} experts, not divisible by {world_size} ranks")
        n_local = n_experts // world_size
        index = int(match["index"])
        if rank * n_local <= index < (rank + 1) * n_local:
            shard[f"{match['prefix']}{index - rank * n_local}{match['rest']}"] = value
    return shard


def merge_expert_shards(shards: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The single-process (labml layout) state dict from the per-rank shards (rank order):
    expert ``i`` of rank ``r`` becomes expert ``r · E/W + i``; the replicated entries come from rank 0."""
    merged = {key: value for key, value in shards[0].items() if _EXPERT_KEY.match(key) is None}
    for rank, shard in enumerate(shards):
        experts_per_prefix = _experts_per_prefix(shard)
        for key, value in shard.items():
            match = _EXPERT_KEY.match(key)
            if match is not None:
                index = rank * experts_per_prefix[match["prefix"]] + int(match["index"])
                merged[f"{match['prefix']}{index}{match['rest']}"] = value
    return merged


def _experts_per_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, int]:
    indices: Dict[str, set] = {}
    for key in state:
        match = _EXPERT_KEY.match(key)
        if match is not None:
            indices.setdefault(match["prefix"], set()).add(int(match["index"]))
    return {prefix: max(found) + 1 for prefix, found in indices.items()}


def gather_expert_state_dict(shard: Dict[str, torch.Tensor], group=None, dst: int = 0
                             ) -> Optional[Dict[str, torch.Tensor]]:
    """Collective: on rank ``dst`` the single-process state dict merged from every rank's
    ``shard`` (e.g. ``model.state_dict()`` of an expert-parallel model); None elsewhere."""
    shards = gather_objects({key: value.detach().cpu() for key, value in shard.items()}, group, dst)
    return merge_expert_shards(shards) if shards is not None else None


def scatter_expert_state_dict(state: Optional[Dict[str, torch.Tensor]], group=None, src: int = 0
                              ) -> Dict[str, torch.Tensor]:
    """Collective: this rank's shard of the single-process ``state`` given on rank ``src``
    (ignored elsewhere), ready for ``load_state_dict`` of an expert-parallel model."""
    world_size, rank = _group_size_rank(group)
    shards = [shard_expert_state_dict(state, r, world_size) for r in range(world_size)] if rank == src else None
    return scatter_objects(shards, group, src)


def gather_objects(value: object, group=None, dst: int = 0) -> Optional[List[object]]:
    """Collective: every rank's ``value`` as a list on rank ``dst`` (None elsewhere)."""
    world_size, rank = _group_size_rank(group)
    gathered: Optional[List] = [None] * world_size if rank == dst else None
    run_collective("gathering per-rank state", group, lambda: dist.gather_object(value, gathered, dst=dst, group=group))
    return gathered


def scatter_objects(values: Optional[Sequence[object]], group=None, src: int = 0) -> object:
    """Collective: element ``rank`` of ``values`` given on rank ``src``."""
    received: List[Optional[object]] = [None]
    sent = list(values) if values is not None else None
    run_collective("scattering per-rank state", group,
                   lambda: dist.scatter_object_list(received, sent, src=src, group=group))
    return received[0]

