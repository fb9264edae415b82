"""``fastformers bench --device cuda``: every fused op against its GPU peers in
one run, with TFLOP/s beside every time, and the whole models of ``fastformers
bench training``.

Peers, timed in the same process as the fused Triton kernels:

- ``rel_attention``: the labml-style reference (baseline);
  ``scaled_dot_product_attention`` on the same shapes *without* the positional
  term (flash backend for bf16/fp16, memory-efficient for float32; lower-right
  causal mask, as the memory-first layout needs) as the speed-of-light anchor;
  FlexAttention with the positional term as a ``score_mod`` bias (forward only,
  as in ``fastformers bench``; first shape only);
- ``switch``: labml_nn's ``SwitchFeedForward`` (baseline), torch's
  ``grouped_mm``, our module on the reference backend (a loop over experts)
  and the dense FFN of the same active size;
- the other ops: their labml-style references.

FLOPs and bytes are analytic, per shape (:func:`work`): the products the op
needs (causal pairs only; backward with recomputation, as flash attention
counts it), each tensor read or written once. A peer that computes less (the
SDPA anchor has no positional term) is credited its own FLOPs. The same
formulas give ``python -m fastformers.gpu_report``'s roofline, labelled as a model.

``dry_run``: the same cases on CPU through the Triton interpreter at tiny
shapes (``bench/gpu_check.sh --dry-run``): it proves the code runs, not speed.
The compiled peer (FlexAttention) is GPU-only there, as compiling it on a CPU
takes longer than the whole dry run may.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Callable, Dict, List, Optional

import torch

from ..ops.compressive import naive as compressive_naive
from ..ops.compressive.op import attention_reconstruction_loss, conv_compress
from ..ops.feedback import naive as feedback_naive
from ..ops.feedback.step_op import feedback_attention_step
from . import training
from .feedback import labml_feedback_memory
from .switch import SwitchImplementations, grouped_mm_available
from .timing import Case, labml_nn_available, markdown_table, time_case
from .xl import FLEX_ATTENTION, flex_attention_available, run_rel_attention

FUSED = "triton"
SDPA = "sdpa (no positional term)"
EXPERT_LOOP = "reference"  # our SwitchFeedForward on the reference backend: a Python loop over experts

# H100 SXM peaks the roofline model uses (dense, no sparsity).
H100_PEAKS = {"bf16_tensor_tflops": 989.0, "tf32_tensor_tflops": 494.0, "fp32_tflops": 67.0, "hbm_tb_s": 3.35}

# Shapes, per op: the GPU run, and the dry run's tiny ones.
SHAPES = {
    "rel_attention": [(512, 512, 8, 8, 64), (1024, 1024, 4, 16, 64), (1, 512, 32, 8, 64)],  # (L, M, B, H, d)
    "feedback_memory": [(7, 256, 1024), (13, 64, 4096)],  # (L, B, D)
    "feedback_attention_step": [(128, 64, 8, 64), (1024, 32, 8, 64)],  # (steps, B, H, d)
    "conv_compress": [(128, 16, 512, 4), (512, 32, 1024, 4)],  # (M, B, D, c)
    "attention_reconstruction_loss": [(32, 128, 4, 16, 256, 4), (128, 512, 4, 16, 512, 8)],  # (L, M, c, B, D, H)
    "switch": [(4096, 512, 2048, 8), (4096, 512, 2048, 64), (16384, 1024, 4096, 16)],  # (T, d, d_ff, E)
}
DRY_SHAPES = {
    "rel_attention": [(4, 4, 2, 2, 16)],
    "feedback_memory": [(3, 2, 32)],
    "feedback_attention_step": [(6, 2, 2, 16)],
    "conv_compress": [(4, 2, 16, 2)],
    "attention_reconstruction_loss": [(4, 4, 2, 2, 16, 2)],
    "switch": [(128, 16, 32, 4)],
}
OPS = tuple(SHAPES)
# The default run's order: the heaviest comparisons first, so that a run cut
# short by its time limit loses the cheapest ones.
DEFAULT_ORDER = ("rel_attention", "switch", "training", "feedback_attention_step", "conv_compress",
                 "attention_reconstruction_loss", "feedback_memory")
DRY_TRAINING_SIZE = training.TrainingSize("xl", "dry run", 2, 2, dict(mem_len=2, d_model=32, heads=2, d_ff=64,
                                                                               n_layers=1))


@dataclasses.dataclass(frozen=True)
class Work:
    """Analytic FLOPs and bytes of one forward and of one forward+backward."""

    forward_flops: float
    forward_backward_flops: float
    forward_bytes: float
    forward_backward_bytes: float


def _causal_pairs(L: int, M: int) -> int:
    """(query, key) pairs query ``i`` sees with ``M`` memories first: keys ``j <= M + i``."""
    return L * M + L * (L + 1) // 2


def work(op: str, shape: tuple, element_bytes: int, backend: str = FUSED) -> Work:
    """The model of ``op`` at ``shape`` (see the module docstring)."""
    e = element_bytes
    if op == "rel_attention":
        L, M, B, H, d = shape
        K = L + M
        pair_product = 2 * _causal_pairs(L, M) * B * H * d
        qo, kv = L * B * H * d, K * B * H * d
        if backend == SDPA:  # QKᵀ, PV; backward recomputes QKᵀ, then dV, dP, dQ, dK
            return Work(2 * pair_product, 7 * pair_product, (2 * qo + 2 * kv) * e, (6 * qo + 6 * kv) * e)
        table = (K + L - 1) * H * (d + 1) * e
        # forward: QKᵀ, Q·Rᵀ (band), PV; backward: both recomputed, dV, dP, dQ (K and R), dK, dR
        return Work(3 * pair_product, 11 * pair_product, (2 * qo + 2 * kv) * e + table,
                    (6 * qo + 6 * kv) * e + 3 * table)
    if op == "feedback_memory":
        L, B, D = shape
        n = L * B * D
        return Work(2 * n, 5 * n, (n + B * D) * e, (3 * n + 2 * B * D) * e)
    if op == "feedback_attention_step":
        steps, B, H, d = shape
        product = 2 * steps * B * H * d
        cache, table, vector = 2 * steps * B * H * d, steps * H * (d + 1), B * H * d
        return Work(3 * product, 11 * product, (cache + table + 2 * vector) * e,
                    (3 * cache + 3 * table + 4 * vector) * e)
    if op == "conv_compress":
        M, B, D, c = shape
        flops = 2 * M * B * D * D
        mem, weight, out = M * B * D, D * D * c, M // c * B * D
        return Work(flops, 3 * flops, (mem + weight + out) * e, (3 * mem + 3 * weight + 2 * out) * e)
    if op == "attention_reconstruction_loss":
        L, M, c, B, D, H = shape
        N = M // c

        def per_keys(keys):  # key and value projections, then QKᵀ and PV over all heads
            return 4 * keys * B * D * D + 4 * L * keys * B * D

        forward = 2 * L * B * D * D + per_keys(M) + per_keys(N)
        read = (L + M + N) * B * D + 3 * D * D
        # only c_mem gets a gradient: the backward retraces its branch
        return Work(forward, forward + 2 * per_keys(N), read * e, (read + 2 * N * B * D) * e)
    if op == "switch":
        T, d, d_ff, E = shape
        forward = 2 * T * d * E + 4 * T * d * d_ff
        weights = E * (2 * d * d_ff + d_ff + d)
        tokens = T * d
        return Work(forward, 3 * forward, (2 * tokens + weights + T * d_ff) * e,
                    (5 * tokens + 3 * weights + 2 * T * d_ff) * e)
    raise ValueError(f"no model of {op!r}; choose from {OPS}")


@dataclasses.dataclass
class GpuResult:
    """One backend on one case; a backend that raised has no times and its ``error``."""

    op: str
    shape: str
    dtype: str
    backend: str
    device: str
    forward_ms: Optional[float] = None
    forward_backward_ms: Optional[float] = None
    forward_speedup: Optional[float] = None
    forward_backward_speedup: Optional[float] = None
    forward_tflops: Optional[float] = None
    forward_backward_tflops: Optional[float] = None
    error: str = ""


def _sdpa(query, key, value, scale):
    """SDPA over the same ``[L, B, H, d]`` tensors, lower-right causal, without the positional term."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    L, K = query.shape[0], key.shape[0]
    q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
    mask = causal_lower_right(L, K)
    if query.device.type != "cuda":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).permute(2, 0, 1, 3)
    kernel = SDPBackend.EFFICIENT_ATTENTION if query.dtype == torch.float32 else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel([kernel]):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.permute(2, 0, 1, 3)


def _rel_attention_cases(device, dtype, shapes, dry_run) -> List[Case]:
    """FlexAttention on the first shape only: compiling it costs tens of
    seconds per shape, out of the check's minutes."""
    peers = (SDPA,)
    flex = () if dry_run or not flex_attention_available() else (FLEX_ATTENTION,)

    def run(inputs, backend):
        if backend == SDPA:
            q, k, v = inputs[:3]
            return _sdpa(q, k, v, q.shape[-1] ** -0.5)
        return run_rel_attention(inputs, backend)

    def maker(L, M, B, H, d):
        def make():
            K = M + L
            leaf = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
            return leaf(L, B, H, d), leaf(K, B, H, d), leaf(K, B, H, d), leaf(K + L, H, d), leaf(K + L, H), leaf(H, d)
        return make

    return [Case("rel_attention", _label("rel_attention", shape), maker(*shape), run, dtype, peers=peers,
                 forward_only_peers=flex if index == 0 else ()) for index, shape in enumerate(shapes)]


def _feedback_memory_cases(device, dtype, shapes, dry_run) -> List[Case]:
    def maker(L, B, D):
        return lambda: (torch.randn(L, B, D, device=device, dtype=dtype, requires_grad=True),
                        torch.randn(L, device=device, dtype=dtype, requires_grad=True))

    return [Case("feedback_memory", _label("feedback_memory", shape), maker(*shape), labml_feedback_memory,
                 dtype) for shape in shapes]


def _attention_step_cases(device, dtype, shapes, dry_run) -> List[Case]:
    P = max(steps for steps, *_ in shapes)

    def maker(steps, B, H, d):
        def make():
            leaf = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
            return leaf(B, H, d), leaf(steps, B, H, d), leaf(steps, B, H, d), leaf(P, H, d), leaf(P, H), leaf(H, d)
        return make

    def run(inputs, backend):
        q, k, v, r, s, u = inputs
        args = (q, k, v, k.shape[0], r, s, u, q.shape[-1] ** -0.5)
        if backend == "reference":
            return feedback_naive.feedback_attention_step(*args)
        return feedback_attention_step(*args, backend=backend)

    return [Case("feedback_attention_step", _label("feedback_attention_step", shape), maker(*shape), run, dtype)
            for shape in shapes]


def _conv_compress_cases(device, dtype, shapes, dry_run) -> List[Case]:
    def maker(M, B, D, c):
        def make():
            mem = torch.randn(M, B, D, device=device, dtype=dtype, requires_grad=True)
            weight = (torch.randn(D, D, c, device=device, dtype=dtype) / math.sqrt(D * c)).requires_grad_()
            return mem, weight, torch.randn(D, device=device, dtype=dtype, requires_grad=True)
        return make

    def run(inputs, backend):
        if backend == "reference":
            return compressive_naive.conv_compress(*inputs)  # labml: permute, nn.Conv1d, permute
        return conv_compress(*inputs, backend=backend)

    return [Case("conv_compress", _label("conv_compress", shape), maker(*shape), run, dtype) for shape in shapes]


def _reconstruction_loss_cases(device, dtype, shapes, dry_run) -> List[Case]:
    cases = []
    for L, M, c, B, D, H in shapes:
        generator = torch.Generator().manual_seed(0)

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

        layer = (1 + rand(D, scale=0.1), rand(D, scale=0.1), 1e-5, rand(D, D, scale=D ** -0.5), None,
                 rand(D, D, scale=D ** -0.5), None, rand(D, D, scale=D ** -0.5), rand(D, scale=0.1), H, (D // H) ** -0.5)

        def make(L=L, M=M, c=c, B=B, D=D):
            return (torch.randn(L, B, D, device=device, dtype=dtype), torch.randn(M, B, D, device=device, dtype=dtype),
                    torch.randn(M // c, B, D, device=device, dtype=dtype, requires_grad=True))

        def run(inputs, backend, layer=layer):
            h, mem, c_mem = inputs
            norm_w, norm_b, eps, *rest = layer
            args = (h, mem, c_mem, norm_w, norm_b, eps, *rest)
            if backend == "reference":
                return compressive_naive.attention_reconstruction_loss(*args)
            return attention_reconstruction_loss(*args, backend=backend)

        cases.append(Case("attention_reconstruction_loss", _label("attention_reconstruction_loss", (L, M, c, B, D, H)),
                          make, run, dtype))
    return cases


def _switch_cases(device, dtype, shapes, dry_run) -> List[Case]:
    baseline = "labml_nn" if labml_nn_available() else EXPERT_LOOP
    peers = ["grouped_mm"] if grouped_mm_available(device, dtype) else []
    peers += [EXPERT_LOOP, "dense"] if baseline != EXPERT_LOOP else ["dense"]
    cases = []
    for T, d, d_ff, E in shapes:
        impl = SwitchImplementations(T, d, d_ff, E, device, dtype)
        cases.append(Case("switch", _label("switch", (T, d, d_ff, E)), impl.make_inputs, impl.run, dtype,
                          baseline=baseline, peers=tuple(peers), zero_grad=impl.zero_grad))
    return cases


_CASE_BUILDERS: Dict[str, Callable] = {
    "rel_attention": _rel_attention_cases,
    "feedback_memory": _feedback_memory_cases,
    "feedback_attention_step": _attention_step_cases,
    "conv_compress": _conv_compress_cases,
    "attention_reconstruction_loss": _reconstruction_loss_cases,
    "switch": _switch_cases,
}
_SHAPE_LETTERS = {
    "rel_attention": "L M B H d",
    "feedback_memory": "L B D",
    "feedback_attention_step": "steps B H d",
    "conv_compress": "M B D c",
    "attention_reconstruction_loss": "L M c B D H",
    "switch": "T d d_ff E",
}


def _label(op: str, shape: tuple) -> str:
    return " ".join(f"{letter}={size}" for letter, size in zip(_SHAPE_LETTERS[op].split(), shape))


def shape_of(label: str) -> tuple:
    """The shape tuple back from a :func:`_label`."""
    return tuple(int(part.split("=")[1]) for part in label.split())


def gpu_cases(op: str, device: str, dtype: torch.dtype, dry_run: bool = False) -> List[Case]:
    shapes = (DRY_SHAPES if dry_run else SHAPES)[op]
    return _CASE_BUILDERS[op](device, dtype, shapes, dry_run)


def _tflops(flops: float, ms: Optional[float]) -> Optional[float]:
    return None if ms is None else flops / (ms / 1000) / 1e12


def _ratio(baseline_ms: Optional[float], ms: Optional[float]) -> Optional[float]:
    return None if baseline_ms is None or ms is None else baseline_ms / ms


def run(cases: List[Case], device: str, min_time: float) -> List[GpuResult]:
    """Time each case's baseline, peers and the Triton kernels (on CPU: through
    the interpreter) one after the other; TFLOP/s from :func:`work`. A backend
    that raises is recorded with its error and the run goes on: a first GPU
    run must report everything it can."""
    results = []
    for case in cases:
        dtype = str(case.dtype).replace("torch.", "")
        element_bytes = torch.empty((), dtype=case.dtype).element_size()
        shape = shape_of(case.shape)
        timed = [(b, False) for b in (case.baseline, *case.peers, FUSED)] + [(b, True) for b in case.forward_only_peers]
        baseline = None
        for backend, forward_only in timed:
            result = GpuResult(case.op, case.shape, dtype, backend, device)
            try:
                fwd, fb, _ = time_case(case, backend, min_time, forward_only=forward_only)
            except Exception as error:  # reported in the table and the JSON, not fatal
                result.error = f"{type(error).__name__}: {error}"
                results.append(result)
                continue
            if backend == case.baseline:
                baseline = (fwd, fb)
            model = work(case.op, shape, element_bytes, backend)
            result.forward_ms, result.forward_backward_ms = fwd, fb
            if baseline is not None:
                result.forward_speedup, result.forward_backward_speedup = _ratio(baseline[0], fwd), _ratio(baseline[1], fb)
            result.forward_tflops = _tflops(model.forward_flops, fwd)
            result.forward_backward_tflops = _tflops(model.forward_backward_flops, fb)
            results.append(result)
            if device == "cuda":
                torch.cuda.empty_cache()
    return results


def training_results(device: str, min_time: float, dry_run: bool = False) -> List[dict]:
    """``fastformers bench training``'s measurement (labml_nn against the
    converted model, alternating, dropout 0/0.1, float32/bf16 autocast) with
    the TFLOP/s of labml_nn's step, counted by torch's FlopCounterMode once per
    size. Each configuration that raises, on either side, is recorded with its
    error and the others still run. The dry run times one tiny Transformer-XL."""
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    for size in [DRY_TRAINING_SIZE] if dry_run else [s for s in training.SIZES if not s.large]:
        label = f"{size.label} ({size.describe()})"
        flops = None
        for dropout in training.DROPOUTS:
            for precision in training.PRECISIONS:
                row = dict(model=size.model, size=label, dropout=dropout, precision=precision)
                try:
                    labml, fused = training.models(size, dropout, device)
                    steps = [training.step_fn(model, size, precision, device) for model in (labml, fused)]
                    if flops is None:
                        with FlopCounterMode(display=False) as counter:
                            steps[0]()
                        flops = counter.get_total_flops()
                    labml_ms, fused_ms = training.median_ms(steps, min_time)
                except Exception as error:  # reported in the table and the JSON, not fatal
                    rows.append(dict(row, error=f"{type(error).__name__}: {error}"))
                    continue
                rows.append(dict(row, labml_ms=labml_ms, fastformers_ms=fused_ms, speedup=labml_ms / fused_ms,
                                 step_flops=flops, labml_tflops=_tflops(flops, labml_ms),
                                 fastformers_tflops=_tflops(flops, fused_ms)))
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _cell(value: Optional[float], digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: List[GpuResult]) -> str:
    header = ("op", "shape", "dtype", "backend", "fwd ms", "fwd TFLOP/s", "fwd x", "fwd+bwd ms", "fwd+bwd TFLOP/s",
              "fwd+bwd x")
    rows = [(r.op, r.shape, r.dtype, r.backend, _cell(r.forward_ms, 4), _cell(r.forward_tflops, 2),
             _cell(r.forward_speedup, 2), _cell(r.forward_backward_ms, 4), _cell(r.forward_backward_tflops, 2),
             _cell(r.forward_backward_speedup, 2)) for r in results if not r.error]
    errors = [f"FAILED {r.op} {r.shape} {r.dtype} [{r.backend}]: {_first_line(r.error)}" for r in results if r.error]
    return "\n".join([markdown_table(header, rows)] + errors)


def _first_line(error: str) -> str:
    return error.strip().splitlines()[0] if error.strip() else error


def format_training(rows: List[dict]) -> str:
    header = ("model", "size", "dropout", "precision", "labml_nn ms", "TFLOP/s", "fastformers ms", "TFLOP/s", "speedup")
    table = [(r["model"], r["size"], f"{r['dropout']:g}", r["precision"], f"{r['labml_ms']:.2f}",
              _cell(r["labml_tflops"], 2), f"{r['fastformers_ms']:.2f}", _cell(r["fastformers_tflops"], 2),
              f"{r['speedup']:.2f}x") for r in rows if "error" not in r]
    errors = [f"FAILED {r['model']} {r['size']} dropout {r['dropout']:g} {r['precision']}: {_first_line(r['error'])}"
              for r in rows if "error" in r]
    return "\n".join([markdown_table(header, table)] + errors)


def environment() -> dict:
    """What the numbers were measured on."""
    import platform
    import subprocess

    import triton

    info = dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                cuda_runtime=torch.version.cuda, gpu=None, driver=None, capability=None)
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())))
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            info["driver"] = "unknown (nvidia-smi did not answer)"
    return info


def check_ops(ops: List[str]) -> None:
    unknown = sorted(set(ops) - set(OPS) - {"training"})
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; choose from {sorted(OPS) + ['training']}")


def bench(ops: List[str], dtype: torch.dtype, min_time: float, dry_run: bool = False,
          json_path: Optional[str] = None) -> dict:
    """Run ``ops`` (names of :data:`OPS` and ``"training"``), printing each
    table as it completes and rewriting ``json_path`` after each op, so that a
    run cut short by a time limit keeps what it measured. Returns the JSON
    record. Raises ValueError for an unknown op."""
    check_ops(ops)
    device = "cpu" if dry_run else "cuda"
    record = dict(environment=environment(), dry_run=dry_run, peaks_for_the_model=H100_PEAKS, ops=[], training=[])
    for op in ops:
        if op == "training":
            rows = training_results(device, min_time, dry_run)
            record["training"] += rows
            print("training step (forward+backward) of each model, labml_nn against fastformers.convert of it; "
                  "TFLOP/s of labml_nn's step as FlopCounterMode counts it\n" + format_training(rows) + "\n", flush=True)
        else:
            results = run(gpu_cases(op, device, dtype, dry_run), device, min_time)
            record["ops"] += [dataclasses.asdict(r) for r in results]
            print(format_table(results) + "\n", flush=True)
        if json_path:
            with open(json_path, "w") as handle:
                json.dump(record, handle, indent=2)
    return record


def _junit_tests(path: str) -> List[dict]:
    """Every test case of a pytest JUnit XML file: name, outcome, seconds, message."""
    import xml.etree.ElementTree as ElementTree

    tests = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = child.get("message", "") or (child.text or "")[:2000]
        tests.append(dict(name=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                          seconds=float(case.get("time", 0)), message=message))
    return tests


def write_check_report(out_path: str, junit_path: str, bench_path: str, suite_exit: int, bench_exit: int) -> dict:
    """``bench/gpu_check.sh``'s one JSON: environment, the CUDA suite's test
    outcomes and the benchmark record (either may be missing if it was cut short)."""
    import os

    tests = _junit_tests(junit_path) if os.path.exists(junit_path) else []
    counts = {outcome: sum(t["outcome"] == outcome for t in tests) for outcome in ("passed", "failed", "error", "skipped")}
    bench_record = None
    if os.path.exists(bench_path):
        with open(bench_path) as handle:
            bench_record = json.load(handle)
    report = dict(environment=environment(), suite=dict(exit_code=suite_exit, counts=counts, tests=tests),
                  bench=dict(exit_code=bench_exit, record=bench_record))
    with open(out_path, "w") as handle:
        json.dump(report, handle, indent=2)
    return report


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m fastformers.benchmarks.gpu report OUT JUNIT BENCH SUITE_EXIT BENCH_EXIT``: merge a check's results."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastformers.benchmarks.gpu", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="write bench/gpu_check.sh's JSON")
    for name in ("out", "junit", "bench"):
        report.add_argument(name)
    report.add_argument("suite_exit", type=int)
    report.add_argument("bench_exit", type=int)
    args = parser.parse_args(argv)
    merged = write_check_report(args.out, args.junit, args.bench, args.suite_exit, args.bench_exit)
    counts = merged["suite"]["counts"]
    print(f"CUDA suite: {counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
          f"{counts['skipped']} skipped; benchmark {'recorded' if merged['bench']['record'] else 'MISSING'}")
    if counts["passed"] + counts["failed"] + counts["error"] == 0:
        print("  WARNING: no CUDA test ran (no GPU, or the Triton interpreter was on): the skip reasons are in the JSON")
    for test in merged["suite"]["tests"]:
        if test["outcome"] in ("failed", "error"):
            print(f"  {test['outcome'].upper()} {test['name']}: {test['message'].splitlines()[0] if test['message'] else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
