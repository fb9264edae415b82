"""Fused ops; each family has a ``naive.py`` reference beside its kernels."""
from .feedback import feedback_memory

__all__ = ["feedback_memory"]
