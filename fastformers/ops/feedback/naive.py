"""Plain-PyTorch reference of the feedback-memory ops: the oracle of tests and
the baseline of benchmarks."""
import torch

from ..dropout import naive as dropout_naive


def feedback_memory(layer_outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Softmax-weighted sum of layer outputs, ``m = Σ_l softmax(w)_l · x_l``.

    layer_outputs: ``[L, B, D]`` (embedding plus each layer's output; any
    trailing shape works), weights: ``[L]`` logits. Returns ``[B, D]``.
    """
    return torch.tensordot(torch.softmax(weights, dim=0), layer_outputs, dims=([0], [0]))


def feedback_memory_backward(grad: torch.Tensor, layer_outputs: torch.Tensor, weights: torch.Tensor):
    """Gradients of :func:`feedback_memory` for ``layer_outputs`` and ``weights``."""
    probs = torch.softmax(weights, dim=0)
    grad_layer_outputs = probs.view(-1, *([1] * grad.dim())) * grad.unsqueeze(0)
    grad_probs = (layer_outputs * grad.unsqueeze(0)).flatten(1).sum(1)
    grad_weights = probs * (grad_probs - (probs * grad_probs).sum())
    return grad_layer_outputs, grad_weights


def feedback_attention_step(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    steps: int,
    key_pos_embeddings: torch.Tensor,
    key_pos_bias: torch.Tensor,
    query_pos_bias: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
) -> torch.Tensor:
    """One attention step of the Feedback Transformer over ``steps`` cached memory steps.

    ``query`` ``[B, H, d]``; ``key_cache``/``value_cache`` ``[T_max, B, H, d]``
    (entries ``0 .. steps-1`` are used); ``key_pos_embeddings`` ``[P, H, d]`` and
    ``key_pos_bias`` ``[P, H]`` (their last ``steps`` rows are used, the last row
    for the most recent step); ``query_pos_bias`` ``[H, d]``. Returns ``[B, H, d]``:
    ``Σ_j dropout(softmax_j(((q + u)·K_j + q·R_j + S_j) · scale)) V_j``.

    Dropout of the probabilities (``dropout_p > 0``): probability ``(b, h, j)``
    is element ``(b · H + h) · steps + j`` of the ``(seed, offset)`` stream
    (mask layout ``[B, H, steps]``, see :func:`attention_keep_scale`).
    """
    key, value = key_cache[:steps], value_cache[:steps]
    pos_emb, pos_bias = key_pos_embeddings[-steps:], key_pos_bias[-steps:]
    scores = torch.einsum("bhd,jbhd->jbh", query + query_pos_bias, key)
    scores = scores + torch.einsum("bhd,jhd->jbh", query, pos_emb) + pos_bias[:, None, :]
    attn = torch.softmax(scores * scale, dim=0)
    keep_scale = attention_keep_scale(query, steps, dropout_p, seed, offset)
    if keep_scale is not None:
        attn = attn * keep_scale
    return torch.einsum("jbh,jbhd->bhd", attn, value)


def attention_keep_scale(query: torch.Tensor, steps: int, dropout_p: float, seed: int, offset: int):
    """Multipliers ``[steps, B, H]`` (``1/(1-p)`` kept, 0 dropped) of one step's
    probabilities from the ``[B, H, steps]`` mask; None without dropout."""
    if dropout_p == 0:
        return None
    B, H, _ = query.shape
    keep = dropout_naive.keep_mask(seed, offset, B * H * steps, dropout_p, query.device).view(B, H, steps)
    return (keep.to(query.dtype) * (1.0 / (1.0 - dropout_p))).permute(2, 0, 1)


def feedback_attention_step_backward(
    grad: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    steps: int,
    key_pos_embeddings: torch.Tensor,
    key_pos_bias: torch.Tensor,
    query_pos_bias: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
):
    """Gradients of :func:`feedback_attention_step` for the rows it used:
    ``(query [B, H, d], key [steps, B, H, d], value [steps, B, H, d],
    key_pos_embeddings [steps, H, d], key_pos_bias [steps, H], query_pos_bias [H, d])``."""
    key, value = key_cache[:steps], value_cache[:steps]
    pos_emb, pos_bias = key_pos_embeddings[-steps:], key_pos_bias[-steps:]
    shifted_query = query + query_pos_bias
    scores = torch.einsum("bhd,jbhd->jbh", shifted_query, key)
    scores = scores + torch.einsum("bhd,jhd->jbh", query, pos_emb) + pos_bias[:, None, :]
    attn = torch.softmax(scores * scale, dim=0)
    grad_attn = torch.einsum("bhd,jbhd->jbh", grad, value)
    kept_attn = attn
    keep_scale = attention_keep_scale(query, steps, dropout_p, seed, offset)
    if keep_scale is not None:
        grad_attn = grad_attn * keep_scale
        kept_attn = attn * keep_scale
    grad_scores = attn * (grad_attn - (attn * grad_attn).sum(0, keepdim=True)) * scale
    grad_query = torch.einsum("jbh,jbhd->bhd", grad_scores, key) + torch.einsum("jbh,jhd->bhd", grad_scores, pos_emb)
    grad_key = torch.einsum("jbh,bhd->jbhd", grad_scores, shifted_query)
    grad_value = torch.einsum("jbh,bhd->jbhd", kept_attn, grad)
    grad_pos_emb = torch.einsum("jbh,bhd->jhd", grad_scores, query)
    grad_pos_bias = grad_scores.sum(1)
    grad_query_pos_bias = torch.einsum("jbh,jbhd->hd", grad_scores, key)
    return grad_query, grad_key, grad_value, grad_pos_emb, grad_pos_bias, grad_query_pos_bias
