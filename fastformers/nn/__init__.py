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
    FeedbackTransformer,
    FeedbackTransformerKV,
    FeedbackTransformerLayer,
)
from .switch import SwitchFeedForward, SwitchTransformer, SwitchTransformerLayer
from .xl import TransformerXL, TransformerXLLayer

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
