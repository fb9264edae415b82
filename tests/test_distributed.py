"""Expert parallelism and multi-process training on gloo over loopback.

Every case runs W fresh processes through ``run_workers``, which kills them at
its deadline, so a hang fails the test instead of stalling the suite. The
workers' code is in ``distributed_workers.py``.
"""
from pathlib import Path

import pytest

from fastformers.testing.distributed import run_workers

TESTS = str(Path(__file__).resolve().parent)


def run(target, world_size, timeout=120, group_timeout=30, **kwargs):
    return run_workers(f"distributed_workers:{target}", world_size, timeout=timeout, group_timeout=group_timeout,
                       kwargs=kwargs, python_path=[TESTS])


def assert_all_succeeded(results):
    for result in results:
        assert result.returncode == 0, f"rank {result.rank} (returncode {result.returncode}):\n{result.stderr[-4000:]}"


@pytest.mark.parametrize("world_size, backends", [(1, ["cpp"]), (2, ["cpp", "reference"]), (4, ["cpp"])])
def test_each_rank_matches_the_single_process_module(world_size, backends):
    """float64, E in {4, 8}: outputs, statistics and input/router gradients per rank, expert
    gradients summed over ranks, with an expert no token reaches and with dropping; then the
    sharded checkpoint gathered into the labml layout and scattered back."""
    results = run("equivalence", world_size, n_experts_options=[4, 8], backends=backends)
    assert_all_succeeded(results)
    for result in results:
        checks = result.value
        assert len(checks) == 2 * (3 * len(backends) + 1), checks


def test_mismatched_configurations_are_clear_errors_on_every_rank():
    results = run("configuration_errors", 2)
    assert_all_succeeded(results)
    for result in results:
        mismatch, indivisible = result.value
        assert "capacity_factor differs (rank 0: 1.0, rank 1: 2.0)" in mismatch
        assert "n_experts (3) must be divisible by the number of ranks (2)" in indivisible


@pytest.mark.parametrize("stall", [0, 12], ids=["raises", "stalls"])
def test_a_failing_rank_makes_the_others_fail_within_the_timeout(stall):
    """Rank 1 raises before the exchange rank 0 waits in; with ``stall`` it first sleeps three
    times the group timeout, so rank 0 can only learn of it from the timeout."""
    group_timeout = 4
    results = run("one_rank_fails", 2, timeout=90, group_timeout=group_timeout, stall=stall)
    survivor, failing = results
    assert survivor.returncode not in (0, None), survivor.stderr[-3000:]
    assert "CollectiveError" in survivor.stderr and "another rank raised, died or did not reach it" in survivor.stderr
    assert failing.returncode not in (0, None) and "rank 1 fails on purpose" in failing.stderr
    if stall:
        # it gave up on its own, before rank 1 woke up
        assert survivor.seconds < failing.seconds
