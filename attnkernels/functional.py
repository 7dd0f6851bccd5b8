"""The fused functional API: one function per op of each hot path, on the chosen backend.

Each function runs on the backend `attnkernels.backend.select` picks for the tensor's
device (C++, CUDA, Triton, or the plain-PyTorch reference below) and is differentiable.

channel_gate hot path (ECA; SE's and CBAM's pooling; HAM's channel half):
    avg, max = channel_pool(x)                          # one read of x
    gate     = channel_gate(avg, max, weight, mode=...)  # (N, C): mix, 1-D conv over C, sigmoid
    y        = channel_rescale(x, gate)                  # one read of x, one write of y

ham_spatial hot path (HAM's spatial half, given the channel gate Ac):
    d1, d2, mask = ham_spatial_pool(x, gate, c_im)       # one read of x: top-k mask, dual pooling
    z            = ham_spatial_conv(cat[d1, d2], weight)  # the shared 7x7 conv on the small maps
    s1, s2       = sigmoid(relu(bn(z[:N]))), sigmoid(relu(bn(z[N:])))  (torch, small maps)
    y            = ham_spatial_apply(x, gate, mask, s1, s2)  # one read of x, one write of y

nonlocal_attn hot path (PAM's HW x HW attention, flash-style; q, k, v from PAM's 1x1 convs):
    y = nonlocal_attn(q, k, v, x, gamma)   # gamma * (v @ softmax(q^T k)^T) + x, no HW x HW tensor

gam_channel and shuffle_conv hot paths (GAM):
    x1 = gam_channel(x, w1, b1, w2, b2)                   # per-pixel MLP gate, one read of x
    z1 = shuffle_conv(x1, conv1.weight, conv1.bias, g)    # raw grouped 7x7 conv (acc dtype)
    y  = shuffle_conv(z1, conv2.weight, conv2.bias, g, g, in_scale, in_shift,
                      gate_x=x1, out_scale=..., out_shift=...)   # BN1+ReLU+shuffle on load,
                                                                 # BN2+sigmoid+multiply epilogue
    y, mean, var = shuffle_conv_bn_gate(...)              # the same with BN2's batch statistics
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import select
from .ops import ops_for
from .ops import shuffle_conv as _shuffle_conv_ops
from .reference._base import memory_format_of
from .reference.formulas import accumulate_dtype, important_channel_mask

#: channel_gate's pooling modes: f = avg, f = max, or HAM's 0.5*(avg+max) + alpha*avg + beta*max.
GATE_MODES = {"avg": 0, "max": 1, "mix": 2}

__all__ = [
    "GATE_MODES",
    "channel_pool",
    "channel_gate",
    "channel_rescale",
    "channel_attention",
    "channel_mlp_attention",
    "ham_spatial_pool",
    "ham_spatial_apply",
    "ham_spatial_conv",
    "nonlocal_attn",
    "gam_channel",
    "shuffle_conv",
    "shuffle_conv_bn_gate",
]


def channel_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and max of x (N, C, H, W) over H*W: two (N, C) maps in the accumulation dtype."""
    backend = select("channel_gate", x.device)
    if backend == "reference":
        acc = accumulate_dtype(x.dtype)
        return x.mean(dim=(2, 3), dtype=acc), x.amax(dim=(2, 3)).to(acc)
    return ops_for(backend).channel_pool(x)


def channel_gate(
    avg: torch.Tensor,
    max: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    mode: str = "avg",
) -> torch.Tensor:
    """`sigmoid(conv1d_over_C(f))` (N, C), f chosen by `mode` ("avg", "max", "mix").

    `weight` holds the k taps of the zero-padded 1-D conv (k odd, any shape with k
    elements, e.g. a Conv1d(1, 1, k) weight); "mix" needs the scalars alpha and beta.
    """
    alpha, beta = _check_gate_args("channel_gate", weight, alpha, beta, mode)
    backend = select("channel_gate", avg.device)
    if backend == "reference":
        return _reference_gate(avg, max, weight, alpha, beta, mode)
    return ops_for(backend).channel_gate(avg, max, weight, alpha, beta, GATE_MODES[mode])


def channel_rescale(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """`y = x * gate[:, :, None, None]`, computed in the accumulation dtype, in x's dtype and layout.

    `gate` (N, C) is cast to the accumulation dtype of x if it is not already.
    """
    gate = gate.to(accumulate_dtype(x.dtype))
    backend = select("channel_gate", x.device)
    if backend == "reference":
        y = (x.to(gate.dtype) * gate[:, :, None, None]).to(x.dtype)
        return y.contiguous(memory_format=memory_format_of(x))
    return ops_for(backend).channel_rescale(x, gate)


def channel_attention(
    x: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    mode: str = "avg",
) -> torch.Tensor:
    """The whole ECA-style gate: `channel_rescale(x, channel_gate(*channel_pool(x), ...))`.

    On the C++/CUDA backends this is one op (the CPU kernel pools, gates and rescales each
    sample while it is in cache); elsewhere the three ops run in turn.
    """
    backend = select("channel_gate", x.device)
    if backend in ("cpu", "cuda"):
        alpha, beta = _check_gate_args("channel_attention", weight, alpha, beta, mode)
        return torch.ops.attnkernels.channel_attention(x, weight, alpha, beta, GATE_MODES[mode])[0]
    avg, max_ = channel_pool(x)
    return channel_rescale(x, channel_gate(avg, max_, weight, alpha, beta, mode))


def channel_mlp_attention(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
) -> torch.Tensor:
    """SE's whole gate: `y = x * sigmoid(w2 @ relu(w1 @ mean_hw(x) + b1) + b2)`.

    `w1` holds (rd, C) values and `w2` (C, rd) (e.g. the weights of SE's 1x1 convs fc1 and
    fc2); the MLP runs in the accumulation dtype of x. On the C++ backend one op pools, gates
    and rescales each sample while it is in cache; elsewhere channel_pool, the MLP in torch
    and channel_rescale run in turn.
    """
    backend = select("channel_gate", x.device)
    if backend in ("cpu", "cuda"):
        return torch.ops.attnkernels.channel_mlp_attention(x, w1, b1, w2, b2)[0]
    avg, _ = channel_pool(x)
    rd = w1.shape[0]
    h = F.relu(F.linear(avg, w1.reshape(rd, -1).to(avg.dtype), None if b1 is None else b1.to(avg.dtype)))
    gate = torch.sigmoid(F.linear(h, w2.reshape(-1, rd).to(avg.dtype), None if b2 is None else b2.to(avg.dtype)))
    return channel_rescale(x, gate)


def ham_spatial_pool(
    x: torch.Tensor, gate: torch.Tensor, c_im: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HAM's channel separation and dual spatial pooling, in one read of x.

    `gate` is Ac (N, C). Returns `d1, d2` (N, 2, H, W) and `mask` (N, C), all in the
    accumulation dtype: mask marks the `c_im` top channels of gate per sample (SPEC's tie
    rule), and with `G1 = x*gate*mask`, `G2 = x*gate*(1 - mask)`,
    `d1 = [sum_c G1 / c_im, max_c G1]`, `d2 = [sum_c G2 / max(C - c_im, 1), max_c G2]`
    (each max over all C channels, the zeroed ones included). No gradient flows to mask.
    """
    _check_c_im("ham_spatial_pool", x, c_im)
    gate = gate.to(accumulate_dtype(x.dtype))
    backend = select("ham_spatial", x.device)
    if backend == "reference":
        return _reference_ham_pool(x, gate, c_im)
    return ops_for(backend).ham_spatial_pool(x, gate, c_im)


def ham_spatial_apply(
    x: torch.Tensor, gate: torch.Tensor, mask: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor
) -> torch.Tensor:
    """HAM's output `y = G1*s1 + G2*s2` with `G1 = x*gate*mask`, `G2 = x*gate*(1 - mask)`.

    gate and mask are (N, C), s1 and s2 the groups' spatial gates (N, 1, H, W); all are
    cast to the accumulation dtype of x. y has x's dtype and memory format.
    """
    acc = accumulate_dtype(x.dtype)
    gate, mask, s1, s2 = (t.to(acc) for t in (gate, mask, s1, s2))
    backend = select("ham_spatial", x.device)
    if backend == "reference":
        f1 = x.to(acc) * gate[:, :, None, None]
        m = mask[:, :, None, None]
        y = (f1 * m * s1 + f1 * (1 - m) * s2).to(x.dtype)
        return y.contiguous(memory_format=memory_format_of(x))
    return ops_for(backend).ham_spatial_apply(x, gate, mask, s1.contiguous(), s2.contiguous())


def ham_spatial_conv(d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """HAM's shared spatial conv: `conv2d(d, weight, padding=(k-1)//2)` without bias, for the
    small (N, Cd, H, W) maps d in an accumulation dtype, weight (1, Cd, k, k) cast to d's dtype.

    On CPU a C++ kernel (oneDNN's setup costs more than this ~100-multiply-add-per-pixel conv
    itself); on every other backend torch's conv2d (cuDNN on GPUs).
    """
    if select("ham_spatial", d.device) == "cpu":
        return torch.ops.attnkernels.ham_spatial_conv(d, weight)
    return F.conv2d(d, weight.to(d.dtype), padding=(weight.shape[-1] - 1) // 2)


def nonlocal_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    """Position attention over all H*W pixels: `y = gamma * (v @ softmax(q^T k, -1)^T) + x`.

    q, k are (N, D_qk, H, W) and v, x (N, D_v, H, W) (D_qk and D_v independent), viewed as
    (N, D, H*W); no 1/sqrt(D) scaling; energies and softmax in the accumulation dtype;
    gamma holds one value. The fused backends never hold the (H*W x H*W) attention matrix,
    forward or backward (online softmax; the backward recomputes it block by block).
    y has x's dtype and memory format.
    """
    _check_nonlocal_args(q, k, v, x, gamma)
    backend = select("nonlocal_attn", x.device)
    if backend == "reference":
        return _reference_nonlocal_attn(q, k, v, x, gamma)
    return ops_for(backend).nonlocal_attn(q, k, v, x, gamma)[0]


def gam_channel(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """GAM's channel gate: `x1 = x * sigmoid(fc2(relu(fc1(x))))` at every pixel.

    w1 (rd, C), b1 (rd), w2 (C, rd), b2 (C) are the two nn.Linear layers' weights, used in the
    accumulation dtype of x. The fused backends read x once and write only x1 (the MLP's
    hidden and output maps never reach memory; backward recomputes them from x).
    """
    _check_gam_channel_args(x, w1, b1, w2, b2)
    backend = select("gam_channel", x.device)
    if backend == "reference":
        return _reference_gam_channel(x, w1, b1, w2, b2)
    return ops_for(backend).gam_channel(x, w1, b1, w2, b2)


def shuffle_conv(
    s: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    groups: int = 1,
    shuffle_groups: int = 1,
    in_scale: torch.Tensor | None = None,
    in_shift: torch.Tensor | None = None,
    gate_x: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    out_shift: torch.Tensor | None = None,
    conv: str = "auto",
) -> torch.Tensor:
    """A grouped k x k conv (stride 1, same padding) of s read through the channel shuffle
    (`shuffle_groups`; 1 for none) and an optional `relu(in_scale * s + in_shift)` on load.

    Without `gate_x`: the raw output `z = conv + bias` (N, C_out, H, W) in the accumulation
    dtype of s. With `gate_x`, `out_scale`, `out_shift`: `gate_x * sigmoid(out_scale * z +
    out_shift)` in gate_x's dtype (GAM's last step with BN2 folded); z is never written.
    `conv` picks the conv: "direct" (the backend's own kernels), "library" (torch's conv2d,
    oneDNN or cuDNN, with the prologue and epilogue around it), or "auto" (per backend, see
    `attnkernels.ops.shuffle_conv.conv_algorithm`).
    """
    gate = (gate_x, out_scale, out_shift)
    if any(t is None for t in gate) and not all(t is None for t in gate):
        raise ValueError("shuffle_conv: gate_x, out_scale and out_shift must be given together")
    _check_shuffle_conv_args(s, weight, groups, shuffle_groups, in_scale, in_shift, gate_x)
    backend = select("shuffle_conv", s.device)
    if backend == "reference":
        return _reference_shuffle_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, out_scale, out_shift)
    ops = ops_for(backend)
    if _shuffle_conv_ops.conv_algorithm(conv, backend, groups, s.shape[2] * s.shape[3]) == "direct":
        return ops.shuffle_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, out_scale, out_shift)
    dtype = s.dtype if gate_x is None else gate_x.dtype
    z = _shuffle_conv_ops.library_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, dtype)
    if gate_x is None:
        return z.to(accumulate_dtype(s.dtype))
    return ops.shuffle_conv_epilogue(z, gate_x, out_scale, out_shift)


def shuffle_conv_bn_gate(
    s: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    shuffle_groups: int,
    in_scale: torch.Tensor | None,
    in_shift: torch.Tensor | None,
    gate_x: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    eps: float = 1e-5,
    conv: str = "auto",
    bn_mean: torch.Tensor | None = None,
    bn_var: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`shuffle_conv`, then BatchNorm, then the gate:
    `y = gate_x * sigmoid((z - mean) / sqrt(var + eps) * bn_weight + bn_bias)` (GAM's last step).

    mean and var are the batch statistics of z (training) unless `bn_mean` and `bn_var`
    (running statistics: eval) are given. Returns (y, mean, var), the statistics used, per
    channel in the accumulation dtype (z's biased batch statistics feed the running-stat
    update; no gradient flows through them as outputs, while y's gradient includes the batch
    statistics'). Saves no full-size intermediate: the backward recomputes z.
    """
    _check_shuffle_conv_args(s, weight, groups, shuffle_groups, in_scale, in_shift, gate_x)
    backend = select("shuffle_conv", s.device)
    if backend == "reference":
        return _reference_shuffle_conv_bn_gate(
            s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, bn_weight, bn_bias, bn_mean, bn_var, eps)
    library = _shuffle_conv_ops.conv_algorithm(conv, backend, groups, s.shape[2] * s.shape[3]) == "library"
    return torch.ops.attnkernels_composite.shuffle_conv_bn_gate(
        s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, bn_weight, bn_bias, bn_mean, bn_var, float(eps),
        backend, library)


def _check_gam_channel_args(x, w1, b1, w2, b2) -> None:
    op = "gam_channel"
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{op}: x must be a 4-D (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    c = x.shape[1]
    if w1.dim() != 2 or w1.shape[1] != c:
        raise ValueError(f"{op}: w1 must have shape (rd, C) = (rd, {c}), got {tuple(w1.shape)}")
    rd = w1.shape[0]
    for name, t, want in (("w2", w2, (c, rd)), ("b1", b1, (rd,)), ("b2", b2, (c,))):
        if tuple(t.shape) != want:
            raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(t.shape)}")


def _check_shuffle_conv_args(s, weight, groups, shuffle_groups, in_scale, in_shift, gate_x) -> None:
    op = "shuffle_conv"
    if not isinstance(s, torch.Tensor) or s.dim() != 4:
        raise ValueError(f"{op}: s must be a 4-D (N, C_in, H, W) tensor, got {getattr(s, 'shape', type(s).__name__)}")
    c_in = s.shape[1]
    for name, g in (("groups", groups), ("shuffle_groups", shuffle_groups)):
        if not isinstance(g, int) or g < 1 or c_in % g:
            raise ValueError(f"{op}: {name} must be a positive divisor of s's {c_in} channels, got {g!r}")
    k = weight.shape[-1] if weight.dim() == 4 else 0
    if weight.dim() != 4 or weight.shape[1] != c_in // groups or weight.shape[0] % groups or k % 2 == 0 or weight.shape[2] != k:
        raise ValueError(
            f"{op}: weight must have shape (C_out, C_in / groups, k, k) = (C_out, {c_in // groups}, k, k) with k odd "
            f"and groups = {groups} dividing C_out, got {tuple(weight.shape)}")
    if (in_scale is None) != (in_shift is None):
        raise ValueError(f"{op}: in_scale and in_shift must be given together")
    if gate_x is not None:
        want = (s.shape[0], weight.shape[0], *s.shape[2:])
        if tuple(gate_x.shape) != want:
            raise ValueError(f"{op}: gate_x must have the output's shape (N, C_out, H, W) = {want}, got {tuple(gate_x.shape)}")


def _reference_shuffle_conv_bn_gate(
    s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, bn_weight, bn_bias, bn_mean, bn_var, eps
):
    z = _reference_shuffle_conv(s, weight, bias, groups, shuffle_groups, in_scale, in_shift)
    if bn_mean is None:
        var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    else:
        var, mean = bn_var.to(z.dtype), bn_mean.to(z.dtype)
    w, b = (None if t is None else t.to(z.dtype) for t in (bn_weight, bn_bias))
    y = F.batch_norm(z, mean.detach() if bn_mean is not None else None, var.detach() if bn_mean is not None else None,
                     w, b, training=bn_mean is None, eps=eps)
    y = (gate_x.to(z.dtype) * torch.sigmoid(y)).to(gate_x.dtype).contiguous(memory_format=memory_format_of(gate_x))
    return y, mean.detach(), var.detach()


def _check_nonlocal_args(q, k, v, x, gamma) -> None:
    op = "nonlocal_attn"
    for name, t in (("q", q), ("k", k), ("v", v), ("x", x)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be a 4-D (N, D, H, W) tensor, got {shape}")
    n, c, h, w = x.shape
    for name, t, d in (("q", q, None), ("k", k, q.shape[1]), ("v", v, c)):
        if t.shape[0] != n or t.shape[2:] != x.shape[2:] or (d is not None and t.shape[1] != d):
            want = f"(N, {'D_qk' if d is None else d}, H, W) = ({n}, {'D_qk' if d is None else d}, {h}, {w})"
            raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(t.shape)}")
    if gamma.numel() != 1:
        raise ValueError(f"{op}: gamma must hold one value, got shape {tuple(gamma.shape)}")


def _reference_nonlocal_attn(q, k, v, x, gamma) -> torch.Tensor:
    n, c, h, w = x.shape
    acc = accumulate_dtype(x.dtype)
    qf, kf, vf = (t.reshape(n, t.shape[1], h * w).to(acc) for t in (q, k, v))
    attention = torch.softmax(torch.bmm(qf.transpose(1, 2), kf), dim=-1)
    out = torch.bmm(vf, attention.transpose(1, 2)).view(n, c, h, w).to(x.dtype)
    return (gamma.reshape(()) * out + x).contiguous(memory_format=memory_format_of(x))


def _check_c_im(op: str, x: torch.Tensor, c_im: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C, H, W), got {x.dim()}-D")
    if not 1 <= c_im <= x.shape[1]:
        raise ValueError(f"{op}: c_im must be in [1, C] = [1, {x.shape[1]}], got {c_im}")


def _reference_ham_pool(x: torch.Tensor, gate: torch.Tensor, c_im: int):
    c = x.shape[1]
    mask = important_channel_mask(gate.detach(), c_im).to(gate.dtype)
    f1 = x.to(gate.dtype) * gate[:, :, None, None]
    m = mask[:, :, None, None]
    g1, g2 = f1 * m, f1 * (1 - m)
    d1 = torch.cat([g1.sum(1, keepdim=True) / c_im, g1.amax(1, keepdim=True)], dim=1)
    d2 = torch.cat([g2.sum(1, keepdim=True) / max(c - c_im, 1), g2.amax(1, keepdim=True)], dim=1)
    return d1, d2, mask


def _check_gate_args(op: str, weight, alpha, beta, mode: str):
    """Validate the gate's mode and taps; return (alpha, beta), None unless mode is "mix"."""
    if mode not in GATE_MODES:
        raise ValueError(f"{op}: mode must be one of {', '.join(GATE_MODES)}; got {mode!r}")
    if mode == "mix" and (alpha is None or beta is None):
        raise ValueError(f"{op}: mode 'mix' needs alpha and beta")
    if weight.numel() % 2 == 0:
        raise ValueError(f"{op}: weight must hold an odd number of taps, got {weight.numel()}")
    return (alpha, beta) if mode == "mix" else (None, None)


def _reference_gate(avg, max_, weight, alpha, beta, mode: str) -> torch.Tensor:
    if mode == "avg":
        f = avg
    elif mode == "max":
        f = max_
    else:
        f = 0.5 * (avg + max_) + alpha.to(avg.dtype) * avg + beta.to(avg.dtype) * max_
    k = weight.numel()
    z = F.conv1d(f[:, None, :], weight.reshape(1, 1, k).to(avg.dtype), padding=(k - 1) // 2)
    return torch.sigmoid(z[:, 0, :])


def _reference_gam_channel(x, w1, b1, w2, b2) -> torch.Tensor:
    """gam_channel in torch ops (acc(x)): x * sigmoid(fc2(relu(fc1(x)))) at every pixel."""
    acc = accumulate_dtype(x.dtype)
    rd, c = w1.shape[0], x.shape[1]
    xf = x.to(acc).permute(0, 2, 3, 1)
    h = F.relu(F.linear(xf, w1.reshape(rd, c).to(acc), b1.reshape(rd).to(acc)))
    m = torch.sigmoid(F.linear(h, w2.reshape(c, rd).to(acc), b2.reshape(c).to(acc))).permute(0, 3, 1, 2)
    return (x.to(acc) * m).to(x.dtype).contiguous(memory_format=memory_format_of(x))


def _reference_shuffle_conv(
    s, weight, bias, groups, shuffle_groups, in_scale=None, in_shift=None, gate_x=None, out_scale=None, out_shift=None
) -> torch.Tensor:
    """shuffle_conv in torch ops: the shuffled, affine + ReLU input through conv2d (acc(s)), raw or gated."""
    acc = accumulate_dtype(s.dtype)
    u = _shuffle_conv_ops.library_input(s, shuffle_groups, in_scale, in_shift, acc)
    k = weight.shape[-1]
    z = F.conv2d(u, weight.to(acc), None if bias is None else bias.reshape(-1).to(acc), padding=(k - 1) // 2, groups=groups)
    if gate_x is None:
        return z.contiguous(memory_format=memory_format_of(s))
    return _reference_shuffle_conv_epilogue(z, gate_x, out_scale, out_shift)


def _reference_shuffle_conv_epilogue(z, gate_x, out_scale, out_shift) -> torch.Tensor:
    """`gate_x * sigmoid(out_scale * z + out_shift)` in acc(z), in gate_x's dtype and layout."""
    acc = accumulate_dtype(z.dtype)
    c = z.shape[1]
    pre = z.to(acc) * out_scale.reshape(1, c, 1, 1).to(acc) + out_shift.reshape(1, c, 1, 1).to(acc)
    y = gate_x.to(acc) * torch.sigmoid(pre)
    return y.to(gate_x.dtype).contiguous(memory_format=memory_format_of(gate_x))
