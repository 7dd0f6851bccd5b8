"""Backbones of attnkernels.models: parameter counts, attention placement, forward/backward.

Expected channel layouts and counts are written out here from the papers and torchvision,
not read back from the models, so a slip in a model's construction shows up.
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from attnkernels import models
from attnkernels.reference import AttentionModule, Bridge, create, names

CIFAR = ("resnet20", "resnet32", "resnet56", "resnet110", "wide_resnet16_8", "resnext29_8x64d")
IMAGENET = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2")

# Output channels of every block, in order.
_MNV2 = [16] + [24] * 2 + [32] * 3 + [64] * 4 + [96] * 3 + [160] * 3 + [320]
BLOCK_CHANNELS = {
    "resnet18": [64] * 2 + [128] * 2 + [256] * 2 + [512] * 2,
    "resnet34": [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3,
    "resnet50": [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3,
    "resnet101": [256] * 3 + [512] * 4 + [1024] * 23 + [2048] * 3,
    "mobilenet_v2": _MNV2,
    "resnet20": [16] * 3 + [32] * 3 + [64] * 3,
    "resnet32": [16] * 5 + [32] * 5 + [64] * 5,
    "resnet56": [16] * 9 + [32] * 9 + [64] * 9,
    "resnet110": [16] * 18 + [32] * 18 + [64] * 18,
    "wide_resnet16_8": [128] * 2 + [256] * 2 + [512] * 2,
    "resnext29_8x64d": [256] * 3 + [512] * 3 + [1024] * 3,
}

# Published sizes at 10 classes (He et al. 2016 Table 6; Zagoruyko & Komodakis; Xie et al.),
# with the half-unit of their last digit: "1.7M" says 1.65M..1.75M, wider than 1%.
PUBLISHED = {
    "resnet20": (0.27e6, 0.005e6),
    "resnet32": (0.46e6, 0.005e6),
    "resnet56": (0.85e6, 0.005e6),
    "resnet110": (1.7e6, 0.05e6),
    "wide_resnet16_8": (11.0e6, 0.05e6),
    "resnext29_8x64d": (34.4e6, 0.05e6),
}


def n_params(module: nn.Module) -> int:
    """Number of parameter elements."""
    return sum(p.numel() for p in module.parameters())


def attention_modules(model: nn.Module) -> list[AttentionModule]:
    """The outermost attention modules (CSM holds an SE and a PAM of its own)."""
    found = []
    for child in model.children():
        found += [child] if isinstance(child, AttentionModule) else attention_modules(child)
    return found


def blocks(model: nn.Module) -> list[nn.Module]:
    """The modules that own an attention slot (`attn`, None without attention)."""
    return [m for m in model.modules() if hasattr(m, "attn") and not isinstance(m, AttentionModule)]


def image(name: str, size: int | None = None) -> torch.Tensor:
    """A small random batch of 2 (BatchNorm1d in some modules needs N > 1 in training):
    16x16 for CIFAR nets (last stage 4x4), 32x32 for ImageNet nets (last stage 1x1)."""
    size = size or (16 if name in CIFAR else 32)
    return torch.randn(2, 3, size, size)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These shapes are tiny: with two OpenMP threads on a busy 2-core machine the
    barrier waits cost more than the work (measured 3-5x slower), so use one, then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- parameter counts --------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_counts_equal_torchvision(name: str) -> None:
    ours = getattr(models, name)
    theirs = getattr(torchvision.models, name)
    assert n_params(ours()) == n_params(theirs())


@pytest.mark.parametrize("name", ("resnet18", "mobilenet_v2"))
def test_num_classes_sets_the_head(name: str) -> None:
    model = getattr(models, name)(num_classes=37)
    assert n_params(model) == n_params(getattr(torchvision.models, name)(num_classes=37))
    assert model(image(name)).shape == (2, 37)


def test_mobilenet_v2_width_mult_matches_torchvision() -> None:
    for width in (0.5, 1.4):
        assert n_params(models.mobilenet_v2(width_mult=width)) == n_params(
            torchvision.models.mobilenet_v2(width_mult=width)
        )


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_counts_match_papers(name: str) -> None:
    published, rounding = PUBLISHED[name]
    count = n_params(getattr(models, name)())
    assert abs(count - published) <= max(0.01 * published, rounding), count


@pytest.mark.parametrize(
    "name, n", [("resnet20", 3), ("resnet32", 5), ("resnet56", 9), ("resnet110", 18)]
)
def test_exact_cifar_resnet_counts(name: str, n: int) -> None:
    # Counted by hand: resnet20 = 464 (stem) + 14,016 + 51,072 + 203,520 (stages) + 650 (fc);
    # each further block per stage adds 4,672 + 18,560 + 73,984 (option A: no shortcut weights).
    assert n_params(getattr(models, name)()) == 269_722 + (n - 3) * 97_216


def test_exact_wrn_count() -> None:
    assert n_params(models.wide_resnet16_8()) == 10_961_370


@pytest.mark.parametrize("name, expected", [("resnet18", 16.04e6), ("resnet50", 151.32e6)])
def test_gam_counts_match_paper(name: str, expected: float) -> None:
    # GAM paper, Table 2 (ImageNet heads, reduction 16, one module per block).
    count = n_params(getattr(models, name)(attention="gam"))
    assert abs(count - expected) <= 0.06e6, count


def test_mobilenet_v2_gam_count_matches_paper() -> None:
    """MobileNetV2 with a GAM (reduction 16) on every inverted-residual block's output: 4.93M
    parameters (1000 classes), the GAM paper's figure. rd = C // 16 rounds down (1 in the 16-
    and 24-channel blocks); each GAM holds fc1, fc2 (2*C*rd + rd + C), conv1, conv2 (7x7:
    98*C*rd + rd + C) and two BNs (2*rd + 2*C): 100*C*rd + 4*rd + 4*C."""
    count = n_params(models.mobilenet_v2(attention="gam"))
    gam = sum(100 * c * (c // 16) + 4 * (c // 16) + 4 * c for c in _MNV2)
    assert count == 3_504_872 + gam == 4_932_060
    assert round(count / 1e6, 2) == 4.93


# --- attention placement -----------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
def test_no_attention_adds_nothing(name: str) -> None:
    model = getattr(models, name)()
    assert attention_modules(model) == []
    assert len(blocks(model)) == len(BLOCK_CHANNELS[name])
    assert all(b.attn is None for b in blocks(model))
    assert not any("attn" in key for key in model.state_dict())


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
def test_one_module_per_block_sized_to_its_output(name: str) -> None:
    model = getattr(models, name)(attention="se")
    bare = n_params(getattr(models, name)())
    mods = attention_modules(model)
    assert [m.channels for m in mods] == BLOCK_CHANNELS[name]
    assert [b.attn for b in blocks(model)] == mods
    extra = sum(n_params(create("se", c)) for c in BLOCK_CHANNELS[name])
    assert n_params(model) == bare + extra


@pytest.mark.parametrize(
    "name", ("resnet18", "resnet50", "mobilenet_v2", "resnet20", "wide_resnet16_8")
)
def test_attention_sits_before_the_residual_add(name: str) -> None:
    """Zeroing the attention output leaves only the shortcut: relu(x) after a post-activation
    add (ResNets), x itself in pre-activation / linear-bottleneck blocks (WRN, MobileNetV2)."""
    model = getattr(models, name)(attention="se").eval()
    for m in attention_modules(model):
        m.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
    post_activation = name.startswith("resnet")
    checked = 0
    for block in blocks(model):
        identity = block.residual if hasattr(block, "residual") else block.shortcut is None
        if not identity:
            continue
        x = torch.randn(2, block.attn.channels, 4, 4)
        expected = torch.relu(x) if post_activation else x
        torch.testing.assert_close(block(x), expected)
        checked += 1
    assert checked > 0


def test_attention_sees_block_output_shape() -> None:
    model = models.resnet50(attention="eca")
    seen: list[tuple[int, ...]] = []
    for m in attention_modules(model):
        m.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    model(torch.randn(2, 3, 32, 32))
    # 32x32 input: stem /4 -> 8, then /2 per later stage.
    sizes = [8] * 3 + [4] * 4 + [2] * 6 + [1] * 3
    assert seen == [(2, c, s, s) for c, s in zip(BLOCK_CHANNELS["resnet50"], sizes)]


# --- forward and backward ----------------------------------------------------------------


def check_train_step(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    """Output (N, num_classes) and finite; every attention parameter gets a finite gradient
    and every attention module a non-zero one."""
    model.train()
    y = model(x)
    assert y.shape == (x.shape[0], num_classes)
    assert torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    for m in attention_modules(model):
        grads = [p.grad for p in m.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), type(m).__name__
        assert any(g.abs().sum() > 0 for g in grads), type(m).__name__
    stem = next(model.parameters())
    assert stem.grad is not None and stem.grad.abs().sum() > 0


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
def test_forward_backward_plain(name: str) -> None:
    model = getattr(models, name)(num_classes=7)
    check_train_step(model, image(name), 7)


@pytest.mark.parametrize("attention", names())
def test_resnet20_with_every_module(attention: str) -> None:
    model = models.resnet20(num_classes=5, attention=attention)
    assert len(attention_modules(model)) == 9
    check_train_step(model, image("resnet20", 8), 5)


def test_attention_kwargs_reach_the_modules() -> None:
    model = models.resnet18(attention="gam", attention_kwargs={"groups": 4})
    assert all(m.groups == 4 for m in attention_modules(model))
    assert n_params(model) < n_params(models.resnet18(attention="gam"))


# Channels of the bridge maps of the first two blocks.
BRIDGES = {
    "resnet18": [[64], [64]],
    "resnet50": [[64, 64], [64, 64]],
    "mobilenet_v2": [[32], [96, 96]],
    "wide_resnet16_8": [[128], [128]],
    "resnext29_8x64d": [[512, 512], [512, 512]],
}


def bridge_sources(block: nn.Module) -> list[nn.Module]:
    """The sub-modules whose outputs BA-Net bridges: the block's earlier conv stages."""
    if hasattr(block, "depthwise"):  # MobileNetV2: expansion (if any), depthwise
        return [m for m in (block.expand, block.depthwise) if m is not None]
    if hasattr(block, "conv3"):  # Bottleneck: 1x1 and 3x3 stages
        return [block.conv1, block.conv2]
    return [block.conv1]  # BasicBlock; WRN's conv1 -> BN -> ReLU, the input of conv2


@pytest.mark.parametrize("name", tuple(BRIDGES))
def test_bridge_gets_the_intermediate_maps(name: str) -> None:
    model = getattr(models, name)(num_classes=3, attention="bridge")
    mods = attention_modules(model)
    assert all(isinstance(m, Bridge) for m in mods)
    assert [m.bridge_channels for m in mods[:2]] == BRIDGES[name]
    produced: dict[int, torch.Tensor] = {}
    received: list[tuple[list[nn.Module], tuple[torch.Tensor, ...]]] = []
    for block in blocks(model):
        sources = bridge_sources(block)
        for src in sources:
            src.register_forward_hook(lambda mod, inp, out: produced.__setitem__(id(mod), out))
        block.attn.register_forward_pre_hook(
            lambda mod, args, sources=sources: received.append((sources, args[1:]))
        )
    # The largest model runs on 8x8 (last stage 2x2) to keep the step cheap.
    check_train_step(model, image(name, 8 if name == "resnext29_8x64d" else None), 3)
    assert len(received) == len(mods)
    for sources, bridges in received:
        assert len(bridges) == len(sources)
        assert all(produced[id(src)] is t for src, t in zip(sources, bridges))
    # Each bridge projection got a gradient, so the maps really were passed in.
    for m in mods:
        assert all(p.weight.grad.abs().sum() > 0 for p in m.proj)


# --- bad arguments -----------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
@pytest.mark.parametrize("num_classes", (0, -3, 2.5, True, "10"))
def test_bad_num_classes(name: str, num_classes: object) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        getattr(models, name)(num_classes=num_classes)


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
@pytest.mark.parametrize("attention", ("nope", "", 3))
def test_bad_attention_name(name: str, attention: object) -> None:
    with pytest.raises(ValueError, match="attention"):
        getattr(models, name)(attention=attention)


def test_bad_attention_kwargs() -> None:
    with pytest.raises(ValueError, match="attention_kwargs"):
        models.resnet18(attention="se", attention_kwargs=[("reduction", 4)])
    with pytest.raises(ValueError, match="attention_kwargs"):
        models.resnet18(attention_kwargs={"reduction": 4})


def test_module_that_cannot_take_a_block_names_attention() -> None:
    # GAM needs rd = C // reduction >= 1; MobileNetV2's first block has 16 channels.
    with pytest.raises(ValueError, match="attention='gam'.*16 channels.*channels // reduction must be >= 1"):
        models.mobilenet_v2(attention="gam", attention_kwargs={"reduction": 32})


def test_bad_model_options() -> None:
    with pytest.raises(ValueError, match="width_mult"):
        models.mobilenet_v2(width_mult=0)
    with pytest.raises(ValueError, match="dropout"):
        models.wide_resnet16_8(dropout=1.0)
