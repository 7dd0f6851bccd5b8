"""SE, ECA and CBAM load timm's SEModule, EcaModule and CbamModule weights and compute the same."""
from __future__ import annotations

import pytest
import torch
from helpers import SHAPES, randomize

from attnkernels import reference as R

# timm is a test dependency (setup.py's "test" extra); a missing install must fail, not skip.
import timm.layers as timm_layers
from timm.layers.cbam import CbamModule


def _pairs(channels: int):
    return [
        ("se", R.SE(channels), timm_layers.SEModule(channels)),
        ("eca", R.ECA(channels), timm_layers.EcaModule(channels)),
        ("cbam", R.CBAM(channels), CbamModule(channels)),
    ]


def _forward_backward(m: torch.nn.Module, x: torch.Tensor, g: torch.Tensor):
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = m(x)
    y.backward(g)
    grads = {k: p.grad for k, p in m.named_parameters()}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("index,name", list(enumerate(["se", "eca", "cbam"])))
def test_loads_timm_weights_and_matches(shape: tuple, train: bool, index: int, name: str) -> None:
    _, ours, theirs = _pairs(shape[1])[index]
    randomize(theirs).double().train(train)
    ours.double().train(train)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    y_ours, gx_ours, gp_ours = _forward_backward(ours, x, g)
    y_timm, gx_timm, gp_timm = _forward_backward(theirs, x, g)
    torch.testing.assert_close(y_ours, y_timm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_ours, gx_timm, rtol=1e-12, atol=1e-12)
    # Parameter gradients by value: the CBAM key names differ, the order does not.
    assert len(gp_ours) == len(gp_timm)
    for a, b in zip(gp_ours.values(), gp_timm.values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if train and name == "cbam":  # both BNs updated their running stats alike
        torch.testing.assert_close(ours.spatial.bn.running_mean, theirs.spatial.conv.bn.running_mean)


def test_same_configuration_same_sizes() -> None:
    for channels in (64, 256, 2048):
        for name, ours, theirs in _pairs(channels):
            assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()], name


def test_cbam_key_mapping() -> None:
    theirs = CbamModule(64)
    ours = R.CBAM(64)
    assert "spatial.conv.conv.weight" in theirs.state_dict()
    assert "spatial.conv.weight" in ours.state_dict() and "spatial.bn.running_var" in ours.state_dict()
    ours.load_state_dict(theirs.state_dict())  # strict by default
    torch.testing.assert_close(ours.spatial.conv.weight, theirs.spatial.conv.conv.weight)
    # Our own keys still load into a fresh module.
    R.CBAM(64).load_state_dict(ours.state_dict())
