"""Feedback Transformer ops: the feedback-memory weighted sum and the attention
step over the shared key/value cache."""
from .op import feedback_memory
from .step_op import feedback_attention_step

__all__ = ["feedback_memory", "feedback_attention_step"]
