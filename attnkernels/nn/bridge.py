"""Fused Bridge (BA-Net): every map pooled by channel_pool, the gate rescaled by channel_rescale;
in eval, x's pooling, the gate and the rescale per sample in one channel_mlp_attention op."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import functional as AF
from ..ops._common import fold_batch_norm
from ..reference import bridge as reference
from ..reference.formulas import accumulate_dtype
from ._fused import FusedModule, autograd_may_record, pick_inference, without_autocast


class Bridge(FusedModule, reference.Bridge):
    """`attnkernels.reference.Bridge` on the fused channel_gate ops (same arguments and weights).

    Training (and eval with a BatchNorm1d that tracks no running stats): each bridge and x
    are pooled in one read each (channel_pool); the projections, BatchNorm1d (batch statistics,
    running stats updated exactly as the reference's), ReLU, fc and sigmoid run as torch ops
    on (N, rd) and (N, C) maps; channel_rescale writes y. Backward saves x, the bridges and
    small maps only.

    Eval: x's BatchNorm1d is folded into its projection, `w1 = scale * proj_x.weight`, and
    the bridges' terms `bn_i(proj_i(mean_hw(bridge_i)))` plus the fold's shift form a
    per-sample bias b1 (N, rd); channel_mlp_attention then pools x[n], runs the gate and
    rescales x[n] while it is in cache (on the C++ CPU backend; elsewhere its composite).
    """

    hot_paths = ("channel_gate",)

    @without_autocast
    def attend(self, x: torch.Tensor, *bridges: torch.Tensor) -> torch.Tensor:
        if self.folds_batch_norm() and not autograd_may_record():
            # Inference: the folded per-sample op or the reference's eager forward, measured.
            runs = {"folded": lambda x, *b: self.attend_folded(x, b), "eager": super().attend}
            return pick_inference("bridge", x, (self.fc.weight.shape[1],), runs, "folded", *bridges)(x, *bridges)
        if self.folds_batch_norm():
            return self.attend_folded(x, bridges)
        u = 0
        for t, proj, bn in zip([*bridges, x], self.proj, self.bn):
            u = u + bn(proj(self.pooled(t)))
        a = torch.sigmoid(self.fc(F.relu(u)))
        return AF.channel_rescale(x, a)

    def folds_batch_norm(self) -> bool:
        """Eval with running stats in x's BatchNorm1d: it is an affine map that folds into
        x's projection, so the gate can run per sample."""
        return not self.training and self.bn[-1].running_mean is not None

    def pooled(self, t: torch.Tensor) -> torch.Tensor:
        """mean_hw(t) (one read, channel_pool) in the parameters' dtype: x's outside autocast,
        rounded as the reference rounds it; under autocast the wider parameter dtype."""
        return AF.channel_pool(t)[0].to(self.fc.weight.dtype)

    def attend_folded(self, x: torch.Tensor, bridges: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The eval forward: `bn_x(proj_x(m)) = (scale * W_x) m + shift`, so
        `u = w1 @ mean_hw(x) + b1` with b1 = shift + the bridges' terms, (N, rd) in acc(x)."""
        acc = accumulate_dtype(x.dtype)
        bn, proj = self.bn[-1], self.proj[-1]
        scale, shift, _ = fold_batch_norm(bn.running_mean.to(acc), bn.running_var.to(acc), bn.weight, bn.bias, bn.eps)
        w1 = scale[:, None] * proj.weight.to(acc)
        b1 = shift
        for t, proj_i, bn_i in zip(bridges, self.proj, self.bn):
            b1 = b1 + bn_i(proj_i(self.pooled(t))).to(acc)
        return AF.channel_mlp_attention(x, w1, b1, self.fc.weight, None)
