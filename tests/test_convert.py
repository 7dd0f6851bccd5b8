"""attnkernels.fuse / unfuse: in-place swaps of reference and timm attention modules, and back.

The backbone tests here check the module swap alone (`tails=False`); the blocks' fused tails,
which `fuse` adds by default, have their own tests in test_block_tail.py.

Fused HAM forwards run under `use_backend("reference")` (the fused module's control flow on
the reference ops) while its C++ kernels are in progress; ECA and SE run on the default
(automatic) backend.
"""
from __future__ import annotations

import copy
import logging
import re
import sys

import pytest
import torch
from helpers import randomize
from torch import nn

import attnkernels
from attnkernels import backend, models, ops
from attnkernels import nn as fused
from attnkernels import reference as R
from attnkernels.reference.registry import REGISTRY

# timm is a test dependency (setup.py's "test" extra); a missing install must fail, not skip.
import timm
import timm.layers as timm_layers
from timm.layers.cbam import CbamModule, LightCbamModule
from timm.models.senet import SEModule as LegacySEModule

ATTENTION_TYPES = (R.AttentionModule, timm_layers.EcaModule, timm_layers.SEModule, CbamModule)


# --- helpers ---------------------------------------------------------------------------------


def randomize_model(model: nn.Module) -> nn.Module:
    """Random attention parameters and BatchNorm affines/stats: timm zero-inits the last BN
    of each block, which would feed the attention modules zeros and hide their gradients."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    for m in model.modules():
        if isinstance(m, ATTENTION_TYPES):
            randomize(m)
    return model


def forward_backward(model: nn.Module, x: torch.Tensor, backend_name: str | None = None):
    """Output, x's gradient and every parameter's gradient by name."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with backend.use_backend(backend_name):
        y = model(x)
    y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
    return y.detach(), x.grad, {k: p.grad for k, p in model.named_parameters()}


def assert_same_numbers(got, want, rel: float, atol: float = 0.0) -> None:
    """Output and every gradient equal within `rel` of the tensor's largest magnitude (+ atol)."""
    (y, gx, grads), (y_want, gx_want, grads_want) = got, want
    assert grads.keys() == grads_want.keys()
    pairs = [("y", y, y_want), ("x.grad", gx, gx_want)]
    pairs += [(k, grads[k], grads_want[k]) for k in grads_want]
    for name, a, b in pairs:
        assert a is not None and b is not None, name
        err = (a - b).abs().max().item()
        assert err <= rel * b.abs().max().item() + atol, (name, err, b.abs().max().item())


def assert_zero_bias_grads(grads: dict, grads_want: dict) -> None:
    """SoftmaxSpatial's conv bias shifts a whole softmax row: its exact gradient is 0, and both
    computed ones are rounding noise of the backward's sums. A layer whose softmax is one-hot
    has a conv weight gradient near 0 beside that noise, so the bound is the largest conv weight
    gradient of any SoftmaxSpatial in the model. Then they are left out of the comparison."""
    keys = [k for k in grads_want if k.endswith("attn.conv.bias")]
    scale = max(grads_want[k.replace("conv.bias", "conv.weight")].abs().max().item() for k in keys)
    for key in keys:
        for g in (grads.pop(key), grads_want.pop(key)):
            assert g.abs().max().item() <= 1e-9 * scale, (key, g, scale)


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def attention_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, ATTENTION_TYPES)]


def ham_on_reference(name: str) -> str | None:
    """The backend a test runs a fused forward on: the reference ops for HAM (see above)."""
    return "reference" if name == "ham" else None


# --- reference backbones -------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["eca", "se", "ham", "pam", "csm", "gam", "softmax_spatial"])
def test_fused_backbone_matches_reference(name: str, train: bool) -> None:
    model = randomize_model(models.resnet20(attention=name)).double().train(train)
    model.features[2][1].attn.train(not train)  # a mixed mode, which the swap must keep
    ref = copy.deepcopy(model)
    params = {k: p for k, p in model.named_parameters()}
    buffers = {k: b for k, b in model.named_buffers()}
    names = attention_names(model)
    swapped_names = [n for n in names if not any(n.startswith(f"{p}.") for p in names)]  # CSM's children go with it

    out, rep = attnkernels.fuse(model, tails=False, report=True)

    assert out is model
    assert [e.name for e in rep.swapped] == swapped_names and len(swapped_names) == 9
    assert rep.left == []
    assert {(e.module, e.detail) for e in rep.swapped} == {(qualname(REGISTRY[name]), qualname(fused.FUSED[name]))}
    for n in swapped_names:
        assert type(model.get_submodule(n)) is fused.FUSED[name]
    # The same parameter and buffer objects under the same keys, and the same modes.
    assert {k: p for k, p in model.named_parameters()}.keys() == params.keys()
    assert all(p is params[k] for k, p in model.named_parameters())
    assert all(b is buffers[k] for k, b in model.named_buffers())
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert modes(model) == modes(ref)

    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    got = forward_backward(model, x, ham_on_reference(name))
    want = forward_backward(ref, x)
    # PAM's key bias cancels in the softmax, GAM's conv1 bias in BN1's batch statistics: their
    # exact gradients are 0, so the computed ones are rounding noise (~1e-15) and only an
    # absolute bound compares them.
    if name == "softmax_spatial":
        assert_zero_bias_grads(got[2], want[2])
    assert_same_numbers(got, want, rel=1e-9, atol=1e-12 if name in ("pam", "csm", "gam") else 0.0)
    # Training updated every running stat (HAM's BN twice) alike.
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=k)


class _Unfused(R.AttentionModule):
    """An attention module with no fused version (every registry module has one)."""

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def test_modules_without_fused_version_are_left_with_reason() -> None:
    model = nn.Sequential(_Unfused(16), nn.ReLU(), _Unfused(16))
    before = {n: m for n, m in model.named_modules()}
    out, rep = attnkernels.fuse(model, report=True)
    assert out is model and rep.swapped == []
    assert [e.name for e in rep.left] == ["0", "2"]
    assert all("no fused version of _Unfused" in e.detail for e in rep.left)
    assert all(m is before[n] for n, m in model.named_modules())


@pytest.mark.parametrize("name", R.names())
def test_every_registry_module_is_swapped(name: str) -> None:
    """Every module of attnkernels.reference.REGISTRY has a fused version, which fuse() puts
    in each block of a backbone, and unfuse() takes out again."""
    model = models.resnet20(attention=name)
    blocks = [n for n, m in model.named_modules() if type(m) is R.REGISTRY[name]]  # CSM's children aside
    out, rep = attnkernels.fuse(model, tails=False, report=True)
    assert out is model and rep.left == []
    assert [e.name for e in rep.swapped] == blocks and len(blocks) == 9
    assert all(isinstance(model.get_submodule(e.name), fused.FUSED[name]) for e in rep.swapped)
    attnkernels.unfuse(model)
    assert all(type(model.get_submodule(e.name)) is R.REGISTRY[name] for e in rep.swapped)


class _Wrapper(R.AttentionModule):
    """An attention module with no fused version around one that has one."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.inner = R.SE(channels)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_left_module_still_gets_its_fused_children() -> None:
    """A module without a fused version is left, its SE child is swapped."""
    wrapper = randomize(_Wrapper(16)).double()
    ref = copy.deepcopy(wrapper)
    out, rep = attnkernels.fuse(wrapper, report=True)
    assert out is wrapper
    assert [e.name for e in rep.swapped] == ["inner"] and type(wrapper.inner) is fused.SE
    assert [e.name for e in rep.left] == [""] and "no fused version of _Wrapper" in rep.left[0].detail
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    assert_same_numbers(forward_backward(wrapper, x), forward_backward(ref, x), rel=1e-12)


def test_csm_is_fused_with_its_children() -> None:
    """CSM is a composite: fuse swaps it and its SE and PAM together (one report entry), the
    original keeps its own children, and unfuse turns all three back."""
    csm = randomize(R.CSM(16)).double()
    ref = copy.deepcopy(csm)
    params = dict(csm.named_parameters())
    out, rep = attnkernels.fuse(csm, report=True, backend="cpu")
    assert type(out) is fused.CSM and [e.name for e in rep.swapped] == [""] and rep.left == []
    assert type(out.channel) is fused.SE and type(out.spatial) is fused.PAM
    assert out.channel.backend == out.spatial.backend == "cpu"
    assert type(csm.channel) is R.SE and type(csm.spatial) is R.PAM  # the original is untouched
    assert all(p is params[k] for k, p in out.named_parameters())
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    # PAM's key bias cancels in the softmax: its gradient is rounding noise, hence the atol.
    assert_same_numbers(forward_backward(out, x), forward_backward(ref, x), rel=1e-12, atol=1e-13)
    back = attnkernels.unfuse(out)
    assert type(back) is R.CSM and type(back.channel) is R.SE and type(back.spatial) is R.PAM
    assert all(p is params[k] for k, p in back.named_parameters())
    assert "backend" not in vars(back.channel) and "backend" not in vars(back.spatial)


@pytest.mark.parametrize("name", ["eca", "se", "ham"])
def test_model_that_is_an_attention_module(name: str) -> None:
    module = randomize(R.create(name, 24)).double().eval()
    ref = copy.deepcopy(module)
    params = list(module.parameters())
    out, rep = attnkernels.fuse(module, report=True)
    assert type(out) is fused.FUSED[name] and out is not module
    assert [e.name for e in rep.swapped] == [""]
    assert all(a is b for a, b in zip(out.parameters(), params)) and not out.training
    x = torch.randn(2, 24, 5, 4, dtype=torch.float64)
    assert_same_numbers(forward_backward(out, x, ham_on_reference(name)), forward_backward(ref, x), rel=1e-12)
    back = attnkernels.unfuse(out)
    assert type(back) is type(module) and all(a is b for a, b in zip(back.parameters(), params))


def test_no_attention_modules_swaps_nothing(caplog) -> None:
    model = models.resnet20()
    sd = model.state_dict()
    with caplog.at_level(logging.INFO, logger="attnkernels"):
        out, rep = attnkernels.fuse(model, tails=False, report=True)
    assert out is model and rep.swapped == [] and rep.left == []
    assert "attnkernels.fuse: swapped 0, left 0" in caplog.text
    assert all(v is not None and torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    lin = nn.Linear(3, 4)
    assert attnkernels.fuse(lin) is lin


def test_report_is_logged(caplog) -> None:
    model = models.resnet20(attention="se")
    with caplog.at_level(logging.INFO, logger="attnkernels"):
        attnkernels.fuse(model, tails=False)
    record = next(r for r in caplog.records if r.name == "attnkernels")
    assert record.levelno == logging.INFO
    assert "swapped 9, left 0" in record.getMessage()
    assert "features.1.0.attn: attnkernels.reference.se.SE -> attnkernels.nn.se.SE" in record.getMessage()


# --- timm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,kwargs,timm_cls,count", [
    ("ecaresnet50d", {}, timm_layers.EcaModule, 16),
    ("seresnet18", {}, timm_layers.SEModule, 8),
    ("resnet18", {"block_args": {"attn_layer": "cbam"}}, CbamModule, 8),
], ids=["ecaresnet50d", "seresnet18", "resnet18-cbam"])
def test_timm_model_matches(name: str, kwargs: dict, timm_cls: type, count: int, train: bool) -> None:
    # Training in float64: BatchNorm over few values (2 samples of 2x2 maps in the last stage)
    # puts float32 gradients about 1e-2 off the float64 ones, and a last-bit difference of the
    # fused modules' sums (or another thread count) moves them by as much.
    dtype = torch.float64 if train else torch.float32
    model = randomize_model(timm.create_model(name, pretrained=False, **kwargs)).train(train).to(dtype)
    ref = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if type(m) is timm_cls]
    params = dict(model.named_parameters())

    out, rep = attnkernels.fuse(model, tails=False, report=True)

    assert out is model and len(names) == count
    assert [e.name for e in rep.swapped] == names and rep.left == []
    assert all(type(model.get_submodule(n)) in fused.FUSED.values() for n in names)
    assert all(p is params[k] for k, p in model.named_parameters())
    assert model.state_dict().keys() == ref.state_dict().keys()
    ref_modes = modes(ref)
    assert all(ref_modes[n] == m for n, m in modes(model).items())

    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    got, want = forward_backward(model, x), forward_backward(ref, x)
    assert_same_numbers(got, want, rel=1e-9 if train else 2e-4)
    attn_grads = [want[2][k] for k in want[2] if k.startswith(names[0] + ".")]
    assert attn_grads and all(g.abs().max() > 0 for g in attn_grads)  # the comparison can fail


# config -> (make the timm module, channels of its input)
REPRODUCIBLE_TIMM = {
    "eca-default": (lambda: timm_layers.EcaModule(64), 64),
    "eca-kernel-7-no-channels": (lambda: timm_layers.EcaModule(kernel_size=7), 20),
    "eca-act_layer-ignored": (lambda: timm_layers.EcaModule(64, act_layer=nn.GELU), 64),  # used with use_mlp only
    "eca-nn-sigmoid": (lambda: timm_layers.EcaModule(64, gate_layer=nn.Sigmoid), 64),
    "se-default": (lambda: timm_layers.SEModule(64), 64),
    "se-rd_channels-5": (lambda: timm_layers.SEModule(64, rd_channels=5), 64),  # an rd our constructor never makes
    "se-rd_ratio-quarter": (lambda: timm_layers.SEModule(48, rd_ratio=0.25, rd_divisor=1), 48),
    "se-relu-by-name": (lambda: timm_layers.SEModule(64, act_layer="relu", gate_layer=nn.Sigmoid), 64),
    "cbam-default": (lambda: CbamModule(64), 64),
    "cbam-rd_channels-5": (lambda: CbamModule(64, rd_channels=5), 64),  # an rd our constructor never makes
    "cbam-kernel-3": (lambda: CbamModule(48, spatial_kernel_size=3), 48),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config", list(REPRODUCIBLE_TIMM))
def test_reproducible_timm_modules_are_swapped_and_match(config: str, train: bool) -> None:
    make, channels = REPRODUCIBLE_TIMM[config]
    module = randomize(make()).double().train(train)
    ref = copy.deepcopy(module)
    keys = module.state_dict().keys()
    out, rep = attnkernels.fuse(nn.Sequential(nn.Identity(), module), report=True)
    swapped = out[1]
    assert type(swapped) in fused.FUSED.values() and [e.name for e in rep.swapped] == ["1"]
    assert swapped.state_dict().keys() == keys and swapped.training == train
    x = torch.randn(2, channels, 5, 3, dtype=torch.float64)
    assert_same_numbers(forward_backward(swapped, x), forward_backward(ref, x), rel=1e-12)


UNREPRODUCIBLE_TIMM = {
    "eca-use_mlp": (lambda: timm_layers.EcaModule(64, use_mlp=True), "use_mlp=True"),
    "eca-hard-sigmoid": (lambda: timm_layers.EcaModule(64, gate_layer="hard_sigmoid"), "gate is .*not sigmoid"),
    "eca-padding": (lambda: _with_padding(timm_layers.EcaModule(64), (0,)), r"conv.padding is \(0,\)"),
    "eca-circular": (lambda: timm_layers.CecaModule(64), "circular"),
    "se-add_maxpool": (lambda: timm_layers.SEModule(64, add_maxpool=True), "add_maxpool=True"),
    "se-gelu": (lambda: timm_layers.SEModule(64, act_layer=nn.GELU), "act is GELU, not ReLU"),
    "se-hard-sigmoid": (lambda: timm_layers.SEModule(64, gate_layer="hard_sigmoid"), "gate is .*not sigmoid"),
    "se-bn": (lambda: timm_layers.SEModule(64, norm_layer=nn.BatchNorm2d), "bn is BatchNorm2d"),
    "se-no-bias": (lambda: timm_layers.SEModule(64, bias=False), "fc1 has no bias"),
    "se-legacy-senet": (lambda: LegacySEModule(64, 16), "legacy SENet"),
    "se-subclass": (lambda: type("MySE", (timm_layers.SEModule,), {})(64), "subclass of timm's SEModule"),
    "cbam-mlp_bias": (lambda: CbamModule(64, mlp_bias=True), "channel.fc1 has a bias"),
    "cbam-silu": (lambda: CbamModule(64, act_layer=nn.SiLU), "channel.act is SiLU, not ReLU"),
    "cbam-hard-sigmoid": (lambda: CbamModule(64, gate_layer="hard_sigmoid"), "gate is .*not sigmoid"),
    "cbam-spatial-act": (lambda: _with_spatial_act(CbamModule(64)), "spatial.conv.bn.act is ReLU, not Identity"),
    "cbam-light": (lambda: LightCbamModule(64), "light CBAM"),
}


def _with_padding(module: nn.Module, padding: tuple) -> nn.Module:
    module.conv.padding = padding
    return module


def _with_spatial_act(module: nn.Module) -> nn.Module:
    module.spatial.conv.bn.act = nn.ReLU()
    return module


@pytest.mark.parametrize("config", list(UNREPRODUCIBLE_TIMM))
def test_unreproducible_timm_modules_are_left_with_reason(config: str) -> None:
    make, reason = UNREPRODUCIBLE_TIMM[config]
    module = make()
    model = nn.Sequential(nn.Conv2d(3, 64, 1), module)
    out, rep = attnkernels.fuse(model, report=True)
    assert out is model and model[1] is module
    assert rep.swapped == []
    assert [e.name for e in rep.left] == ["1"]
    assert rep.left[0].module == f"{type(module).__module__}.{type(module).__qualname__}"
    assert re.search(reason, rep.left[0].detail), rep.left[0].detail
    # At the top level too.
    assert attnkernels.fuse(module) is module


def test_timm_fused_module_has_every_attribute_of_a_constructed_one() -> None:
    """Guards the build around timm's submodules: a fused class that gains an attribute
    in __init__ must get it in convert.py's timm adapter too."""
    for name, timm_module in [
        ("eca", timm_layers.EcaModule(64)),
        ("se", timm_layers.SEModule(64)),
        ("cbam", CbamModule(64)),
    ]:
        from_timm = attnkernels.fuse(timm_module)
        constructed = fused.FUSED[name](64)
        assert set(vars(constructed)) <= set(vars(from_timm)), name
        assert dict(constructed.named_children()).keys() == dict(from_timm.named_children()).keys()


def test_fuse_works_without_timm(monkeypatch) -> None:
    module = timm_layers.SEModule(64)
    monkeypatch.setitem(sys.modules, "timm.layers", None)  # `import timm.layers` now raises ImportError
    model = nn.Sequential(R.ECA(64), module)
    out, rep = attnkernels.fuse(model, report=True)
    assert type(out[0]) is fused.ECA and out[1] is module
    assert [e.name for e in rep.swapped] == ["0"]


# --- backend pinning -----------------------------------------------------------------------


def test_backend_pins_the_swapped_modules(monkeypatch) -> None:
    model = randomize_model(models.resnet20(attention="ham")).double()
    ref = copy.deepcopy(model)
    out, rep = attnkernels.fuse(model, backend="reference", tails=False, report=True)
    assert rep.backend == "reference" and len(rep.swapped) == 9
    assert all(model.get_submodule(e.name).backend == "reference" for e in rep.swapped)
    assert "backend='reference'" in repr(model.get_submodule(rep.swapped[0].name))
    chosen = []
    select = backend.select

    def spy(hot_path, device):
        chosen.append(select(hot_path, device))
        return chosen[-1]

    # Every backend choice of the fused ops: each op module that chooses binds `select`.
    for module in (ops._common, *(ops.hot_path_module(p) for p in ops.HOT_PATHS)):
        if hasattr(module, "select"):
            monkeypatch.setattr(module, "select", spy)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    # The pin wins over an outer choice (Triton has no ham_spatial kernels: it would raise).
    got = forward_backward(model, x, backend_name="triton")
    assert chosen and set(chosen) == {"reference"}
    assert_same_numbers(got, forward_backward(ref, x), rel=1e-9)


def test_backend_argument_errors() -> None:
    model = models.resnet20(attention="eca")
    with pytest.raises(ValueError, match=r"fuse: backend must be None, 'auto' or one of .*got 'gpu'"):
        attnkernels.fuse(model, backend="gpu", tails=False)
    with pytest.raises(ValueError, match=r"backend must be"):
        attnkernels.fuse(model, backend=3, tails=False)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run channel_gate on cpu"):
            attnkernels.fuse(model, backend="cuda", tails=False)
        assert type(model.features[1][0].attn) is R.ECA  # checked before any swap
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        attnkernels.fuse(torch.randn(3))
    _, rep = attnkernels.fuse(model, backend="AUTO", tails=False, report=True)  # auto: not pinned
    assert rep.backend is None and model.features[1][0].attn.backend is None


def test_fused_classes_wrap_their_forward_in_the_pin() -> None:
    """Every fused class lists FusedModule first and overrides attend, not forward, so the
    backend pin applies; its reference class is the registry's class of the same name."""
    for name, cls in fused.FUSED.items():
        assert cls.forward is fused.FusedModule.forward, name
        assert fused.reference_class(cls) is REGISTRY[name], name
        assert cls.backend is None


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["resnet20-ham", "resnet20-se", "ecaresnet26t"])
def test_fuse_unfuse_round_trip(source: str) -> None:
    if source.startswith("resnet20"):
        model = models.resnet20(attention=source.split("-")[1])
    else:
        model = timm.create_model(source, pretrained=False)
    classes = {n: type(m) for n, m in model.named_modules()}
    objects = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    hook_calls = []
    first = attention_names(model)[0]
    handle = model.get_submodule(first).register_forward_hook(lambda *args: hook_calls.append(1))

    attnkernels.fuse(model, tails=False)
    assert type(model.get_submodule(first)) in fused.FUSED.values()
    model.eval()  # a mode change while fused reaches the restored modules
    with backend.use_backend("reference"):
        model(torch.randn(1, 3, 32, 32))
    assert hook_calls == [1]  # hooks of the swapped module keep firing

    out, rep = attnkernels.unfuse(model, report=True)
    assert out is model and len(rep.swapped) == len(attention_names(model)) and rep.left == []
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(not m.training for m in model.modules())
    if source == "ecaresnet26t":  # the very timm modules come back
        assert all(m is objects[n] for n, m in model.named_modules())
    assert all(p is params[k] for k, p in model.named_parameters())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    handle.remove()
    model(torch.randn(1, 3, 32, 32))
    assert hook_calls == [1]  # the handle still removes the hook


def test_fusing_twice_is_a_no_op() -> None:
    model = nn.Sequential(R.SE(32), timm_layers.EcaModule(32), _Unfused(32))
    attnkernels.fuse(model, backend="reference")
    after_first = dict(model.named_modules())
    out, rep = attnkernels.fuse(model, report=True)  # another backend would not re-pin either
    assert out is model and rep.swapped == []
    assert [(e.name, e.detail) for e in rep.left[:2]] == [("0", "already fused"), ("1", "already fused")]
    assert rep.left[2].name == "2" and "no fused version of _Unfused" in rep.left[2].detail
    assert dict(model.named_modules()) == after_first
    assert model[0].backend == "reference"


def test_module_registered_twice_becomes_one_fused_module() -> None:
    se = R.SE(16)
    model = nn.Sequential(se, nn.ReLU(), se)
    out, rep = attnkernels.fuse(model, report=True)
    assert model[0] is model[2] and type(model[0]) is fused.SE
    assert [e.name for e in rep.swapped] == ["0"]
    attnkernels.unfuse(model)
    assert model[0] is model[2] and type(model[0]) is R.SE


def test_unfuse_turns_constructed_fused_modules_to_reference() -> None:
    model = nn.Sequential(fused.ECA(16), type("MyECA", (fused.ECA,), {})(16))
    out, rep = attnkernels.unfuse(model, report=True)
    assert type(model[0]) is R.ECA and type(model[1]).__name__ == "MyECA"
    assert [e.name for e in rep.swapped] == ["0"] and [e.name for e in rep.left] == ["1"]
