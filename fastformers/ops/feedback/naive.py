"""Plain-PyTorch reference of the feedback-memory ops: the oracle of tests and
the baseline of benchmarks."""
import torch


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
