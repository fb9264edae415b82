"""Fused ops; each family has a ``naive.py`` reference beside its kernels."""
from .compressive import attention_reconstruction_loss, conv_compress
from .feedback import feedback_memory

__all__ = ["attention_reconstruction_loss", "conv_compress", "feedback_memory"]
