"""Fused ops; each family has a ``naive.py`` reference beside its kernels."""
from .feedback import feedback_memory
from .xl import rel_attention

__all__ = ["feedback_memory", "rel_attention"]
