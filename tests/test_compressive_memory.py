"""CompressiveMemory (ring buffers) against the cat/split formulation of
labml_nn's merge_compress_memory, step by step."""
import pytest
import torch

from fastformers.nn import CompressiveMemory, Conv1dCompression


def cat_split_merge(mem, c_mem, new_mem, compress, mem_len, c_mem_len, rate):
    """The whole-history formulation: append, compress the oldest whole groups
    beyond mem_len, keep the last c_mem_len compressed steps."""
    mem = [torch.cat((m, n)) for m, n in zip(mem, new_mem)] if mem else list(new_mem)
    if mem[0].shape[0] <= mem_len:
        return mem, c_mem, []
    n_old = (mem[0].shape[0] - mem_len + rate - 1) // rate * rate
    old = [m[:n_old] for m in mem]
    mem = [m[n_old:] for m in mem]
    fresh = [f(o) for f, o in zip(compress, old)]
    c_mem = [torch.cat((c, f)) for c, f in zip(c_mem, fresh)] if c_mem else fresh
    c_mem = [c[-c_mem_len:] for c in c_mem] if c_mem_len else []
    return mem, c_mem, old


def _as_list(get, n_layers):
    return [get(i) for i in range(n_layers)]


@pytest.mark.parametrize("mem_len,c_mem_len,rate,segments", [
    (8, 128, 2, [8] * 6),           # labml's experiment: seq 8, mem 8, c_mem 128, rate 2
    (8, 6, 2, [3, 5, 1, 8, 2, 7, 4]),  # ragged segments, rings wrap, compressed memory evicts
    (5, 4, 3, [2, 4, 9, 1, 3, 6]),  # odd rate, segment longer than the memory
    (0, 4, 2, [4, 2, 6]),           # compressed memory only
    (6, 0, 2, [4, 4, 5]),           # no compressed memory
])
def test_ring_buffer_matches_cat_and_split(mem_len, c_mem_len, rate, segments):
    torch.manual_seed(0)
    n_layers, batch, d_model = 2, 3, 8
    compress = [Conv1dCompression(rate, d_model) for _ in range(n_layers)]
    ring = CompressiveMemory(n_layers, mem_len, c_mem_len, rate)
    mem, c_mem = [], []
    for steps in segments:
        new_mem = [torch.randn(steps, batch, d_model) for _ in range(n_layers)]
        with torch.no_grad():
            mem, c_mem, expected_old = cat_split_merge(mem, c_mem, new_mem, compress, mem_len, c_mem_len, rate)
        old = ring.append(new_mem, compress)
        assert len(old) == len(expected_old)
        for got, want in zip(old, expected_old):
            torch.testing.assert_close(got, want)
        for layer in range(n_layers):
            got_mem, got_c_mem = ring.mem(layer), ring.c_mem(layer)
            if mem[layer].shape[0] == 0:
                assert got_mem is None
            else:
                torch.testing.assert_close(got_mem, mem[layer])
            if not c_mem or c_mem[layer].shape[0] == 0:
                assert got_c_mem is None
            else:
                torch.testing.assert_close(got_c_mem, c_mem[layer])
                assert not got_c_mem.requires_grad


def test_returned_steps_survive_later_writes():
    ring = CompressiveMemory(1, 4, 4, 2)
    compress = [Conv1dCompression(2, 4)]
    ring.append([torch.zeros(4, 1, 4)], compress)
    old = ring.append([torch.ones(4, 1, 4)], compress)
    ring.append([torch.full((4, 1, 4), 2.0)], compress)
    torch.testing.assert_close(old[0], torch.zeros(4, 1, 4))


def test_bad_arguments():
    with pytest.raises(ValueError, match="compression_rate >= 1"):
        CompressiveMemory(2, 8, 8, 0)
    ring = CompressiveMemory(2, 8, 8, 2)
    with pytest.raises(ValueError, match="one segment and one compression per layer"):
        ring.append([torch.zeros(2, 1, 4)], [Conv1dCompression(2, 4)])
