"""Plain-PyTorch references of the Compressive Transformer ops: the oracle of
tests and the baseline of benchmarks, written the way labml_nn computes them.

Shape letters: ``M`` memory length, ``G = M / c`` compressed length, ``c``
compression rate, ``L`` query (segment) length, ``B`` batch, ``H`` heads,
``d_k`` features per head, ``D = H · d_k``.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def conv_compress(mem: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``Conv1d(D, D, kernel=stride=c)`` over time, as labml_nn runs it (permute,
    ``conv1d``, permute back): ``mem [M, B, D]``, ``weight [D, D, c]``, ``bias [D]``
    -> ``[M / c, B, D]``."""
    stride = weight.shape[2]
    return F.conv1d(mem.permute(1, 2, 0), weight, bias, stride=stride).permute(2, 0, 1)


def conv_compress_backward(grad: torch.Tensor, mem: torch.Tensor, weight: torch.Tensor, has_bias: bool):
    """Gradients of :func:`conv_compress` for ``mem``, ``weight`` and ``bias``
    (an empty tensor when there is no bias)."""
    c = weight.shape[2]
    M, B, D = mem.shape
    G = M // c
    # out[g, b, o] = bias[o] + Σ_{k, i} mem[g·c + k, b, i] · weight[o, i, k]
    grouped = mem.reshape(G, c, B, D)
    grad_mem = torch.einsum("gbo,oik->gkbi", grad, weight).reshape(M, B, D)
    grad_weight = torch.einsum("gbo,gkbi->oik", grad, grouped)
    grad_bias = grad.sum((0, 1)) if has_bias else grad.new_empty(0)
    return grad_mem, grad_weight, grad_bias


def _layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _heads(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], heads: int) -> torch.Tensor:
    return F.linear(x, weight, bias).view(*x.shape[:-1], heads, -1)


def _attention(query, key, value, scale):
    """Content-only softmax attention: ``[L, B, H, d_k]`` queries over ``[K, B, H, d_k]``."""
    scores = torch.einsum("ibhd,jbhd->ijbh", query, key) * scale
    return torch.einsum("ijbh,jbhd->ibhd", torch.softmax(scores, dim=1), value)


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
) -> torch.Tensor:
    """``MSE(attn(LN(h), LN(c_mem)), attn(LN(h), LN(mem)))``, labml_nn's formulation.

    ``h [L, B, D]`` (the layer's input), ``mem [M, B, D]`` (the memory being
    compressed), ``c_mem [N, B, D]`` (its compression). The layer norm and the
    query/key/value projections (weights ``[D, D]``, biases ``[D]``) are the
    layer's, detached like ``h`` and ``mem``: only ``c_mem`` gets a gradient.
    Returns a scalar.
    """
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    norm_weight, norm_bias = detach(norm_weight), detach(norm_bias)
    wq, bq, wk, bk, wv, bv = map(detach, (query_weight, query_bias, key_weight, key_bias, value_weight, value_bias))
    h = _layer_norm(h.detach(), norm_weight, norm_bias, eps)
    mem = _layer_norm(mem.detach(), norm_weight, norm_bias, eps)
    c_mem = _layer_norm(c_mem, norm_weight, norm_bias, eps)
    query = _heads(h, wq, bq, heads)
    attn_mem = _attention(query, _heads(mem, wk, bk, heads), _heads(mem, wv, bv, heads), scale)
    attn_c_mem = _attention(query, _heads(c_mem, wk, bk, heads), _heads(c_mem, wv, bv, heads), scale)
    return F.mse_loss(attn_c_mem, attn_mem)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_reconstruction_loss_forward(
    h, mem, c_mem, norm_weight, norm_bias, eps, query_weight, query_bias, key_weight, key_bias, value_weight,
    value_bias, heads, scale,
):
    """The loss plus what its backward needs, as the registered op returns them.

    Returns ``loss []`` (``h``'s dtype) and, in float32 (float64 for float64
    inputs): ``query [L, B, E]`` (projected, unscaled), ``key_c`` and
    ``value_c [N, B, E]``, ``diff = attn(h, c_mem) - attn(h, mem)`` as
    ``[L, B, E]`` and ``stats [2, L, B, H]``: the log-sum-exp of the scaled
    ``h``-vs-``c_mem`` scores and ``Σ_d diff · attn(h, c_mem)``.
    """
    acc = _acc_dtype(h.dtype)
    cast = lambda t: None if t is None else t.to(acc)  # noqa: E731
    norm_weight, norm_bias = cast(norm_weight), cast(norm_bias)
    normed = [_layer_norm(x.to(acc), norm_weight, norm_bias, eps) for x in (h, mem, c_mem)]
    query = F.linear(normed[0], cast(query_weight), cast(query_bias))
    key_m, key_c = (F.linear(x, cast(key_weight), cast(key_bias)) for x in normed[1:])
    value_m, value_c = (F.linear(x, cast(value_weight), cast(value_bias)) for x in normed[1:])
    split = lambda t: t.view(*t.shape[:-1], heads, -1)  # noqa: E731
    attn_mem = _attention(split(query), split(key_m), split(value_m), scale)
    scores_c = torch.einsum("ibhd,jbhd->ijbh", split(query), split(key_c)) * scale
    attn_c_mem = torch.einsum("ijbh,jbhd->ibhd", torch.softmax(scores_c, dim=1), split(value_c))
    diff = attn_c_mem - attn_mem
    stats = torch.stack((torch.logsumexp(scores_c, dim=1), (diff * attn_c_mem).sum(-1)))
    loss = diff.square().mean().to(h.dtype)
    return loss, query, key_c, value_c, diff.flatten(2), stats


def attention_reconstruction_loss_backward(
    grad, c_mem, norm_weight, norm_bias, eps, key_weight, value_weight, heads, scale, query, key_c, value_c, diff,
    stats,
):
    """Gradient of the loss for ``c_mem [N, B, D]`` from the forward's residuals."""
    acc = query.dtype
    split = lambda t: t.view(*t.shape[:-1], heads, -1)  # noqa: E731
    query, key_c, value_c, diff = map(split, (query, key_c, value_c, diff))
    lse, delta = stats
    coef = grad.to(acc) * 2 / diff.numel()
    probs = torch.exp(torch.einsum("ibhd,jbhd->ijbh", query, key_c) * scale - lse[:, None])
    grad_attn = coef * diff
    grad_value = torch.einsum("ijbh,ibhd->jbhd", probs, grad_attn)
    grad_scores = probs * (torch.einsum("ibhd,jbhd->ijbh", grad_attn, value_c) - coef * delta[:, None])
    grad_key = torch.einsum("ijbh,ibhd->jbhd", grad_scores, query) * scale
    grad_normed = grad_key.flatten(2) @ key_weight.to(acc) + grad_value.flatten(2) @ value_weight.to(acc)
    x = c_mem.to(acc)
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    x_hat = (x - mean) * rstd
    g = grad_normed if norm_weight is None else grad_normed * norm_weight.to(acc)
    grad_c_mem = rstd * (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True))
    return grad_c_mem.to(c_mem.dtype)
