"""The shared Philox 4x32-10 dropout generator: C++, Triton (interpreter) and
the Python reference give the same keep bits; known-answer vector; rates."""
import math

import pytest
import torch

from fastformers import _backend
from fastformers.ops import dropout
from fastformers.ops.dropout import naive

needs_cpp = pytest.mark.skipif(not _backend.extension_available(), reason="needs the C++ extension")

CASES = [(0, 0, 0.1), (2**62 + 12345, 7, 0.5), (123, 2**33 + 3, 0.9), (2**63 - 1, 5, 0.3)]


def test_known_answer():
    # Random123's kat_vectors: philox4x32_10, counter 0, key 0.
    words = naive.philox4x32_10(torch.tensor([0]), 0)[:, 0].tolist()
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@needs_cpp
@pytest.mark.parametrize("seed,offset,p", CASES)
def test_cpp_equals_reference(seed, offset, p):
    like = torch.empty(3, 1001)
    got = torch.ops.fastformers.dropout_keep_mask(like, seed, offset, p)
    assert torch.equal(got, naive.keep_mask(seed, offset, like.numel(), p).view(like.shape))


@pytest.mark.parametrize("seed,offset,p", CASES)
def test_triton_equals_reference(triton_interpreter, seed, offset, p):
    from fastformers.ops.dropout import triton_kernel

    got = triton_kernel.keep_mask(2053, seed, offset, p, "cpu")
    assert torch.equal(got, naive.keep_mask(seed, offset, 2053, p))


@needs_cpp
def test_offset_shifts_the_stream():
    like = torch.empty(4096)
    whole = torch.ops.fastformers.dropout_keep_mask(like, 99, 0, 0.5)
    tail = torch.ops.fastformers.dropout_keep_mask(like[:4000], 99, 96, 0.5)
    assert torch.equal(whole[96:], tail)


@needs_cpp
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_within_binomial_bounds(p):
    n = 1 << 22
    kept = torch.ops.fastformers.dropout_keep_mask(torch.empty(n), 5, 0, p).sum().item()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) < 6 * sigma


def test_p_zero_keeps_everything():
    assert naive.keep_mask(1, 0, 1000, 0.0).all()


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan"), 2])
def test_bad_p(p):
    with pytest.raises(ValueError, match="dropout_p"):
        dropout.check_p(p)


def test_seeds_follow_manual_seed_and_advance():
    torch.manual_seed(3)
    first = dropout.next_seed_offset(torch.device("cpu"), 10)
    second = dropout.next_seed_offset(torch.device("cpu"), 10)
    torch.manual_seed(3)
    assert dropout.next_seed_offset(torch.device("cpu"), 10) == first
    assert first != second


def test_record_gives_back_the_mask():
    with dropout.record() as calls:
        seed, offset = dropout.draw("demo", 0.25, (4, 5), torch.device("cpu"))
    assert len(calls) == 1 and calls[0].shape == (4, 5)
    assert torch.equal(calls[0].mask(), naive.keep_mask(seed, offset, 20, 0.25).view(4, 5))
