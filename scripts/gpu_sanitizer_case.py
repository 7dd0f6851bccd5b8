"""A small case that runs every CUDA op of the fused hot paths forward and backward, for
compute-sanitizer (scripts/gpu_check.sh): NCHW and channels_last, odd sizes, every dtype."""
import torch

from attnkernels import backend
from attnkernels import functional as AF
from attnkernels import nn as fused

assert torch.cuda.is_available(), "needs a GPU"
with backend.use_backend("cuda"):
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            for shape in ((3, 37, 5, 7), (1, 1, 1, 1), (2, 260, 1, 3)):
                x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
                w = torch.randn(5, device="cuda", requires_grad=True)
                a = torch.tensor(0.5, device="cuda", requires_grad=True)
                b = torch.tensor(0.5, device="cuda", requires_grad=True)
                for mode in ("avg", "max", "mix"):
                    y = AF.channel_attention(x, w, a, b, mode)
                    y.float().square().sum().backward()
    # The fused HAM: channel_gate ops, then ham_spatial_pool and ham_spatial_apply, and their
    # backwards. Training mode (BatchNorm batch statistics) needs N >= 2; N = 1 runs in eval.
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            for shape in ((3, 37, 5, 7), (1, 1, 1, 1), (2, 260, 1, 3)):
                m = fused.HAM(shape[1]).cuda().to(dtype).train(shape[0] >= 2)
                x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
                y = m(x)
                y.float().square().sum().backward()
    # cbam_spatial_pool and cbam_spatial_apply (ham_spatial's kernels with one group) and their
    # backwards: s depends on d, so one backward runs both backward ops; gate requires grad, so
    # grad_gate's per-channel sums run too. C and H*W odd, under and over one tile, HW = 1.
    # (AF.cbam_spatial_* exist once "cbam_spatial" is in attnkernels.ops.HOT_PATHS.)
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            for n, c, h, w in ((3, 37, 5, 7), (1, 1, 1, 1), (2, 260, 1, 3), (2, 64, 9, 13)):
                x = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
                gate = torch.rand(n, c, device="cuda", requires_grad=True)
                d = AF.cbam_spatial_pool(x, gate)
                s = torch.sigmoid(d.sum(1, keepdim=True))
                AF.cbam_spatial_apply(x, gate, s).float().square().sum().backward()
    # triplet_pool and triplet_apply and their backwards: the gates depend on the maps, so one
    # backward runs both backward ops. C = 1, odd sizes, HW = 1; C and W over one row of
    # threads (several channel and column tiles), H of several bands, W over one slab.
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            for n, c, h, w in ((3, 37, 5, 7), (1, 1, 1, 1), (2, 260, 1, 3), (2, 300, 37, 301), (1, 3, 33, 2100)):
                x = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
                d_hw, d_cw, d_hc = AF.triplet_pool(x)
                s = [torch.sigmoid(d.sum(1, keepdim=True)) for d in (d_hw, d_cw, d_hc)]
                AF.triplet_apply(x, *s).float().square().sum().backward()
    # bam_apply and its backward: mc and ms require grad, so both reductions (grad_mc per
    # channel over the pixels, grad_ms per pixel over the channels) run. C = 1, HW = 1, C and
    # H*W odd, under and over one tile.
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            for n, c, h, w in ((3, 37, 5, 7), (1, 1, 1, 1), (2, 260, 1, 3), (2, 300, 37, 41)):
                x = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
                mc = torch.randn(n, c, device="cuda", requires_grad=True)
                ms = torch.randn(n, 1, h, w, device="cuda", requires_grad=True)
                AF.bam_apply(x, mc, ms).float().square().sum().backward()
    # block_tail (stats, apply, backward_reduce, and apply again for grad_z) with a gate, training
    # and eval: C = 1, HW = 1, C and H*W odd, planes over one tile, a sliced (non-dense) z.
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            for n, c, h, w in ((3, 37, 5, 7), (1, 1, 1, 1), (2, 260, 1, 3), (2, 300, 37, 41), (2, 5, 9, 26)):
                z = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
                if w == 26:
                    z = z[..., ::2]  # any strides
                z.requires_grad_()
                shortcut = torch.randn(z.shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
                weight = torch.rand(c, device="cuda", requires_grad=True)
                bias = torch.randn(c, device="cuda", requires_grad=True)
                gate_w = torch.randn(c, device="cuda", requires_grad=True)
                for training in (True, False) if n * h * w > 1 else (False,):
                    y = AF.block_tail(z, shortcut, torch.zeros(c, device="cuda"), torch.ones(c, device="cuda"),
                                      weight, bias, training=training, gate=lambda avg: torch.sigmoid(avg * gate_w))
                    y.float().square().sum().backward()
    # spatial_tail (stats, pool, apply; backward_reduce, pool_backward, backward_apply) in
    # training and eval, with a CBAM-like gate (one group: an MLP on avg and max, a 7x7 conv of
    # [mean, max]) and a HAM-like one (two groups, important=k: a per-channel mix, the 7x7 conv
    # per group): C = 1 (HAM's second group empty), HW = 1, C and H*W odd, planes over one tile,
    # a sliced (non-dense) z.
    from attnkernels.ops.spatial_tail import spatial_tail

    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for fmt in (torch.contiguous_format, torch.channels_last):
            for n, c, h, w in ((3, 37, 5, 7), (1, 1, 1, 1), (2, 260, 1, 3), (2, 300, 37, 41), (2, 5, 9, 26)):
                z = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
                if w == 26:
                    z = z[..., ::2]  # any strides
                z.requires_grad_()
                shortcut = torch.randn(z.shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
                weight = torch.rand(c, device="cuda", requires_grad=True)
                bias = torch.randn(c, device="cuda", requires_grad=True)
                hidden = max(c // 4, 1)
                w1 = (torch.randn(hidden, c, device="cuda", dtype=acc) * 0.3).requires_grad_()
                w2 = (torch.randn(c, hidden, device="cuda", dtype=acc) * 0.3).requires_grad_()
                mix = torch.randn(c, device="cuda", dtype=acc, requires_grad=True)
                conv = (torch.randn(1, 2, 7, 7, device="cuda", dtype=acc) * 0.2).requires_grad_()

                def cbam_channel(avg, mx):
                    return torch.sigmoid(torch.relu(avg @ w1.t()) @ w2.t() + torch.relu(mx @ w1.t()) @ w2.t())

                def ham_channel(avg, mx):
                    return torch.sigmoid(0.5 * (avg + mx) * mix)

                def spatial(d):  # d (N, 2G, H, W): each group's [mean, max] through the same conv
                    pairs = [d[:, k : k + 2] for k in range(0, d.shape[1], 2)]
                    return torch.cat([torch.sigmoid(torch.nn.functional.conv2d(p, conv, padding=3)) for p in pairs], 1)

                for channel_gate, important in ((cbam_channel, None), (ham_channel, max(1, c // 3))):
                    for training in (True, False) if n * h * w > 1 else (False,):
                        y = spatial_tail(z, shortcut, torch.zeros(c, device="cuda"), torch.ones(c, device="cuda"),
                                         weight, bias, training,
                                         channel_gate=channel_gate, spatial_gate=spatial, important=important)
                        y.float().square().sum().backward()
    # cam and its backward: C = 1, HW = 1, C and H*W odd, C over one block of rows.
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            for n, c, h, w in ((3, 37, 5, 7), (1, 1, 1, 1), (2, 260, 1, 3), (2, 70, 9, 13)):
                x = (torch.randn(n, c, h, w, device="cuda", dtype=dtype) * 0.3).contiguous(memory_format=fmt)
                gamma = torch.tensor([0.5], device="cuda", requires_grad=True)
                AF.cam(x.requires_grad_(), gamma).float().square().sum().backward()
    # criss_cross on the CUDA kernels and Triton: H = 1, W = 1, H and W over one key tile, C over
    # one channel tile, D = 1.
    for name in ("cuda", "triton"):
        with backend.use_backend(name):
            for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                for fmt in (torch.contiguous_format, torch.channels_last):
                    for n, d, c, h, w in ((2, 5, 40, 9, 13), (1, 1, 3, 1, 6), (1, 2, 70, 37, 1), (1, 8, 130, 35, 33)):
                        def make(c):
                            t = torch.randn(n, c, h, w, device="cuda", dtype=dtype)
                            return t.contiguous(memory_format=fmt).requires_grad_()

                        gamma = torch.tensor([0.5], device="cuda", requires_grad=True)
                        AF.criss_cross(make(d), make(d), make(c), make(c), gamma).float().square().sum().backward()
    # nonlocal_attn on the CUDA kernels (and on Triton, whose launches the sanitizer checks
    # too): HW not a multiple of any tile, HW = 1, D_qk = 1, D_v above one D_v tile.
    for name in ("cuda", "triton"):
        with backend.use_backend(name):
            for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                for fmt in (torch.contiguous_format, torch.channels_last):
                    for n, d_qk, d_v, h, w in ((2, 5, 40, 9, 13), (1, 1, 3, 1, 1), (1, 8, 300, 3, 37)):
                        def make(c):
                            t = torch.randn(n, c, h, w, device="cuda", dtype=dtype)
                            return t.contiguous(memory_format=fmt).requires_grad_()

                        q, k, v, x = make(d_qk), make(d_qk), make(d_v), make(d_v)
                        gamma = torch.tensor([0.5], device="cuda", dtype=dtype, requires_grad=True)
                        AF.nonlocal_attn(q, k, v, x, gamma).float().square().sum().backward()
    # The fused GAM (gam_channel, shuffle_conv raw / gated / bn_gate and their backwards), both
    # conv algorithms, training and eval, groups 1 and 4; and the epilogue op alone.
    for name in ("cuda", "triton"):
        with backend.use_backend(name):
            for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                for fmt in (torch.contiguous_format, torch.channels_last):
                    for (n, c, h, w), groups in (((2, 64, 9, 13), 4), ((2, 16, 1, 1), 1), ((1, 32, 5, 3), 2)):
                        for algo in ("direct", "library"):
                            m = fused.GAM(c, reduction=4, groups=groups).cuda().to(dtype).train(n >= 2)
                            m.conv_algorithm = algo
                            x = torch.randn(n, c, h, w, device="cuda", dtype=dtype)
                            x = x.contiguous(memory_format=fmt).requires_grad_()
                            m(x).float().square().sum().backward()
torch.cuda.synchronize()
print("sanitizer case done")
