"""Compressive Transformer ops: strided-conv memory compression and the
attention-reconstruction loss."""
from .op import attention_reconstruction_loss, conv_compress

__all__ = ["attention_reconstruction_loss", "conv_compress"]
