"""Character-level autoregressive language models, one per transformer variant:
token embedding -> transformer (with its final LayerNorm) -> generator linear.

:func:`build_model` makes one from a :class:`ModelConfig`; ``MODEL_DEFAULTS``
holds the labml_nn 0.5.1 experiment settings of each variant.
"""
from .language_models import (
    LABML_POSITIONS,
    MODEL_DEFAULTS,
    MODEL_NAMES,
    CompressiveLM,
    FeedbackLM,
    LanguageModel,
    LMOutput,
    ModelConfig,
    SwitchLM,
    TransformerXLLM,
    build_model,
    default_model_config,
    labml_modules,
)

__all__ = [
    "LABML_POSITIONS",
    "MODEL_DEFAULTS",
    "MODEL_NAMES",
    "CompressiveLM",
    "FeedbackLM",
    "LanguageModel",
    "LMOutput",
    "ModelConfig",
    "SwitchLM",
    "TransformerXLLM",
    "build_model",
    "default_model_config",
    "labml_modules",
]
