"""Pieces every backbone shares: argument checks, the per-block attention module,
conv-BN-activation units, the classifier head, weight init and model assembly.

Every block builds its attention module with a `make_attn(out_channels, bridge_channels)`
factory and applies it with `apply_attention(self.attn, out, bridges)`, so placement and
the Bridge protocol live here once.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import nn

from attnkernels.reference import REGISTRY, create

#: `make_attn(channels, bridge_channels)` -> the block's attention module, or None.
AttentionFactory = Callable[[int, Sequence[int]], Optional[nn.Module]]


def check_num_classes(num_classes: int) -> None:
    """Raise ValueError unless `num_classes` is an int >= 1 (bools excluded)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")


def attention_factory(
    attention: str | None, attention_kwargs: dict | None
) -> AttentionFactory:
    """Check the model's attention arguments and return the factory its blocks call.

    The factory returns None when `attention` is None, so a plain backbone gets no
    extra modules. Otherwise it calls the registry's `create(attention, channels,
    **attention_kwargs)`, adding `bridge_channels` for modules that take bridges.
    An unknown name raises ValueError here, before any block is built; a ValueError
    from the module's constructor (e.g. GAM's reduction leaving rd = C // reduction = 0) is
    re-raised naming `attention` and the channel count.
    """
    known = isinstance(attention, str) and attention.lower() in REGISTRY
    if attention is not None and not known:
        # Fail before any block is built; `create` would only see it at the first one.
        raise ValueError(
            f"attention must be None or one of {', '.join(REGISTRY)}; got {attention!r}"
        )
    if attention_kwargs is not None and not isinstance(attention_kwargs, dict):
        raise ValueError(f"attention_kwargs must be a dict or None, got {attention_kwargs!r}")
    if attention is None and attention_kwargs:
        # Silently dropping options would hide a typo in the caller's config.
        raise ValueError("attention_kwargs were given but attention is None")
    kwargs = dict(attention_kwargs or {})

    def make_attn(channels: int, bridge_channels: Sequence[int]) -> nn.Module | None:
        if attention is None:
            return None
        takes_bridges = REGISTRY[attention.lower()].takes_bridges
        extra = {"bridge_channels": list(bridge_channels)} if takes_bridges else {}
        try:
            return create(attention, channels, **kwargs, **extra)
        except ValueError as err:
            raise ValueError(f"attention={attention!r} ({channels} channels): {err}") from err

    return make_attn


def apply_attention(
    attn: nn.Module | None, out: torch.Tensor, bridges: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Apply a block's attention module to its output; Bridge also gets `bridges`."""
    if attn is None:
        return out
    if attn.takes_bridges:
        return attn(out, *bridges)
    return attn(out)


def conv_bn(
    in_ch: int,
    out_ch: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = None,
) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BatchNorm -> optional activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


def classifier(in_ch: int, num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    """Global average pool -> flatten -> (dropout) -> Linear."""
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(in_ch, num_classes))
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    """He init for convs, unit/zero BatchNorm, small normal Linear; attention modules keep
    their own initialisation (e.g. PAM's gamma = 0, HAM's alpha = beta = 0.5)."""
    for child in module.children():
        if hasattr(child, "takes_bridges"):
            continue
        if isinstance(child, nn.Conv2d):
            nn.init.kaiming_normal_(child.weight, mode="fan_out", nonlinearity="relu")
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, nn.BatchNorm2d):
            nn.init.ones_(child.weight)
            nn.init.zeros_(child.bias)
        elif isinstance(child, nn.Linear):
            nn.init.normal_(child.weight, 0.0, 0.01)
            nn.init.zeros_(child.bias)
        else:
            init_weights(child)


class Backbone(nn.Module):
    """`classifier(features(x))`: the container every model function returns.

    Args:
        features: stem, stages and any final feature layers, as one Sequential.
        head: maps the last feature map to logits.
    """

    def __init__(self, features: nn.Sequential, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.classifier = head
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


#: `block(in_ch, out_ch, stride, make_attn)`: one block of a stage.
BlockFn = Callable[[int, int, int, AttentionFactory], nn.Module]
#: `(block, out_ch, count, stride)`: `count` blocks; only the first changes width and stride.
StageSpec = Tuple[BlockFn, int, int, int]


def build(
    num_classes: int,
    attention: str | None,
    attention_kwargs: dict | None,
    stem: Sequence[nn.Module],
    stem_ch: int,
    stages: Sequence[StageSpec],
    tail: Sequence[nn.Module] = (),
    head_ch: int | None = None,
    dropout: float = 0.0,
) -> Backbone:
    """Check the common arguments and assemble stem, stages, tail and classifier.

    `head_ch` is the classifier's input width: the last stage's output unless `tail`
    changes it. Every block gets the same attention factory.
    """
    check_num_classes(num_classes)
    make_attn = attention_factory(attention, attention_kwargs)
    layers = list(stem)
    in_ch = stem_ch
    for block, out_ch, count, stride in stages:
        blocks = [block(in_ch, out_ch, stride, make_attn)]
        blocks += [block(out_ch, out_ch, 1, make_attn) for _ in range(count - 1)]
        layers.append(nn.Sequential(*blocks))
        in_ch = out_ch
    layers += tail
    head = classifier(head_ch or in_ch, num_classes, dropout)
    return Backbone(nn.Sequential(*layers), head)
