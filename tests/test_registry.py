"""`create` and the registry: every module of docs/contract.md by its lower-case name."""
from __future__ import annotations

import pytest
import torch

import attnkernels
from attnkernels import reference as R

EXPECTED = {
    "se": R.SE,
    "eca": R.ECA,
    "cbam": R.CBAM,
    "ham": R.HAM,
    "gam": R.GAM,
    "pam": R.PAM,
    "cam": R.CAM,
    "csm": R.CSM,
    "softmax_spatial": R.SoftmaxSpatial,
    "bridge": R.Bridge,
    "bam": R.BAM,
    "triplet": R.Triplet,
    "criss_cross": R.CrissCross,
}


def test_names_cover_the_spec() -> None:
    assert R.names() == list(EXPECTED)


@pytest.mark.parametrize("name,cls", EXPECTED.items())
def test_create_builds_the_class(name: str, cls: type) -> None:
    m = R.create(name, 32)
    assert type(m) is cls and m.channels == 32
    assert attnkernels.create(name, 32).state_dict().keys() == m.state_dict().keys()
    assert cls.__doc__ and "y" in cls.__doc__  # the formula is in the docstring
    assert m.takes_bridges == (name == "bridge")


def test_create_passes_kwargs() -> None:
    assert R.create("gam", 64, groups=4).groups == 4
    assert R.create("eca", 64, kernel_size=9).kernel_size == 9


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"unknown attention name 'sk'; expected one of se, eca"):
        R.create("sk", 32)


@pytest.mark.parametrize(
    "name,keys",
    [
        ("se", {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}),
        ("eca", {"conv.weight"}),
        ("ham", {"alpha", "beta", "conv.weight", "spatial_conv.weight", "bn.weight", "bn.bias"}),
        ("gam", {"fc1.weight", "fc2.bias", "conv1.weight", "conv1.bias", "bn1.weight", "conv2.weight", "bn2.bias"}),
        ("pam", {"query.weight", "key.bias", "value.weight", "gamma"}),
        ("cam", {"gamma"}),
        ("csm", {"channel.fc1.weight", "spatial.query.weight", "spatial.gamma"}),
        ("softmax_spatial", {"conv.weight", "conv.bias"}),
        ("bridge", {"proj.0.weight", "bn.0.weight", "fc.weight"}),
    ],
)
def test_spec_state_dict_keys(name: str, keys: set) -> None:
    assert keys <= set(R.create(name, 64).state_dict())


def test_parameter_shapes_follow_the_spec() -> None:
    ham = R.HAM(256)
    assert ham.alpha.shape == () and ham.alpha.item() == 0.5 and ham.beta.item() == 0.5
    assert ham.conv.weight.shape == (1, 1, 5) and ham.c_im == 154
    gam = R.GAM(256, groups=4)
    assert gam.conv1.weight.shape == (16, 64, 7, 7) and gam.conv2.weight.shape == (256, 4, 7, 7)
    assert R.PAM(64).query.weight.shape == (8, 64, 1, 1) and R.PAM(64).gamma.item() == 0.0
    assert R.SE(64).fc1.weight.shape == (8, 64, 1, 1)
    assert R.CBAM(64).channel.fc1.weight.shape == (4, 64, 1, 1)
    assert R.Bridge(64, [32]).proj[0].weight.shape == (4, 32)
    # GAM parameters per module: 2*C*rd + rd + C (MLP) + 49*C*rd*2/g + rd + C (convs) + 2*(rd + C) (BN).
    c, rd = 256, 16
    assert sum(p.numel() for p in R.GAM(c).parameters()) == 2 * c * rd + rd + c + 98 * c * rd + rd + c + 2 * (rd + c)
    assert torch.is_tensor(R.CAM(8).gamma)
