"""Property tests (hypothesis) of the Triton backend: tests/test_properties.py's properties on
`use_backend("triton")`, with a smaller budget.

Without CUDA the kernels run on CPU tensors under the Triton interpreter (triton_cases switches
it on before triton is imported), which runs each program in Python: few examples, tiny
shapes, and no bfloat16 (the interpreter has none). fp64/fp32 results must match the reference
backend (values, NaN and inf positions, shapes, dtypes, layouts, layout independence, bitwise
repeat); fp16 results must have an error against float64 no worse than eager PyTorch's.
ham_spatial_conv has no Triton kernel (it runs torch's conv2d there) and is left out.
Failing examples are reported as drawn, not shrunk (shrinking under the interpreter takes
minutes); their draws replay on the CPU backend through tests/property_cases.py.
"""
from __future__ import annotations

# triton_cases first: it switches the Triton interpreter on without CUDA.
import triton_cases  # noqa: F401
import pytest
from hypothesis import given
from hypothesis import strategies as st
from property_cases import (
    ACC_ONLY_OPS,
    F16,
    F32,
    F64,
    FINITE_KINDS,
    INTERPRETER_SIZES,
    OPS,
    check_full_precision,
    check_low_precision,
    check_module_full_precision,
    check_module_low_precision,
    examples,
    maker,
    module_case,
)

from attnkernels import nn as fused

BACKEND = "triton"
TRITON_OPS = [op for op in OPS if op != "ham_spatial_conv"]
LOW_PRECISION_OPS = [op for op in TRITON_OPS if op not in ACC_ONLY_OPS]


@pytest.mark.parametrize("op", TRITON_OPS)
@examples(4, shrink=False)
@given(data=st.data())
def test_op_matches_reference(op: str, data) -> None:
    """fp64/fp32, every layout and value kind: the Triton op's results as the reference's."""
    m = maker(data, [F64, F32], sizes=INTERPRETER_SIZES)
    check_full_precision(OPS[op](data, m), BACKEND, m.dtype)


@pytest.mark.parametrize("op", LOW_PRECISION_OPS)
@examples(2, shrink=False)
@given(data=st.data())
def test_op_fp16_error_like_eager(op: str, data) -> None:
    """fp16 inputs: the Triton op's error against float64 no worse than eager PyTorch's."""
    m = maker(data, [F16], kinds=FINITE_KINDS, sizes=INTERPRETER_SIZES)
    check_low_precision(OPS[op](data, m), BACKEND, m.dtype)


@pytest.mark.parametrize("name", list(fused.FUSED))
@examples(3, shrink=False)
@given(data=st.data())
def test_module_matches_reference(name: str, data) -> None:
    """fp64/fp32, train / eval / inference: the fused module on Triton as its reference module."""
    m = maker(data, [F64, F32], sizes=INTERPRETER_SIZES)
    check_module_full_precision(module_case(data, name, m), BACKEND, m.dtype)


@pytest.mark.parametrize("name", list(fused.FUSED))
@examples(1, shrink=False)
@given(data=st.data())
def test_module_fp16_error_like_eager(name: str, data) -> None:
    """fp16: the fused module on Triton, its error against float64 no worse than the eager reference's."""
    m = maker(data, [F16], kinds=FINITE_KINDS, sizes=INTERPRETER_SIZES)
    check_module_low_precision(module_case(data, name, m), BACKEND, m.dtype)
