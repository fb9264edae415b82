"""fastformers: fused kernels for Feedback, Transformer-XL, Compressive and
Switch transformers, drop-in compatible with labml_nn."""
from . import nn, ops
from ._backend import available_backends, extension_available, resolve_backend, use_backend
from .convert import convert
from .explain import explain

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "convert",
    "explain",
    "extension_available",
    "nn",
    "ops",
    "resolve_backend",
    "use_backend",
    "__version__",
]
