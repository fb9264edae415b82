"""The one op library, ``torch.ops.fastformers``.

Schemas are defined here, in Python, once; the C++ extension only adds CPU
kernels with ``TORCH_LIBRARY_IMPL(fastformers, CPU, ...)``, Triton launchers
are registered for CUDA, and each op's reference is registered under
``CompositeExplicitAutograd`` so it serves every device without a kernel
(including CPU when the extension is not built).
"""
import torch

NAMESPACE = "fastformers"
lib = torch.library.Library(NAMESPACE, "DEF")


def qualname(name: str) -> str:
    return f"{NAMESPACE}::{name}"


# The int narrowing of every C++ GEMM call's sizes and leading dimensions
# (csrc/blas_check.cpp), callable so tests reach values no test can allocate.
lib.define("_blas_dims(int m, int n, int k, int lda, int ldb, int ldc) -> int[]")
