"""Ahead-of-time compile check of every Triton kernel in ``fastformers.ops``.

Each ``fastformers/ops/<family>/triton_kernel.py`` declares ``AOT_SPECS``; every
spec is compiled for each requested NVIDIA arch (no GPU needed) and its cubin is
inspected with the tools of the triton wheel: registers, shared memory and
spills (``cuobjdump --dump-resource-usage``), and from the SASS (``nvdisasm``)
the count of the instructions that say how the kernel computes: tensor-core
products (``HMMA``, mma.sync; ``HGMMA``, Hopper's wgmma), atomics (``RED``/
``REDG``/``ATOM``/``ATOMG``/``ATOMS``: non-deterministic summation order) and
CUDA-core FMAs (``FFMA``, ``DFMA``). The disassembler costs a third of a
second per cubin whatever its size (most of a warm run), so a caller that reads
the counts of only some modules asks for those (``sass_modules``); the others
get ``sass=None``.

Must run in a process without ``TRITON_INTERPRET``: the interpreter replaces
``@triton.jit`` kernels at import time with functions Triton cannot compile.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import multiprocessing
import os
import pkgutil
import re
import subprocess
import tempfile
from types import ModuleType

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import fastformers.ops
from fastformers.triton_utils import AotSpec

# Static + dynamic shared memory one block may use (CUDA programming guide,
# opt-in maximum); Triton only checks it when a kernel is launched.
MAX_SHARED_BYTES_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

WARP_SIZE = 32

_RESOURCE_USAGE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")

# SASS opcodes counted per kernel (the mnemonic before its first '.').
SASS_OPCODES = ("HMMA", "HGMMA", "RED", "REDG", "ATOM", "ATOMG", "ATOMS", "FFMA", "DFMA")
ATOMIC_OPCODES = ("RED", "REDG", "ATOM", "ATOMG", "ATOMS")
# An instruction line: "/*0a30*/  @!P0 HMMA.16816.F32.BF16 R4, ..." (the predicate is optional).
_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9]*)", re.MULTILINE)
# nvdisasm heads each ELF section with "//------- .text.my_kernel -------".
_DISASSEMBLY_SECTION = re.compile(r"^//-+ +(\S+) +-+$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class AotResult:
    """One spec compiled for one arch; resource fields are None if it did not compile."""

    kernel: str
    module: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int | None = None
    static_shared_bytes: int | None = None
    dynamic_shared_bytes: int | None = None
    local_bytes: int | None = None
    stack_bytes: int | None = None
    # Count of each of SASS_OPCODES in the kernel's SASS; None if not disassembled.
    sass: dict | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def shared_bytes(self) -> int | None:
        if self.static_shared_bytes is None:
            return None
        return self.static_shared_bytes + self.dynamic_shared_bytes

    @property
    def atomics(self) -> int | None:
        return None if self.sass is None else sum(self.sass[opcode] for opcode in ATOMIC_OPCODES)

    @property
    def spill_bytes(self) -> int | None:
        """Per-thread local memory; any of it means ptxas ran out of registers."""
        if self.local_bytes is None:
            return None
        return self.local_bytes + self.stack_bytes

    def as_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "shared_bytes": self.shared_bytes,
            "spill_bytes": self.spill_bytes,
            "atomics": self.atomics,
            "ok": self.ok,
        }


def _reraise_import_error(package_name: str) -> None:
    # walk_packages calls this inside its `except ImportError`, which it would
    # otherwise swallow, silently dropping a kernel family from the check.
    raise


def kernel_modules() -> list[ModuleType]:
    """Every ``fastformers.ops.<family>.triton_kernel`` module, imported."""
    return [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(
            fastformers.ops.__path__, prefix="fastformers.ops.", onerror=_reraise_import_error
        )
        if info.name.rsplit(".", 1)[-1] == "triton_kernel"
    ]


def collect_specs(arch: int | None = None) -> list[tuple[str, AotSpec]]:
    """``(module name, spec)`` for every spec of every kernel module (those
    for ``sm_<arch>`` only, when given: see ``AotSpec.archs``)."""
    collected = []
    for module in kernel_modules():
        specs = getattr(module, "AOT_SPECS", None)
        if not specs:
            raise RuntimeError(f"{module.__name__} declares no AOT_SPECS; every Triton kernel module must")
        collected.extend((module.__name__, spec) for spec in specs if arch is None or spec.compiles_for(arch))
    return collected


def _resource_usage(cubin_path: str, function_name: str) -> tuple[int, int, int, int]:
    """Registers, then stack, static shared and local bytes, of one function of a cubin."""
    dump = subprocess.run(
        [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin_path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name, registers, stack, shared, local in _RESOURCE_USAGE.findall(dump):
        if name == function_name:
            return int(registers), int(stack), int(shared), int(local)
    raise RuntimeError(f"cuobjdump reports no function {function_name!r}:\n{dump}")


def count_sass_opcodes(sass: str, function_name: str) -> dict:
    """Count of each of :data:`SASS_OPCODES` in ``function_name``'s part of a
    ``nvdisasm`` listing (a function's code is its section ``.text.<name>``)."""
    sections = _DISASSEMBLY_SECTION.split(sass)
    # split() gives [preamble, name, body, name, body, ...]
    bodies = [body for name, body in zip(sections[1::2], sections[2::2]) if name == f".text.{function_name}"]
    if not bodies:
        raise RuntimeError(f"nvdisasm lists no function {function_name!r}")
    counts = dict.fromkeys(SASS_OPCODES, 0)
    for opcode in _SASS_INSTRUCTION.findall(bodies[0]):
        if opcode in counts:
            counts[opcode] += 1
    return counts


def _sass_counts(cubin_path: str, function_name: str) -> dict:
    # nvdisasm directly, not through `cuobjdump -sass` (which runs it): a third
    # less CPU with only the code sections (-c) and without the dataflow analysis
    # (-ndf) that only labels branch targets; the instructions are the same.
    sass = subprocess.run(
        [knobs.nvidia.nvdisasm.path, "-c", "-ndf", cubin_path], capture_output=True, text=True, check=True
    ).stdout
    return count_sass_opcodes(sass, function_name)


def _problems(result: AotResult) -> str:
    problems = []
    if result.spill_bytes:
        problems.append(f"spills ({result.local_bytes} B local, {result.stack_bytes} B stack per thread)")
    limit = MAX_SHARED_BYTES_PER_BLOCK[result.arch]
    if result.shared_bytes > limit:
        problems.append(f"needs {result.shared_bytes} B shared memory, sm_{result.arch} allows {limit} B")
    return "; ".join(problems)


def compile_spec(module_name: str, spec: AotSpec, arch: int, workdir: str, disassemble: bool = True) -> AotResult:
    """Compile one spec for ``sm_<arch>``; a compile error becomes the result's
    ``error``. ``disassemble``: count its SASS opcodes (else ``sass`` is None)."""
    identity = dict(kernel=spec.name, module=module_name, arch=arch, num_warps=spec.num_warps, num_stages=spec.num_stages)
    try:
        compiled = triton.compile(
            ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs),
            target=GPUTarget("cuda", arch, WARP_SIZE),
            # triton.compile takes launch options only through this dict; without
            # it every spec would compile with the defaults (4 warps, 3 stages).
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
    except Exception as error:  # any compiler failure is this kernel's result, not the report's
        return AotResult(**identity, error=f"compile failed: {type(error).__name__}: {error}")

    cubin_path = os.path.join(workdir, f"{compiled.metadata.hash}.cubin")
    with open(cubin_path, "wb") as cubin:
        cubin.write(compiled.asm["cubin"])
    registers, stack, static_shared, local = _resource_usage(cubin_path, compiled.metadata.name)
    result = AotResult(
        **identity,
        registers=registers,
        static_shared_bytes=static_shared,
        dynamic_shared_bytes=compiled.metadata.shared,
        local_bytes=local,
        stack_bytes=stack,
        sass=_sass_counts(cubin_path, compiled.metadata.name) if disassemble else None,
    )
    return dataclasses.replace(result, error=_problems(result))


def _compile_task(task: tuple[int, int, str, bool]) -> AotResult:
    # Runs in a worker process: specs hold JIT functions, which do not pickle, so
    # the worker finds its spec again by index.
    index, arch, workdir, disassemble = task
    module_name, spec = collect_specs()[index]
    return compile_spec(module_name, spec, arch, workdir, disassemble)


def run_aot_check(archs, jobs: int = 0, kernel_filter: str = "", sass_modules=None) -> list[AotResult]:
    """Compile every spec of the package (whose name contains ``kernel_filter``)
    for every arch in ``archs`` that it is for (``AotSpec.archs``), on ``jobs`` processes (0: by the amount of
    work, at most one per CPU); results in spec, then arch, order.

    ``sass_modules``: disassemble only the kernels of the modules whose name
    contains one of these strings (None: every kernel); every kernel still gets
    its registers, shared memory and spills."""
    unknown = sorted(set(archs) - MAX_SHARED_BYTES_PER_BLOCK.keys())
    if unknown:
        raise ValueError(f"unknown arch {unknown}; choose from {sorted(MAX_SHARED_BYTES_PER_BLOCK)}")
    specs = collect_specs()
    chosen = [index for index, (_, spec) in enumerate(specs) if kernel_filter in spec.name]
    if not chosen:
        raise ValueError(f"no kernel spec name contains {kernel_filter!r}")
    if isinstance(sass_modules, str):
        raise TypeError(f"sass_modules must be a sequence of module name parts, not the string {sass_modules!r}")
    if sass_modules is not None:
        module_names = {module_name for module_name, _ in specs}
        unmatched = [part for part in sass_modules if not any(part in name for name in module_names)]
        if unmatched:
            raise ValueError(f"no kernel module name contains {unmatched}; choose from {sorted(module_names)}")

    def disassemble(module_name: str) -> bool:
        return sass_modules is None or any(part in module_name for part in sass_modules)

    with tempfile.TemporaryDirectory(prefix="fastformers-aot-") as workdir:
        tasks = [
            (index, arch, workdir, disassemble(specs[index][0]))
            for index in chosen
            for arch in archs
            if specs[index][1].compiles_for(arch)
        ]
        # A worker process costs an import of torch and triton: worth it only
        # when each has a few dozen compilations to do.
        jobs = jobs or max(1, min(os.cpu_count() or 1, len(tasks) // 24))
        if jobs == 1:
            return [_compile_task(task) for task in tasks]
        # spawn, not fork: the parent has torch's thread pools running.
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(_compile_task, tasks))
