"""Run a function on W local processes joined by a gloo process group on loopback,
bounded in time: the tests and the benchmark of :mod:`fastformers.distributed`.

Each worker is a fresh ``python`` (no fork of the caller's threads) with
``OMP_NUM_THREADS=1``, the ``torchrun`` environment variables and a free port;
it joins the group with ``timeout`` seconds, calls ``module:function(**kwargs)``
and prints the JSON of its return value on its last stdout line.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence


@dataclass
class WorkerResult:
    rank: int
    returncode: Optional[int]  # None: killed at the deadline
    stdout: str
    stderr: str
    seconds: float  # from the start of the workers to this one's exit (or kill)

    @property
    def value(self):
        """The JSON value the worker's function returned."""
        return json.loads(self.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(target: str, world_size: int, *, timeout: float = 60.0, group_timeout: float = 30.0,
                kwargs: Optional[dict] = None, python_path: Sequence[str] = ()) -> List[WorkerResult]:
    """Start ``world_size`` workers running ``target`` (``"module:function"``), wait at most
    ``timeout`` seconds for all of them (killing the rest at the deadline) and return their results
    in rank order. ``group_timeout`` is the process group's own timeout in seconds."""
    port = free_port()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([*python_path, *sys.path]))
    command = [sys.executable, "-m", __name__, target, json.dumps(kwargs or {}), str(group_timeout)]
    workers = [
        subprocess.Popen(command, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(world_size)
    ]
    start = time.monotonic()
    deadline = start + timeout
    results = []
    for rank, worker in enumerate(workers):
        try:
            stdout, stderr = worker.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            returncode = worker.returncode
        except subprocess.TimeoutExpired:
            worker.kill()
            stdout, stderr = worker.communicate()
            returncode = None
        # communicate() of a later rank returns at once if it exited first: a bound, not the exact time
        results.append(WorkerResult(rank, returncode, stdout, stderr, time.monotonic() - start))
    return results


def _worker_main(target: str, kwargs_json: str, group_timeout: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(group_timeout)))
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    try:
        value = function(**json.loads(kwargs_json))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(json.dumps(value), flush=True)


if __name__ == "__main__":
    _worker_main(*sys.argv[1:4])
