"""Registration of the Feedback Transformer attention step in ``torch.ops.fastformers``.

``feedback_attention_step(query [B, H, d], key_cache [T_max, B, H, d],
value_cache [T_max, B, H, d], steps, key_pos_embeddings [P, H, d],
key_pos_bias [P, H], query_pos_bias [H, d], scale, dropout_p, seed, offset)
-> [B, H, d]``: the query attends to cache entries ``0 .. steps-1``; memory
step ``j`` uses positional row ``P - steps + j`` (the last row for the most
recent step).

Dropout of the attention probabilities: probability ``(b, h, j)`` is kept iff
element ``(b · H + h) · steps + j`` of the Philox stream ``(seed, offset)``
is (mask layout ``[B, H, steps]``; :mod:`fastformers.ops.dropout`); the
backward ops take the same three arguments and regenerate the bits.
``dropout_p = 0`` is the plain step.

Backward comes in two forms:

* ``feedback_attention_step_backward`` returns the gradients of the rows the
  step used (``[steps, ...]``), never ``[P, H, d]``;
* ``feedback_attention_step_backward_accumulate_`` adds them into caller-owned
  buffers (cache-shaped, table-shaped). The fused recurrence
  (:mod:`fastformers.ops.feedback.recurrence`) gives it one buffer per forward,
  so backward through a whole sequence does no per-step zero-fill or copy.
  The buffers share the query dtype, or are float32 for bfloat16/half steps
  (a sequence adds thousands of step gradients into them).

The op's own autograd formula (for direct callers) must return gradients shaped
like its inputs, so it scatters the used rows into zero tensors of the full
cache and table shapes: call the op inside a sequence-level autograd function,
as the modules do, to avoid that.

CPU kernels come from ``csrc/feedback_attention.cpp``, CUDA kernels from
:mod:`.triton_kernel`, every other device from :mod:`.naive`.
"""
import torch

from ... import _backend
from ..._library import lib, qualname
from .. import _autocast, dropout
from . import naive

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_ARGS = (
    "Tensor query, Tensor key_cache, Tensor value_cache, int steps, Tensor key_pos_embeddings, "
    "Tensor key_pos_bias, Tensor query_pos_bias, float scale, float dropout_p, int seed, int offset"
)
_OPTIONAL_DROPOUT = "float dropout_p=0., int seed=0, int offset=0"
_STEP_ARGS = _ARGS.replace("float dropout_p, int seed, int offset", _OPTIONAL_DROPOUT)

lib.define(f"feedback_attention_step({_STEP_ARGS}) -> Tensor")
lib.define(f"feedback_attention_step_backward(Tensor grad, {_STEP_ARGS}) -> "
           "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
lib.define(
    f"feedback_attention_step_backward_accumulate_(Tensor grad, {_ARGS}, Tensor(a!) grad_key_cache, "
    "Tensor(b!) grad_value_cache, Tensor(c!) grad_key_pos_embeddings, Tensor(d!) grad_key_pos_bias, "
    "Tensor(e!) grad_query_pos_bias) -> Tensor"
)


def _reference_accumulate(grad, query, key_cache, value_cache, steps, key_pos_embeddings, key_pos_bias,
                          query_pos_bias, scale, dropout_p, seed, offset, grad_key_cache, grad_value_cache,
                          grad_key_pos_embeddings, grad_key_pos_bias, grad_query_pos_bias):
    grads = naive.feedback_attention_step_backward(
        grad, query, key_cache, value_cache, steps, key_pos_embeddings, key_pos_bias, query_pos_bias, scale,
        dropout_p, seed, offset,
    )
    grad_key_cache[:steps] += grads[1]
    grad_value_cache[:steps] += grads[2]
    grad_key_pos_embeddings[grad_key_pos_embeddings.shape[0] - steps:] += grads[3]
    grad_key_pos_bias[grad_key_pos_bias.shape[0] - steps:] += grads[4]
    grad_query_pos_bias += grads[5]
    return grads[0]


lib.impl("feedback_attention_step", naive.feedback_attention_step, "CompositeExplicitAutograd")
lib.impl("feedback_attention_step_backward", naive.feedback_attention_step_backward, "CompositeExplicitAutograd")
lib.impl("feedback_attention_step_backward_accumulate_", _reference_accumulate, "CompositeExplicitAutograd")


def check_inputs(query, key_cache, value_cache, steps, key_pos_embeddings, key_pos_bias, query_pos_bias) -> None:
    """Raise a clear TypeError/ValueError for inputs the kernels cannot take."""
    named = dict(query=query, key_cache=key_cache, value_cache=value_cache, key_pos_embeddings=key_pos_embeddings,
                 key_pos_bias=key_pos_bias, query_pos_bias=query_pos_bias)
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if query.dim() != 3:
        raise ValueError(f"query must be [batch, heads, d_k], got shape {tuple(query.shape)}")
    B, H, d = query.shape
    if key_cache.dim() != 4 or tuple(key_cache.shape[1:]) != (B, H, d):
        raise ValueError(f"key_cache must be [T_max, {B}, {H}, {d}], got shape {tuple(key_cache.shape)}")
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache must match key_cache {tuple(key_cache.shape)}, got {tuple(value_cache.shape)}")
    if key_pos_embeddings.dim() != 3 or tuple(key_pos_embeddings.shape[1:]) != (H, d):
        raise ValueError(f"key_pos_embeddings must be [P, {H}, {d}], got shape {tuple(key_pos_embeddings.shape)}")
    P = key_pos_embeddings.shape[0]
    if tuple(key_pos_bias.shape) != (P, H):
        raise ValueError(f"key_pos_bias must be [{P}, {H}], got shape {tuple(key_pos_bias.shape)}")
    if tuple(query_pos_bias.shape) != (H, d):
        raise ValueError(f"query_pos_bias must be [{H}, {d}], got shape {tuple(query_pos_bias.shape)}")
    if not isinstance(steps, int) or isinstance(steps, bool):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if not 1 <= steps <= min(key_cache.shape[0], P):
        raise ValueError(f"steps must be in [1, min(T_max={key_cache.shape[0]}, P={P})], got {steps}")
    if query.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"query must be a floating tensor {_FLOAT_DTYPES}, got {query.dtype}")
    for name, tensor in named.items():
        if tensor.dtype != query.dtype:
            raise TypeError(f"{name} dtype {tensor.dtype} must equal query dtype {query.dtype}")
        if tensor.device != query.device:
            raise ValueError(f"{name} is on {tensor.device} but query is on {query.device}; all must share a device")


@torch.library.register_fake(qualname("feedback_attention_step"))
def _step_fake(query, key_cache, value_cache, steps, key_pos_embeddings, key_pos_bias, query_pos_bias, scale,
               dropout_p=0.0, seed=0, offset=0):
    check_inputs(query, key_cache, value_cache, steps, key_pos_embeddings, key_pos_bias, query_pos_bias)
    return torch.empty_like(query, memory_format=torch.contiguous_format)


@torch.library.register_fake(qualname("feedback_attention_step_backward"))
def _step_backward_fake(grad, query, key_cache, value_cache, steps, key_pos_embeddings, key_pos_bias,
                        query_pos_bias, scale, dropout_p=0.0, seed=0, offset=0):
    B, H, d = query.shape
    new = query.new_empty
    return new(B, H, d), new(steps, B, H, d), new(steps, B, H, d), new(steps, H, d), new(steps, H), new(H, d)


@torch.library.register_fake(qualname("feedback_attention_step_backward_accumulate_"))
def _step_accumulate_fake(grad, query, *args):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    query, key_cache, value_cache, steps, key_pos_embeddings, key_pos_bias, query_pos_bias, *scalars = inputs
    ctx.save_for_backward(query, key_cache, value_cache, key_pos_embeddings, key_pos_bias, query_pos_bias)
    ctx.steps, ctx.scalars = steps, tuple(scalars)  # scale, dropout_p, seed, offset (trailing ones may be defaulted)


def _scatter_rows(grads, key_cache, key_pos_embeddings, steps):
    """Full-shape gradients from the used-row gradients (the generic autograd path only)."""
    grad_query, grad_key, grad_value, grad_pos_emb, grad_pos_bias, grad_query_pos_bias = grads
    P = key_pos_embeddings.shape[0]
    full_key = grad_key.new_zeros(key_cache.shape)
    full_value = grad_value.new_zeros(key_cache.shape)
    full_key[:steps] = grad_key
    full_value[:steps] = grad_value
    full_pos_emb = grad_pos_emb.new_zeros(key_pos_embeddings.shape)
    full_pos_emb[P - steps:] = grad_pos_emb
    full_pos_bias = grad_pos_bias.new_zeros((P, grad_pos_bias.shape[1]))
    full_pos_bias[P - steps:] = grad_pos_bias
    return grad_query, full_key, full_value, None, full_pos_emb, full_pos_bias, grad_query_pos_bias


def _backward(ctx, grad):
    query, key_cache, value_cache, key_pos_embeddings, key_pos_bias, query_pos_bias = ctx.saved_tensors
    grads = torch.ops.fastformers.feedback_attention_step_backward(
        grad.contiguous(), query, key_cache, value_cache, ctx.steps, key_pos_embeddings, key_pos_bias,
        query_pos_bias, *ctx.scalars,
    )
    return (*_scatter_rows(grads, key_cache, key_pos_embeddings, ctx.steps), *([None] * len(ctx.scalars)))


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("fastformers::feedback_attention_step does not support double backward")


torch.library.register_autograd(qualname("feedback_attention_step"), _backward, setup_context=_setup_context)
_autocast.register("feedback_attention_step")
torch.library.register_autograd(
    qualname("feedback_attention_step_backward"), _no_double_backward, setup_context=lambda ctx, inputs, output: None
)

if _backend.triton_available():
    from . import triton_kernel as step_triton

    lib.impl("feedback_attention_step", step_triton.attention_step_forward, "CUDA")
    lib.impl("feedback_attention_step_backward", step_triton.attention_step_backward, "CUDA")
    lib.impl("feedback_attention_step_backward_accumulate_", step_triton.attention_step_backward_accumulate, "CUDA")

    class _InterpretedTriton(torch.autograd.Function):
        """The Triton kernels on CPU tensors (interpreter), with the same backward as the op."""

        @staticmethod
        def forward(ctx, query, key_cache, value_cache, steps, key_pos_embeddings, key_pos_bias, query_pos_bias,
                    *scalars):
            ctx.save_for_backward(query, key_cache, value_cache, key_pos_embeddings, key_pos_bias, query_pos_bias)
            ctx.steps, ctx.scalars = steps, scalars
            return step_triton.attention_step_forward(
                query, key_cache, value_cache, steps, key_pos_embeddings, key_pos_bias, query_pos_bias, *scalars
            )

        @staticmethod
        def backward(ctx, grad):
            query, key_cache, value_cache, key_pos_embeddings, key_pos_bias, query_pos_bias = ctx.saved_tensors
            grads = step_triton.attention_step_backward(
                grad.contiguous(), query, key_cache, value_cache, ctx.steps, key_pos_embeddings, key_pos_bias,
                query_pos_bias, *ctx.scalars,
            )
            return (*_scatter_rows(grads, key_cache, key_pos_embeddings, ctx.steps), *([None] * len(ctx.scalars)))


def feedback_attention_step(query, key_cache, value_cache, steps, key_pos_embeddings, key_pos_bias, query_pos_bias,
                            scale, dropout_p=0.0, *, seed=None, backend=None) -> torch.Tensor:
    """``Σ_j dropout(softmax_j(((q + u)·K_j + q·R_{P-steps+j} + S_{P-steps+j}) · scale)) V_j`` over ``j < steps``.

    ``query`` ``[B, H, d]``, ``key_cache``/``value_cache`` ``[T_max, B, H, d]``,
    ``key_pos_embeddings`` ``[P, H, d]``, ``key_pos_bias`` ``[P, H]``,
    ``query_pos_bias`` ``[H, d]``; returns ``[B, H, d]``. With ``dropout_p > 0``
    the mask ``[B, H, steps]`` comes from ``seed`` (offset 0) or, when None,
    from torch's default generator (:func:`fastformers.ops.dropout.draw`,
    recorded by ``dropout.record()``). Under ``torch.autocast`` every floating
    input is cast to the autocast dtype. ``backend`` overrides the backend
    selection for this call.
    """
    query, key_cache, value_cache, key_pos_embeddings, key_pos_bias, query_pos_bias = _autocast.cast(
        query.device.type if isinstance(query, torch.Tensor) else "cpu", query, key_cache, value_cache,
        key_pos_embeddings, key_pos_bias, query_pos_bias)
    check_inputs(query, key_cache, value_cache, steps, key_pos_embeddings, key_pos_bias, query_pos_bias)
    dropout_p = dropout.check_p(dropout_p, "dropout_p")
    B, H, _ = query.shape
    seed, offset = dropout.draw("feedback_attention_step", dropout_p, (B, H, steps), query.device, seed)
    name = _backend.resolve_backend(query.device, backend)
    args = (query, key_cache, value_cache, steps, key_pos_embeddings, key_pos_bias, query_pos_bias, float(scale),
            dropout_p, seed, offset)
    if name == "reference":
        return naive.feedback_attention_step(*args)
    if name == "triton" and query.device.type == "cpu":
        return _InterpretedTriton.apply(*args)
    return torch.ops.fastformers.feedback_attention_step(*args)


def step_kernels(backend: str, device: torch.device):
    """``(forward, backward_accumulate)`` callables of ``backend`` for tensors on ``device``,
    called without autograd by the fused recurrence."""
    if backend == "reference":
        return naive.feedback_attention_step, _reference_accumulate
    if backend == "triton" and device.type == "cpu":
        return step_triton.attention_step_forward, step_triton.attention_step_backward_accumulate
    ops = torch.ops.fastformers
    return ops.feedback_attention_step.default, ops.feedback_attention_step_backward_accumulate_.default
