"""Benchmark cases of the Switch feed-forward against labml_nn, torch's
grouped GEMM and the dense FFN, and of the Hugging Face Switch Transformers
drop-in against Hugging Face's own model."""
from __future__ import annotations

from typing import Optional

import torch

from .timing import Case, labml_nn_available


class SwitchImplementations:
    """The Switch FFN (capacity factor 1, drop_tokens, is_scale_prob, ReLU
    experts without dropout, labml drop policy) of ``T`` tokens ``[64, T/64, d]``
    as labml's experiment lays them out, built from the same seeded weights by
    every implementation:

    - ``labml_nn``: labml_nn's ``SwitchFeedForward`` (Python loop over experts);
    - ``reference``: :class:`fastformers.nn.SwitchFeedForward` on the reference backend;
    - ``grouped_mm``: routing, then ``torch.nn.functional.grouped_mm`` over the
      kept tokens sorted by expert, with weights stored stacked ``[E, ...]``;
    - ``dense``: one FFN d → d_ff → d over all T tokens (the same active parameters);
    - ``cpp`` / ``triton``: :class:`fastformers.nn.SwitchFeedForward` on that backend.

    One implementation's module is alive at a time (at T=4096, d=512, E=64 the
    expert weights alone take 0.5 GB).
    """

    def __init__(self, n_tokens: int, d_model: int, d_ff: int, n_experts: int, device: str, dtype: torch.dtype):
        self.shape = (64, n_tokens // 64, d_model)
        self.d_model, self.d_ff, self.n_experts = d_model, d_ff, n_experts
        self.device, self.dtype = device, dtype
        self.current: Optional[tuple] = None

    def make_inputs(self) -> tuple:
        return (torch.randn(self.shape, device=self.device, dtype=self.dtype, requires_grad=True),)

    def module(self, backend: str) -> torch.nn.Module:
        if self.current is None or self.current[0] != backend:
            self.current = None
            self.current = (backend, self._build(backend).to(self.device, self.dtype))
        return self.current[1]

    def _build(self, backend: str) -> torch.nn.Module:
        from .. import nn as ffnn

        torch.manual_seed(0)
        if backend == "dense":
            return ffnn.FeedForward(self.d_model, self.d_ff, dropout=0.0)
        if backend == "labml_nn":
            from labml_nn.transformers.feed_forward import FeedForward
            from labml_nn.transformers.switch import SwitchFeedForward
        else:
            FeedForward, SwitchFeedForward = ffnn.FeedForward, ffnn.SwitchFeedForward
        module = SwitchFeedForward(capacity_factor=1.0, drop_tokens=True, is_scale_prob=True,
                                   n_experts=self.n_experts, expert=FeedForward(self.d_model, self.d_ff, 0.0),
                                   d_model=self.d_model)
        if backend == "grouped_mm":
            return _GroupedMMSwitch(module)
        if backend != "labml_nn":
            module.backend = backend
        return module

    def run(self, inputs: tuple, backend: str) -> torch.Tensor:
        out = self.module(backend)(inputs[0])
        return out if backend == "dense" else out[0]

    def zero_grad(self, backend: str) -> None:
        self.module(backend).zero_grad(set_to_none=True)


class _GroupedMMSwitch(torch.nn.Module):
    """The Switch FFN written with torch's grouped GEMM: expert weights stacked
    ``[E, ...]``, kept tokens gathered in expert order, two
    ``torch.nn.functional.grouped_mm`` calls, biases added per row, scattered back."""

    def __init__(self, labml_layout: torch.nn.Module):
        super().__init__()
        experts = labml_layout.experts
        self.switch = labml_layout.switch
        self.capacity_factor = labml_layout.capacity_factor
        stack = lambda get: torch.nn.Parameter(torch.stack([get(e).detach() for e in experts]))  # noqa: E731
        self.w1 = stack(lambda e: e.layer1.weight)
        self.b1 = stack(lambda e: e.layer1.bias)
        self.w2 = stack(lambda e: e.layer2.weight)
        self.b2 = stack(lambda e: e.layer2.bias)

    def forward(self, x: torch.Tensor):
        from ..ops.switch import route

        tokens = x.reshape(-1, x.shape[-1])
        routing = route(self.switch(tokens), self.capacity_factor, True, "labml")
        expert_of_position = routing.route[routing.order]
        position_in_segment = torch.arange(len(tokens), device=x.device) - routing.offsets[expert_of_position]
        is_kept = position_in_segment < routing.kept[expert_of_position]
        rows = routing.order[is_kept]
        row_expert = expert_of_position[is_kept]
        group_ends = torch.cumsum(routing.kept, 0).to(torch.int32)
        hidden = torch.nn.functional.grouped_mm(tokens[rows], self.w1.transpose(1, 2), offs=group_ends)
        hidden = torch.relu(hidden + self.b1[row_expert])
        out = torch.nn.functional.grouped_mm(hidden, self.w2.transpose(1, 2), offs=group_ends) + self.b2[row_expert]
        out = tokens.index_copy(0, rows, out) * routing.route_prob_max.unsqueeze(1)
        return (out.view_as(x),)


def grouped_mm_available(device: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` exists and runs on ``device`` in ``dtype``
    (on CPU in torch 2.13: float32, bfloat16 and float16, not float64)."""
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None)
    if grouped_mm is None:
        return False
    try:
        a = torch.zeros(4, 8, device=device, dtype=dtype)
        b = torch.zeros(2, 8, 8, device=device, dtype=dtype)
        grouped_mm(a, b, offs=torch.tensor([2, 4], device=device, dtype=torch.int32))
    except RuntimeError:
        return False
    return True


SWITCH_SHAPES = [(2048, 128, 256, 4), (2048, 128, 256, 16), (2048, 128, 256, 64)]
SWITCH_LARGE_SHAPES = [(4096, 512, 2048, 8), (4096, 512, 2048, 64)]


def switch_cases(device: str = "cpu", dtype: torch.dtype = torch.float32, large: bool = False) -> list[Case]:
    """``SwitchFeedForward`` forward+backward at labml's experiment size
    (T = seq 64 × batch 32, d_model 128, d_ff 256) for E = 4, 16, 64, and with
    ``large`` at the compute-heavy T = 4096, d_model 512, d_ff 2048, E = 8, 64.
    The baseline is labml_nn when importable (else our reference module); the
    peers are torch's grouped GEMM (when it runs here) and the dense FFN."""
    baseline = "labml_nn" if labml_nn_available() else "reference"
    peers = (["grouped_mm"] if grouped_mm_available(device, dtype) else []) + ["dense"]
    cases = []
    for n_tokens, d_model, d_ff, n_experts in SWITCH_SHAPES + (SWITCH_LARGE_SHAPES if large else []):
        impl = SwitchImplementations(n_tokens, d_model, d_ff, n_experts, device, dtype)
        cases.append(Case("switch", f"T={n_tokens} d={d_model} d_ff={d_ff} E={n_experts}", impl.make_inputs,
                          impl.run, dtype, baseline=baseline, peers=tuple(peers), zero_grad=impl.zero_grad))
    return cases


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# switch-base-8's widths; fewer layers (one sparse layer in the encoder and one in the decoder) for a CPU run
SWITCH_BASE_8 = dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_experts=8, expert_capacity=64,
                     vocab_size=32128, num_layers=2, num_decoder_layers=2, encoder_sparse_step=2,
                     decoder_sparse_step=2, decoder_start_token_id=0, pad_token_id=0)


class _HFSwitch:
    """Hugging Face ``SwitchTransformersForConditionalGeneration`` from a config
    with switch-base-8's widths (random weights) and the same model after
    :func:`fastformers.convert`; implementation ``"hf"`` is HF's, a fused
    backend name the converted one on that backend. ``sparse_mlp`` times the
    first sparse MLP alone on ``[batch, seq, d_model]`` activations instead
    of the whole model. One implementation's model is alive at a time."""

    def __init__(self, device: str, dtype: torch.dtype, batch: int, seq_len: int, target_len: int,
                 sparse_mlp: bool):
        self.device, self.dtype = device, dtype
        self.batch, self.seq_len, self.target_len, self.sparse_mlp = batch, seq_len, target_len, sparse_mlp
        self.current: Optional[tuple] = None

    def label(self) -> str:
        config = SWITCH_BASE_8
        what = "sparse MLP" if self.sparse_mlp else (f"{config['num_layers']}+{config['num_decoder_layers']} layers, "
                                                     f"target {self.target_len}")
        return (f"B={self.batch} S={self.seq_len} d={config['d_model']} d_ff={config['d_ff']} "
                f"E={config['num_experts']} ({what})")

    def _build(self, implementation: str) -> tuple:
        import transformers

        from .. import convert

        torch.manual_seed(0)
        model = transformers.SwitchTransformersForConditionalGeneration(
            transformers.SwitchTransformersConfig(**SWITCH_BASE_8)).to(self.device, self.dtype)
        if self.sparse_mlp:
            model = next(m for m in model.modules() if type(m).__name__ == "SwitchTransformersSparseMLP")
        if implementation != "hf":
            model = convert(model, backend=implementation)
        # built after convert, which gives the experts new Parameters
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return model, optimizer

    def _state(self, implementation: str) -> tuple:
        if self.current is None or self.current[0] != implementation:
            self.current = None
            self.current = (implementation, *self._build(implementation))
        return self.current[1:]

    def make_inputs(self) -> tuple:
        generator = torch.Generator().manual_seed(1)
        if self.sparse_mlp:
            x = torch.randn(self.batch, self.seq_len, SWITCH_BASE_8["d_model"], generator=generator)
            return (x.to(self.device, self.dtype).requires_grad_(),)
        vocab = SWITCH_BASE_8["vocab_size"]
        return (torch.randint(1, vocab, (self.batch, self.seq_len), generator=generator).to(self.device),
                torch.randint(1, vocab, (self.batch, self.target_len), generator=generator).to(self.device))

    def run(self, inputs: tuple, implementation: str) -> torch.Tensor:
        model, _ = self._state(implementation)
        if self.sparse_mlp:
            # the router jitters its float32 input in place, which a leaf cannot take
            return model.train()(inputs[0].clone())
        # timed without gradients ("fwd"): the eval forward; with them ("fwd+bwd"): a training step
        model.train(torch.is_grad_enabled())
        return model(input_ids=inputs[0], labels=inputs[1], output_router_logits=True).loss

    def zero_grad(self, implementation: str) -> None:
        self._state(implementation)[0].zero_grad(set_to_none=True)

    def update(self, implementation: str) -> None:
        model, optimizer = self._state(implementation)
        if not self.sparse_mlp:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def switch_hf_cases(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[Case]:
    """Hugging Face Switch Transformers (switch-base-8 widths: d_model 768,
    d_ff 3072, 8 experts, capacity 64, dropout 0.1, jitter 0.01) against the
    same model after :func:`fastformers.convert`, in the same run: the sparse
    MLP alone (forward, forward+backward, training mode), and the whole
    ``SwitchTransformersForConditionalGeneration`` with two encoder and two
    decoder layers, where "fwd" is the eval forward and "fwd+bwd" one
    training step (forward with the router losses, backward, AdamW). Empty
    without ``transformers``."""
    if not transformers_available():
        return []
    cases = []
    for sparse_mlp in (True, False):
        impl = _HFSwitch(device, dtype, batch=4, seq_len=128, target_len=32, sparse_mlp=sparse_mlp)
        op = "HF SwitchTransformersSparseMLP" if sparse_mlp else "HF Switch model (fwd: eval, fwd+bwd: train step)"
        cases.append(Case(op, impl.label(), impl.make_inputs, impl.run, dtype, baseline="hf",
                          zero_grad=impl.zero_grad, update=impl.update))
    return cases
