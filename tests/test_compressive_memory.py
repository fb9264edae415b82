"""CompressiveMemory (ring buffers) against the cat/split formulation of
labml_nn's merge_compress_memory, step by step, alone and inside the
Compressive language model's training steps."""
import copy

import pytest
import torch

from fastformers.models import build_model, default_model_config
from fastformers.models.language_models import causal_mask
from fastformers.nn import CompressiveMemory, Conv1dCompression
from fastformers.nn.compressive import cat_split_merge
from fastformers.train import cross_entropy


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


def test_segment_of_another_batch_shape_is_refused():
    ring = CompressiveMemory(1, 4, 4, 2)
    ring.append([torch.zeros(2, 3, 4)], [Conv1dCompression(2, 4)])
    with pytest.raises(ValueError, match="start a new memory"):
        ring.append([torch.zeros(2, 2, 4)], [Conv1dCompression(2, 4)])


def test_state_dict_round_trip():
    compress = [Conv1dCompression(2, 4) for _ in range(2)]
    ring = CompressiveMemory(2, 3, 4, 2)
    for _ in range(4):  # both rings wrap
        ring.append([torch.randn(3, 1, 4) for _ in range(2)], compress)
    restored = CompressiveMemory(2, 3, 4, 2)
    restored.load_state_dict(ring.state_dict())
    segment = [torch.randn(3, 1, 4) for _ in range(2)]
    ring.append(segment, compress)
    restored.append(segment, compress)
    for layer in range(2):
        torch.testing.assert_close(torch.cat(restored.history(layer)), torch.cat(ring.history(layer)))
    with pytest.raises(ValueError, match="more than its length"):
        restored.load_state_dict({"mem": [torch.zeros(4, 1, 4)] * 2, "c_mem": []})


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mem_len,c_mem_len,rate,segments", [
    (4, 6, 2, [4] * 7),                # memory full, compressed memory fills and evicts, rings wrap
    (3, 4, 3, [2, 5, 1, 4, 3, 6]),     # ragged segments, odd rate
])
def test_language_model_training_matches_cat_and_split(mem_len, c_mem_len, rate, segments):
    """Training steps of CompressiveLM on its ring buffers against the same
    model stepped the way labml's experiment does it (whole-list memory,
    cat/split merge): logits, losses, every gradient and the memory agree in
    float64, and the reconstruction loss gets the steps that were compressed."""
    config = default_model_config("compressive", 11, d_model=16, heads=2, d_ff=32, n_layers=2, mem_len=mem_len,
                                  c_mem_len=c_mem_len, compression_rate=rate)
    ring_lm = build_model(config).double().train()
    with torch.no_grad():
        for p in ring_lm.parameters():  # the positional tables start at zero: make every term count
            p.normal_(0, 0.3)
    cat_lm = copy.deepcopy(ring_lm)
    layers = list(cat_lm.transformer.layers)
    ring_opt, cat_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (ring_lm, cat_lm))
    seen = []
    loss_of = ring_lm.reconstruction_loss
    ring_lm.reconstruction_loss = lambda h, mem: seen.append([m.clone() for m in mem]) or loss_of(h, mem)
    memory, mem, c_mem = None, [], []
    for steps in segments:
        tokens = torch.randint(0, 11, (steps + 1, 3))
        output = ring_lm(tokens[:-1], memory)
        memory = output.memory
        ring_loss = cross_entropy(output.logits, tokens[1:])

        remembered = (mem[0].shape[0] if mem else 0) + (c_mem[0].shape[0] if c_mem and mem else 0)
        hidden, new_mem = cat_lm.transformer(cat_lm.src_embed(tokens[:-1]), mem, c_mem,
                                             causal_mask(steps, remembered, tokens.device))
        logits = cat_lm.generator(hidden)
        mem, c_mem, old = cat_split_merge(mem, c_mem, new_mem, [layer.compress for layer in layers],
                                          mem_len, c_mem_len, rate)
        cat_loss = cross_entropy(logits, tokens[1:])

        assert (output.logits - logits).abs().max().item() <= 1e-10
        assert abs(ring_loss.item() - cat_loss.item()) <= 1e-10
        assert (output.aux_loss is None) == (not old)
        if old:
            reconstruction = cat_lm.reconstruction_loss(new_mem, old)
            assert abs(output.aux_loss.item() - reconstruction.item()) <= 1e-10
            assert all(torch.equal(got, want) for got, want in zip(seen.pop(), old))
            ring_loss, cat_loss = ring_loss + output.aux_loss, cat_loss + reconstruction
        for lm, opt, loss in ((ring_lm, ring_opt, ring_loss), (cat_lm, cat_opt, cat_loss)):
            opt.zero_grad()
            loss.backward()
        for (name, p), q in zip(ring_lm.named_parameters(), cat_lm.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            assert p.grad is None or (p.grad - q.grad).abs().max().item() <= 1e-10, name
        ring_opt.step()
        cat_opt.step()
        for layer in range(config.n_layers):
            assert torch.equal(memory.mem(layer), mem[layer]) if mem[layer].shape[0] else memory.mem(layer) is None
            if c_mem:
                assert (memory.c_mem(layer) - c_mem[layer]).abs().max().item() <= 1e-10
    assert not seen
