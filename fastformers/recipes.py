"""Training presets of ``fastformers train --preset``.

Stub of the interface the recipes branch implements (issue #16, item 1): only
``labml`` (labml_nn's experiment settings, today's defaults) until it lands.
"""
from __future__ import annotations

import dataclasses
from typing import Dict

PRESETS: tuple = ("labml",)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Overrides of :class:`fastformers.train.TrainConfig` (``train``) and of
    :class:`fastformers.models.ModelConfig` (``model``) fields."""

    train: Dict[str, object]
    model: Dict[str, object]


def recipe(model: str, preset: str) -> Recipe:
    """The overrides ``preset`` makes for ``model``; ``labml`` makes none."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    return Recipe(train={}, model={})
