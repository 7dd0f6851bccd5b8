"""attnkernels.budget: the extra memory a choice may keep, and GAM's save_z candidate under it."""
from __future__ import annotations

import pytest
import torch

from attnkernels import budget, choose
from attnkernels import functional as AF


def test_limit_from_block_then_environment(monkeypatch):
    monkeypatch.delenv(budget.ENV_VAR, raising=False)
    assert budget.extra_memory_limit() is None and budget.allows(10**15)
    monkeypatch.setenv(budget.ENV_VAR, "2M")
    assert budget.extra_memory_limit() == 2 * 1024**2
    assert budget.allows(2 * 1024**2) and not budget.allows(2 * 1024**2 + 1)
    with budget.extra_memory(0):
        assert budget.extra_memory_limit() == 0 and not budget.allows(1) and budget.allows(0)
        with budget.extra_memory("unlimited"):
            assert budget.extra_memory_limit() is None
        with budget.extra_memory(None):
            assert budget.extra_memory_limit() is None
    assert budget.extra_memory_limit() == 2 * 1024**2
    monkeypatch.setenv(budget.ENV_VAR, "1g")
    assert budget.extra_memory_limit() == 1024**3


@pytest.mark.parametrize("bad", ["lots", "-5", "1.5G", "M"])
def test_bad_limits_are_named(bad, monkeypatch):
    monkeypatch.setenv(budget.ENV_VAR, bad)
    with pytest.raises(ValueError, match="ATTNKERNELS_EXTRA_MEMORY must"):
        budget.extra_memory_limit()
    with pytest.raises(ValueError, match=r"budget.extra_memory\(limit\) must"):
        with budget.extra_memory(-1 if bad == "-5" else bad):
            pass


def candidates_measured(monkeypatch, limit) -> list[str]:
    """The candidates choose measures for GAM's conv2 (shuffle_conv_bn_gate) in training,
    under `limit`: each timed by a fake clock that makes saving z the fastest."""
    measured: list[str] = []

    def fake_measure(name, fn, args, prepared):
        measured.append(name)
        return 1e-3 if name.endswith("+save_z") else 2e-3

    monkeypatch.setattr(choose, "measure_candidate", fake_measure)
    monkeypatch.setenv(choose.ENV_MODE, "measure")
    choose.clear()
    n, c, h, w, groups = 2, 8, 5, 4, 2
    s = torch.randn(n, c, h, w, requires_grad=True)
    weight = torch.randn(c, c // groups, 7, 7, requires_grad=True)
    gate_x = torch.randn(n, c, h, w)
    bn_w, bn_b = torch.rand(c) + 0.5, torch.randn(c)
    with budget.extra_memory(limit):
        y = AF.shuffle_conv_bn_gate(s, weight, None, groups, groups, None, None, gate_x, bn_w, bn_b)[0]
    y.sum().backward()
    choose.clear()
    return sorted(set(measured))


def test_save_z_is_a_candidate_only_within_the_budget(monkeypatch, compiled_ops):
    z_bytes = 2 * 8 * 5 * 4 * 4  # (N, C_out, H, W) fp32
    assert any(name.endswith("+save_z") for name in candidates_measured(monkeypatch, None))
    assert any(name.endswith("+save_z") for name in candidates_measured(monkeypatch, z_bytes))
    within = candidates_measured(monkeypatch, z_bytes - 1)
    assert within and not any(name.endswith("+save_z") for name in within)
