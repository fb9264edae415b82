"""The timing harness every op family's cases share: a :class:`Case` is one op
at one shape, :func:`run` times its baseline, peers and fused backends in the
same process, one after the other, so only ratios are meaningful."""
from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Callable, Iterable, Optional, Sequence

import torch

from .. import _backend

# Peer backend: the reference under torch.compile, compiled once (on the first,
# untimed call) and then timed like the others.
COMPILED_REFERENCE = "compile(reference)"


@dataclasses.dataclass
class Case:
    """One op at one shape: ``make_inputs()`` builds leaf tensors, ``run(inputs, backend)`` the output.

    ``baseline`` is timed first and every ratio is relative to it; ``peers``
    are other implementations timed in the same run (e.g. labml_nn, torch's
    grouped GEMM); ``zero_grad(backend)`` clears gradients a run left outside
    the inputs (module parameters)."""

    op: str
    shape: str
    make_inputs: Callable[[], tuple]
    run: Callable[[tuple, str], torch.Tensor]
    dtype: torch.dtype = torch.float32
    # Implementation the ratios are taken against (labml_nn's module where one exists).
    baseline: str = "reference"
    peers: tuple = ()
    # Peers timed for the forward pass only (their backward does not run here).
    forward_only_peers: tuple = ()
    measure_memory: bool = False
    # Clears gradients a case keeps outside its inputs (module parameters).
    zero_grad: Optional[Callable[[str], None]] = None
    # Runs after each timed backward (e.g. an optimizer step): whole training-step cases.
    update: Optional[Callable[[str], None]] = None
    # Seconds per repetition or more: timed only in a full run (``quick_cases`` skips it).
    heavy: bool = False


@dataclasses.dataclass
class Result:
    op: str
    shape: str
    dtype: str
    backend: str
    device: str
    forward_ms: float
    forward_backward_ms: Optional[float]
    forward_speedup: Optional[float] = None
    forward_backward_speedup: Optional[float] = None
    peak_mib: Optional[float] = None
    peak_memory_ratio: Optional[float] = None


@functools.cache
def compile_on_first_call(fn: Callable, **options) -> Callable:
    """``torch.compile(fn, **options)``, compiled on the first call (bench runs only)."""
    compiled = None

    def run(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, **options)
        return compiled(*args, **kwargs)

    return run


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of bytes allocated minus bytes freed while ``fn`` runs, from the
    allocator events torch.profiler records (CPU tensors, every op incl. C++)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def _median_ms(fn: Callable[[], object], min_time: float, max_repeat: int) -> float:
    fn()  # warm-up: allocator, lazy init
    times = []
    deadline = time.perf_counter() + min_time
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < max_repeat):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def time_case(case: Case, backend: str, min_time: float = 0.2, max_repeat: int = 200, forward_only: bool = False):
    """Median (forward ms, forward+backward ms) of ``case`` on ``backend``, and the
    peak bytes of one forward+backward when ``case.measure_memory`` (else None).
    With ``forward_only`` the forward+backward time and the peak are None."""
    inputs = case.make_inputs()

    def forward():
        with torch.no_grad():
            case.run(inputs, backend)

    fwd = _median_ms(forward, min_time, max_repeat)
    if forward_only:
        return fwd, None, None
    grad = torch.randn_like(case.run(inputs, backend))

    def forward_backward():
        out = case.run(inputs, backend)
        torch.autograd.backward(out, grad)
        if case.update is not None:
            case.update(backend)
        for tensor in inputs:
            tensor.grad = None
        if case.zero_grad is not None:
            case.zero_grad(backend)

    fb = _median_ms(forward_backward, min_time, max_repeat)
    peak = peak_bytes(forward_backward) if case.measure_memory and inputs[0].device.type == "cpu" else None
    return fwd, fb, peak


def fused_backends(device: str) -> list[str]:
    available = _backend.available_backends()
    if device == "cuda":
        return [name for name in ("triton",) if name in available]
    return [name for name in ("cpp",) if name in available]


def run(cases: Iterable[Case], device: str, min_time: float = 0.2) -> list[Result]:
    results = []
    for case in cases:
        dtype = str(case.dtype).replace("torch.", "")
        ref_fwd, ref_fb, ref_peak = time_case(case, case.baseline, min_time)
        mib = lambda peak: None if peak is None else peak / 2**20  # noqa: E731
        results.append(Result(case.op, case.shape, dtype, case.baseline, device, ref_fwd, ref_fb, 1.0, 1.0,
                              mib(ref_peak), 1.0 if ref_peak else None))
        timed = [(backend, False) for backend in [*case.peers, *fused_backends(device)]]
        timed += [(backend, True) for backend in case.forward_only_peers]
        for backend, forward_only in timed:
            fwd, fb, peak = time_case(case, backend, min_time, forward_only=forward_only)
            results.append(
                Result(case.op, case.shape, dtype, backend, device, fwd, fb, ref_fwd / fwd,
                       None if fb is None else ref_fb / fb, mib(peak),
                       peak / ref_peak if peak is not None and ref_peak else None)
            )
    return results


def format_table(results: list[Result]) -> str:
    header = ("op", "shape", "dtype", "device", "backend", "fwd ms", "fwd+bwd ms", "fwd x", "fwd+bwd x")
    with_memory = any(r.peak_mib is not None for r in results)
    if with_memory:
        header += ("peak MiB", "peak / ref")
    rows = []
    for r in results:
        row = (r.op, r.shape, r.dtype, r.device, r.backend, f"{r.forward_ms:.4f}",
               "-" if r.forward_backward_ms is None else f"{r.forward_backward_ms:.4f}",
               f"{r.forward_speedup:.2f}",
               "-" if r.forward_backward_speedup is None else f"{r.forward_backward_speedup:.2f}")
        if with_memory:
            row += ("-" if r.peak_mib is None else f"{r.peak_mib:.3f}",
                    "-" if r.peak_memory_ratio is None else f"{r.peak_memory_ratio:.2f}")
        rows.append(row)
    return markdown_table(header, rows)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table with every column padded to its widest cell (readable as printed text too)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


def labml_nn_available() -> bool:
    try:
        import labml_nn.transformers.switch  # noqa: F401
    except ImportError:
        return False
    return True


def quick_cases(cases: list[Case]) -> list[Case]:
    """``cases`` without the heavy shapes and the compiled peers (torch.compile of
    the reference, FlexAttention: compilation alone takes tens of seconds): the
    default ``fastformers bench``."""
    return [
        dataclasses.replace(case, peers=tuple(p for p in case.peers if p != COMPILED_REFERENCE), forward_only_peers=())
        for case in cases
        if not case.heavy
    ]
