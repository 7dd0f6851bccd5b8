"""Independent formulations of docs/contract.md, to check the reference modules against.

Each oracle reads a module's parameters but computes the contract's formula another way
(per-sample loops with a sorted top-k, SDPA with an explicit mask, gathers instead of
views), so a slip in the reference does not repeat here. SE, ECA and CBAM are checked
against timm instead (tests/test_timm_interop.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkernels import reference as R


def _bn(t: torch.Tensor, bn: torch.nn.Module) -> torch.Tensor:
    """BatchNorm with the module's affine, batch stats in training and running stats in eval,
    without touching the module's running stats."""
    if bn.training:
        return F.batch_norm(t, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    return F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def ham(m: R.HAM, x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    c_im = m.c_im
    flat = x.reshape(n, c, h * w)
    a, mx = flat.mean(-1), flat.max(-1).values
    f = 0.5 * (a + mx) + m.alpha * a + m.beta * mx
    k = m.conv.weight.reshape(-1)
    pad = (k.numel() - 1) // 2
    fp = F.pad(f, (pad, pad))
    # 1-D cross-correlation written out as a sum of shifted copies.
    conv = sum(k[i] * fp[:, i : i + c] for i in range(k.numel()))
    ac = torch.sigmoid(conv)
    f1 = x * ac[:, :, None, None]
    d1s, d2s, important = [], [], torch.zeros(n, c, dtype=torch.bool)
    for s in range(n):
        values = ac[s].tolist()
        order = sorted(range(c), key=lambda j: (-values[j], j))
        top = sorted(order[:c_im])
        rest = sorted(order[c_im:])
        important[s, top] = True
        g1 = f1[s, top]
        zero = torch.zeros((h, w), dtype=x.dtype)
        max1 = g1.amax(0) if not rest else torch.maximum(g1.amax(0), zero)
        d1s.append(torch.stack([g1.sum(0) / c_im, max1]))
        if rest:
            g2 = f1[s, rest]
            d2s.append(torch.stack([g2.sum(0) / len(rest), torch.maximum(g2.amax(0), zero)]))
        else:
            d2s.append(torch.stack([zero, zero]))
    pad2 = (m.spatial_conv.kernel_size[0] - 1) // 2

    def spatial(d: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.relu(_bn(F.conv2d(d, m.spatial_conv.weight, padding=pad2), m.bn)))

    s1, s2 = spatial(torch.stack(d1s)), spatial(torch.stack(d2s))
    sel = important[:, :, None, None]
    return torch.where(sel, f1 * s1, f1 * s2)


def gam(m: R.GAM, x: torch.Tensor) -> torch.Tensor:
    g = m.groups
    hidden = F.relu(torch.einsum("nchw,rc->nrhw", x, m.fc1.weight) + m.fc1.bias[:, None, None])
    mc = torch.sigmoid(torch.einsum("nrhw,cr->nchw", hidden, m.fc2.weight) + m.fc2.bias[:, None, None])
    x1 = x * mc
    pad = m.conv1.padding
    s = F.relu(_bn(F.conv2d(x1, m.conv1.weight, m.conv1.bias, padding=pad, groups=g), m.bn1))
    rd = s.shape[1]
    # Shuffled channel j is old channel (j % g) * (rd / g) + j // g.
    perm = [(j % g) * (rd // g) + j // g for j in range(rd)]
    s = s[:, perm]
    ms = torch.sigmoid(_bn(F.conv2d(s, m.conv2.weight, m.conv2.bias, padding=pad, groups=g), m.bn2))
    return x1 * ms


def _project(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv as (N, HW, D) rows, one per pixel."""
    w = conv.weight[:, :, 0, 0]
    return torch.einsum("nchw,dc->nhwd", x, w).flatten(1, 2) + conv.bias


def pam(m: R.PAM, x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    q, k, v = (_project(p, x)[:, None] for p in (m.query, m.key, m.value))
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0)[:, 0]  # (N, HW, C)
    return m.gamma * out.transpose(1, 2).reshape(n, c, h, w) + x


def cam(m: R.CAM, x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    X = x.reshape(n, c, h * w)
    attention = torch.softmax(-(X @ X.transpose(1, 2)), dim=-1)
    return m.gamma * (attention @ X).reshape(n, c, h, w) + x


def criss_cross(m: R.CrissCross, x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    # Pixel i sees pixel j iff they share a row or a column (itself once, naturally).
    allowed = (rows[:, None] == rows[None, :]) | (cols[:, None] == cols[None, :])
    for _ in range(m.recurrence):
        q, k, v = (_project(p, x)[:, None] for p in (m.query, m.key, m.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0)[:, 0]
        x = m.gamma * out.transpose(1, 2).reshape(n, c, h, w) + x
    return x


def csm(m: R.CSM, x: torch.Tensor) -> torch.Tensor:
    se = m.channel
    pooled = x.mean((2, 3))
    hidden = F.relu(pooled @ se.fc1.weight[:, :, 0, 0].T + se.fc1.bias)
    gate = torch.sigmoid(hidden @ se.fc2.weight[:, :, 0, 0].T + se.fc2.bias)
    return pam(m.spatial, x * gate[:, :, None, None])


def softmax_spatial(m: R.SoftmaxSpatial, x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    g = m.groups
    logits = F.conv2d(x, m.conv.weight, m.conv.bias)
    maps = torch.softmax(logits.reshape(n, g, h * w), -1).reshape(n, g, h, w)
    per_channel = maps[:, [ch // (c // g) for ch in range(c)]]
    return x * per_channel * (h * w if m.rescale else 1)


def bridge(m: R.Bridge, x: torch.Tensor, *bridges: torch.Tensor) -> torch.Tensor:
    terms = [
        _bn(t.mean((2, 3)) @ proj.weight.T, bn)
        for t, proj, bn in zip([*bridges, x], m.proj, m.bn)
    ]
    u = torch.stack(terms).sum(0)
    a = torch.sigmoid(F.relu(u) @ m.fc.weight.T)
    return x * a[:, :, None, None]


def bam(m: R.BAM, x: torch.Tensor) -> torch.Tensor:
    ch, sp = m.channel, m.spatial
    mc = F.linear(F.relu(_bn(F.linear(x.mean((2, 3)), ch.fc1.weight, ch.fc1.bias), ch.bn)), ch.fc2.weight, ch.fc2.bias)
    s = F.relu(_bn(F.conv2d(x, sp.reduce.weight, sp.reduce.bias), sp.reduce_bn))
    for conv, bn in zip(sp.dilated, sp.dilated_bn):
        s = F.relu(_bn(F.conv2d(s, conv.weight, conv.bias, padding=conv.padding, dilation=conv.dilation), bn))
    ms = F.conv2d(s, sp.final.weight, sp.final.bias)
    return x * (1 + torch.sigmoid(mc[:, :, None, None] + ms))


def triplet(m: R.Triplet, x: torch.Tensor) -> torch.Tensor:
    def pool(dim: int) -> torch.Tensor:
        return torch.stack([x.amax(dim), x.mean(dim)], dim=1)

    def gate(gm: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        pad = (gm.conv.kernel_size[0] - 1) // 2
        return torch.sigmoid(_bn(F.conv2d(z, gm.conv.weight, padding=pad), gm.bn))[:, 0]

    # Pool over one axis of x directly; each map lives on the other two axes, in the
    # (row, column) orientation the permuted branch of the official code sees.
    s_hw = gate(m.hw, pool(1))[:, None]  # map over (H, W)
    s_cw = gate(m.cw, pool(2))[:, :, None, :]  # map over (C, W)
    s_hc = gate(m.hc, pool(3).transpose(2, 3)).transpose(1, 2)[:, :, :, None]  # map over (H, C)
    return x * (s_hw + s_cw + s_hc) / 3


ORACLES = {
    "ham": ham,
    "gam": gam,
    "pam": pam,
    "cam": cam,
    "criss_cross": criss_cross,
    "csm": csm,
    "softmax_spatial": softmax_spatial,
    "bridge": bridge,
    "bam": bam,
    "triplet": triplet,
}
