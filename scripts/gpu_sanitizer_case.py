"""A small case that runs every CUDA op of the fused hot paths forward and backward, for
compute-sanitizer (scripts/gpu_check.sh): NCHW and channels_last, odd sizes, every dtype."""
import torch

from attnkernels import backend
from attnkernels import functional as AF

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
torch.cuda.synchronize()
print("sanitizer case done")
