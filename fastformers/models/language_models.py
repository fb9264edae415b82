"""The four language models and their configuration.

Every model maps token ids ``x`` ``[T, B]`` to logits ``[T, B, V]``
(``V`` = vocabulary size) and differs in the memory it carries:

* :class:`TransformerXLLM`: each layer's inputs of the last ``mem_len`` steps,
  carried from batch to batch (the batches must follow the text).
* :class:`CompressiveLM`: as XL, but steps leaving the memory are compressed
  ``compression_rate``:1 into a compressed memory of at most ``c_mem_len``
  steps, and the attention-reconstruction loss trains the compression
  whenever a batch compresses.
* :class:`FeedbackLM`: no memory between batches in training; for
  generation the K/V cache (:class:`fastformers.nn.FeedbackState`) makes
  each new token one recurrence step.
* :class:`SwitchLM`: no memory; its auxiliary loss is the load-balancing
  loss ``n_experts · Σ_i f_i · P_i`` times ``load_balancing_coef``.

``forward(x, memory)`` is the training/evaluation call; ``step(x, state)`` the
generation call, which continues from ``state`` so that only the new tokens
are computed.
"""
from __future__ import annotations

import contextlib
import dataclasses
from types import SimpleNamespace
from typing import Dict, List, NamedTuple, Optional

import torch
from torch import nn

from .. import nn as ffnn

MODEL_NAMES = ("xl", "compressive", "feedback", "switch")
# labml_nn's relative-position tables cover 2**12 positions whatever the lengths trained.
LABML_POSITIONS = 2 ** 12


@dataclasses.dataclass
class ModelConfig:
    """Architecture of one language model; fields that a variant does not use are ignored."""

    # the language model: one of MODEL_NAMES
    model: str
    # vocabulary size (the text's distinct characters)
    n_tokens: int
    # width of the embeddings and of every layer's input and output
    d_model: int = 128
    # attention heads (d_model must be a multiple)
    heads: int = 4
    # hidden width of the feed-forward layers
    d_ff: int = 256
    # transformer layers
    n_layers: int = 6
    # dropout probability of the attention weights, residual branches and feed-forward hidden layer
    dropout: float = 0.0
    # XL, Compressive and Feedback: relative positions P of the attention's positional tables (labml's
    # 2**12 keeps its state_dict shapes); must cover the longest span of keys (and queries) attended.
    n_positions: int = LABML_POSITIONS
    # Transformer-XL and Compressive: memory steps kept per layer.
    mem_len: int = 32
    # Compressive: compressed memory steps kept per layer.
    c_mem_len: int = 128
    # Compressive: memory steps compressed into one.
    compression_rate: int = 4
    # Feedback: shared key/value projections (FeedbackTransformerKV) or the original.
    kv: bool = True
    # Switch: experts per layer.
    n_experts: int = 4
    # Switch: an expert's capacity is int(capacity_factor * tokens / n_experts) tokens.
    capacity_factor: float = 1.0
    # Switch: tokens over an expert's capacity pass the layer unchanged (else every token is processed).
    drop_tokens: bool = False
    # Switch: scale each expert's output by its routing probability.
    is_scale_prob: bool = True
    # Switch: weight of the load-balancing loss added to the cross-entropy.
    load_balancing_coef: float = 0.01
    # Switch: learned absolute position embeddings for this many positions, added to the token
    # embedding (0: none, as labml_nn's experiment, where only the causal mask tells positions apart)
    position_embeddings: int = 0

    def __post_init__(self):
        if self.model not in MODEL_NAMES:
            raise ValueError(f"model must be one of {MODEL_NAMES}, got {self.model!r}")
        for name in ("n_tokens", "d_model", "heads", "d_ff", "n_layers", "compression_rate", "n_experts",
                     "n_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        for name in ("mem_len", "c_mem_len", "position_embeddings"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


# labml_nn 0.5.1's transformers/{xl,compressive,feedback,switch}/experiment.py:
# the class defaults with the overrides of each main().
MODEL_DEFAULTS: Dict[str, dict] = {
    "xl": dict(d_model=128, heads=4, d_ff=256, n_layers=6, dropout=0.0, mem_len=32),
    "compressive": dict(d_model=128, heads=4, d_ff=256, n_layers=6, dropout=0.0, mem_len=8,
                        c_mem_len=128, compression_rate=2),
    "feedback": dict(d_model=512, heads=8, d_ff=2048, n_layers=6, dropout=0.0, kv=True),
    "switch": dict(d_model=128, heads=4, d_ff=256, n_layers=6, dropout=0.0, n_experts=4,
                   capacity_factor=1.2, drop_tokens=True, is_scale_prob=True, load_balancing_coef=0.01),
}


def default_model_config(model: str, n_tokens: int, **overrides) -> ModelConfig:
    """labml's experiment configuration of ``model``, with ``overrides`` (None values ignored)."""
    if model not in MODEL_NAMES:
        raise ValueError(f"model must be one of {MODEL_NAMES}, got {model!r}")
    settings = dict(MODEL_DEFAULTS[model])
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(model=model, n_tokens=n_tokens, **settings)


class LMOutput(NamedTuple):
    """``logits`` ``[T, B, V]``; ``memory`` to pass to the next batch (None when
    the model carries none); ``aux_loss`` a scalar to add to the cross-entropy
    (already weighted; None when there is none); ``stats`` floats worth logging."""

    logits: torch.Tensor
    memory: object
    aux_loss: Optional[torch.Tensor]
    stats: Dict[str, float]


def causal_mask(queries: int, memory: int, device: torch.device) -> torch.Tensor:
    """``[queries, memory + queries, 1]`` bool: every query sees all memory and
    the segment up to itself."""
    segment = torch.ones(queries, queries, dtype=torch.bool, device=device).tril()
    seen = torch.ones(queries, memory, dtype=torch.bool, device=device)
    return torch.cat((seen, segment), dim=1).unsqueeze(-1)


class LanguageModel(nn.Module):
    """Embedding ``[T, B] -> [T, B, D]``, a transformer, generator ``[T, B, D] -> [T, B, V]``.

    ``carries_memory`` says whether ``forward`` returns memory meant for the
    next batch (so batches must be sequential) or not (so they can be shuffled).
    """

    carries_memory = False

    def __init__(self, config: ModelConfig, transformer: nn.Module):
        super().__init__()
        self.config = config
        self.src_embed = nn.Embedding(config.n_tokens, config.d_model)
        self.transformer = transformer
        self.generator = nn.Linear(config.d_model, config.n_tokens)

    def step(self, x: torch.Tensor, state: object = None):
        """Generation: logits ``[T, B, V]`` of the tokens ``x`` ``[T, B]`` that
        follow the ones ``state`` summarises (None: nothing yet), and the new state."""
        output = self(x, state)
        return output.logits, output.memory


class TransformerXLLM(LanguageModel):
    """Transformer-XL language model; memory: one ``[M, B, D]`` tensor per layer, ``M <= mem_len``."""

    carries_memory = True

    def forward(self, x: torch.Tensor, memory: Optional[List[torch.Tensor]] = None) -> LMOutput:
        """``x`` ``[T, B]``; ``memory`` from the previous batch or None."""
        memory = memory or []
        mask = causal_mask(x.shape[0], memory[0].shape[0] if memory else 0, x.device)
        hidden, new_memory = self.transformer(self.src_embed(x), memory, mask)
        return LMOutput(self.generator(hidden), self.merge_memory(memory, new_memory), None, {})

    def merge_memory(self, old: List[torch.Tensor], new: List[torch.Tensor]) -> List[torch.Tensor]:
        """Append ``new`` (each ``[T, B, D]``) and keep the last ``mem_len`` steps."""
        if self.config.mem_len == 0:
            return []
        merged = [torch.cat((m, n)) for m, n in zip(old, new)] if old else new
        return [m[-self.config.mem_len:] for m in merged]


class CompressiveLM(LanguageModel):
    """Compressive Transformer language model; memory: a :class:`fastformers.nn.CompressiveMemory`
    (None when ``mem_len`` and ``c_mem_len`` are both 0)."""

    carries_memory = True

    def __init__(self, config: ModelConfig, transformer: nn.Module, reconstruction_loss_class):
        super().__init__(config, transformer)
        self.reconstruction_loss = reconstruction_loss_class(self.transformer.layers)

    def new_memory(self) -> Optional[ffnn.CompressiveMemory]:
        """An empty memory of this model's lengths (None when it keeps none)."""
        c = self.config
        if c.mem_len == 0 and c.c_mem_len == 0:
            return None
        return ffnn.CompressiveMemory(c.n_layers, c.mem_len, c.c_mem_len, c.compression_rate)

    def forward(self, x: torch.Tensor, memory: Optional[ffnn.CompressiveMemory] = None) -> LMOutput:
        """``x`` ``[T, B]``; ``memory`` from the previous batch, or None to start
        afresh. The memory is updated in place (the new segment written, the
        groups falling out compressed) and returned. In training mode, when
        this batch pushes steps out of the memory, the attention-reconstruction
        loss of their compression is ``aux_loss``."""
        memory = memory if memory is not None else self.new_memory()
        embedded = self.src_embed(x)
        hidden, new_mem = self._run_transformer(embedded, memory)
        aux_loss, stats = None, {}
        if memory is not None:
            compressed_away = memory.append(new_mem, [layer.compress for layer in self.transformer.layers])
            if compressed_away and self.training:
                aux_loss = self.reconstruction_loss(new_mem, compressed_away)
                stats["ar_loss"] = aux_loss.item()
        return LMOutput(self.generator(hidden), memory, aux_loss, stats)

    def _run_transformer(self, embedded: torch.Tensor, memory: Optional[ffnn.CompressiveMemory]):
        """The transformer over ``embedded`` ``[T, B, D]`` after ``memory``: ``(hidden, new_mem)``."""
        if memory is None:
            return self.transformer(embedded, [], [], causal_mask(embedded.shape[0], 0, embedded.device))
        memory.check_segment(embedded)
        mask = causal_mask(embedded.shape[0], memory.mem_length + memory.c_mem_length, embedded.device)
        layers = range(len(self.transformer.layers))
        if isinstance(self.transformer, ffnn.CompressiveTransformer):
            return self.transformer.forward_with_history(embedded, [memory.history(i) for i in layers], mask)
        # labml_nn's CompressiveTransformer (labml_modules()) takes each layer's memory whole.
        whole = memory.state_dict()
        return self.transformer(embedded, whole["mem"], whole["c_mem"], mask)


class FeedbackLM(LanguageModel):
    """Feedback Transformer language model (KV variant unless ``config.kv`` is False).

    No memory between training batches (the recurrence runs within each
    sequence). :meth:`step` carries a :class:`fastformers.nn.FeedbackState`.
    """

    def forward(self, x: torch.Tensor, memory: None = None) -> LMOutput:
        """``x`` ``[T, B]``; the recurrence starts afresh (``memory`` must be None)."""
        if memory is not None:
            raise ValueError("FeedbackLM carries no memory between batches; use step() for generation")
        return LMOutput(self.generator(self.transformer(self.src_embed(x))), None, None, {})

    def step(self, x: torch.Tensor, state: Optional[ffnn.FeedbackState] = None):
        """Each token of ``x`` ``[T, B]`` is one recurrence step after ``state``.

        The relative-position tables cover ``P = n_positions`` steps; past that the
        oldest cached steps are dropped (a sliding window).
        """
        limit = self.transformer.layers[0].attn.P
        logits = []
        for chunk in torch.split(x, limit // 2):
            if state is not None and state.steps + chunk.shape[0] > limit:
                state = state.window(limit - chunk.shape[0])
            hidden, state = self.transformer.forward_with_state(self.src_embed(chunk), state)
            logits.append(self.generator(hidden))
        return torch.cat(logits), state


class SwitchLM(LanguageModel):
    """Switch Transformer language model; ``aux_loss`` is ``load_balancing_coef``
    times the load-balancing loss summed over layers.

    :meth:`step` caches each layer's normalised attention inputs ``[t, B, D]``
    so a new token runs every layer once (its key/value projections over the
    cache are recomputed). Generation never drops tokens: a capacity of
    ``capacity_factor · tokens / n_experts`` is meaningless for one token.
    """

    def __init__(self, config: ModelConfig, transformer: nn.Module):
        super().__init__(config, transformer)
        self.position_embed: Optional[nn.Embedding] = None
        if config.position_embeddings:
            # initialised as the token embedding (N(0, 1)): smaller, they take hundreds of steps to matter
            self.position_embed = nn.Embedding(config.position_embeddings, config.d_model)

    def _embed(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token embeddings of ``x`` ``[T, B]`` at positions ``start ..``, plus their position embeddings."""
        embedded = self.src_embed(x)
        if self.position_embed is None:
            return embedded
        end = start + x.shape[0]
        if end > self.config.position_embeddings:
            raise ValueError(f"SwitchLM has position embeddings for {self.config.position_embeddings} positions, "
                             f"got a sequence of {end}")
        return embedded + self.position_embed.weight[start:end, None]

    def forward(self, x: torch.Tensor, memory: None = None) -> LMOutput:
        """``x`` ``[T, B]``; ``memory`` must be None."""
        if memory is not None:
            raise ValueError("SwitchLM carries no memory between batches; use step() for generation")
        mask = causal_mask(x.shape[0], 0, x.device)
        hidden, counts, route_prob, n_dropped, _ = self.transformer(self._embed(x), mask)
        total = counts.sum(dim=-1, keepdim=True)
        route_fraction = counts / total
        mean_route_prob = route_prob / total
        load_balancing = self.config.n_experts * (route_fraction * mean_route_prob).sum()
        stats = {
            "lb_loss": load_balancing.item(),
            "dropped": float(sum(n_dropped)) / float(total.sum()),
        }
        return LMOutput(self.generator(hidden), None, self.config.load_balancing_coef * load_balancing, stats)

    @contextlib.contextmanager
    def _no_token_dropping(self):
        switches = [layer.feed_forward for layer in self.transformer.layers]
        saved = [switch.drop_tokens for switch in switches]
        for switch in switches:
            switch.drop_tokens = False
        try:
            yield
        finally:
            for switch, drop in zip(switches, saved):
                switch.drop_tokens = drop

    def step(self, x: torch.Tensor, state: Optional[List[torch.Tensor]] = None):
        """``x`` ``[T, B]``; ``state`` one ``[t, B, D]`` tensor per layer (its
        normalised inputs so far) or None. With position embeddings the state
        also ends with the token ids ``[t, B]`` seen so far, and past the last
        position the oldest tokens are dropped and the window recomputed (a
        cached input depends on its position)."""
        ids, new_tokens = None, x.shape[0]
        if self.position_embed is not None:
            ids = x if state is None else torch.cat((state[-1], x))
            state = state[:-1] if state is not None else None
            if ids.shape[0] > self.config.position_embeddings:
                ids = ids[-self.config.position_embeddings:]
                x, state = ids, None
        cached = state[0].shape[0] if state else 0
        mask = causal_mask(x.shape[0], cached, x.device)
        hidden = self._embed(x, cached)
        new_state = []
        with self._no_token_dropping():
            for i, layer in enumerate(self.transformer.layers):
                z = layer.norm_self_attn(hidden)
                keys = torch.cat((state[i], z)) if state else z
                new_state.append(keys)
                hidden = hidden + layer.dropout(layer.attn(query=z, key=keys, value=keys, mask=mask))
                ff = layer.feed_forward(layer.norm_ff(hidden))[0]
                hidden = hidden + layer.dropout(ff)
        if ids is not None:
            new_state.append(ids)
        return self.generator(self.transformer.norm(hidden[-new_tokens:])), new_state


def labml_modules() -> SimpleNamespace:
    """labml_nn 0.5.1's module classes under fastformers.nn's names (ImportError if not installed)."""
    from labml import tracker

    if not hasattr(tracker, "debug"):
        # labml 0.5.3 lacks tracker.debug, which labml_nn 0.5.1's attention calls.
        tracker.debug = lambda *args, **kwargs: None
    from labml_nn.transformers import compressive, feed_forward, feedback, mha, switch, xl

    return SimpleNamespace(
        FeedForward=feed_forward.FeedForward,
        MultiHeadAttention=mha.MultiHeadAttention,
        RelativeMultiHeadAttention=xl.RelativeMultiHeadAttention,
        TransformerXLLayer=xl.TransformerXLLayer,
        TransformerXL=xl.TransformerXL,
        FeedbackAttention=feedback.FeedbackAttention,
        FeedbackTransformerLayer=feedback.FeedbackTransformerLayer,
        FeedbackTransformer=feedback.FeedbackTransformer,
        FeedbackTransformerKV=feedback.FeedbackTransformerKV,
        Conv1dCompression=compressive.Conv1dCompression,
        CompressiveTransformerLayer=compressive.CompressiveTransformerLayer,
        CompressiveTransformer=compressive.CompressiveTransformer,
        AttentionReconstructionLoss=compressive.AttentionReconstructionLoss,
        SwitchFeedForward=switch.SwitchFeedForward,
        SwitchTransformerLayer=switch.SwitchTransformerLayer,
        SwitchTransformer=switch.SwitchTransformer,
    )


def build_model(config: ModelConfig, modules=ffnn) -> LanguageModel:
    """The language model of ``config`` built from ``modules`` (fastformers.nn,
    or :func:`labml_modules` to wrap labml_nn's modules in the same shell)."""
    c = config
    # labml_nn's attention modules have no such argument: passed only when it differs from theirs
    positions = {} if c.n_positions == LABML_POSITIONS else {"n_positions": c.n_positions}
    if c.model == "xl":
        layer = modules.TransformerXLLayer(
            d_model=c.d_model,
            self_attn=modules.RelativeMultiHeadAttention(c.heads, c.d_model, c.dropout, **positions),
            feed_forward=modules.FeedForward(c.d_model, c.d_ff, c.dropout),
            dropout_prob=c.dropout)
        return TransformerXLLM(c, modules.TransformerXL(layer, c.n_layers))
    if c.model == "compressive":
        layer = modules.CompressiveTransformerLayer(
            d_model=c.d_model,
            self_attn=modules.RelativeMultiHeadAttention(c.heads, c.d_model, c.dropout, **positions),
            feed_forward=modules.FeedForward(c.d_model, c.d_ff, c.dropout),
            dropout_prob=c.dropout,
            compress=modules.Conv1dCompression(c.compression_rate, c.d_model))
        return CompressiveLM(c, modules.CompressiveTransformer(layer, c.n_layers), modules.AttentionReconstructionLoss)
    if c.model == "feedback":
        layer = modules.FeedbackTransformerLayer(
            d_model=c.d_model,
            attn=modules.FeedbackAttention(c.heads, c.d_model, c.dropout, is_kv_precomputed=c.kv, **positions),
            feed_forward=modules.FeedForward(c.d_model, c.d_ff, c.dropout),
            dropout_prob=c.dropout)
        if c.kv:
            return FeedbackLM(c, modules.FeedbackTransformerKV(layer, c.n_layers, c.d_model, c.heads))
        return FeedbackLM(c, modules.FeedbackTransformer(layer, c.n_layers))
    layer = modules.SwitchTransformerLayer(
        d_model=c.d_model,
        attn=modules.MultiHeadAttention(c.heads, c.d_model, c.dropout),
        feed_forward=modules.SwitchFeedForward(
            capacity_factor=c.capacity_factor,
            drop_tokens=c.drop_tokens,
            is_scale_prob=c.is_scale_prob,
            n_experts=c.n_experts,
            expert=modules.FeedForward(c.d_model, c.d_ff, c.dropout),
            d_model=c.d_model),
        dropout_prob=c.dropout)
    return SwitchLM(c, modules.SwitchTransformer(layer, c.n_layers))
