"""Helpers shared by the Triton hot-path modules: input checks, layouts, block sizes, jit helpers.

Host side: argument checks that raise TypeError/ValueError naming the op and the argument,
output allocation in x's layout, H*W addressing (one flat stride or separate h, w strides),
power-of-two block sizes, the launch size that fills a GPU, tl.dot precision and warps,
the split count and the fixed-order sum of a reduction's partials, and op registration.
Device side (`triton.jit`): int64 spatial offsets, correctly rounded division, the
(sample, channel block) of a 1-D grid's program, masked 2-D tiles, relu and sigmoid.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..reference._base import memory_format_of

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------
def _check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be a floating-point tensor (float64, float32, float16 or bfloat16), "
            f"got {t.dtype}"
        )


def _check_x(op: str, name: str, x) -> None:
    _check_tensor(op, name, x)
    if x.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D (N, C, H, W), got {x.dim()}-D")
    if x.numel() == 0:
        raise ValueError(f"{op}: {name} must not be empty, got shape {tuple(x.shape)}")


def _check_same_shape(op: str, name: str, t, ref_name: str, ref: torch.Tensor) -> None:
    _check_tensor(op, name, t)
    if t.shape != ref.shape:
        raise ValueError(
            f"{op}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}"
        )


def _check_nc(op: str, name: str, t, n: int, c: int) -> None:
    _check_tensor(op, name, t)
    if tuple(t.shape) != (n, c):
        raise ValueError(f"{op}: {name} must have shape (N, C) = ({n}, {c}), got {tuple(t.shape)}")


def _check_vector(op: str, name: str, t, count: int, what: str) -> None:
    """t: a floating tensor of `count` values (a bias, a BatchNorm scale or shift)."""
    _check_tensor(op, name, t)
    if t.numel() != count:
        raise ValueError(f"{op}: {name} must hold {what} = {count} values, got shape {tuple(t.shape)}")


def _check_device(op: str, ref_name: str, ref: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


# ----------------------------------------------------------------------------------------
# Host-side helpers: dtypes, layouts, tiles
# ----------------------------------------------------------------------------------------
def _nc(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """An (N, C) input as a contiguous tensor of the accumulation dtype (no copy if it is one)."""
    return t.to(acc).contiguous()


def _empty_like_x(x: torch.Tensor) -> torch.Tensor:
    """x's shape and dtype; channels_last if x is channels_last-dense and not NCHW-contiguous."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


def _pow2(v) -> int:
    """Smallest power of two >= v. Block sizes are compile-time constants: under
    torch.compile a symbolic size is specialized here (int())."""
    return 1 << max(int(v) - 1, 0).bit_length()


def _flat_hw_stride(t: torch.Tensor) -> Optional[int]:
    """The stride of the flattened h*W + w index if (h, w) -> offset is linear in it, else None."""
    _, _, h, w = t.shape
    s_h, s_w = t.stride(2), t.stride(3)
    if w == 1:
        return s_h
    if h == 1 or s_h == w * s_w:
        return s_w
    return None


def _hw_strides(*ts: torch.Tensor) -> tuple[bool, list[int]]:
    """FLAT (every tensor's H*W plane is addressed by one stride) and those strides."""
    flat = [_flat_hw_stride(t) for t in ts]
    if all(s is not None for s in flat):
        return True, flat
    return False, [0] * len(ts)


_SM_COUNT: dict = {}


def _min_programs(device: torch.device) -> int:
    """Programs a launch should have to fill the device: 2 per SM on a GPU, 1 elsewhere."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 2 * _SM_COUNT[index]


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: exact ("ieee") for fp32/fp64 inputs, "tf32" for fp16/bf16
    inputs. On fp32 operands (the acc operands of gam_channel and shuffle_conv) that is the
    TF32 tensor-core path, where half-precision values are exact; on half operands
    (nonlocal_attn) the option does not apply (tf32 is the default)."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _warps(*tiles: int) -> int:
    """8 warps once an fp32 accumulator tile reaches 8192 elements (64 registers per thread
    at 4 warps), else 4."""
    return 8 if max(tiles) >= 8192 else 4


# Module attributes, so tests can force many splits and small sum tiles.
# Fewest splits of a reduction over tiles (more when the GPU needs more programs).
_MIN_SPLITS = 1
# _sum_partials' tile: up to _SUM_BLOCK_L columns, _SUM_TILE elements.
_SUM_BLOCK_L = 256
_SUM_TILE = 4096


def _splits(tiles: int, programs_per_split: int, device: torch.device) -> int:
    """How many fixed sets the `tiles` of a reduction are split into: enough programs to fill
    the device, at least _MIN_SPLITS, at most one tile each."""
    want = max(_MIN_SPLITS, triton.cdiv(_min_programs(device), programs_per_split))
    return max(1, min(tiles, want))


def _sum_partials(part: torch.Tensor) -> torch.Tensor:
    """part (R, L) contiguous -> (L,) = sum over the R rows in a fixed order: deterministic."""
    rows, length = part.shape
    out = torch.empty((length,), dtype=part.dtype, device=part.device)
    block_l = min(_pow2(length), _SUM_BLOCK_L)
    block_r = min(_pow2(rows), max(1, _SUM_TILE // block_l))
    wrap_triton(_sum_rows_kernel)[(triton.cdiv(length, block_l),)](
        part, out, rows, length, BLOCK_R=block_r, BLOCK_L=block_l,
    )
    return out


# ----------------------------------------------------------------------------------------
# Op registration
# ----------------------------------------------------------------------------------------
def _op_registrar(schemas: dict):
    """The decorator factory `_op` of a hot-path module: @_op(name) registers the function as
    the triton_op attnkernels_triton::<name> with schemas[name] (csrc/attnkernels.cpp's,
    verbatim); no op mutates its arguments."""

    def _op(name: str):
        return triton_op(f"attnkernels_triton::{name}", mutates_args=(), schema=schemas[name])

    return _op


# ----------------------------------------------------------------------------------------
# Device-side helpers
# ----------------------------------------------------------------------------------------
@triton.jit
def _hw_offsets(hw, W, s_h, s_w, s_hw, FLAT: tl.constexpr):
    """Element offsets (int64) of flattened spatial indices hw = h*W + w."""
    hw = hw.to(tl.int64)
    if FLAT:
        off = hw * s_hw
    else:
        off = (hw // W) * s_h + (hw % W) * s_w
    return off


@triton.jit
def _div(a, b):
    """a / b correctly rounded, b broadcast to a's dtype. (fp32 `/` compiles to an
    approximate division on NVIDIA GPUs; these divisions run once per channel.)"""
    b = tl.zeros_like(a) + b
    if a.dtype == tl.float32:
        q = tl.div_rn(a, b)
    else:
        q = a / b
    return q


@triton.jit
def _channel_block(num_cb, C, BLOCK_C: tl.constexpr):
    """This program's sample n (int64), its block of BLOCK_C channels c, and c < C.
    The grid is 1-D over (n, channel block): no 65535 limit on a second axis."""
    pid = tl.program_id(0)
    n = (pid // num_cb).to(tl.int64)
    c = (pid % num_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    return n, c, c < C


@triton.jit
def _tile(ptr, base, rows, s_row, row_mask, cols, s_col, col_mask):
    """The [rows, cols] tile at ptr + base + rows*s_row + cols*s_col (int64), 0 outside the masks."""
    offs = base + rows.to(tl.int64)[:, None] * s_row + cols.to(tl.int64)[None, :] * s_col
    return tl.load(ptr + offs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _relu(a):
    """max(a, 0) with NaN kept, as torch.relu (tl.maximum may drop a NaN on a GPU)."""
    return tl.where(a < 0, 0.0, a)


@triton.jit
def _sigmoid(a):
    """1 / (1 + exp(-a)) from exp of a non-positive argument only: no overflow; NaN stays NaN."""
    e = tl.exp(-tl.abs(a))
    return _div(tl.where(a >= 0, 1.0, e), 1.0 + e)


@triton.jit
def _sum_rows_kernel(part_ptr, out_ptr, R, L, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """out[j] = sum_r part[r, j] for this program's BLOCK_L columns, rows in a fixed order."""
    j = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    j_mask = j < L
    acc = tl.zeros([BLOCK_R, BLOCK_L], dtype=out_ptr.dtype.element_ty)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        acc += _tile(part_ptr, 0, rows, L, rows < R, j, 1, j_mask)
    tl.store(out_ptr + j, tl.sum(acc, axis=0), mask=j_mask)
