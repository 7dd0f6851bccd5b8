"""docs/contract.md's shared formulas: ECA's k, make_divisible, HAM's C_im and tie rule, reductions."""
from __future__ import annotations

import pytest
import torch

from attnkernels.reference import formulas as f


@pytest.mark.parametrize(
    "channels,k", [(64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7), (16, 3), (1, 3)]
)
def test_eca_kernel_size_table(channels: int, k: int) -> None:
    assert f.eca_kernel_size(channels) == k


@pytest.mark.parametrize("v,d,expected", [(4.0, 8, 8), (16.0, 8, 16), (12.0, 8, 16), (11.9, 8, 8), (0.1, 8, 8), (24.0, 8, 24)])
def test_make_divisible(v: float, d: int, expected: int) -> None:
    assert f.make_divisible(v, d) == expected


@pytest.mark.parametrize(
    "channels,c_im",
    [(64, 38), (128, 76), (256, 154), (512, 308), (2048, 1228), (1, 1), (2, 1), (3, 2), (5, 4), (7, 4)],
)
def test_ham_important_channels_table(channels: int, c_im: int) -> None:
    assert f.ham_important_channels(channels, 0.6) == c_im


def _sorted_rule_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """The tie rule as a sort key: larger value first, then lower index."""
    mask = torch.zeros(a.shape, dtype=torch.bool)
    for n, row in enumerate(a.tolist()):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        mask[n, order[:k]] = True
    return mask


def test_constant_attention_marks_lowest_indices() -> None:
    a = torch.full((3, 64), 0.5)
    mask = f.important_channel_mask(a, 38)
    expected = torch.zeros(3, 64, dtype=torch.bool)
    expected[:, :38] = True
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("channels,k", [(64, 38), (7, 4), (2, 1), (300, 180)])
def test_tie_rule_matches_sort_key(channels: int, k: int) -> None:
    # Few distinct values, so most channels tie with others.
    a = torch.randint(0, 5, (4, channels)).double() / 4
    mask = f.important_channel_mask(a, k)
    assert torch.equal(mask, _sorted_rule_mask(a, k))
    assert (mask.sum(dim=1) == k).all()


def test_tie_rule_chunks_large_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked rank count gives the same mask as one chunk."""
    a = torch.randint(0, 3, (9, 20)).float()
    whole = f.important_channel_mask(a, 12)
    monkeypatch.setattr(f, "_RANK_CHUNK_ELEMENTS", 2 * 20 * 20)
    assert torch.equal(f.important_channel_mask(a, 12), whole)


def test_channel_shuffle_permutation() -> None:
    x = torch.arange(12.0).view(1, 12, 1, 1)
    y = f.channel_shuffle(x, 3)
    # view (3 groups of 4) -> transpose -> channels 0,4,8,1,5,9,...
    assert y.flatten().tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduce", [f.mean_hw, f.mean_c, f.sum_c])
def test_half_reductions_accumulate_in_fp32(dtype: torch.dtype, reduce) -> None:
    """A half-precision reduction lands within one rounding of the exact result."""
    x = (1 + torch.rand(2, 512, 48, 48)).to(dtype)  # all positive: errors cannot cancel
    exact = reduce(x.double())
    got = reduce(x).double()
    assert got.dtype == torch.float64 and reduce(x).dtype == dtype
    eps = torch.finfo(dtype).eps
    assert ((got - exact).abs() <= eps * exact.abs()).all()


def test_max_reduction_splits_gradient_among_ties() -> None:
    x = torch.tensor([[[[1.0, 3.0], [3.0, 3.0]]]], requires_grad=True)
    f.max_hw(x).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([[[[0.0, 1 / 3], [1 / 3, 1 / 3]]]]))


def test_max_reduction_propagates_nan() -> None:
    x = torch.tensor([[[[1.0, float("nan")]]]])
    assert torch.isnan(f.max_hw(x)).all() and torch.isnan(f.max_c(x.transpose(1, 3))).all()
