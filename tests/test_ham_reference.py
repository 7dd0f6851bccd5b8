"""HAM's reference beyond the oracle sweep: exact ties, tiny C, and BatchNorm called twice."""
from __future__ import annotations

import oracles
import pytest
import torch
from helpers import randomize

from attnkernels.reference import HAM


def _identity_conv(m: HAM) -> None:
    """Make the 1-D conv pass f through unchanged (Ac = sigmoid(f))."""
    with torch.no_grad():
        m.conv.weight.zero_()
        m.conv.weight[0, 0, m.kernel_size // 2] = 1.0


def test_constant_attention_keeps_lowest_channels() -> None:
    """Equal Ac everywhere: the C_im lowest channels form group 1 (docs/contract.md#top-k-rank-rule)."""
    m = randomize(HAM(16)).double().eval()
    _identity_conv(m)
    # Every channel is a pixel permutation of one map: equal mean and max, so Ac ties
    # exactly, but different maps, so which channels form group 1 changes the output.
    base = torch.randn(2, 30, dtype=torch.float64)
    perms = torch.stack([torch.randperm(30) for _ in range(16)])
    x = base[:, perms].reshape(2, 16, 5, 6)
    ac = m.channel_attention(x)
    assert torch.equal(ac, ac[:, :1].expand_as(ac))
    y = m(x)
    torch.testing.assert_close(y, oracles.ham(m, x), rtol=1e-12, atol=1e-12)
    # The opposite tie order (highest indices first) would give another output.
    y_highest_first = m(x.flip(1)).flip(1)
    assert not torch.allclose(y, y_highest_first)


@pytest.mark.parametrize("train", [True, False])
def test_relu_zero_ties(train: bool) -> None:
    """ReLU inputs: many exact zeros tie in every max; forward still equals the oracle."""
    m = randomize(HAM(24)).double().train(train)
    x = torch.relu(torch.randn(3, 24, 6, 5, dtype=torch.float64) - 0.5)
    x[:, 5] = 0  # an all-zero channel: its mean and max tie at 0
    torch.testing.assert_close(m(x), oracles.ham(m, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels", [1, 2, 3, 5])
def test_tiny_channel_counts(channels: int) -> None:
    """C = 1 has an empty second group (d2 = 0); C = 2, 3, 5 leave one or two channels out."""
    m = randomize(HAM(channels)).double().train()
    assert m.c_im + m.c_sub == channels and m.c_im >= 1
    x = torch.randn(2, channels, 4, 5, dtype=torch.float64, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, oracles.ham(m, x), rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_batchnorm_updates_running_stats_twice() -> None:
    """Training: two BN calls, each with its own batch statistics, each updating the running stats."""
    m = randomize(HAM(24)).double().train()
    seen = []
    m.bn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    mean0, var0 = m.bn.running_mean.clone(), m.bn.running_var.clone()
    batches0 = int(m.bn.num_batches_tracked)
    x = torch.randn(4, 24, 6, 7, dtype=torch.float64)
    m(x)
    assert len(seen) == 2
    expected_mean, expected_var = mean0, var0
    for t in seen:  # group 1 first, then group 2; momentum 0.1, unbiased batch variance
        expected_mean = 0.9 * expected_mean + 0.1 * t.mean()
        expected_var = 0.9 * expected_var + 0.1 * t.var()
    torch.testing.assert_close(m.bn.running_mean, expected_mean.reshape(1))
    torch.testing.assert_close(m.bn.running_var, expected_var.reshape(1))
    assert int(m.bn.num_batches_tracked) == batches0 + 2
    # The two calls saw different descriptors (groups 1 and 2).
    assert not torch.allclose(seen[0], seen[1])


def test_eval_uses_running_stats() -> None:
    m = randomize(HAM(24)).double().eval()
    before = m.bn.running_mean.clone()
    x = torch.randn(2, 24, 5, 5, dtype=torch.float64)
    y1 = m(x)
    assert torch.equal(m.bn.running_mean, before)
    # Eval output of one sample does not depend on the rest of the batch.
    torch.testing.assert_close(m(x[:1]), y1[:1], rtol=1e-12, atol=1e-12)
