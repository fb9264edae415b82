"""Which implementation an op runs: ``reference``, ``cpp`` or ``triton``.

Precedence, highest first: an explicit ``backend=`` argument (modules pass
their ``backend`` attribute), the innermost :func:`use_backend` context, the
``FASTFORMERS_BACKEND`` environment variable, then the automatic choice
(``cpp`` for CPU tensors when the extension is built, ``triton`` for CUDA
tensors, ``reference`` otherwise).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
import warnings
from typing import Iterator, Optional, Sequence

import torch

BACKENDS = ("reference", "cpp", "triton")

logger = logging.getLogger("fastformers")

_override = threading.local()
_extension_error: Optional[BaseException] = None
_extension_loaded = False
_warned_missing_extension = False


def load_extension() -> bool:
    """Import ``fastformers._C`` (once; a failure is kept in ``_extension_error``); True when loaded."""
    global _extension_loaded, _extension_error
    if _extension_loaded or _extension_error is not None:
        return _extension_loaded
    try:
        importlib.import_module("fastformers._C")
        _extension_loaded = True
    except ImportError as error:
        _extension_error = error
    return _extension_loaded


def extension_available() -> bool:
    """True when the C++ CPU kernels (``fastformers._C``) are importable."""
    return load_extension()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends() -> list[str]:
    """Backends usable in this installation (``reference`` always is)."""
    names = ["reference"]
    if extension_available():
        names.append("cpp")
    if triton_available():
        names.append("triton")
    return names


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` for every fastformers op called inside the block (this thread)."""
    _validate(name)
    stack = getattr(_override, "stack", None)
    if stack is None:
        stack = _override.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def forced_backend() -> Optional[str]:
    """The backend forced by a :func:`use_backend` block or ``FASTFORMERS_BACKEND``."""
    stack = getattr(_override, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("FASTFORMERS_BACKEND", "").strip()
    if env:
        if env not in BACKENDS:
            raise ValueError(f"FASTFORMERS_BACKEND must be one of {BACKENDS}, got {env!r}")
        return env
    return None


def _warn_missing_extension() -> None:
    global _warned_missing_extension
    if not _warned_missing_extension:
        _warned_missing_extension = True
        warnings.warn(
            "fastformers: the C++ extension fastformers._C is not built "
            f"({_extension_error}); CPU ops run on the pure-PyTorch reference path. "
            "Reinstall with `pip install --no-build-isolation .` to build it.",
            RuntimeWarning,
            stacklevel=3,
        )


def resolve_backend(device: torch.device, requested: Optional[str] = None, implemented: Sequence[str] = BACKENDS) -> str:
    """The backend an op on ``device`` runs with; raises if it cannot run there.

    ``implemented`` lists the backends the calling op has kernels for: the
    automatic choice stays within it (an op without a Triton kernel runs its
    reference on CUDA), and forcing a backend outside it raises.
    """
    name = requested if requested is not None else forced_backend()
    if name is None:
        if device.type == "cuda" and triton_available() and "triton" in implemented:
            name = "triton"
        elif device.type == "cpu" and extension_available() and "cpp" in implemented:
            name = "cpp"
        else:
            if device.type == "cpu" and not extension_available():
                _warn_missing_extension()
            name = "reference"
        logger.debug("fastformers: auto backend %s for device %s", name, device)
        return name
    _validate(name)
    if name not in implemented:
        raise NotImplementedError(
            f"backend {name!r} has no kernel for this op yet (implemented: {', '.join(implemented)})"
        )
    if name == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on CPU tensors only, got tensors on {device}")
        if not extension_available():
            raise RuntimeError(
                f"backend 'cpp' requested but fastformers._C is not built ({_extension_error})"
            )
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' requested but triton is not installed")
        if device.type == "cpu":
            from .triton_utils import interpreter_enabled

            if not interpreter_enabled():
                raise RuntimeError(
                    "backend 'triton' on CPU tensors needs the Triton interpreter: "
                    "set TRITON_INTERPRET=1 before importing fastformers"
                )
        elif device.type != "cuda":
            raise ValueError(f"backend 'triton' runs on CUDA tensors (or CPU via the interpreter), got {device}")
    return name


_warned_fallbacks: set = set()
_warned_lock = threading.Lock()


class FallbackWarning(UserWarning):
    """A module or op ran its reference path instead of its fused kernels."""


def _warn_once(key: tuple, message: str) -> None:
    with _warned_lock:
        if key in _warned_fallbacks:
            return
        _warned_fallbacks.add(key)
    # stacklevel 4: the caller of the module or op that fell back
    warnings.warn(message, FallbackWarning, stacklevel=4)


def warn_fallback(module: object, reason: str) -> None:
    """Warn once per (module class, reason) that ``module`` left its fused path.

    ``reason`` says why and what to change; it is also what
    :func:`fastformers.explain` reports.
    """
    _warn_once((type(module).__qualname__, reason),
               f"fastformers: {type(module).__name__} runs the reference path: {reason}")


def warn_op_fallback(op_name: str, reason: str) -> None:
    """Warn once per (op, reason) that op ``op_name`` ran its reference
    implementation on a device whose kernels do not take the call (``reason``
    says why and what to change); shares :func:`warn_fallback`'s registry."""
    _warn_once(("op", op_name, reason), f"fastformers: op {op_name} runs the reference path: {reason}")
