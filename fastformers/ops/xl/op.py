"""Registration of relative-position attention in ``torch.ops.fastformers``.

``rel_attention(query [L, B, H, d], key [K, B, H, d], value [K, B, H, d],
pos_emb [K + L - 1, H, d], pos_bias [K + L - 1, H], query_pos_bias [H, d],
scale, causal, mask [L or 1, K, B or 1] bool or None, dropout_p, seed, offset)
-> (out [L, B, H, d], lse [B, H, L])`` and ``rel_attention_backward``. ``lse``
is the log-sum-exp of each query's scaled scores (before dropout), in float64
for float64 inputs and float32 otherwise; backward recomputes the
probabilities from it and regenerates the dropout bits (mask layout
``[B, H, L, K]``, see :mod:`.naive`). ``rel_attention`` follows
``torch.autocast`` (every floating input cast to the autocast dtype).
A query row with no visible key (every key masked) has an undefined softmax: its
``out`` row is NaN, its ``lse`` -inf and the gradients it reaches NaN, on every backend (labml_nn's
behaviour, kept).

Kernels: CPU from ``csrc/rel_attention.cpp``; CUDA from :mod:`.triton_kernel`
(explicit masks included; float64, float32 with head dims over 64 and 16-bit
floats with head dims over 128 run the reference formulas below on the GPU,
with a ``FallbackWarning`` once per reason, see
``triton_kernel.gpu_unsupported_reason``); every other device, and
CPU without the extension, from the reference formulas.
"""
import importlib
from typing import Optional

import torch

from ... import _backend
from ..._library import lib, qualname
from .. import _autocast, dropout
from . import naive

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

lib.define(
    "rel_attention(Tensor query, Tensor key, Tensor value, Tensor pos_emb, Tensor pos_bias, "
    "Tensor query_pos_bias, float scale, bool causal, Tensor? mask, float dropout_p=0., int seed=0, int offset=0) "
    "-> (Tensor, Tensor)"
)
lib.define(
    "rel_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor pos_emb, "
    "Tensor pos_bias, Tensor query_pos_bias, Tensor out, Tensor lse, float scale, bool causal, Tensor? mask, "
    "float dropout_p=0., int seed=0, int offset=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the saved log-sum-exp (and of the kernels' accumulation)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(query, key, value, pos_emb, pos_bias, query_pos_bias, *, causal: bool, mask=None) -> None:
    """Raise a clear TypeError/ValueError for inputs the kernels cannot take."""
    named = dict(query=query, key=key, value=value, pos_emb=pos_emb, pos_bias=pos_bias, query_pos_bias=query_pos_bias)
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if query.dim() != 4:
        raise ValueError(f"query must be [L, B, H, d], got shape {tuple(query.shape)}")
    L, B, H, d = query.shape
    if key.dim() != 4 or tuple(key.shape[1:]) != (B, H, d):
        raise ValueError(f"key must be [K, B, H, d] = [K, {B}, {H}, {d}], got shape {tuple(key.shape)}")
    K = key.shape[0]
    if value.shape != key.shape:
        raise ValueError(f"value must be [K, B, H, d] = {list(key.shape)} like key, got shape {tuple(value.shape)}")
    if L == 0 or K == 0:
        raise ValueError(f"rel_attention needs at least one query and one key, got L={L}, K={K}")
    if causal and K < L:
        raise ValueError(f"causal attention needs K = M + L >= L keys (memory first), got K={K} < L={L}")
    W = K + L - 1
    if tuple(pos_emb.shape) != (W, H, d):
        raise ValueError(
            f"pos_emb must be the position window [K + L - 1, H, d] = [{W}, {H}, {d}], got shape {tuple(pos_emb.shape)}"
        )
    if tuple(pos_bias.shape) != (W, H):
        raise ValueError(f"pos_bias must be [K + L - 1, H] = [{W}, {H}], got shape {tuple(pos_bias.shape)}")
    if tuple(query_pos_bias.shape) != (H, d):
        raise ValueError(f"query_pos_bias must be [H, d] = [{H}, {d}], got shape {tuple(query_pos_bias.shape)}")
    if query.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"query must be a floating tensor {_FLOAT_DTYPES}, got {query.dtype}")
    for name, tensor in named.items():
        if tensor.dtype != query.dtype:
            raise TypeError(f"{name} dtype {tensor.dtype} must equal query dtype {query.dtype}")
        if tensor.device != query.device:
            raise ValueError(f"{name} is on {tensor.device} but query is on {query.device}; all inputs must share a device")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = visible), got {getattr(mask, 'dtype', type(mask))}")
        if mask.dim() != 3 or mask.shape[0] not in (1, L) or mask.shape[1] != K or mask.shape[2] not in (1, B):
            raise ValueError(f"mask must be [L or 1, K, B or 1] = [{L}, {K}, {B}], got shape {tuple(mask.shape)}")
        if mask.device != query.device:
            raise ValueError(f"mask is on {mask.device} but query is on {query.device}")


def _visible(L: int, K: int, B: int, causal: bool, mask, device) -> Optional[torch.Tensor]:
    """``[L, K, B, 1]`` bool of the keys each query sees, or None for all."""
    visible = naive.causal_mask(L, K, device)[:, :, None, None] if causal else None
    if mask is not None:
        explicit = mask[..., None]
        visible = explicit if visible is None else visible & explicit
    return visible


def _reference_scores(query, key, pos_emb, pos_bias, query_pos_bias, scale, causal, mask):
    """Scaled, masked scores ``[L, K, B, H]``."""
    scores = naive.relative_scores(query, key, pos_emb, pos_bias, query_pos_bias) * scale
    visible = _visible(query.shape[0], key.shape[0], query.shape[1], causal, mask, query.device)
    return scores if visible is None else scores.masked_fill(~visible, float("-inf"))


def _dropout_multiplier(probs, dropout_p, seed, offset) -> Optional[torch.Tensor]:
    """``keep / (1 - p)`` in the layout of ``probs [L, K, B, H]``, or None without dropout."""
    if dropout_p == 0:
        return None
    return naive.attention_dropout(torch.ones_like(probs), dropout_p, seed, offset)


def reference_forward(query, key, value, pos_emb, pos_bias, query_pos_bias, scale, causal, mask, dropout_p=0.0,
                      seed=0, offset=0):
    """The op by the reference formulas, in the accumulation precision: ``(out, lse)``."""
    compute = lse_dtype(query.dtype)
    q, k, v, pe, pb, u = (t.to(compute) for t in (query, key, value, pos_emb, pos_bias, query_pos_bias))
    scores = _reference_scores(q, k, pe, pb, u, scale, causal, mask)
    lse = torch.logsumexp(scores, dim=1)
    probs = naive.attention_dropout(torch.exp(scores - lse[:, None]), dropout_p, seed, offset)
    out = torch.einsum("ijbh,jbhd->ibhd", probs, v)
    return out.to(query.dtype).contiguous(), lse.permute(1, 2, 0).contiguous()


def reference_backward(grad_out, query, key, value, pos_emb, pos_bias, query_pos_bias, out, lse, scale, causal, mask,
                       dropout_p=0.0, seed=0, offset=0):
    """Gradients of :func:`reference_forward` from the saved ``lse``, written out by hand.

    With dropout ``Z = keep / (1 - p)``: ``dV = (P ⊙ Z)ᵀ dO`` and
    ``dS = P ⊙ (Z ⊙ dO Vᵀ - delta)``, ``delta = rowsum(dO ⊙ O)`` (``O``
    already includes the dropout).
    """
    dtype, compute = query.dtype, lse_dtype(query.dtype)
    go, q, k, v, pe, pb, u, o = (
        t.to(compute) for t in (grad_out, query, key, value, pos_emb, pos_bias, query_pos_bias, out)
    )
    L, K = q.shape[0], k.shape[0]
    probs = torch.exp(_reference_scores(q, k, pe, pb, u, scale, causal, mask) - lse.to(compute).permute(2, 0, 1)[:, None])
    grad_probs = torch.einsum("ibhd,jbhd->ijbh", go, v)
    multiplier = _dropout_multiplier(probs, dropout_p, seed, offset)
    if multiplier is not None:
        grad_probs = grad_probs * multiplier
    grad_value = torch.einsum("ijbh,ibhd->jbhd", probs if multiplier is None else probs * multiplier, go)
    delta = (go * o).sum(-1)  # [L, B, H]
    grad_scores = probs * (grad_probs - delta[:, None]) * scale
    grad_content_query = torch.einsum("ijbh,jbhd->ibhd", grad_scores, k)
    grad_key = torch.einsum("ijbh,ibhd->jbhd", grad_scores, q + u)
    # Scatter each (i, j) onto its window row r = L - 1 - i + j.
    rows = (L - 1 - torch.arange(L, device=q.device)[:, None]) + torch.arange(K, device=q.device)[None, :]
    grad_rows = grad_scores.new_zeros(L, K + L - 1, *grad_scores.shape[2:])
    grad_rows.scatter_add_(1, rows[:, :, None, None].expand_as(grad_scores), grad_scores)
    grad_query = grad_content_query + torch.einsum("irbh,rhd->ibhd", grad_rows, pe)
    grad_pos_emb = torch.einsum("irbh,ibhd->rhd", grad_rows, q)
    grad_pos_bias = grad_rows.sum(dim=(0, 2))
    grad_query_pos_bias = grad_content_query.sum(dim=(0, 1))
    grads = (grad_query, grad_key, grad_value, grad_pos_emb, grad_pos_bias, grad_query_pos_bias)
    return tuple(g.to(dtype).contiguous() for g in grads)


lib.impl("rel_attention", reference_forward, "CompositeExplicitAutograd")
lib.impl("rel_attention_backward", reference_backward, "CompositeExplicitAutograd")


@torch.library.register_fake(qualname("rel_attention"))
def _rel_attention_fake(query, key, value, pos_emb, pos_bias, query_pos_bias, scale, causal, mask, dropout_p=0.0,
                        seed=0, offset=0):
    check_inputs(query, key, value, pos_emb, pos_bias, query_pos_bias, causal=causal, mask=mask)
    L, B, H, _ = query.shape
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    return out, query.new_empty((B, H, L), dtype=lse_dtype(query.dtype))


@torch.library.register_fake(qualname("rel_attention_backward"))
def _rel_attention_backward_fake(grad_out, query, key, value, pos_emb, pos_bias, query_pos_bias, out, lse, scale,
                                 causal, mask, dropout_p=0.0, seed=0, offset=0):
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format)
        for t in (query, key, value, pos_emb, pos_bias, query_pos_bias)
    )


def _setup_context(ctx, inputs, output):
    query, key, value, pos_emb, pos_bias, query_pos_bias, scale, causal, mask, dropout_p, seed, offset = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(query, key, value, pos_emb, pos_bias, query_pos_bias, out, lse)
    ctx.options = (scale, causal, mask, dropout_p, seed, offset)


def _backward(ctx, grad_out, grad_lse):
    grads = torch.ops.fastformers.rel_attention_backward(grad_out.contiguous(), *ctx.saved_tensors, *ctx.options)
    return (*grads, *([None] * len(ctx.options)))


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("fastformers::rel_attention does not support double backward")


torch.library.register_autograd(qualname("rel_attention"), _backward, setup_context=_setup_context)
torch.library.register_autograd(
    qualname("rel_attention_backward"), _no_double_backward, setup_context=lambda ctx, inputs, output: None
)
# The backward is not registered: autograd calls it with the dtypes the
# forward saved (autocast already applied), and its float32 ``lse`` must not
# be cast down.
_autocast.register("rel_attention")


def _triton_kernel():
    """:mod:`.triton_kernel`, imported on first use so that this module imports without it."""
    try:
        return importlib.import_module(f"{__package__}.triton_kernel")
    except ModuleNotFoundError as error:
        if error.name != f"{__package__}.triton_kernel":
            raise
        raise RuntimeError(
            "fastformers.ops.xl.triton_kernel is missing from this installation: the Triton backend of "
            "rel_attention is unavailable (use backend='reference' or 'cpp')"
        ) from error


def gpu_unsupported_reason(dtype: torch.dtype, head_dim: int, dropout: bool = False,
                           device: Optional[torch.device] = None) -> Optional[str]:
    """Why the Triton kernels do not take a call of ``dtype`` and head dim
    ``head_dim`` (with attention dropout if ``dropout``) on CUDA ``device``
    (None: the current one), saying what to change; None when they do (masks
    never matter: the kernels read them). The answer depends on the GPU's arch:
    each has its own spill-free tiles."""
    return _triton_kernel().gpu_unsupported_reason(dtype, head_dim, dropout, device)


def _cuda_forward(query, key, value, pos_emb, pos_bias, query_pos_bias, scale, causal, mask, dropout_p=0.0, seed=0,
                  offset=0):
    args = (query, key, value, pos_emb, pos_bias, query_pos_bias, scale, causal)
    reason = gpu_unsupported_reason(query.dtype, query.shape[-1], dropout_p > 0, query.device)
    if reason is not None:
        _backend.warn_op_fallback("rel_attention", reason)
        return reference_forward(*args, mask, dropout_p, seed, offset)
    return _triton_kernel().rel_attention_forward(*args, dropout_p, seed, offset, mask)


def _cuda_backward(grad_out, query, key, value, pos_emb, pos_bias, query_pos_bias, out, lse, scale, causal, mask,
                   dropout_p=0.0, seed=0, offset=0):
    args = (grad_out, query, key, value, pos_emb, pos_bias, query_pos_bias, out, lse, scale, causal)
    if gpu_unsupported_reason(query.dtype, query.shape[-1], dropout_p > 0, query.device) is not None:
        return reference_backward(*args, mask, dropout_p, seed, offset)
    return _triton_kernel().rel_attention_backward(*args, dropout_p, seed, offset, mask)


if _backend.triton_available():
    lib.impl("rel_attention", _cuda_forward, "CUDA")
    lib.impl("rel_attention_backward", _cuda_backward, "CUDA")


class _InterpretedTriton(torch.autograd.Function):
    """The Triton kernels on CPU tensors (interpreter), with the same backward as the op."""

    @staticmethod
    def forward(ctx, query, key, value, pos_emb, pos_bias, query_pos_bias, scale, causal, dropout_p, seed, offset,
                mask):
        ctx.options = (scale, causal, dropout_p, seed, offset, mask)
        out, lse = _triton_kernel().rel_attention_forward(
            query, key, value, pos_emb, pos_bias, query_pos_bias, *ctx.options
        )
        ctx.save_for_backward(query, key, value, pos_emb, pos_bias, query_pos_bias, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grads = _triton_kernel().rel_attention_backward(grad_out.contiguous(), *ctx.saved_tensors, *ctx.options)
        return (*grads, *([None] * len(ctx.options)))


def rel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pos_emb: torch.Tensor,
    pos_bias: torch.Tensor,
    query_pos_bias: torch.Tensor,
    scale: float,
    *,
    mask: Optional[torch.Tensor] = None,
    causal: bool = True,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Relative-position attention (Transformer-XL); returns ``[L, B, H, d]``.

    query ``[L, B, H, d]``; key, value ``[K, B, H, d]`` with ``K = M + L``
    (memory first); pos_emb ``[K + L - 1, H, d]`` and pos_bias ``[K + L - 1, H]``
    the window :func:`naive.position_window` cuts from the ``[2P, ...]``
    tables; query_pos_bias ``[H, d]``. ``causal`` lets query ``i`` see keys
    ``j <= M + i``; ``mask`` (bool ``[L or 1, K, B or 1]``, True = visible) is
    applied as well. A query row with no visible key gives NaN, as softmax
    over nothing does (labml_nn's behaviour), on every backend, and so do the
    gradients that flow through that row.

    ``dropout_p`` drops attention probabilities inside the kernels (mask
    layout ``[B, H, L, K]``, bits from :func:`fastformers.ops.dropout.draw`:
    ``seed`` fixes them, None draws from torch's generator, and
    ``dropout.record()`` gives the mask back). Under ``torch.autocast`` every
    floating input is cast to the autocast dtype.

    ``backend`` overrides the backend selection for this call.
    """
    dropout_p = dropout.check_p(dropout_p, "dropout_p")
    if isinstance(query, torch.Tensor):
        query, key, value, pos_emb, pos_bias, query_pos_bias = _autocast.cast(
            query.device.type, query, key, value, pos_emb, pos_bias, query_pos_bias
        )
    check_inputs(query, key, value, pos_emb, pos_bias, query_pos_bias, causal=causal, mask=mask)
    name = _backend.resolve_backend(query.device, backend)
    L, B, H, _ = query.shape
    seed, offset = dropout.draw("rel_attention", dropout_p, (B, H, L, key.shape[0]), query.device, seed=seed)
    if name == "reference":
        return naive.rel_attention(query, key, value, pos_emb, pos_bias, query_pos_bias, scale, mask=mask,
                                   causal=causal, dropout_p=dropout_p, seed=seed, offset=offset)
    if name == "triton" and query.device.type == "cpu":
        return _InterpretedTriton.apply(query, key, value, pos_emb, pos_bias, query_pos_bias, float(scale), causal,
                                        dropout_p, seed, offset, mask)
    out, _ = torch.ops.fastformers.rel_attention(
        query, key, value, pos_emb, pos_bias, query_pos_bias, float(scale), causal, mask, dropout_p, seed, offset
    )
    return out
