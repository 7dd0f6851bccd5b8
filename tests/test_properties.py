"""Property tests (hypothesis) of every fused op and module on the C++ CPU backend.

For every public op of the five hot paths (`attnkernels.functional`) and every fused module
(`attnkernels.nn.FUSED`, in training, in eval with gradients and in inference), over drawn
shapes (1s, odd sizes, small channel counts), strides (tests/property_cases.py's LAYOUTS:
dense, sliced, channel slices, broadcast), dtypes and values (ties, zeros, large magnitudes,
NaN, +-inf), against the `reference` backend / the reference modules (docs/contract.md):

* fp64/fp32: output and every gradient equal up to summation order, NaN and inf at the same
  places, the same shapes and dtypes; outputs and input gradients in x's layout; the same
  numbers whatever the layout; bitwise the same run after run; BatchNorm buffers too;
* fp16/bf16: each result's error against the float64 truth at most twice the eager
  reference's in the same dtype, plus two units of rounding (finite values only).

Hypothesis runs derandomized (the same examples every run; property_cases.examples). A
falsifying example prints its draws: dtype, layout, values, seed, shapes and options.
"""
from __future__ import annotations

import pytest
from helpers import load_compiled_ops
from hypothesis import given
from hypothesis import strategies as st
from property_cases import (
    ACC_ONLY_OPS,
    BF16,
    F16,
    F32,
    F64,
    FINITE_KINDS,
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

BACKEND = "cpu"
LOW_PRECISION_OPS = [op for op in OPS if op not in ACC_ONLY_OPS]


@pytest.fixture(autouse=True, scope="module")
def _compiled_ops() -> None:
    load_compiled_ops()


@pytest.mark.parametrize("op", list(OPS))
@examples(40)
@given(data=st.data())
def test_op_matches_reference(op: str, data) -> None:
    """fp64/fp32, every layout and value kind: the op's outputs and gradients as the reference's."""
    m = maker(data, [F64, F32])
    check_full_precision(OPS[op](data, m), BACKEND, m.dtype)


@pytest.mark.parametrize("op", LOW_PRECISION_OPS)
@examples(15)
@given(data=st.data())
def test_op_low_precision_error_like_eager(op: str, data) -> None:
    """fp16/bf16 inputs: the op's error against float64 no worse than eager PyTorch's."""
    m = maker(data, [F16, BF16], kinds=FINITE_KINDS)
    check_low_precision(OPS[op](data, m), BACKEND, m.dtype)


@pytest.mark.parametrize("name", list(fused.FUSED))
@examples(40)
@given(data=st.data())
def test_module_matches_reference(name: str, data) -> None:
    """fp64/fp32, train / eval / inference: the fused module as its reference module."""
    m = maker(data, [F64, F32])
    check_module_full_precision(module_case(data, name, m), BACKEND, m.dtype)


@pytest.mark.parametrize("name", list(fused.FUSED))
@examples(12)
@given(data=st.data())
def test_module_low_precision_error_like_eager(name: str, data) -> None:
    """fp16/bf16: the fused module's error against float64 no worse than the eager reference's."""
    m = maker(data, [F16, BF16], kinds=FINITE_KINDS)
    check_module_low_precision(module_case(data, name, m), BACKEND, m.dtype)
