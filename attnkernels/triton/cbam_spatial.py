"""Triton kernels of the cbam_spatial hot path (CBAM's spatial half, given the channel gate a).

Registers four ops under `torch.ops.attnkernels_triton` with the schemas and the math of
`csrc/cbam_spatial_ops.cpp` (HAM's dual pooling with a single group and no mask):

    cbam_spatial_pool(x, gate) -> d
    cbam_spatial_pool_backward(grad_d, x, gate, d) -> (grad_x, grad_gate)
    cbam_spatial_apply(x, gate, s) -> y
    cbam_spatial_apply_backward(grad_y, x, gate, s) -> (grad_x, grad_gate, grad_s)

The kernels are ham_spatial's (`attnkernels/triton/ham_spatial.py`: `_pool_kernel`,
`_pool_backward_kernel`, `_apply_kernel`, `_apply_backward_kernel`) launched with
ONE_GROUP=True: G1 = F = x*gate over all C channels (the divisor C), no mask read, no second
group (its pointers get `gate`, never read nor written), and apply's y = F * s alone. Their
tiles are ham_spatial's rule (`_pixel_tiles`, `_pixel_warps`), measured on a GPU at this
module's own sites (`_launch_pixel_tiled("cbam_spatial_pool", ...)`, ...). Layouts, dtypes
and determinism are ham_spatial's: x with any strides, outputs shaped like x in x's layout,
gate (N, C), d (N, 2, H, W), s (N, 1, H, W) contiguous in acc(x); grad_gate's pixel-block
partials summed in a fixed order. The argument checks are the op module's
(`attnkernels.ops.cbam_spatial.check_<op>`).

Importing this module registers the four ops (schemas from csrc/cbam_spatial_ops.cpp through
`_op_registrar`) and, through `register_hot_path` at its end, their fakes and autograd
(`attnkernels.ops.cbam_spatial.REGISTRATION`).

On a machine without a GPU set TRITON_INTERPRET=1 before importing this module; the ops
then run on CPU tensors under the Triton interpreter.
"""
import torch
import triton

from ..ops import register_hot_path
from ..ops._common import empty_like_layout
from ..ops.cbam_spatial import (
    check_cbam_spatial_apply,
    check_cbam_spatial_apply_backward,
    check_cbam_spatial_pool,
    check_cbam_spatial_pool_backward,
)
from ..reference.formulas import accumulate_dtype
from ._common import _in_acc, _nchw_strides, _nonempty, _op_registrar
from ._compat import wrap_triton
from .ham_spatial import (
    _apply_backward_kernel,
    _apply_kernel,
    _grad_gate,
    _grad_gate_buffer,
    _launch_pixel_tiled,
    _pool_backward_kernel,
    _pool_kernel,
)

HOT_PATH = "cbam_spatial"

__all__ = [
    "cbam_spatial_pool",
    "cbam_spatial_pool_backward",
    "cbam_spatial_apply",
    "cbam_spatial_apply_backward",
]

_op = _op_registrar(HOT_PATH)


@_op("cbam_spatial_pool")
def cbam_spatial_pool(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """d (N, 2, H, W) = [sum_c F / C, max_c F] with F = x*gate, in acc(x) (NaN propagates
    through the max)."""
    acc = accumulate_dtype(x.dtype)
    gt = _in_acc(gate, acc)
    check_cbam_spatial_pool(x, gt)
    _nonempty("cbam_spatial_pool", "x", x)
    n, c, h, w = x.shape
    d = torch.empty((n, 2, h, w), dtype=acc, device=x.device)
    flat, strides = _nchw_strides(x)

    def launch(block_c: int, block_hw: int, num_warps: int) -> None:
        num_pb = triton.cdiv(h * w, block_hw)
        wrap_triton(_pool_kernel)[(n * num_pb,)](
            x, gt, gt, d, gt,  # mask, d2: unused with ONE_GROUP
            c, h * w, w, num_pb, c, 1, *strides,  # divisor C; c_sub unused
            FLAT=flat, BLOCK_C=block_c, BLOCK_HW=block_hw, ONE_GROUP=True, num_warps=num_warps,
        )

    _launch_pixel_tiled("cbam_spatial_pool", x, acc, launch)
    return d


@_op("cbam_spatial_pool_backward")
def cbam_spatial_pool_backward(
    grad_d: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, d: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_gate) of cbam_spatial_pool: the mean shares evenly over C, the max over
    the channels tied with it ([F == max] a literal product: a NaN max gives NaN, as torch.amax)."""
    acc = accumulate_dtype(x.dtype)
    gd, gt, dd = (_in_acc(t, acc) for t in (grad_d, gate, d))
    check_cbam_spatial_pool_backward(gd, x, gt, dd)
    _nonempty("cbam_spatial_pool_backward", "x", x)
    n, c, h, w = x.shape
    grad_x = empty_like_layout(x)
    flat, strides = _nchw_strides(x, grad_x)

    def launch(block_c: int, block_hw: int, num_warps: int) -> torch.Tensor:
        num_pb = triton.cdiv(h * w, block_hw)
        partials = _grad_gate_buffer(n, num_pb, c, acc, x.device)
        wrap_triton(_pool_backward_kernel)[(n * num_pb,)](
            gd, gt, x, gt, gt, dd, gt, grad_x, partials,  # grad_d2, mask, d2: unused with ONE_GROUP
            c, h * w, w, num_pb, c, 1, *strides,
            FLAT=flat, BLOCK_C=block_c, BLOCK_HW=block_hw, ONE_GROUP=True, num_warps=num_warps,
        )
        return _grad_gate(partials, num_pb, c)

    return grad_x, _launch_pixel_tiled("cbam_spatial_pool_backward", x, acc, launch)


@_op("cbam_spatial_apply")
def cbam_spatial_apply(x: torch.Tensor, gate: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y = F * s with F = x*gate, in acc(x), x's dtype and layout."""
    acc = accumulate_dtype(x.dtype)
    gt, sp = (_in_acc(t, acc) for t in (gate, s))
    check_cbam_spatial_apply(x, gt, sp)
    _nonempty("cbam_spatial_apply", "x", x)
    n, c, h, w = x.shape
    y = empty_like_layout(x)
    flat, strides = _nchw_strides(x, y)

    def launch(block_c: int, block_hw: int, num_warps: int) -> None:
        num_pb = triton.cdiv(h * w, block_hw)
        wrap_triton(_apply_kernel)[(n * num_pb,)](
            x, gt, gt, sp, gt, y,  # mask, s2: unused with ONE_GROUP
            c, h * w, w, num_pb, *strides,
            FLAT=flat, BLOCK_C=block_c, BLOCK_HW=block_hw, ONE_GROUP=True, num_warps=num_warps,
        )

    _launch_pixel_tiled("cbam_spatial_apply", x, acc, launch)
    return y


@_op("cbam_spatial_apply_backward")
def cbam_spatial_apply_backward(
    grad_y: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_gate, grad_s) of cbam_spatial_apply; grad_x in x's dtype and layout, the
    rest in acc(x) (grad_s: (N, 1, H, W), the sum over C of grad_y * F)."""
    acc = accumulate_dtype(x.dtype)
    gt, sp = (_in_acc(t, acc) for t in (gate, s))
    check_cbam_spatial_apply_backward(grad_y, x, gt, sp)
    _nonempty("cbam_spatial_apply_backward", "x", x)
    n, c, h, w = x.shape
    grad_x = empty_like_layout(x)
    grad_s = torch.empty((n, 1, h, w), dtype=acc, device=x.device)
    flat, strides = _nchw_strides(grad_y, x, grad_x)

    def launch(block_c: int, block_hw: int, num_warps: int) -> torch.Tensor:
        num_pb = triton.cdiv(h * w, block_hw)
        partials = _grad_gate_buffer(n, num_pb, c, acc, x.device)
        wrap_triton(_apply_backward_kernel)[(n * num_pb,)](
            grad_y, x, gt, gt, sp, gt, grad_x, partials, grad_s, gt,  # mask, s2, grad_s2: unused
            c, h * w, w, num_pb, *strides,
            FLAT=flat, BLOCK_C=block_c, BLOCK_HW=block_hw, ONE_GROUP=True, num_warps=num_warps,
        )
        return _grad_gate(partials, num_pb, c)

    grad_gate = _launch_pixel_tiled("cbam_spatial_apply_backward", x, acc, launch)
    return grad_x, grad_gate, grad_s


# Importing this module gives the ops their autograd.
register_hot_path(HOT_PATH, "attnkernels_triton")
