"""Feedback Transformer ops: the feedback-memory weighted sum."""
from .op import feedback_memory

__all__ = ["feedback_memory"]
