"""Fused Bridge (BA-Net): every map pooled by channel_pool, the gate rescaled by channel_rescale;
in eval, every BatchNorm1d folded, x's pooling, the gate and the rescale per sample in one
channel_mlp_attention op."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import functional as AF
from ..ops._common import fold_batch_norm
from ..ops.channel_gate import channel_gate_ops
from ..reference import bridge as reference
from ..reference.formulas import accumulate_dtype
from ._fused import (
    FusedModule, autograd_may_record, cached_while_unchanged, child_parameter, children, chosen_in_training,
    module_tensors, pick_inference, without_autocast,
)


class Bridge(FusedModule, reference.Bridge):
    """`attnkernels.reference.Bridge` on the fused channel_gate ops (same arguments and weights).

    Training (and eval with a BatchNorm1d that tracks no running stats): each bridge and x
    are pooled in one read each (channel_pool); the projections, BatchNorm1d (batch statistics,
    running stats updated exactly as the reference's), ReLU, fc and sigmoid run as torch ops
    on (N, rd) and (N, C) maps; channel_rescale writes y. Backward saves x, the bridges and
    small maps only.

    Eval: every BatchNorm1d is an affine map that folds into its projection,
    `bn_i(P_i m_i) = (scale_i P_i) m_i + shift_i`, so `u = w1 @ mean_hw(x) + b1` with
    `w1 = scale_x P_x` and a per-sample bias b1 (N, rd) = the bridges' folded terms plus every
    shift; channel_mlp_attention then pools x[n], runs the gate and rescales x[n] while it is
    in cache (on the C++ CPU backend; elsewhere its composite). Without autograd the folded
    weights are kept until a weight or running stat changes.
    """

    hot_paths = ("channel_gate",)

    @without_autocast
    @chosen_in_training
    def attend(self, x: torch.Tensor, *bridges: torch.Tensor) -> torch.Tensor:
        if self.folds_batch_norm() and not autograd_may_record():
            # Inference: the folded per-sample op or the reference's eager forward, measured.
            runs = {"folded": self.attend_folded, "eager": super().attend}
            rd = child_parameter(self, "fc", "weight").shape[1]
            return pick_inference("bridge", x, (rd,), runs, "folded", *bridges)(x, *bridges)
        if self.folds_batch_norm():
            return AF.channel_mlp_attention(x, *self.folded_gate_args(x, bridges), self.fc.weight, None)
        u = 0
        for t, proj, bn in zip([*bridges, x], self.proj, self.bn):
            u = u + bn(proj(self.pooled(t)))
        a = torch.sigmoid(self.fc(F.relu(u)))
        return AF.channel_rescale(x, a)

    def folds_batch_norm(self) -> bool:
        """Eval with running stats in every BatchNorm1d: each is then an affine map that folds
        into its projection, so the gate can run per sample."""
        return not self.training and all(bn._buffers.get("running_mean") is not None for bn in children(self, "bn"))

    def pooled(self, t: torch.Tensor) -> torch.Tensor:
        """mean_hw(t) (one read, channel_pool) in the parameters' dtype: x's outside autocast,
        rounded as the reference rounds it; under autocast the wider parameter dtype."""
        return AF.channel_pool(t)[0].to(self.fc.weight.dtype)

    def attend_folded(self, x: torch.Tensor, *bridges: torch.Tensor) -> torch.Tensor:
        """The inference forward: the folded gate on the backend's channel_mlp_attention op,
        called directly (the module-level choice already measured it against eager)."""
        ops = channel_gate_ops(x.device)
        w2 = child_parameter(self, "fc", "weight")
        return ops.channel_mlp_attention(x, *self.folded_gate_args(x, bridges), w2, None)[0]

    def folded_gate_args(self, x: torch.Tensor, bridges: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1, b1) of the folded gate, in acc(x): w1 (rd, C); b1 (N, rd) with bridges, the
        shared (rd,) bias without: each bridge adds `mean_hw(t) @ w_t` in acc(x)."""
        acc = accumulate_dtype(x.dtype)
        bns = children(self, "bn")
        sources = module_tensors([*children(self, "proj"), *bns])
        key = (acc, *(bn.eps for bn in bns))  # eps is a plain attribute: no version counter
        w1, w_bridges, b1 = cached_while_unchanged(self, "_folded_weights", key, sources, lambda: self.folded_weights(acc))
        # Run op by op, the sum with alpha = 1/hw saves torch's mean its division op (whose host
        # time, cold as in a network, is a third of the sum's on Bridge's maps). A graph pays no
        # host time per op and must not hold 1/hw as a constant (a trace replayed at another size;
        # ONNX's addmm takes no symbolic alpha): it keeps the mean.
        in_graph = torch.compiler.is_compiling() or torch.jit.is_tracing()
        for t, w_t in zip(bridges, w_bridges):
            if in_graph:
                b1 = torch.addmm(b1, t.mean((2, 3), dtype=acc), w_t)
            else:
                b1 = torch.addmm(b1, t.sum((2, 3), dtype=acc), w_t, alpha=1 / (t.shape[2] * t.shape[3]))
        return w1, b1

    def folded_weights(self, acc: torch.dtype) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
        """(w1, w_bridges, b) in `acc`: x's projection scaled by its BatchNorm's scale (rd, C),
        each bridge's scaled projection transposed (C_i, rd), and the sum of every BatchNorm's
        shift (rd,)."""
        weights, b = [], 0
        for proj, bn in zip(self.proj, self.bn):
            scale, shift, _ = fold_batch_norm(bn.running_mean.to(acc), bn.running_var.to(acc), bn.weight, bn.bias, bn.eps)
            weights.append(scale[:, None] * proj.weight.to(acc))
            b = b + shift
        return weights[-1], tuple(w.t() for w in weights[:-1]), b
