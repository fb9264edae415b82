"""Reference modules, drop-in compatible with labml_nn 0.5.1: same constructor
arguments, forward signatures, return values and ``state_dict`` keys, so a
labml_nn checkpoint loads with ``strict=True``. All layouts are
sequence-first, ``[seq, batch, ...]``. :func:`fastformers.convert.convert`
swaps the classes of an existing model in place.
"""
from .attention import FeedForward, MultiHeadAttention, PrepareForMultiHeadAttention, RelativeMultiHeadAttention
from .compressive import (
    AttentionReconstructionLoss,
    CompressiveTransformer,
    CompressiveTransformerLayer,
    Conv1dCompression,
)
from .feedback import (
    FeedbackAttention,
    FeedbackState,
    FeedbackTransformer,
    FeedbackTransformerKV,
    FeedbackTransformerLayer,
)
# load_balancing_loss is a helper, not a labml module: kept out of __all__, which lists the mirrored classes
from .switch import SwitchFeedForward, SwitchTransformer, SwitchTransformerLayer, load_balancing_loss
from .xl import TransformerXL, TransformerXLLayer

# FeedbackState is fastformers-only (generation state); __all__ lists the labml_nn-compatible names.
__all__ = [
    "PrepareForMultiHeadAttention",
    "MultiHeadAttention",
    "FeedForward",
    "RelativeMultiHeadAttention",
    "TransformerXLLayer",
    "TransformerXL",
    "FeedbackAttention",
    "FeedbackTransformerLayer",
    "FeedbackTransformer",
    "FeedbackTransformerKV",
    "Conv1dCompression",
    "CompressiveTransformerLayer",
    "CompressiveTransformer",
    "AttentionReconstructionLoss",
    "SwitchFeedForward",
    "SwitchTransformerLayer",
    "SwitchTransformer",
]
