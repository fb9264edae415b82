"""Benchmark cases of the Compressive Transformer ops (compression,
attention-reconstruction loss) and its whole training step against labml_nn."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..ops.compressive import naive as compressive_naive
from ..ops.compressive.op import attention_reconstruction_loss, conv_compress
from .timing import COMPILED_REFERENCE, Case, compile_on_first_call, fused_backends, labml_nn_available


def conv_compress_cases(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[Case]:
    # (M, B, D, c): the memory labml's experiment compresses each step (the
    # segment of 8 that falls out, batch 32, d_model 128, rate 2) and a larger one.
    shapes = [(8, 32, 128, 2), (128, 16, 512, 4)]
    cases = []
    for M, B, D, c in shapes:
        reference = compressive_naive.conv_compress
        compiled = compile_on_first_call(reference)

        def make(M=M, B=B, D=D, c=c):
            mem = torch.randn(M, B, D, device=device, dtype=dtype, requires_grad=True)
            weight = (torch.randn(D, D, c, device=device, dtype=dtype) / math.sqrt(D * c)).requires_grad_()
            bias = torch.randn(D, device=device, dtype=dtype, requires_grad=True)
            return mem, weight, bias

        def run(inputs, backend, compiled=compiled):
            if backend == "reference":
                return compressive_naive.conv_compress(*inputs)  # labml: permute, nn.Conv1d, permute
            if backend == COMPILED_REFERENCE:
                return compiled(*inputs)
            return conv_compress(*inputs, backend=backend)

        cases.append(Case("conv_compress", f"M={M} B={B} D={D} c={c}", make, run, dtype,
                          peers=(COMPILED_REFERENCE,), measure_memory=True))
    return cases


def attention_reconstruction_loss_cases(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[Case]:
    # (L, M, c, B, D, H): labml's experiment (h [8, 32, 128] against the 8
    # memories being compressed at rate 2, 4 heads) and a larger layer.
    shapes = [(8, 8, 2, 32, 128, 4), (32, 128, 4, 16, 256, 4)]
    cases = []
    for L, M, c, B, D, H in shapes:
        gen = torch.Generator().manual_seed(0)
        rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(device, dtype)  # noqa: E731
        layer = (1 + rand(D, scale=0.1), rand(D, scale=0.1), 1e-5, rand(D, D, scale=D**-0.5), None,
                 rand(D, D, scale=D**-0.5), None, rand(D, D, scale=D**-0.5), rand(D, scale=0.1), H, (D // H) ** -0.5)
        compiled = compile_on_first_call(compressive_naive.attention_reconstruction_loss)

        def make(L=L, M=M, c=c, B=B, D=D):
            h = torch.randn(L, B, D, device=device, dtype=dtype)
            mem = torch.randn(M, B, D, device=device, dtype=dtype)
            return h, mem, torch.randn(M // c, B, D, device=device, dtype=dtype, requires_grad=True)

        def run(inputs, backend, layer=layer, compiled=compiled):
            h, mem, c_mem = inputs
            norm_w, norm_b, eps, *rest = layer
            args = (h, mem, c_mem, norm_w, norm_b, eps, *rest)
            if backend == "reference":
                return compressive_naive.attention_reconstruction_loss(*args)  # labml's formulation
            if backend == COMPILED_REFERENCE:
                return compiled(*args)
            return attention_reconstruction_loss(*args, backend=backend)

        cases.append(Case("attention_reconstruction_loss", f"L={L} M={M} c={c} B={B} D={D} H={H}", make, run, dtype,
                          peers=(COMPILED_REFERENCE,), measure_memory=True))
    return cases


class CompressiveTrainingStep:
    """Training steps of the Compressive Transformer language model at labml_nn's
    experiment configuration (seq 8, mem 8, c_mem 128, compression rate 2,
    batch 32, d_model 128, 4 heads, d_ff 256, 6 layers, no dropout): forward,
    memory merge and compression, cross-entropy plus the attention-reconstruction
    loss, backward, then (:meth:`update`) gradient clipping at 1 and AdamW
    (lr 2.5e-4), as labml's experiment steps. Every implementation runs the same
    optimizer, torch's fused AdamW (labml's experiment uses its own Python
    ``AdamWarmup``): the ~6.3M parameters of the positional tables
    (``[2P, H, d_k]`` per layer) make the update a fixed cost the model's
    kernels cannot change, so the fastest stock update keeps it from hiding them.

    Implementations: ``labml_nn`` (labml's modules, labml's whole-history
    ``cat``/``split`` merge), ``reference`` (fastformers.nn on the reference
    backend), a fused backend (``cpp`` on CPU), and that fused backend with the
    relative attention on the reference (:attr:`without_rel_attention`), which
    isolates what the ``rel_attention`` kernel adds. Each keeps its own model,
    optimizer and memory; memories start full (random ``mem`` and ``c_mem``),
    so every timed step is the steady state: 8 steps fall out and 4 compressed
    ones evict the oldest.
    """

    def __init__(self, device: str = "cpu", dtype: torch.dtype = torch.float32, n_tokens: int = 65):
        from ..models import default_model_config

        self.device, self.dtype = device, dtype
        self.config = default_model_config("compressive", n_tokens)
        self.seq_len, self.batch = 8, 32
        self._states: dict = {}

    @staticmethod
    def without_rel_attention(backend: str) -> str:
        return f"{backend}, rel_attention on reference"

    def label(self) -> str:
        c = self.config
        return (f"L={self.seq_len} M={c.mem_len} N={c.c_mem_len} c={c.compression_rate} B={self.batch} "
                f"D={c.d_model} H={c.heads} F={c.d_ff} layers={c.n_layers}")

    def make_inputs(self) -> tuple:
        """Token ids ``[L + 1, B]``: the segment and its targets."""
        return (torch.randint(0, self.config.n_tokens, (self.seq_len + 1, self.batch), device=self.device),)

    def _state(self, implementation: str) -> dict:
        if implementation in self._states:
            return self._states[implementation]
        from .. import nn as ffnn
        from ..models import build_model, labml_modules

        c = self.config
        torch.manual_seed(0)
        lm = build_model(c, labml_modules() if implementation == "labml_nn" else ffnn)
        lm = lm.to(device=self.device, dtype=self.dtype).train()
        gen = torch.Generator().manual_seed(1)
        full = lambda length: [  # noqa: E731
            torch.randn(length, self.batch, c.d_model, generator=gen).to(self.device, self.dtype)
            for _ in range(c.n_layers)
        ]
        mem, c_mem = full(c.mem_len), full(c.c_mem_len)
        if implementation == "labml_nn":
            memory = (mem, c_mem)
        else:
            # The fused rows leave every op on the automatic choice (the named
            # backend where the op has a kernel for it, its reference otherwise).
            backend, _, without_rel_attention = implementation.partition(", ")
            chosen = "reference" if backend == "reference" else None
            for module in lm.modules():
                if hasattr(module, "last_backend"):
                    module.backend = chosen
                if without_rel_attention and isinstance(module, ffnn.RelativeMultiHeadAttention):
                    module.backend = "reference"
            lm.reconstruction_loss.backend = chosen
            memory = lm.new_memory()
            memory.load_state_dict({"mem": mem, "c_mem": c_mem})
        state = dict(lm=lm, memory=memory, optimizer=torch.optim.AdamW(lm.parameters(), lr=2.5e-4, fused=True))
        self._states[implementation] = state
        return state

    def run(self, inputs: tuple, implementation: str) -> torch.Tensor:
        """The step's loss (scalar) on ``inputs``; advances that implementation's memory."""
        from ..models.language_models import causal_mask
        from ..nn.compressive import cat_split_merge
        from ..train import cross_entropy

        state = self._state(implementation)
        lm, tokens = state["lm"], inputs[0]
        x, targets = tokens[:-1], tokens[1:]
        if implementation != "labml_nn":
            output = lm(x, state["memory"])
            loss = cross_entropy(output.logits, targets)
            return loss if output.aux_loss is None else loss + output.aux_loss
        c = self.config
        mem, c_mem = state["memory"]
        mask = causal_mask(x.shape[0], mem[0].shape[0] + c_mem[0].shape[0], x.device)
        hidden, new_mem = lm.transformer(lm.src_embed(x), mem, c_mem, mask)
        loss = cross_entropy(lm.generator(hidden), targets)
        compress = [layer.compress for layer in lm.transformer.layers]
        mem, c_mem, old = cat_split_merge(mem, c_mem, new_mem, compress, c.mem_len, c.c_mem_len, c.compression_rate)
        state["memory"] = (mem, c_mem)
        return loss + lm.reconstruction_loss(new_mem, old) if old else loss

    def update(self, implementation: str) -> None:
        """Clip the gradients at norm 1, take the AdamW step, clear the gradients."""
        state = self._state(implementation)
        torch.nn.utils.clip_grad_norm_(state["lm"].parameters(), max_norm=1.0)
        state["optimizer"].step()
        state["optimizer"].zero_grad(set_to_none=True)


def compressive_model_cases(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[Case]:
    """The whole Compressive training step against labml_nn's (the baseline); the
    fused backend with and without the ``rel_attention`` kernel. "fwd" is the
    forward with the memory merge and both losses; "fwd+bwd" the whole step
    (backward, clipping, AdamW)."""
    if not labml_nn_available():
        return []
    steps = CompressiveTrainingStep(device, dtype)
    peers = ["reference", *(steps.without_rel_attention(name) for name in fused_backends(device))]
    return [Case("Compressive training step vs labml", steps.label(), steps.make_inputs, steps.run, dtype,
                 baseline="labml_nn", peers=tuple(peers), update=steps.update)]


def compressive_training_step(implementation: str, device: str = "cpu") -> Callable[[], None]:
    """One :class:`CompressiveTrainingStep` of ``implementation`` as a closure (for pytest-benchmark)."""
    steps = CompressiveTrainingStep(device)
    inputs = steps.make_inputs()

    def step():
        steps.run(inputs, implementation).backward()
        steps.update(implementation)

    return step
