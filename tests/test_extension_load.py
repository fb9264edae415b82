"""The C++ kernels are registered as soon as fastformers is imported, and a failed load still
falls back to the reference with one warning. Fresh interpreters: the test process has long
imported fastformers."""
import os
import subprocess
import sys
import textwrap

import pytest

from fastformers import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("FASTFORMERS_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(not _backend.extension_available(), reason="fastformers._C is not built in this installation")
def test_import_registers_the_cpp_kernels_before_the_first_call():
    out = run_python("""
        import torch
        import fastformers
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        print(has("fastformers::rel_attention", "CPU"), has("fastformers::feedback_memory", "CPU"))
        # the first call of a raw op: C++ returns zeros for no layers, where the kernel used to give garbage
        print(torch.ops.fastformers.feedback_memory(torch.randn(0, 2, 3), torch.randn(0)).abs().sum().item())
    """)
    assert out.split("\n")[:2] == ["True True", "0.0"]


def test_a_failed_load_falls_back_and_warns_once():
    out = run_python("""
        import importlib.abc, sys, warnings

        class RefuseExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "fastformers._C":
                    raise ImportError("simulated: the extension is broken")
                return None

        sys.meta_path.insert(0, RefuseExtension())
        import torch
        import fastformers
        print(fastformers.extension_available(), "cpp" in fastformers.available_backends())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                m = fastformers.ops.feedback_memory(torch.randn(3, 2, 4), torch.randn(3))
        print(sum("not built" in str(w.message) and "simulated" in str(w.message) for w in caught))
    """)
    assert out.split("\n")[:2] == ["False False", "1"]
