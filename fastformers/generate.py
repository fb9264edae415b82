"""Sampling text from a trained checkpoint: the loop behind ``fastformers generate``.

The prompt runs through the model once; after that every new character costs
one :meth:`LanguageModel.step` on that character alone, carrying the model's
state (Feedback: its K/V cache; Transformer-XL / Compressive: their memory;
Switch: its per-layer attention inputs).
"""
from __future__ import annotations

import math
import os
from typing import Iterator, Optional

import torch

from .data import CharVocab
from .models import LanguageModel
from .train import backend_context, load_checkpoint, model_from_checkpoint


def check_sampling(temperature: float, top_k: int, tokens: int = 1) -> None:
    """ValueError naming ``temperature`` (finite, >= 0), ``top_k`` (>= 0) or ``tokens`` (>= 1)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if tokens < 1:
        raise ValueError(f"tokens must be at least 1, got {tokens}")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Token ids ``[B]`` drawn from ``logits`` ``[B, V]``.

    ``temperature`` 0 picks the most likely token; otherwise the logits are
    divided by it and, if ``top_k`` > 0, restricted to the ``top_k`` largest.
    """
    check_sampling(temperature, top_k)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model: LanguageModel, prompt: torch.Tensor, tokens: int, temperature: float = 1.0,
                 top_k: int = 0, generator: Optional[torch.Generator] = None) -> Iterator[int]:
    """Yield ``tokens`` sampled ids following ``prompt`` ``[T]`` (batch of one)."""
    if prompt.numel() == 0:
        raise ValueError("the prompt must have at least one character")
    model.eval()
    logits, state = model.step(prompt.view(-1, 1))
    for _ in range(tokens):
        token = sample_next(logits[-1], temperature, top_k, generator)
        yield int(token)
        logits, state = model.step(token.view(1, 1), state)


def generate(checkpoint: os.PathLike | str, prompt: str, tokens: int, temperature: float = 1.0,
             top_k: int = 0, seed: Optional[int] = None, backend: str = "fused",
             device: Optional[str] = None) -> Iterator[str]:
    """Yield the characters sampled after ``prompt`` from the model in ``checkpoint``."""
    check_sampling(temperature, top_k, tokens)
    payload = load_checkpoint(checkpoint)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model_from_checkpoint(payload, device)
    vocab = CharVocab(payload["vocab"])
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    with backend_context(backend):
        for token in generate_ids(model, vocab.encode(prompt).to(device), tokens, temperature, top_k, generator):
            yield vocab.decode([token])
