"""fastformers: fused kernels for Feedback, Transformer-XL, Compressive and
Switch transformers, drop-in compatible with labml_nn."""
from . import _backend, _cache, nn, ops
from ._backend import available_backends, extension_available, resolve_backend, use_backend
from ._cache import cache_info, empty_cache, set_cache_limit
from .convert import convert
from .explain import explain

# Importing fastformers._C registers the C++ CPU kernels of the ops defined above. Done here, so
# that torch.ops.fastformers.* run them from the first call instead of the reference registered
# for every device; a failed load is remembered, and warned about once at the first CPU op.
_backend.load_extension()
_cache.apply_environment()

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "cache_info",
    "convert",
    "empty_cache",
    "explain",
    "extension_available",
    "nn",
    "ops",
    "resolve_backend",
    "set_cache_limit",
    "use_backend",
    "__version__",
]
