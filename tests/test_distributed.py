"""Expert parallelism and multi-process training on gloo over loopback.

Every case runs W fresh processes through ``run_workers``, which kills them at
its deadline, so a hang fails the test instead of stalling the suite. The
workers' code is in ``distributed_workers.py``.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from fastformers.testing.distributed import run_workers
from fastformers.train import CheckpointError, Trainer, default_train_config, load_checkpoint

from lm_helpers import TINY_MODEL, sample_text

TESTS = str(Path(__file__).resolve().parent)


def run(target, world_size, timeout=120, group_timeout=30, **kwargs):
    return run_workers(f"distributed_workers:{target}", world_size, timeout=timeout, group_timeout=group_timeout,
                       kwargs=kwargs, python_path=[TESTS])


def assert_all_succeeded(results):
    for result in results:
        assert result.returncode == 0, f"rank {result.rank} (returncode {result.returncode}):\n{result.stderr[-4000:]}"


def equivalence_args(backends):
    return {"n_experts_options": [4, 8], "backends": backends}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The two-rank cases in one pair of processes: {call: [rank 0's value, rank 1's value]}."""
    out = tmp_path_factory.mktemp("two_ranks")
    text = out / "text.txt"
    text.write_text(sample_text(20_000), encoding="utf-8")
    calls = [["equivalence", equivalence_args(["cpp", "reference"])], ["configuration_errors", {}],
             ["training", {"text_path": str(text), "out": str(out)}]]
    results = run("run_all", 2, timeout=300, calls=calls)
    assert_all_succeeded(results)
    values = {}
    for index, (name, _) in enumerate(calls):
        per_rank = [result.value[index] for result in results]
        values[name] = [entry.get("value") for entry in per_rank], \
            "\n".join(f"rank {rank}: {entry['error']}" for rank, entry in enumerate(per_rank) if "error" in entry)
    return values


def two_rank_values(two_ranks, name):
    values, errors = two_ranks[name]
    assert not errors, errors
    return values


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_each_rank_matches_the_single_process_module(world_size, request):
    """float64, E in {4, 8}: outputs, statistics and input/router gradients per rank, expert
    gradients summed over ranks, with an expert no token reaches and with dropping; then the
    sharded checkpoint gathered into the labml layout and scattered back. Both backends at W = 2."""
    backends = ["cpp", "reference"] if world_size == 2 else ["cpp"]
    if world_size == 2:
        values = two_rank_values(request.getfixturevalue("two_ranks"), "equivalence")
    else:
        results = run("equivalence", world_size, **equivalence_args(backends))
        assert_all_succeeded(results)
        values = [result.value for result in results]
    for checks in values:
        assert len(checks) == 2 * (3 * len(backends) + 1), checks


def test_mismatched_configurations_are_clear_errors_on_every_rank(two_ranks):
    for mismatch, indivisible in two_rank_values(two_ranks, "configuration_errors"):
        assert "capacity_factor differs (rank 0: 1.0, rank 1: 2.0)" in mismatch
        assert "n_experts (3) must be divisible by the number of ranks (2)" in indivisible


def test_two_rank_training_learns_and_resumes_exactly(two_ranks):
    """Switch with sharded experts and Transformer-XL: see distributed_workers.training."""
    rank0, rank1 = two_rank_values(two_ranks, "training")
    assert rank0 == rank1  # the same averaged losses on both ranks


@pytest.mark.parametrize("stall", [0, 8], ids=["raises", "stalls"])
def test_a_failing_rank_makes_the_others_fail_within_the_timeout(stall):
    """Rank 1 raises before the exchange rank 0 waits in; with ``stall`` it first sleeps
    longer than the group timeout, so rank 0 can only learn of it from the timeout."""
    group_timeout = 3
    results = run("one_rank_fails", 2, timeout=90, group_timeout=group_timeout, stall=stall)
    survivor, failing = results
    assert survivor.returncode not in (0, None), survivor.stderr[-3000:]
    assert "CollectiveError" in survivor.stderr and "another rank raised, died or did not reach it" in survivor.stderr
    assert failing.returncode not in (0, None) and "rank 1 fails on purpose" in failing.stderr
    if stall:
        # it gave up on its own, before rank 1 woke up
        assert survivor.seconds < failing.seconds


def test_torchrun_cli_expert_parallel(tmp_path):
    """The README's command at tiny sizes: only rank 0 reports, and resuming needs the same N."""
    text = tmp_path / "text.txt"
    text.write_text(sample_text(20_000), encoding="utf-8")
    common = ["--data", str(text), "--out", str(tmp_path / "run"), "--seq-len", "8", "--batch-size", "4",
              "--eval-interval", "2", "--eval-batches", "1", "--threads", "1"]
    model = ["--d-model", "16", "--heads", "2", "--d-ff", "32", "--n-layers", "1", "--n-experts", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "fastformers.cli", "train", "switch"]
    trained = subprocess.run([*torchrun, "--expert-parallel", "--steps", "2", *common, *model], env=env,
                             capture_output=True, text=True, timeout=180)
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert trained.stdout.count("step 2: train loss") == 1 and "2 processes (experts sharded)" in trained.stdout
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["world_size"] == 2


def test_resume_needs_the_same_number_of_processes(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(sample_text(20_000), encoding="utf-8")
    trainer = Trainer.start(default_train_config("xl", data=str(text), out=str(tmp_path), seq_len=8, batch_size=4,
                                                 steps=1, eval_batches=1), log=lambda line: None, **TINY_MODEL)
    path = trainer.save()
    payload = load_checkpoint(path)
    payload["world_size"] = 2
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"written by a run of 2 process\(es\); resume it with as many"):
        Trainer.resume(path)


def test_shard_and_merge_a_language_model_state_dict():
    from fastformers.distributed import merge_expert_shards, shard_expert_state_dict
    from fastformers.models import build_model, default_model_config

    full = build_model(default_model_config("switch", 10, **{**TINY_MODEL, "n_experts": 4})).state_dict()
    shards = [shard_expert_state_dict(full, rank, 2) for rank in range(2)]
    for shard in shards:
        experts = {key.split(".experts.")[1].split(".")[0] for key in shard if ".experts." in key}
        assert experts == {"0", "1"}
        assert len(shard) == len(full) - sum(".experts." in key for key in full) // 2
    assert shards[1]["transformer.layers.1.feed_forward.experts.0.layer1.weight"] is \
        full["transformer.layers.1.feed_forward.experts.2.layer1.weight"]
    merged = merge_expert_shards(shards)
    assert sorted(merged) == sorted(full) and all(merged[key] is full[key] for key in full)
    with pytest.raises(ValueError, match="has 4 experts, not divisible by 3 ranks"):
        shard_expert_state_dict(full, 0, 3)


def test_expert_parallel_needs_a_process_group(tmp_path):
    from fastformers.distributed import ExpertParallelSwitchFeedForward
    from fastformers.nn import FeedForward

    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelSwitchFeedForward(capacity_factor=1.0, drop_tokens=False, is_scale_prob=True, n_experts=2,
                                        expert=FeedForward(4, 8, 0.0), d_model=4)
    with pytest.raises(ValueError, match="xl has none"):
        default_train_config("xl", expert_parallel=True)
    text = tmp_path / "text.txt"
    text.write_text(sample_text(20_000), encoding="utf-8")
    with pytest.raises(ValueError, match="--expert-parallel needs several processes: launch with torchrun"):
        Trainer.start(default_train_config("switch", data=str(text), expert_parallel=True), **TINY_MODEL)
