"""Training recipes: how each model is trained and sized by default.

A recipe is a set of :class:`fastformers.train.TrainConfig` and
:class:`fastformers.models.ModelConfig` field values for one model under one
preset:

* ``cpu`` (the default of ``fastformers train``): tuned on a 2-thread CPU to
  reach 1.9 nats validation on Tiny Shakespeare within minutes: longer segments
  and memories than labml's experiments, AdamW with linear warm-up and cosine
  decay, positional tables sized to the lengths used (``n_positions``).
* ``labml``: labml_nn 0.5.1's experiment settings (``transformers/*/experiment.py``),
  what ``fastformers train`` used before recipes existed.

Every preset of a model sets the same fields, so layering one recipe over
another (or explicit values over a recipe) never leaves a value of the other.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

from .models import LABML_POSITIONS, MODEL_DEFAULTS, MODEL_NAMES

PRESETS: Tuple[str, ...] = ("cpu", "labml")
DEFAULT_PRESET = PRESETS[0]

# labml_nn's training settings; the optimizer ones are labml's OptimizerConfigs
# (warm-up 2000, no weight decay, no decay of the learning rate after warm-up).
_LABML_OPTIMIZER = dict(warmup=2000, weight_decay=0.0, decay_steps=None, min_lr_ratio=0.0, beta1=0.9, beta2=0.999,
                        grad_clip=1.0, eval_interval=100, eval_batches=10, steps=5000, backend="fused")
_LABML_TRAIN: Dict[str, dict] = {
    "xl": dict(seq_len=2, batch_size=32, optimizer="noam", lr=1.0),
    "compressive": dict(seq_len=8, batch_size=32, optimizer="adamw", lr=2.5e-4),
    "feedback": dict(seq_len=128, batch_size=64, optimizer="noam", lr=1.0),
    "switch": dict(seq_len=64, batch_size=32, optimizer="noam", lr=1.0),
}

# The cpu recipes: nanoGPT's CPU shape (4 layers of width 128, d_ff 512, windows
# of 64, AdamW, linear warm-up then cosine decay to lr / 10 at decay_steps =
# steps), with lr 4e-3 and evaluation every 50 steps so that the 1.9-nats
# crossing is seen within seconds. In the tuning runs a memory of 32 beat 64 for
# XL (2.02 against 2.09 nats after 400 steps) and costs less. n_positions covers the longest
# key/query span each model uses (XL: mem_len + seq_len; Compressive: c_mem_len +
# mem_len + seq_len; Feedback: seq_len steps), with room for generation windows.
# Switch gets learned absolute positions: labml's has none (only the causal mask
# tells positions apart) and then stays near the bigram loss (~2.4 nats) for
# hundreds of steps. As many as the training length: generation then slides a
# window of trained positions.
_CPU_OPTIMIZER = dict(optimizer="adamw", lr=4e-3, warmup=50, min_lr_ratio=0.1, weight_decay=0.1, beta1=0.9,
                      beta2=0.99, grad_clip=1.0, seq_len=64, batch_size=16, eval_interval=50, eval_batches=10,
                      backend="fused")
# steps (= decay_steps) end each run a little after the 1.9-nats crossing of the tuning runs
_CPU_STEPS = {"xl": 700, "compressive": 900, "feedback": 700, "switch": 900}
_CPU_MODEL: Dict[str, dict] = {
    "xl": dict(d_model=128, heads=4, d_ff=512, n_layers=4, dropout=0.0, mem_len=32, n_positions=96),
    "compressive": dict(d_model=128, heads=4, d_ff=512, n_layers=4, dropout=0.0, mem_len=32, c_mem_len=16,
                        compression_rate=2, n_positions=128),
    "feedback": dict(d_model=128, heads=4, d_ff=512, n_layers=4, dropout=0.0, kv=True, n_positions=128),
    "switch": dict(d_model=128, heads=4, d_ff=512, n_layers=4, dropout=0.0, n_experts=4, capacity_factor=1.2,
                   drop_tokens=True, is_scale_prob=True, load_balancing_coef=0.01, position_embeddings=64),
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """``train``: :class:`~fastformers.train.TrainConfig` field values; ``model``:
    :class:`~fastformers.models.ModelConfig` field values (without ``model`` and ``n_tokens``)."""

    model_name: str
    preset: str
    train: Dict[str, object]
    model: Dict[str, object]


def recipe(model: str, preset: str = DEFAULT_PRESET) -> Recipe:
    """The recipe of ``model`` under ``preset`` (one of :data:`PRESETS`); ValueError naming an
    unknown model or preset. The dicts are fresh copies: changing them changes no later recipe."""
    if model not in MODEL_NAMES:
        raise ValueError(f"model must be one of {MODEL_NAMES}, got {model!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if preset == "labml":
        train = {**_LABML_OPTIMIZER, **_LABML_TRAIN[model]}
        model_settings = {**MODEL_DEFAULTS[model]}
        if model == "switch":
            model_settings["position_embeddings"] = 0
        else:
            model_settings["n_positions"] = LABML_POSITIONS
    else:
        train = {**_LABML_OPTIMIZER, **_CPU_OPTIMIZER, "steps": _CPU_STEPS[model], "decay_steps": _CPU_STEPS[model]}
        model_settings = {**_CPU_MODEL[model]}
    return Recipe(model, preset, train, model_settings)


__all__ = ["DEFAULT_PRESET", "PRESETS", "Recipe", "recipe"]
