"""Benchmarks shared by ``fastformers bench`` and the pytest-benchmark suite in
``bench/``, laid out like :mod:`fastformers.ops`: one module per op family
(``feedback``, ``xl``, ``compressive``, ``switch``) on the shared harness in
``timing``; ``lm`` and ``training`` time whole language models, ``gpu`` is
``fastformers bench --device cuda``.

Every case times the labml-style reference and each fused backend in the same
process, one after the other, so only ratios are meaningful.
"""
from .compressive import attention_reconstruction_loss_cases, compressive_model_cases, conv_compress_cases
from .feedback import feedback_attention_step_cases, feedback_memory_cases, feedback_model_cases
from .switch import switch_cases, switch_hf_cases
from .xl import rel_attention_cases

# ``fastformers bench OP``: the case builders, by op name
ALL_CASES = {
    "feedback_memory": feedback_memory_cases,
    "feedback_attention_step": feedback_attention_step_cases,
    "feedback_model": feedback_model_cases,
    "conv_compress": conv_compress_cases,
    "attention_reconstruction_loss": attention_reconstruction_loss_cases,
    "rel_attention": rel_attention_cases,
    "compressive_model": compressive_model_cases,
    "switch": switch_cases,
    "switch_hf": switch_hf_cases,
}
