"""Functions run on every rank by tests/test_distributed.py (through
fastformers.testing.distributed.run_workers, which has joined the gloo group)."""
import copy
import time
import traceback

import torch
import torch.distributed as dist

from fastformers.distributed import (
    ExpertParallelSwitchFeedForward,
    gather_expert_state_dict,
    scatter_expert_state_dict,
)
from fastformers.nn import FeedForward, SwitchFeedForward

D_MODEL, D_FF = 6, 5

# (name, capacity_factor, drop_tokens, router bias): "balanced" spreads the tokens;
# "no_tokens" keeps every token off the last expert; "dropping" sends ~all tokens to
# expert 0 with a small capacity, so most are dropped and the other experts get none.
ROUTING_CASES = [
    ("balanced", 2.0, False, None),
    ("no_tokens", 1.5, True, {-1: -50.0}),
    ("dropping", 1.0, True, {0: 3.0}),
]


def run_all(calls):
    """Each ``[function name, kwargs]`` in turn, in one set of processes (each start costs
    seconds); a failure is returned as its traceback and the next calls still run."""
    results = []
    for name, kwargs in calls:
        try:
            results.append({"value": globals()[name](**kwargs)})
        except Exception:  # noqa: BLE001 - reported to the test, which fails on it
            results.append({"error": traceback.format_exc()})
    return results


def _single_process_switch(n_experts, capacity_factor, drop_tokens, bias, is_scale_prob):
    torch.manual_seed(n_experts)  # the same weights on every rank
    module = SwitchFeedForward(capacity_factor=capacity_factor, drop_tokens=drop_tokens,
                               is_scale_prob=is_scale_prob, n_experts=n_experts,
                               expert=FeedForward(D_MODEL, D_FF, 0.0), d_model=D_MODEL).double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.5)
        for expert, value in (bias or {}).items():
            module.switch.bias[expert] = value
    return module


def _run(module, x, grad_out):
    x = x.clone().requires_grad_()
    torch.manual_seed(7)  # labml's drop policy draws randperm from the global generator
    out, counts, route_prob_sum, n_dropped, p_max = module(x)
    out.backward(grad_out)
    return out, counts, route_prob_sum, n_dropped, p_max, x.grad


def equivalence(n_experts_options, backends):
    """Compare, on this rank, the expert-parallel module with the single-process one holding all
    experts, then round-trip its checkpoint; returns the checks made (each raises on mismatch)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    checks = []
    for n_experts in n_experts_options:
        for name, capacity_factor, drop_tokens, bias in ROUTING_CASES:
            for backend in backends:
                single = _single_process_switch(n_experts, capacity_factor, drop_tokens, bias, is_scale_prob=True)
                parallel = ExpertParallelSwitchFeedForward.from_switch(copy.deepcopy(single))
                single.backend = parallel.backend = backend
                generator = torch.Generator().manual_seed(100 + rank)
                # a different number of tokens on every rank
                x = torch.randn(3 + rank, 2, D_MODEL, dtype=torch.float64, generator=generator)
                grad_out = torch.randn(x.shape, dtype=torch.float64, generator=generator)
                expected = _run(single, x, grad_out)
                got = _run(parallel, x, grad_out)
                label = f"rank {rank} E={n_experts} {name} {backend}"
                if name == "no_tokens":
                    assert expected[1][-1] == 0, f"{label}: the last expert should get no tokens"
                if name == "dropping":
                    assert expected[3] > 0, f"{label}: tokens should be dropped"
                for what, want, have in zip(("out", "counts", "route_prob_sum", "n_dropped", "p_max", "grad x"),
                                            expected, got):
                    if isinstance(want, torch.Tensor):
                        torch.testing.assert_close(have, want, rtol=1e-12, atol=1e-12, msg=f"{label}: {what}")
                    else:
                        assert have == want, f"{label}: {what} {have} != {want}"
                torch.testing.assert_close(parallel.switch.weight.grad, single.switch.weight.grad, rtol=1e-12,
                                           atol=1e-12, msg=f"{label}: router gradient")
                # an owned expert's gradient is the sum over ranks of the single-process ones
                # (single stores its experts stacked: row e of each stacked gradient)
                for param_name, parameter in single.named_parameters():
                    if not param_name.startswith("switch."):
                        dist.all_reduce(parameter.grad)
                stacked_grads = [p.grad for n, p in single.named_parameters() if not n.startswith("switch.")]
                for local, expert in enumerate(parallel.experts):
                    e = parallel.first_expert + local
                    for (param_name, have), want in zip(expert.named_parameters(), stacked_grads):
                        torch.testing.assert_close(have.grad, want[e], rtol=1e-12, atol=1e-12,
                                                   msg=f"{label}: expert {e} {param_name}")
                # what rank s sent to rank r is what r received from s
                sent = torch.tensor(parallel.last_send_splits)
                received = torch.empty_like(sent)
                dist.all_to_all_single(received, sent)
                assert received.tolist() == parallel.last_receive_splits, label
                checks.append(label)
        checkpoint_round_trip(n_experts)
        checks.append(f"rank {rank} E={n_experts} checkpoint round trip")
    return checks


def checkpoint_round_trip(n_experts):
    """Gather the shards into the single-process layout and scatter them back."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    single = _single_process_switch(n_experts, 1.0, True, None, is_scale_prob=False)
    parallel = ExpertParallelSwitchFeedForward.from_switch(copy.deepcopy(single))
    shard = parallel.state_dict()
    assert sorted(k for k in shard if k.startswith("experts.")) == sorted(
        f"experts.{i}.{name}" for i in range(n_experts // world_size) for name in ("layer1.weight", "layer1.bias",
                                                                                  "layer2.weight", "layer2.bias"))
    full = gather_expert_state_dict(shard)
    if rank == 0:
        expected = single.state_dict()
        assert list(full) == list(expected) or sorted(full) == sorted(expected), (sorted(full), sorted(expected))
        for key, value in expected.items():
            assert torch.equal(full[key], value), key
        # what a user loads into the labml-compatible module
        SwitchFeedForward(capacity_factor=1.0, drop_tokens=True, is_scale_prob=False, n_experts=n_experts,
                          expert=FeedForward(D_MODEL, D_FF, 0.0), d_model=D_MODEL).double().load_state_dict(full)
    fresh = ExpertParallelSwitchFeedForward(capacity_factor=1.0, drop_tokens=True, is_scale_prob=False,
                                            n_experts=n_experts, expert=FeedForward(D_MODEL, D_FF, 0.0),
                                            d_model=D_MODEL).double()
    fresh.load_state_dict(scatter_expert_state_dict(full))
    for key, value in shard.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def configuration_errors():
    """The errors of a capacity factor that differs between ranks and of E not divisible by W."""
    return [mismatched_configuration(), indivisible_experts()]


def mismatched_configuration():
    """Rank 1 builds its layer with a different capacity factor."""
    rank = dist.get_rank()
    try:
        ExpertParallelSwitchFeedForward(capacity_factor=1.0 + rank, drop_tokens=True, is_scale_prob=True,
                                        n_experts=4, expert=FeedForward(D_MODEL, D_FF, 0.0), d_model=D_MODEL)
    except ValueError as error:
        return str(error)
    return None


def indivisible_experts():
    try:
        ExpertParallelSwitchFeedForward(capacity_factor=1.0, drop_tokens=True, is_scale_prob=True,
                                        n_experts=3, expert=FeedForward(D_MODEL, D_FF, 0.0), d_model=D_MODEL)
    except ValueError as error:
        return str(error)
    return None


def one_rank_fails(stall):
    """Rank 1 raises before the exchange (after sleeping ``stall`` seconds, past the group timeout);
    rank 0 must end with a clear error instead of waiting forever."""
    rank = dist.get_rank()
    module = ExpertParallelSwitchFeedForward(capacity_factor=1.0, drop_tokens=False, is_scale_prob=True,
                                             n_experts=4, expert=FeedForward(D_MODEL, D_FF, 0.0), d_model=D_MODEL)
    if rank == 1:
        if stall:
            time.sleep(stall)
        raise RuntimeError("rank 1 fails on purpose")
    module(torch.randn(4, 2, D_MODEL))
    return "rank 0 finished"


def training(text_path, out):
    """Two-rank training of tiny models (Switch with sharded experts, Transformer-XL with
    replicated weights and carried memory): the loss falls, the replicas stay identical,
    the checkpoint holds the single-process model, and resuming continues exactly."""
    from fastformers.train import Trainer, default_train_config, load_checkpoint, model_from_checkpoint

    rank = dist.get_rank()
    report = {}
    for model, expert_parallel in (("switch", True), ("xl", False)):
        def trainer(directory, **overrides):
            settings = dict(data=text_path, out=f"{out}/{directory}", seq_len=8, batch_size=4, optimizer="adamw",
                            lr=3e-3, warmup=1, eval_interval=1000, eval_batches=2, checkpoint_interval=1000,
                            expert_parallel=expert_parallel, dist_timeout=30.0)
            settings.update(overrides)
            return Trainer.start(default_train_config(model, **settings), log=lambda line: None,
                                 d_model=16, heads=2, d_ff=32, n_layers=2, mem_len=8, n_experts=4, dropout=0.1)

        learner = trainer(f"{model}-learn", steps=40)
        before = learner.evaluate()
        after = learner.run(progress=False)["valid"][-1][1]
        assert after < before - 0.3, (model, before, after)
        replicated = {name: p for name, p in learner.model.named_parameters() if name not in learner.expert_names}
        for name, parameter in replicated.items():
            copies = [torch.empty_like(parameter) for _ in range(dist.get_world_size())]
            dist.all_gather(copies, parameter.detach())
            assert all(torch.equal(copies[0], c) for c in copies), f"{model}: {name} differs between ranks"
        if rank == 0:
            payload = load_checkpoint(f"{out}/{model}-learn/checkpoint.pt")
            single = model_from_checkpoint(payload)  # the labml-layout model, all experts
            assert sum(p.numel() for p in single.parameters()) > sum(p.numel() for p in learner.model.parameters()) \
                or not expert_parallel

        uninterrupted = trainer(f"{model}-a", steps=3, checkpoint_interval=3, eval_interval=2)
        uninterrupted.run(progress=False)
        expected = [uninterrupted.train_step() for _ in range(3)]
        dist.barrier()  # rank 0 has written the checkpoint
        resumed = Trainer.resume(f"{out}/{model}-a/checkpoint.pt", log=lambda line: None)
        assert resumed.step == 3
        got = [resumed.train_step() for _ in range(3)]
        assert got == expected, (model, got, expected)
        for ours, theirs in zip(resumed.model.parameters(), uninterrupted.model.parameters()):
            assert torch.equal(ours, theirs), model
        report[model] = [before, after]
    return report
