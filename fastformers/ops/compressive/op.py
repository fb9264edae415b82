"""Registration of the Compressive Transformer ops in ``torch.ops.fastformers``.

``conv_compress(mem [M, B, D], weight [D_out, D, c], bias [D_out]?) -> [M / c, B, D_out]``
and its backward (mem, weight, bias);
``attention_reconstruction_loss(h, mem, c_mem, <layer norm>, <q/k/v projections>, heads, scale)``
returning the loss and the residuals its backward reads, and
``attention_reconstruction_loss_backward`` (gradient of ``c_mem`` only).
CPU kernels come from ``csrc/compressive.cpp``, CUDA kernels from
:mod:`.triton_kernel` (float32, float64 and bfloat16; other dtypes, and loss
heads wider than the checked tiles, run the reference on the GPU with a
``FallbackWarning`` once per reason), every other device (and CPU without the extension) from
:mod:`.naive`. ``conv_compress`` (and its backward) and
``attention_reconstruction_loss`` follow ``torch.autocast``: every floating
input (weights, biases, norm parameters too) is cast to the autocast dtype.
"""
from typing import Optional

import torch

from ... import _backend
from ..._library import lib, qualname
from .. import _autocast
from . import naive

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

lib.define("conv_compress(Tensor mem, Tensor weight, Tensor? bias) -> Tensor")
lib.define("conv_compress_backward(Tensor grad, Tensor mem, Tensor weight, bool has_bias) -> (Tensor, Tensor, Tensor)")
lib.define(
    "attention_reconstruction_loss(Tensor h, Tensor mem, Tensor c_mem, Tensor? norm_weight, Tensor? norm_bias, "
    "float eps, Tensor query_weight, Tensor? query_bias, Tensor key_weight, Tensor? key_bias, "
    "Tensor value_weight, Tensor? value_bias, int heads, float scale) "
    "-> (Tensor, Tensor, Tensor)"
)
lib.define(
    "attention_reconstruction_loss_backward(Tensor grad, Tensor h, Tensor c_mem, Tensor? norm_weight, "
    "Tensor? norm_bias, float eps, Tensor query_weight, Tensor? query_bias, Tensor key_weight, Tensor? key_bias, "
    "Tensor value_weight, Tensor? value_bias, int heads, float scale, Tensor diff, Tensor stats) -> Tensor"
)

lib.impl("conv_compress", naive.conv_compress, "CompositeExplicitAutograd")
lib.impl("conv_compress_backward", naive.conv_compress_backward, "CompositeExplicitAutograd")
lib.impl("attention_reconstruction_loss", naive.attention_reconstruction_loss_forward, "CompositeExplicitAutograd")
lib.impl(
    "attention_reconstruction_loss_backward", naive.attention_reconstruction_loss_backward, "CompositeExplicitAutograd"
)


def _check_tensor(name: str, value, *, dtype: torch.dtype, device: torch.device, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(value).__name__}")
    if value.dtype != dtype:
        raise TypeError(f"{name} dtype {value.dtype} must equal the memory's dtype {dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the memory is on {device}; all tensors must share a device")


def check_conv_inputs(mem: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Raise a clear TypeError/ValueError for inputs ``conv_compress`` cannot take."""
    if not isinstance(mem, torch.Tensor):
        raise TypeError(f"mem must be a torch.Tensor, got {type(mem).__name__}")
    if mem.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"mem must be a floating tensor {_FLOAT_DTYPES}, got {mem.dtype}")
    _check_tensor("weight", weight, dtype=mem.dtype, device=mem.device)
    _check_tensor("bias", bias, dtype=mem.dtype, device=mem.device, optional=True)
    if mem.dim() != 3:
        raise ValueError(f"mem must be [mem_len, batch, d_model], got shape {tuple(mem.shape)}")
    if weight.dim() != 3 or weight.shape[1] != mem.shape[2] or weight.shape[2] < 1:
        raise ValueError(
            f"weight must be [d_out, d_model = {mem.shape[2]}, compression_rate] (nn.Conv1d layout), "
            f"got shape {tuple(weight.shape)}"
        )
    rate = weight.shape[2]
    if mem.shape[0] == 0 or mem.shape[0] % rate:
        raise ValueError(
            f"mem length {mem.shape[0]} is not a positive multiple of the compression rate {rate}: "
            f"only whole groups of {rate} memories are compressed"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [d_out] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")


def check_loss_inputs(h, mem, c_mem, norm_weight, norm_bias, query_weight, query_bias, key_weight, key_bias,
                      value_weight, value_bias, heads) -> None:
    """Raise a clear TypeError/ValueError for inputs the reconstruction loss cannot take."""
    for name, value in (("h", h), ("mem", mem), ("c_mem", c_mem)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if mem.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"mem must be a floating tensor {_FLOAT_DTYPES}, got {mem.dtype}")
    dtype, device = mem.dtype, mem.device
    for name, value, optional in (
        ("h", h, False), ("c_mem", c_mem, False), ("norm_weight", norm_weight, True), ("norm_bias", norm_bias, True),
        ("query_weight", query_weight, False), ("query_bias", query_bias, True), ("key_weight", key_weight, False),
        ("key_bias", key_bias, True), ("value_weight", value_weight, False), ("value_bias", value_bias, True),
    ):
        _check_tensor(name, value, dtype=dtype, device=device, optional=optional)
    if h.dim() != 3:
        raise ValueError(f"h must be [seq_len, batch, d_model], got shape {tuple(h.shape)}")
    _, batch, d_model = h.shape
    for name, value in (("mem", mem), ("c_mem", c_mem)):
        if value.dim() != 3 or value.shape[1:] != h.shape[1:] or value.shape[0] == 0:
            raise ValueError(
                f"{name} must be [{name}_len > 0, batch = {batch}, d_model = {d_model}], got shape {tuple(value.shape)}"
            )
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    if query_weight.dim() != 2 or query_weight.shape[1] != d_model or query_weight.shape[0] % heads:
        raise ValueError(
            f"query_weight must be [heads * d_k, d_model = {d_model}] with heads = {heads}, "
            f"got shape {tuple(query_weight.shape)}"
        )
    features = query_weight.shape[0]
    for name, value in (("key_weight", key_weight), ("value_weight", value_weight)):
        if value.shape != query_weight.shape:
            raise ValueError(f"{name} must be [{features}, {d_model}] like query_weight, got shape {tuple(value.shape)}")
    for name, value, size in (
        ("norm_weight", norm_weight, d_model), ("norm_bias", norm_bias, d_model), ("query_bias", query_bias, features),
        ("key_bias", key_bias, features), ("value_bias", value_bias, features),
    ):
        if value is not None and tuple(value.shape) != (size,):
            raise ValueError(f"{name} must be [{size}], got shape {tuple(value.shape)}")


# ------------------------------------------------------------------ fake kernels


@torch.library.register_fake(qualname("conv_compress"))
def _conv_compress_fake(mem, weight, bias):
    check_conv_inputs(mem, weight, bias)
    return mem.new_empty(mem.shape[0] // weight.shape[2], mem.shape[1], weight.shape[0])


@torch.library.register_fake(qualname("conv_compress_backward"))
def _conv_compress_backward_fake(grad, mem, weight, has_bias):
    return torch.empty_like(mem), torch.empty_like(weight), weight.new_empty(weight.shape[0] if has_bias else 0)


@torch.library.register_fake(qualname("attention_reconstruction_loss"))
def _loss_fake(h, mem, c_mem, norm_weight, norm_bias, eps, query_weight, query_bias, key_weight, key_bias,
               value_weight, value_bias, heads, scale):
    check_loss_inputs(h, mem, c_mem, norm_weight, norm_bias, query_weight, query_bias, key_weight, key_bias,
                      value_weight, value_bias, heads)
    acc = naive._acc_dtype(h.dtype)
    L, B, _ = h.shape
    E = query_weight.shape[0]
    return h.new_empty(()), h.new_empty((L, B, E), dtype=acc), h.new_empty((2, L, B, heads), dtype=acc)


@torch.library.register_fake(qualname("attention_reconstruction_loss_backward"))
def _loss_backward_fake(grad, h, c_mem, norm_weight, norm_bias, eps, query_weight, query_bias, key_weight, key_bias,
                        value_weight, value_bias, heads, scale, diff, stats):
    return torch.empty_like(c_mem)


# ------------------------------------------------------------------ autograd


def _conv_setup_context(ctx, inputs, output):
    mem, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(mem, weight)


def _conv_backward(ctx, grad):
    mem, weight = ctx.saved_tensors
    grad_mem, grad_weight, grad_bias = torch.ops.fastformers.conv_compress_backward(
        grad.contiguous(), mem, weight, ctx.has_bias
    )
    return grad_mem, grad_weight, grad_bias if ctx.has_bias else None


def _loss_setup_context(ctx, inputs, output):
    h, mem, c_mem, norm_weight, norm_bias, eps, *projections, heads, scale = inputs
    _, diff, stats = output
    ctx.mark_non_differentiable(diff, stats)
    # The residual outputs never get a gradient: without this autograd would
    # allocate and zero-fill one per backward call.
    ctx.set_materialize_grads(False)
    ctx.eps, ctx.heads, ctx.scale = eps, heads, scale
    # Saved by reference (inputs the caller holds anyway, or residuals); the
    # optional ones as a presence mask so that None survives save_for_backward.
    layer = (norm_weight, norm_bias, *projections)
    ctx.present = [t is not None for t in layer]
    ctx.save_for_backward(h, c_mem, diff, stats, *(t for t in layer if t is not None))


def _loss_backward(ctx, grad, *unused_residual_grads):
    h, c_mem, diff, stats, *present = ctx.saved_tensors
    present = iter(present)
    layer = [next(present) if is_present else None for is_present in ctx.present]
    norm_weight, norm_bias, *projections = layer
    grad_c_mem = None
    if grad is not None:
        grad_c_mem = torch.ops.fastformers.attention_reconstruction_loss_backward(
            grad, h, c_mem, norm_weight, norm_bias, ctx.eps, *projections, ctx.heads, ctx.scale, diff, stats,
        )
    # Everything but c_mem is detached by the loss's definition.
    return None, None, grad_c_mem, *([None] * 11)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("fastformers' compressive ops do not support double backward")


torch.library.register_autograd(qualname("conv_compress"), _conv_backward, setup_context=_conv_setup_context)
torch.library.register_autograd(
    qualname("attention_reconstruction_loss"), _loss_backward, setup_context=_loss_setup_context
)
for _name in ("conv_compress_backward", "attention_reconstruction_loss_backward"):
    torch.library.register_autograd(
        qualname(_name), _no_double_backward, setup_context=lambda ctx, inputs, output: None
    )
# attention_reconstruction_loss_backward is left out: autograd calls it with
# the dtypes its forward saved, and its float32 residuals must not be cast down.
for _name in ("conv_compress", "conv_compress_backward", "attention_reconstruction_loss"):
    _autocast.register(_name)

# ------------------------------------------------------------------ Triton


def _reference_on_gpu(op: str, dtype: torch.dtype, d_k: int = 0) -> bool:
    """Whether ``op`` runs the reference on the GPU (warned once per reason): no
    checked Triton configuration takes it."""
    reason = triton_kernel.gpu_unsupported_reason(op, dtype, d_k)
    if reason is not None:
        _backend.warn_op_fallback(op, reason)
    return reason is not None


def _cuda_conv_compress(mem, weight, bias):
    if _reference_on_gpu("conv_compress", mem.dtype):
        return naive.conv_compress(mem, weight, bias)
    return triton_kernel.conv_compress_forward(mem, weight, bias)


def _cuda_conv_compress_backward(grad, mem, weight, has_bias):
    if _reference_on_gpu("conv_compress", mem.dtype):
        return naive.conv_compress_backward(grad, mem, weight, has_bias)
    return triton_kernel.conv_compress_backward(grad, mem, weight, has_bias)


def _cuda_loss(h, mem, c_mem, norm_weight, norm_bias, eps, query_weight, query_bias, key_weight, key_bias,
               value_weight, value_bias, heads, scale):
    args = (h, mem, c_mem, norm_weight, norm_bias, eps, query_weight, query_bias, key_weight, key_bias, value_weight,
            value_bias, heads, scale)
    if _reference_on_gpu("attention_reconstruction_loss", h.dtype, query_weight.shape[0] // heads):
        return naive.attention_reconstruction_loss_forward(*args)
    return triton_kernel.attention_reconstruction_loss_forward(*args)


def _cuda_loss_backward(grad, h, c_mem, norm_weight, norm_bias, eps, query_weight, query_bias, key_weight, key_bias,
                        value_weight, value_bias, heads, scale, diff, stats):
    args = (grad, h, c_mem, norm_weight, norm_bias, eps, query_weight, query_bias, key_weight, key_bias, value_weight,
            value_bias, heads, scale, diff, stats)
    if _reference_on_gpu("attention_reconstruction_loss", h.dtype, query_weight.shape[0] // heads):
        return naive.attention_reconstruction_loss_backward(*args)
    return triton_kernel.attention_reconstruction_loss_backward(*args)


if _backend.triton_available():
    from . import triton_kernel

    lib.impl("conv_compress", _cuda_conv_compress, "CUDA")
    lib.impl("conv_compress_backward", _cuda_conv_compress_backward, "CUDA")
    lib.impl("attention_reconstruction_loss", _cuda_loss, "CUDA")
    lib.impl("attention_reconstruction_loss_backward", _cuda_loss_backward, "CUDA")

    class _InterpretedConvCompress(torch.autograd.Function):
        """The Triton conv kernels on CPU tensors (interpreter), with the same backward as the op."""

        @staticmethod
        def forward(ctx, mem, weight, bias):
            ctx.has_bias = bias is not None
            ctx.save_for_backward(mem, weight)
            return triton_kernel.conv_compress_forward(mem, weight, bias)

        @staticmethod
        def backward(ctx, grad):
            mem, weight = ctx.saved_tensors
            grad_mem, grad_weight, grad_bias = triton_kernel.conv_compress_backward(grad, mem, weight, ctx.has_bias)
            return grad_mem, grad_weight, grad_bias if ctx.has_bias else None

    class _InterpretedReconstructionLoss(torch.autograd.Function):
        """The Triton loss kernels on CPU tensors (interpreter): gradient for ``c_mem`` only, as the op."""

        @staticmethod
        def forward(ctx, h, mem, c_mem, *layer):
            loss, diff, stats = triton_kernel.attention_reconstruction_loss_forward(h, mem, c_mem, *layer)
            ctx.layer = layer
            ctx.save_for_backward(h, c_mem, diff, stats)
            return loss

        @staticmethod
        def backward(ctx, grad):
            h, c_mem, diff, stats = ctx.saved_tensors
            grad_c_mem = triton_kernel.attention_reconstruction_loss_backward(grad, h, c_mem, *ctx.layer, diff, stats)
            return None, None, grad_c_mem, *([None] * len(ctx.layer))


# ------------------------------------------------------------------ public functions


KERNELS = ("reference", "cpp", "triton")


def conv_compress(mem: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """``Conv1d(kernel = stride = c)`` over the time axis of a sequence-first memory.

    mem: ``[M, B, D]`` with ``M`` a multiple of ``c``; weight: ``[D_out, D, c]``
    and bias ``[D_out]`` exactly as ``nn.Conv1d`` stores them. Returns
    ``[M / c, B, D_out]``: ``out[g] = bias + Σ_k mem[g·c + k] @ weight[:, :, k]ᵀ``.
    ``backend`` overrides the backend selection for this call. Under
    ``torch.autocast`` the three tensors are cast to the autocast dtype.
    """
    if isinstance(mem, torch.Tensor):
        mem, weight, bias = _autocast.cast(mem.device.type, mem, weight, bias)
    check_conv_inputs(mem, weight, bias)
    name = _backend.resolve_backend(mem.device, backend, implemented=KERNELS)
    if name == "reference":
        return naive.conv_compress(mem, weight, bias)
    if name == "triton" and mem.device.type == "cpu":
        # Its helper torch ops must see the inputs' dtypes (autocast already applied), as the dispatcher's would.
        with torch.autocast("cpu", enabled=False):
            return _InterpretedConvCompress.apply(mem, weight, bias)
    return torch.ops.fastformers.conv_compress(mem, weight, bias)


def attention_reconstruction_loss(
    h: torch.Tensor,
    mem: torch.Tensor,
    c_mem: torch.Tensor,
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    eps: float,
    query_weight: torch.Tensor,
    query_bias: Optional[torch.Tensor],
    key_weight: torch.Tensor,
    key_bias: Optional[torch.Tensor],
    value_weight: torch.Tensor,
    value_bias: Optional[torch.Tensor],
    heads: int,
    scale: float,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``MSE(attn(LN(h), LN(c_mem)), attn(LN(h), LN(mem)))`` for one layer.

    h: ``[L, B, D]``, mem: ``[M, B, D]``, c_mem: ``[N, B, D]``; the layer norm
    (``norm_weight``/``norm_bias`` ``[D]`` or None, ``eps``) and the query/key/value
    projections (weights ``[H·d_k, D]``, biases ``[H·d_k]`` or None) are the
    layer's; attention is content-only softmax over ``heads`` heads with scores
    times ``scale``. Every input but ``c_mem`` is treated as detached: only
    ``c_mem`` receives a gradient. Returns a scalar. Under ``torch.autocast``
    every floating tensor is cast to the autocast dtype.
    """
    if isinstance(mem, torch.Tensor):
        (h, mem, c_mem, norm_weight, norm_bias, query_weight, query_bias, key_weight, key_bias, value_weight,
         value_bias) = _autocast.cast(mem.device.type, h, mem, c_mem, norm_weight, norm_bias, query_weight,
                                      query_bias, key_weight, key_bias, value_weight, value_bias)
    check_loss_inputs(h, mem, c_mem, norm_weight, norm_bias, query_weight, query_bias, key_weight, key_bias,
                      value_weight, value_bias, heads)
    args = (h, mem, c_mem, norm_weight, norm_bias, float(eps), query_weight, query_bias, key_weight, key_bias,
            value_weight, value_bias, heads, float(scale))
    name = _backend.resolve_backend(mem.device, backend, implemented=KERNELS)
    if name == "reference":
        return naive.attention_reconstruction_loss(*args)
    if name == "triton" and mem.device.type == "cpu":
        with torch.autocast("cpu", enabled=False):  # as for conv_compress
            return _InterpretedReconstructionLoss.apply(*args)
    return torch.ops.fastformers.attention_reconstruction_loss(*args)[0]
