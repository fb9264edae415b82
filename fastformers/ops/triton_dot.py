"""The tensor-core product every Triton kernel family uses (``@triton.jit``, called from kernels)."""
import triton
import triton.language as tl


@triton.jit
def mma(a, b, ACC: tl.constexpr, UPCAST_DOTS: tl.constexpr, PRECISION: tl.constexpr):
    """``a @ b`` accumulated in ACC; float32 operands as PRECISION says ("tf32" or "ieee")."""
    if UPCAST_DOTS:
        # The interpreter multiplies 16-bit float tensors as their raw bit
        # patterns; the conversion to float32 is exact and so are the products
        # in float32, so this computes what the GPU's dot with float32
        # accumulation does.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, out_dtype=ACC, input_precision=PRECISION)
