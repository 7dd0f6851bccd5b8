"""Bad inputs and bad configurations raise ValueError/TypeError naming the argument."""
from __future__ import annotations

import pytest
import torch
from helpers import bridge_inputs, build

from attnkernels import reference as R


@pytest.mark.parametrize("name", R.names())
class TestForwardInputs:
    def test_wrong_rank(self, name: str) -> None:
        m = build(name, 16, dtype=torch.float32)
        with pytest.raises(ValueError, match=r"x must be 4-D"):
            m(torch.randn(2, 16, 5))

    def test_wrong_channel_count(self, name: str) -> None:
        m = build(name, 16, dtype=torch.float32)
        x = torch.randn(2, 12, 5, 5)
        with pytest.raises(ValueError, match=r"x must have 16 channels"):
            m(x, *bridge_inputs(m, x))

    def test_integer_dtype(self, name: str) -> None:
        m = build(name, 16, dtype=torch.float32)
        with pytest.raises(TypeError, match=r"x must be a floating-point tensor"):
            m(torch.ones(2, 16, 5, 5, dtype=torch.int64))

    def test_not_a_tensor(self, name: str) -> None:
        m = build(name, 16, dtype=torch.float32)
        with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
            m([[1.0]])

    def test_dtype_differs_from_parameters(self, name: str) -> None:
        m = build(name, 16, dtype=torch.float32)
        if next(m.parameters(), None) is None:
            pytest.fail("every registry module has parameters")
        x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
        with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the module's parameters are torch.float32"):
            m(x, *bridge_inputs(m, x))

    def test_device_differs_from_parameters(self, name: str) -> None:
        m = build(name, 16, dtype=torch.float32)
        with pytest.raises(ValueError, match=r"x is on meta but the module's parameters are on cpu"):
            m(torch.empty(2, 16, 5, 5, device="meta"))

    def test_empty(self, name: str) -> None:
        m = build(name, 16, dtype=torch.float32)
        with pytest.raises(ValueError, match=r"x must not be empty"):
            m(torch.randn(0, 16, 5, 5))


@pytest.mark.parametrize(
    "name,channels,kwargs,error,pattern",
    [
        ("se", 0, {}, ValueError, r"channels must be >= 1"),
        ("se", 16.0, {}, TypeError, r"channels must be an int"),
        ("se", 16, {"reduction": 0}, ValueError, r"reduction must be >= 1"),
        ("eca", 16, {"kernel_size": 4}, ValueError, r"kernel_size must be odd"),
        ("cbam", 16, {"spatial_kernel_size": 6}, ValueError, r"spatial_kernel_size must be odd"),
        ("ham", 16, {"separation_rate": 1.0}, ValueError, r"separation_rate must be in \(0, 1\)"),
        ("ham", 16, {"kernel_size": 0}, ValueError, r"kernel_size must be >= 1"),
        ("gam", 24, {}, ValueError, r"reduction \(16\) must divide channels \(24\)"),
        ("gam", 64, {"groups": 3}, ValueError, r"groups \(3\) must divide channels // reduction \(4\)"),
        ("gam", 64, {"groups": 0}, ValueError, r"groups must be >= 1"),
        ("pam", 7, {}, ValueError, r"channels must be >= 8"),
        ("csm", 4, {}, ValueError, r"channels must be >= 8"),
        ("criss_cross", 4, {}, ValueError, r"channels must be >= 8"),
        ("criss_cross", 16, {"recurrence": 0}, ValueError, r"recurrence must be >= 1"),
        ("softmax_spatial", 24, {"groups": 5}, ValueError, r"groups \(5\) must divide channels \(24\)"),
        ("bridge", 16, {"bridge_channels": 8}, TypeError, r"bridge_channels must be a sequence"),
        ("bridge", 16, {"bridge_channels": [8, 0]}, ValueError, r"bridge_channels\[1\] must be >= 1"),
        ("bam", 8, {}, ValueError, r"reduction \(16\) must not exceed channels \(8\)"),
        ("triplet", 16, {"kernel_size": 2}, ValueError, r"kernel_size must be odd"),
    ],
    ids=str,
)
def test_bad_configuration(name, channels, kwargs, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        R.create(name, channels, **kwargs)


def test_bridge_argument_errors() -> None:
    m = R.Bridge(16, bridge_channels=[8, 4])
    x = torch.randn(2, 16, 5, 5)
    with pytest.raises(ValueError, match=r"expected 2 bridge maps"):
        m(x, torch.randn(2, 8, 5, 5))
    with pytest.raises(ValueError, match=r"bridges\[1\] must have 4 channels"):
        m(x, torch.randn(2, 8, 5, 5), torch.randn(2, 5, 5, 5))
    with pytest.raises(ValueError, match=r"bridges\[0\] must match x in batch size"):
        m(x, torch.randn(3, 8, 5, 5), torch.randn(2, 4, 5, 5))
    with pytest.raises(TypeError, match=r"bridges\[0\] must be a floating-point tensor"):
        m(x, torch.ones(2, 8, 5, 5, dtype=torch.int32), torch.randn(2, 4, 5, 5))


def test_non_bridge_modules_take_one_input() -> None:
    with pytest.raises(TypeError):
        R.SE(16)(torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4))
