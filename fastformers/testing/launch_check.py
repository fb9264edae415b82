"""Launch arithmetic of every Triton launcher at any shape, without a GPU and
without memory: which kernels would index past int32 or launch an
impossible grid.

Each launcher of ``fastformers/ops/*/triton_kernel.py`` is called on ``meta``
tensors (shapes and strides, no storage) while its kernels are replaced by
recorders, so every ``kernel[grid](...)`` launch is captured with its real
grid, tensors and scalars. For each launch:

- the largest element offset of each tensor argument, ``Σ (size - 1)·stride``:
  past ``2**31 - 1`` a kernel must compute that tensor's offsets in int64
  (Triton's ``tl.arange``, ``tl.program_id`` and ``i32`` arguments are 32-bit,
  and their products wrap silently);
- for each pointer argument, the integer widths of the offsets the compiled
  kernel adds to it (``tt.addptr`` in its Triton IR, one AOT spec per kernel,
  sm_90): a tensor whose offsets pass int32 while its pointer takes i32
  offsets is at risk (an i32 tile offset added to an int64 base is fine only
  while that tile offset itself stays below 2^31; the IR does not say, so such
  a case is flagged for a look, not proven wrong). Without the IR (``ttir=False``)
  the hint is coarser: whether ``int64`` appears in the kernel's source at all;
- the grid against CUDA's limits: ``2**31 - 1`` blocks on axis 0, 65535 on
  axes 1 and 2 (e.g. ``B·H`` on axis 1 fails to launch past 65535).

Run it in a process without ``TRITON_INTERPRET`` to see the GPU launch
configurations::

    python -m fastformers.testing.launch_check [--json PATH]
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import re
import sys
from typing import Callable, Dict, Iterator, List, Optional

import torch

INT32_MAX = 2**31 - 1
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@dataclasses.dataclass
class TensorExtent:
    name: str
    shape: tuple
    stride: tuple
    max_offset: int  # elements


@dataclasses.dataclass
class Launch:
    kernel: str
    grid: tuple
    tensors: List[TensorExtent]
    kernel_uses_int64: bool
    # pointer argument -> integer widths of the offsets added to it in the kernel's IR (None: not compiled)
    offset_widths: Optional[Dict[str, List[int]]] = None

    @property
    def max_offset(self) -> int:
        return max((t.max_offset for t in self.tensors), default=0)

    @property
    def offset_overflow(self) -> List[str]:
        """Tensor arguments whose offsets pass int32."""
        return [t.name for t in self.tensors if t.max_offset > INT32_MAX]

    @property
    def grid_overflow(self) -> List[str]:
        return [f"axis {axis}: {size} > {limit}" for axis, (size, limit) in enumerate(zip(self.grid, GRID_LIMITS))
                if size > limit]

    @property
    def verdict(self) -> str:
        problems = []
        if self.grid_overflow:
            problems.append("GRID TOO LARGE (" + "; ".join(self.grid_overflow) + ")")
        past = self.offset_overflow
        if past and self.offset_widths is not None:
            narrow = [name for name in past if 32 in self.offset_widths.get(name, [])]
            unseen = [name for name in past if name not in self.offset_widths]
            if narrow:
                problems.append(f"AT RISK: offsets of {narrow} reach {self.max_offset:,} and the kernel adds i32 "
                                "offsets to them (TTIR)")
            if unseen:
                problems.append(f"offsets of {unseen} pass int32 and the IR names no such pointer: check by hand")
        elif past and self.kernel_uses_int64:
            problems.append(f"offsets past int32 in {past}: the kernel casts something to int64, check these "
                            "offsets by hand")
        elif past:
            problems.append(f"OVERFLOWS int32: offsets of {past} reach {self.max_offset:,}, the kernel computes "
                            "every offset in int32")
        return "; ".join(problems) or "ok"


def _extent(name: str, tensor: torch.Tensor) -> TensorExtent:
    offset = 0 if tensor.numel() == 0 else sum((size - 1) * abs(stride)
                                               for size, stride in zip(tensor.shape, tensor.stride()))
    return TensorExtent(name, tuple(tensor.shape), tuple(tensor.stride()), offset + tensor.storage_offset())


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel, or a ``triton.autotune`` one:
    ``kernel[grid](*args)`` records, once per configuration the autotuner
    may pick (each has its own grid); ``best_config`` is the first of them."""

    def __init__(self, kernel, launches: List[Launch]):
        self.kernel, self.launches = kernel, launches
        self.fn = kernel
        while hasattr(self.fn, "fn"):  # Autotuner -> JITFunction -> the Python function
            self.fn = self.fn.fn
        self.arg_names = list(inspect.signature(self.fn).parameters)
        self.uses_int64 = "int64" in inspect.getsource(self.fn)
        self.configs = list(getattr(kernel, "configs", []))
        self.best_config = self.configs[0] if self.configs else None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for config in self.configs or [None]:
                named = dict(zip(self.arg_names, args), **kwargs, **(config.all_kwargs() if config else {}))
                resolved = grid(named) if callable(grid) else grid
                resolved = tuple(resolved) + (1,) * (3 - len(tuple(resolved)))
                tensors = [_extent(name, value) for name, value in named.items() if isinstance(value, torch.Tensor)]
                self.launches.append(Launch(self.fn.__name__, tuple(int(size) for size in resolved), tensors,
                                            self.uses_int64))

        return launch


_TTIR_POINTER_ARG = re.compile(r"(%[\w.]+): !tt\.ptr<")
_TTIR_DERIVED = re.compile(r"^\s*(%[\w.]+) = (?:tt\.splat|tt\.broadcast|tt\.expand_dims|tt\.reshape|tt\.addptr) "
                           r"(%[\w.]+)")
_TTIR_ADDPTR = re.compile(r"tt\.addptr (%[\w.]+), %[\w.]+ : [^,]+, (?:tensor<[^>]*x)?i(\d+)>?")
_TTIR_ITER_ARG = re.compile(r"(%[\w.]+) = (%[\w.]+)")


def addptr_offset_widths(ttir: str) -> Dict[str, List[int]]:
    """For each pointer argument of a kernel's Triton IR, the integer widths
    (32, 64) of the offsets ``tt.addptr`` adds to it or to pointers derived
    from it (splat, broadcast, expand_dims, reshape, addptr, loop-carried)."""
    origin = {name: name for name in _TTIR_POINTER_ARG.findall(ttir)}
    widths: Dict[str, set] = {name: set() for name in origin}
    for line in ttir.splitlines():
        if "iter_args(" in line:
            for carried, initial in _TTIR_ITER_ARG.findall(line.split("iter_args(", 1)[1]):
                if initial in origin:
                    origin[carried] = origin[initial]
        derived = _TTIR_DERIVED.match(line)
        if derived and derived.group(2) in origin:
            origin[derived.group(1)] = origin[derived.group(2)]
        added = _TTIR_ADDPTR.search(line)
        if added and added.group(1) in origin:
            widths[origin[added.group(1)]].add(int(added.group(2)))
    return {name.lstrip("%"): sorted(found) for name, found in widths.items()}


@functools.lru_cache(maxsize=None)
def kernel_offset_widths(kernel_name: str, arch: int = 90) -> Dict[str, List[int]]:
    """:func:`addptr_offset_widths` of the first AOT spec of ``kernel_name``
    (its bf16 one where there is one), compiled for ``sm_<arch>``. Needs a
    process without TRITON_INTERPRET."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import aot

    specs = [spec for _, spec in aot.collect_specs() if spec.kernel.fn.__name__ == kernel_name]
    if not specs:
        raise ValueError(f"no AOT spec of {kernel_name}")
    spec = next((spec for spec in specs if "bf16" in spec.label), specs[0])
    compiled = triton.compile(ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs,
                                        attrs=spec.attrs), target=GPUTarget("cuda", arch, aot.WARP_SIZE),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    return addptr_offset_widths(compiled.asm["ttir"])


def _kernel_objects(module) -> Dict[str, object]:
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # older Triton: the interpreter wraps JITFunction itself
        InterpretedFunction = JITFunction
    return {name: value for name, value in vars(module).items()
            if isinstance(value, (JITFunction, InterpretedFunction, Autotuner)) and name.endswith("_kernel")}


@contextlib.contextmanager
def recording() -> Iterator[List[Launch]]:
    """Within the block, every kernel launch of fastformers' Triton modules is recorded, not run."""
    from . import aot

    launches: List[Launch] = []
    patched = []
    for module in aot.kernel_modules():
        for name, kernel in _kernel_objects(module).items():
            patched.append((module, name, kernel))
            setattr(module, name, _Recorder(kernel, launches))
    try:
        yield launches
    finally:
        for module, name, kernel in patched:
            setattr(module, name, kernel)


# ---------------------------------------------------------------- the launchers, on meta tensors

def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _rel_attention(L, M, B, H, d, dtype=torch.bfloat16):
    from ..ops.xl import triton_kernel

    K = L + M
    q, k, v = _meta(L, B, H, d, dtype=dtype), _meta(K, B, H, d, dtype=dtype), _meta(K, B, H, d, dtype=dtype)
    pe, pb, u = _meta(K + L - 1, H, d, dtype=dtype), _meta(K + L - 1, H, dtype=dtype), _meta(H, d, dtype=dtype)
    out, lse = triton_kernel.rel_attention_forward(q, k, v, pe, pb, u, d ** -0.5, True)
    triton_kernel.rel_attention_backward(torch.empty_like(out), q, k, v, pe, pb, u, out, lse, d ** -0.5, True)


def _feedback_memory(L, B, D, dtype=torch.bfloat16):
    from ..ops.feedback import triton_kernel

    x, w = _meta(L, B, D, dtype=dtype), _meta(L, dtype=dtype)
    out = triton_kernel.feedback_memory_forward(x, w)
    triton_kernel.feedback_memory_backward(torch.empty_like(out), x, w)


def _feedback_attention_step(steps, B, H, d, dtype=torch.bfloat16):
    from ..ops.feedback import triton_kernel

    q, k, v = _meta(B, H, d, dtype=dtype), _meta(steps, B, H, d, dtype=dtype), _meta(steps, B, H, d, dtype=dtype)
    r, s, u = _meta(steps, H, d, dtype=dtype), _meta(steps, H, dtype=dtype), _meta(H, d, dtype=dtype)
    out = triton_kernel.attention_step_forward(q, k, v, steps, r, s, u, d ** -0.5)
    triton_kernel.attention_step_backward(torch.empty_like(out), q, k, v, steps, r, s, u, d ** -0.5)


def _feedback_recurrence_rows(B, D, F, dtype=torch.bfloat16):
    """The fused recurrence's row kernels (forward and backward), with dropout."""
    from ..ops.feedback import triton_kernel

    x, branch, out, z = (_meta(B, D, dtype=dtype) for _ in range(4))
    mean, rstd, weight, bias = _meta(B, dtype=dtype), _meta(B, dtype=dtype), _meta(D, dtype=dtype), _meta(D, dtype=dtype)
    norm = (weight, bias, 1e-5, z, mean, rstd)
    triton_kernel.residual_norm(x, None, bias, 0.0, 0, 0, out=x, norm=norm)
    triton_kernel.residual_norm(x, branch, bias, 0.1, 1, 0, out=out, norm=norm)
    h, gate, hidden = _meta(B, F, dtype=dtype), _meta(B, F, dtype=dtype), _meta(B, F, dtype=dtype)
    triton_kernel.ffn_hidden(h, gate, "gelu", 0.1, 1, 0, out=hidden)
    triton_kernel.ffn_hidden_backward(hidden, h, gate, "gelu", 0.1, 1, 0, torch.empty_like(h), torch.empty_like(h))
    mix = _meta(3, dtype=torch.float32)
    triton_kernel.norm_backward(z, x, mean, rstd, weight, branch, torch.empty_like(x), memory=(branch, mix, 1),
                                masked=((0.1, 1, 0), torch.empty_like(x)))


def _conv_compress(M, B, D, c, dtype=torch.bfloat16):
    from ..ops.compressive import triton_kernel

    mem, weight, bias = _meta(M, B, D, dtype=dtype), _meta(D, D, c, dtype=dtype), _meta(D, dtype=dtype)
    out = triton_kernel.conv_compress_forward(mem, weight, bias)
    triton_kernel.conv_compress_backward(torch.empty_like(out), mem, weight, True)


def _attention_reconstruction_loss(L, M, c, B, D, H, dtype=torch.bfloat16):
    from ..ops.compressive import triton_kernel

    h, mem, c_mem = _meta(L, B, D, dtype=dtype), _meta(M, B, D, dtype=dtype), _meta(M // c, B, D, dtype=dtype)
    layer = (_meta(D, dtype=dtype), _meta(D, dtype=dtype), 1e-5, _meta(D, D, dtype=dtype), None,
             _meta(D, D, dtype=dtype), None, _meta(D, D, dtype=dtype), None)
    loss, diff, stats = triton_kernel.attention_reconstruction_loss_forward(h, mem, c_mem, *layer, H, (D // H) ** -0.5)
    triton_kernel.attention_reconstruction_loss_backward(torch.empty_like(loss), h, c_mem, *layer, H,
                                                         (D // H) ** -0.5, diff, stats)


def _switch(T, d, d_ff, E, dtype=torch.bfloat16):
    from ..ops.switch import triton_kernel

    x, scale = _meta(T, d, dtype=dtype), _meta(T, dtype=dtype)
    order, offsets, kept = _meta(T, dtype=torch.int64), _meta(E + 1, dtype=torch.int64), _meta(E, dtype=torch.int64)
    w1, b1 = list(_meta(E, d_ff, d, dtype=dtype).unbind(0)), list(_meta(E, d_ff, dtype=dtype).unbind(0))
    w2, b2 = list(_meta(E, d, d_ff, dtype=dtype).unbind(0)), list(_meta(E, d, dtype=dtype).unbind(0))
    y, hidden = triton_kernel.switch_mlp_forward(x, order, offsets, kept, w1, b1, w2, b2, [], [], scale, "relu")
    triton_kernel.switch_mlp_backward(torch.empty_like(y), x, order, offsets, kept, w1, b1, w2, b2, [], [], scale,
                                      hidden, "relu")


LAUNCHERS: Dict[str, Callable] = {
    "rel_attention": _rel_attention,
    "feedback_memory": _feedback_memory,
    "feedback_attention_step": _feedback_attention_step,
    "feedback_recurrence_rows": _feedback_recurrence_rows,
    "conv_compress": _conv_compress,
    "attention_reconstruction_loss": _attention_reconstruction_loss,
    "switch": _switch,
}

# Shapes whose products pass 2^31 (tests/cuda/test_cuda_large.py runs the same
# ones on a GPU) and one past the grid's axis-1 limit (B·H = 131072).
STRESS_SHAPES = {
    "rel_attention": [(512, 1536, 4096, 8, 64), (64, 64, 8192, 16, 64)],
    "feedback_memory": [(3, 2**15, 2**15)],
    # Many pairs (one program each), few pairs over a long cache (the split walk and its merge), and a
    # memory of more step blocks than grid axis 1 takes (the positional gradient's blocks).
    "feedback_attention_step": [(8192, 1024, 8, 64), (4096, 4, 8, 128), (2**21, 1, 2, 64)],
    "feedback_recurrence_rows": [(2**20, 4096, 4096)],
    "conv_compress": [(1024, 2048, 1536, 4)],
    "attention_reconstruction_loss": [(128, 2048, 4, 1024, 1024, 8)],
    "switch": [(2**20, 512, 4096, 8)],
}


@dataclasses.dataclass
class OpCheck:
    op: str
    shape: tuple
    launches: List[Launch]
    error: str = ""

    def as_dict(self) -> dict:
        return dict(op=self.op, shape=self.shape, error=self.error,
                    launches=[dict(kernel=launch.kernel, grid=launch.grid, max_offset=launch.max_offset,
                                   kernel_uses_int64=launch.kernel_uses_int64,
                                   offset_widths=launch.offset_widths, verdict=launch.verdict,
                                   tensors=[dataclasses.asdict(t) for t in launch.tensors])
                              for launch in self.launches])


def check(op: str, shape: tuple, ttir: bool = False) -> OpCheck:
    """Every launch of ``op``'s forward and backward launchers at ``shape``;
    with ``ttir`` each kernel's IR is compiled and read (see the module docstring)."""
    error = ""
    with recording() as launches:
        try:
            LAUNCHERS[op](*shape)
        except Exception as failure:  # a launcher that cannot run on meta tensors is reported, not fatal
            error = f"{type(failure).__name__}: {failure}"
    if ttir:
        for launch in launches:
            launch.offset_widths = kernel_offset_widths(launch.kernel)
    return OpCheck(op, shape, list(launches), error)


def check_all(shapes: Optional[Dict[str, list]] = None, ttir: bool = False) -> List[OpCheck]:
    return [check(op, shape, ttir) for op, op_shapes in (shapes or STRESS_SHAPES).items() for shape in op_shapes]


def format_report(checks: List[OpCheck]) -> str:
    lines = []
    for op_check in checks:
        lines.append(f"{op_check.op} {op_check.shape}:" + (f" COULD NOT TRACE: {op_check.error}" if op_check.error else ""))
        for launch in op_check.launches:
            lines.append(f"  {launch.kernel:<36} grid {launch.grid!s:<22} max offset {launch.max_offset:>13,}  "
                         f"{launch.verdict}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastformers.testing.launch_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--no-ttir", action="store_true",
                        help="skip compiling each kernel's IR (faster; the int64 hint then comes from its source)")
    args = parser.parse_args(argv)
    from ..triton_utils import interpreter_enabled

    if interpreter_enabled() and not args.no_ttir:
        print("reading the kernels' IR needs a process without TRITON_INTERPRET (or pass --no-ttir)", file=sys.stderr)
        return 2
    checks = check_all(ttir=not args.no_ttir)
    print(format_report(checks))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([c.as_dict() for c in checks], handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
