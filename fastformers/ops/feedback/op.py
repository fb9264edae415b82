"""Registration of the feedback-memory ops in ``torch.ops.fastformers``.

``feedback_memory(layer_outputs [L, B, D], weights [L]) -> [B, D]`` and its
``feedback_memory_backward``: CPU kernels come from ``csrc/feedback_memory.cpp``,
CUDA kernels from :mod:`.triton_kernel`, every other device (and CPU without
the extension) from :mod:`.naive`.
"""
import torch

from ... import _backend
from ..._library import lib, qualname
from .. import _autocast
from . import naive

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

lib.define("feedback_memory(Tensor layer_outputs, Tensor weights) -> Tensor")
lib.define(
    "feedback_memory_backward(Tensor grad, Tensor layer_outputs, Tensor weights) -> (Tensor, Tensor)"
)

lib.impl("feedback_memory", naive.feedback_memory, "CompositeExplicitAutograd")
lib.impl("feedback_memory_backward", naive.feedback_memory_backward, "CompositeExplicitAutograd")
_autocast.register("feedback_memory")


def check_inputs(layer_outputs: torch.Tensor, weights: torch.Tensor) -> None:
    """Raise a clear TypeError/ValueError for inputs the kernels cannot take."""
    if not isinstance(layer_outputs, torch.Tensor) or not isinstance(weights, torch.Tensor):
        raise TypeError("layer_outputs and weights must be torch.Tensors")
    if layer_outputs.dim() < 2:
        raise ValueError(
            f"layer_outputs must be [n_layers + 1, batch, d_model] (rank >= 2), got shape {tuple(layer_outputs.shape)}"
        )
    if weights.dim() != 1 or weights.shape[0] != layer_outputs.shape[0]:
        raise ValueError(
            f"weights must be [n_layers + 1] = [{layer_outputs.shape[0]}] to match layer_outputs, "
            f"got shape {tuple(weights.shape)}"
        )
    if layer_outputs.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"layer_outputs must be a floating tensor {_FLOAT_DTYPES}, got {layer_outputs.dtype}")
    if weights.dtype != layer_outputs.dtype:
        raise TypeError(f"weights dtype {weights.dtype} must equal layer_outputs dtype {layer_outputs.dtype}")
    if weights.device != layer_outputs.device:
        raise ValueError(
            f"weights is on {weights.device} but layer_outputs is on {layer_outputs.device}; both must share a device"
        )


@torch.library.register_fake(qualname("feedback_memory"))
def _feedback_memory_fake(layer_outputs, weights):
    check_inputs(layer_outputs, weights)
    return layer_outputs.new_empty(layer_outputs.shape[1:])


@torch.library.register_fake(qualname("feedback_memory_backward"))
def _feedback_memory_backward_fake(grad, layer_outputs, weights):
    return torch.empty_like(layer_outputs), torch.empty_like(weights)


def _setup_context(ctx, inputs, output):
    layer_outputs, weights = inputs
    ctx.save_for_backward(layer_outputs, weights)


def _backward(ctx, grad):
    layer_outputs, weights = ctx.saved_tensors
    grad_layer_outputs, grad_weights = torch.ops.fastformers.feedback_memory_backward(
        grad.contiguous(), layer_outputs, weights
    )
    return grad_layer_outputs, grad_weights


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("fastformers::feedback_memory does not support double backward")


torch.library.register_autograd(qualname("feedback_memory"), _backward, setup_context=_setup_context)
torch.library.register_autograd(
    qualname("feedback_memory_backward"), _no_double_backward, setup_context=lambda ctx, inputs, output: None
)

if _backend.triton_available():
    from . import triton_kernel

    lib.impl("feedback_memory", triton_kernel.feedback_memory_forward, "CUDA")
    lib.impl("feedback_memory_backward", triton_kernel.feedback_memory_backward, "CUDA")

    class _InterpretedTriton(torch.autograd.Function):
        """The Triton kernels on CPU tensors (interpreter), with the same backward as the op."""

        @staticmethod
        def forward(ctx, layer_outputs, weights):
            ctx.save_for_backward(layer_outputs, weights)
            return triton_kernel.feedback_memory_forward(layer_outputs, weights)

        @staticmethod
        def backward(ctx, grad):
            layer_outputs, weights = ctx.saved_tensors
            return triton_kernel.feedback_memory_backward(grad.contiguous(), layer_outputs, weights)


def feedback_memory(layer_outputs: torch.Tensor, weights: torch.Tensor, *, backend=None) -> torch.Tensor:
    """``m = Σ_l softmax(weights)_l · layer_outputs[l]``.

    layer_outputs: ``[L, B, D]`` (L = n_layers + 1), weights: ``[L]``; returns
    ``[B, D]``. ``backend`` overrides the backend selection for this call.
    """
    if isinstance(layer_outputs, torch.Tensor):
        layer_outputs, weights = _autocast.cast(layer_outputs.device.type, layer_outputs, weights)
    check_inputs(layer_outputs, weights)
    name = _backend.resolve_backend(layer_outputs.device, backend)
    if name == "reference":
        return naive.feedback_memory(layer_outputs, weights)
    layer_outputs = layer_outputs.contiguous()
    if name == "triton" and layer_outputs.device.type == "cpu":
        return _InterpretedTriton.apply(layer_outputs, weights)
    return torch.ops.fastformers.feedback_memory(layer_outputs, weights)
