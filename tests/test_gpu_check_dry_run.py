"""CI's run of ``bench/gpu_check.sh --dry-run``: the first-GPU check's whole
code path (CUDA suite, GPU benchmark, merged JSON) on CPU through the Triton
interpreter at tiny shapes. About a minute on an idle 2-core machine; the limit
leaves room for a loaded one."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastformers.benchmarks import gpu

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 300


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    process = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIME_LIMIT_S)
    output = f"exit code {process.returncode}\nstdout:\n{process.stdout[-6000:]}\nstderr:\n{process.stderr[-3000:]}"
    assert f"gpu_check JSON: {tmp_path / 'gpu_check.json'}" in process.stdout, output
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["environment"]["torch"] and report["environment"]["triton"], report["environment"]

    suite = report["suite"]
    assert suite["exit_code"] == 0 and suite["counts"]["passed"] > 0, output
    ran = {test["name"].split("::")[0].rsplit(".", 1)[-1] for test in suite["tests"] if test["outcome"] == "passed"}
    assert {"test_cuda_ops", "test_cuda_models"} <= ran, ran

    bench = report["bench"]
    assert bench["exit_code"] == 0 and bench["record"]["dry_run"], output
    rows = bench["record"]["ops"]
    fused = {row["op"]: row for row in rows if row["backend"] == gpu.FUSED}
    assert set(fused) == set(gpu.OPS), fused.keys()
    failed = {op: row["error"] for op, row in fused.items() if row["error"]}
    assert not failed, failed
    assert all(row["forward_tflops"] is not None for row in fused.values())
    assert any("error" not in row for row in bench["record"]["training"]), bench["record"]["training"]
