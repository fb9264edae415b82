"""Expert-parallel SwitchFeedForward: step time and bytes exchanged, W = 1 and 2.

    PYTHONPATH=. python bench/distributed_switch.py [--tokens 1024] [--d-model 256] [--d-ff 1024] [--experts 8]

Spawns W local gloo processes (one thread each, loopback) for W = 1 and 2 and
times forward + backward of one expert-parallel Switch layer on ``--tokens``
tokens per rank, next to the single-process module (all experts, one thread)
on the same tokens. "remote bytes sent" are the rows each rank sends to other
ranks per step in the four exchanges (tokens and results forward, their
gradients backward), measured from the split sizes; it receives as many. On a 2-core machine W = 2 runs two
1-thread processes on the two cores: informative only; the numbers do not
predict a multi-GPU deployment (see the README's estimate).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def measure(tokens, d_model, d_ff, n_experts, capacity_factor, steps):
    """Run on every rank: median step time of the expert-parallel and (same tokens) the
    single-process layer, and the remote rows sent per step."""
    from fastformers.distributed import ExpertParallelSwitchFeedForward
    from fastformers.nn import FeedForward, SwitchFeedForward

    rank = dist.get_rank()
    torch.manual_seed(0)
    single = SwitchFeedForward(capacity_factor=capacity_factor, drop_tokens=True, is_scale_prob=True,
                               n_experts=n_experts, expert=FeedForward(d_model, d_ff, 0.0), d_model=d_model)
    single.drop_policy = "deterministic"
    with torch.no_grad():
        for parameter in single.parameters():
            parameter.normal_(0, d_model ** -0.5)
    parallel = ExpertParallelSwitchFeedForward.from_switch(single)
    x = torch.randn(tokens, 1, d_model, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    grad = torch.randn_like(x)

    times = {parallel: [], single: []}
    # alternating, so that load from elsewhere on the machine hits both alike
    for step in range(steps + 3):
        for module, seconds in times.items():
            dist.barrier()
            start = time.perf_counter()
            module(x)[0].backward(grad)
            seconds.append(time.perf_counter() - start)
    parallel_seconds, single_seconds = (statistics.median(seconds[3:]) for seconds in times.values())
    remote_rows = sum(n for r, n in enumerate(parallel.last_send_splits) if r != rank) + \
        sum(n for r, n in enumerate(parallel.last_receive_splits) if r != rank)
    # sent: its tokens and the others' results forward, the gradients of both backward
    remote_bytes = 2 * remote_rows * d_model * x.element_size()
    return {"parallel": parallel_seconds, "single": single_seconds, "remote_bytes": remote_bytes,
            "backend": parallel.last_backend}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    from fastformers.testing.distributed import run_workers

    print(f"tokens/rank {args.tokens}, d_model {args.d_model}, d_ff {args.d_ff}, E {args.experts}, float32, "
          "1 thread per process, gloo on loopback; medians of forward+backward\n")
    print("| W | expert-parallel step | single-process step (same tokens, all experts) | remote bytes sent per rank "
          "per step |")
    print("|---|---|---|---|")
    for world_size in (1, 2):
        results = run_workers("distributed_switch:measure", world_size, timeout=600, group_timeout=120,
                              kwargs=dict(tokens=args.tokens, d_model=args.d_model, d_ff=args.d_ff,
                                          n_experts=args.experts, capacity_factor=args.capacity_factor,
                                          steps=args.steps),
                              python_path=[str(Path(__file__).resolve().parent)])
        for result in results:
            if result.returncode != 0:
                sys.exit(f"W={world_size} rank {result.rank} failed:\n{result.stderr[-3000:]}")
        values = [r.value for r in results]
        parallel = max(v["parallel"] for v in values)  # a step ends when the slowest rank ends
        single = statistics.mean(v["single"] for v in values)
        remote = statistics.mean(v["remote_bytes"] for v in values)
        print(f"| {world_size} | {parallel * 1e3:.1f} ms ({values[0]['backend']}) | {single * 1e3:.1f} ms | "
              f"{remote / 1e6:.2f} MB |", flush=True)


if __name__ == "__main__":
    main()
