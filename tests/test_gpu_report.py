"""The pieces of ``python -m fastformers.gpu_report`` that need no compiler:
the SASS instruction count and the roofline model (the compiled report
itself is checked by tests/test_aot.py)."""
import pytest

from fastformers.benchmarks import gpu
from fastformers.gpu_report import format_roofline, roofline
from fastformers.testing.aot import count_sass_opcodes

LISTING = """
	.target	sm_90a

//--------------------- .text.other_kernel --------------------------
	.section	.text.other_kernel,"ax",@progbits
.text.other_kernel:
        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;


//--------------------- .text.my_kernel  --------------------------
	.section	.text.my_kernel,"ax",@progbits
my_kernel:
.text.my_kernel:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 gdesc[UR4], RZ, !UPT ;
        /*0020*/              @!P0 HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0030*/               @P1 REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR6][R2.64], R5 ;
        /*0040*/                   ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, R7, desc[UR6][R2.64], R5 ;
        /*0050*/                   FFMA.FTZ R0, R1, R2, R3 ;
.L_x_0:
        /*0060*/                   FFMA R0, R1, R2, R3 ;
        /*0070*/                   FMUL R0, R1, R2 ;
        /*0080*/                   REDUX.SUM UR4, R0 ;
.L_x_1:


//--------------------- .text.my_kernel_tail --------------------------
	.section	.text.my_kernel_tail,"ax",@progbits
.text.my_kernel_tail:
        /*0000*/                   HGMMA.64x64x16.F32.BF16 gdesc[UR4], RZ, !UPT ;


//--------------------- SYMBOLS --------------------------
	.type		my_kernel,@function
"""


def test_sass_counts_one_functions_instructions():
    counts = count_sass_opcodes(LISTING, "my_kernel")
    assert counts == dict(HMMA=1, HGMMA=1, RED=0, REDG=1, ATOM=0, ATOMG=1, ATOMS=0, FFMA=2, DFMA=0)


def test_sass_count_refuses_a_missing_function():
    with pytest.raises(RuntimeError, match="no_such_kernel"):
        count_sass_opcodes(LISTING, "no_such_kernel")


def test_roofline_models_every_benchmark_shape():
    lines = roofline()
    expected = {(op, gpu._label(op, shape)) for op, shapes in gpu.SHAPES.items() for shape in shapes}
    assert {(line["op"], line["shape"]) for line in lines} == expected
    for line in lines:
        assert line["ideal_us"] == max(line["compute_us"], line["memory_us"]) > 0
    assert "ROOFLINE MODEL, not a measurement" in format_roofline(lines)


def test_attention_flops_count_the_causal_pairs():
    L, M, B, H, d = 5, 3, 2, 4, 8
    pairs = sum(1 for i in range(L) for j in range(L + M) if j <= M + i)
    fused = gpu.work("rel_attention", (L, M, B, H, d), 2)
    anchor = gpu.work("rel_attention", (L, M, B, H, d), 2, backend=gpu.SDPA)
    assert fused.forward_flops == 3 * 2 * pairs * B * H * d  # content, positional and value products
    assert anchor.forward_flops == 2 * 2 * pairs * B * H * d  # no positional term
    assert fused.forward_backward_flops > fused.forward_flops


def test_work_refuses_an_unknown_op():
    with pytest.raises(ValueError, match="no model"):
        gpu.work("no_such_op", (1,), 4)
