"""Helpers shared by the Triton hot-path modules: registration, launch guards, layouts, block
sizes, partial sums, jit helpers.

Host side: op registration with the schemas of csrc/<hot_path>_ops.cpp, the empty-input launch
guard, small inputs cast to the accumulation dtype, H*W addressing (one flat stride or separate
h, w strides), power-of-two block sizes, the launch size that fills a GPU, launch configurations
chosen by measurement on a GPU, tl.dot precision and warps, and the split count and fixed-order
sum of a reduction's partials. The argument checks
themselves are the op modules' (`attnkernels.ops.<hot_path>.check_<op>`, `attnkernels.ops._checks`):
one wording per rule, whichever backend runs.
Device side (`triton.jit`): int64 spatial offsets, correctly rounded division, the
(sample, channel block) and (sample, pixel block) of a 1-D grid's program, masked 2-D tiles,
relu and sigmoid, and the partial-sum kernel.
"""
from collections.abc import Callable
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from .. import choose
from ..ops._schemas import schemas
from ._compat import triton_op, wrap_triton


# ----------------------------------------------------------------------------------------
# Op registration
# ----------------------------------------------------------------------------------------
def _op_registrar(hot_path: str):
    """The decorator factory `_op` of a hot-path module: @_op(name) registers the function as
    the triton_op attnkernels_triton::<name> with csrc/<hot_path>_ops.cpp's schema of that op
    (`attnkernels.ops._schemas`, the one place schemas are read; triton_op takes the schema
    without the op's name). No op mutates its arguments."""
    found = schemas(hot_path)

    def _op(name: str):
        schema = found[name]
        assert schema.startswith(f"{name}("), (name, schema)
        return triton_op(f"attnkernels_triton::{name}", mutates_args=(), schema=schema[len(name):])

    return _op


# ----------------------------------------------------------------------------------------
# Launch guard and small inputs
# ----------------------------------------------------------------------------------------
def _nonempty(op: str, name: str, t: torch.Tensor) -> None:
    """A Triton launch guard, not an argument rule: the Triton ops reject empty feature maps
    (their zero-program grids and zero-size loops are not exercised, and channel_pool's mean
    over H*W = 0 would be 0/0). The C++ kernels accept empty inputs and return empty outputs
    (channel_pool rejects H*W = 0 in its own words), so `attnkernels.ops._checks.feature_map`,
    the shared rule, does not reject them."""
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} must not be empty, got shape {list(t.shape)}")


def _in_acc(t, acc: torch.dtype):
    """A small input ((N, C) or (N, k, H, W) map, lse) of any floating dtype and strides as a
    contiguous tensor of the accumulation dtype (no copy if it is one). The Triton ops take
    any floating dtype there and cast (the C++ ops require acc), then run the op's check on
    the result: its shape and device rules apply in their one wording. Anything else is
    returned as it is, for the check to reject."""
    if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
        return t.to(acc).contiguous()
    return t


def _acc_vector(t: Optional[torch.Tensor], acc: torch.dtype, dummy: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A small parameter (weights, bias, a scalar) as a contiguous 1-D tensor of acc, row-major
    (dummy, never read by the kernel, when the parameter is absent)."""
    return dummy if t is None else t.reshape(-1).to(acc).contiguous()


def _like_param(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient, computed in acc: in the parameter's shape and dtype, a tensor of
    its own (never a view of the partials buffer)."""
    return t.reshape(param.shape).to(param.dtype, copy=True)


# ----------------------------------------------------------------------------------------
# Layouts, tiles, launches
# ----------------------------------------------------------------------------------------
def _pow2(v) -> int:
    """Smallest power of two >= v. Block sizes are compile-time constants: under
    torch.compile a symbolic size is specialized here (int())."""
    return 1 << max(int(v) - 1, 0).bit_length()


# tl.dot needs every dimension >= 16.
_MIN_DOT_BLOCK = 16


def _dot_block(v, cap: Optional[int] = None) -> int:
    """A tl.dot block covering v: a power of two, at least 16, at most max(cap, 16)."""
    block = _pow2(v) if cap is None else min(_pow2(v), cap)
    return max(_MIN_DOT_BLOCK, block)


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


def _nchw_strides(*ts: torch.Tensor) -> tuple[bool, list[int]]:
    """FLAT (as _hw_strides) and, tensor by tensor, its (n, c, h, w, h*W + w) strides: the
    arguments of kernels that take `s_n, s_c, s_h, s_w, s_hw` per tensor (_hw_offsets)."""
    flat, s_hw = _hw_strides(*ts)
    return flat, [v for t, s in zip(ts, s_hw) for v in (*t.stride(), s)]


def _pixel_strides(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """t and its (n, channel, pixel) strides, pixel p = h*W + w; made contiguous first if its
    (h, w) strides do not flatten to one pixel stride (NCHW and channels_last both do: no copy)."""
    s_p = _flat_hw_stride(t)
    if s_p is None:
        t = t.contiguous()
        s_p = _flat_hw_stride(t)
    return t, (t.stride(0), t.stride(1), s_p)


_SM_COUNT: dict = {}


def _min_programs(device: torch.device) -> int:
    """Programs a launch should have to fill the device: 2 per SM on a GPU, 1 elsewhere."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 2 * _SM_COUNT[index]


# When set (scripts/triton_aot/bench_launches.py records the launches a GPU would make), every
# candidate configuration of a measured launch is launched too, so that the ahead-of-time check
# compiles each configuration a GPU may measure, not only the static rule's.
LAUNCH_EVERY_CANDIDATE = False


def _launch_measured(site: str, x: torch.Tensor, tiles: Callable[[int], tuple[int, int]], tile: int,
                     warps: Callable[[int, int], int], launch: Callable[..., Any], params: tuple = ()) -> Any:
    """`launch(block_c=, block_hw=, num_warps=)` of one kernel over x's [BLOCK_C, BLOCK_HW] tiles,
    and its result, in one of `_tile_candidates(tiles, tile, warps)` (`_launch_choice`): the
    static rule's tile `tiles(tile)`, and on a GPU half and twice its elements, measured."""
    return _launch_choice(site, x, lambda: _tile_config(tiles, tile, warps),
                          lambda: _tile_candidates(tiles, tile, warps), launch, params)


def _launch_choice(site: str, x: torch.Tensor, rule: Callable[[], tuple[str, dict[str, int]]],
                   candidates: Callable[[], dict[str, dict[str, int]]], launch: Callable[..., Any],
                   params: tuple = ()) -> Any:
    """`launch(**config)` and its result, in one of `candidates()` (name -> launch parameters,
    the static rule's `rule()` first): on a GPU, the one `attnkernels.choose` measures fastest
    the first time x's shape is seen at `site` (Triton's autotune, with the library's chooser:
    interleaved rounds, a fixed winner per key, `choose.explain()`, the choices file, static
    mode); under the interpreter, tracing or static mode, the rule's. The key is x's dtype,
    shape and layout, then `params` (what else sets the cost: softmax_spatial's map count).
    The candidates run on the real arguments: an op measured this way only writes its outputs
    (buffers whose shape depends on the configuration, such as per-block partials, are made
    inside `launch`), and the winner's launch comes last.

    The candidates are listed only when a choice is made: a launch pays the rule (where nothing
    is measured) or a dict lookup of the winner, not the candidates' rules per call."""
    if not LAUNCH_EVERY_CANDIDATE and not (_measures_launches(x.device) and choose.current_mode() == "measure"):
        return launch(**rule()[1])
    site, key = f"triton.{site}", (*_shape_key(x), *params)
    known = choose.answered(site, key)
    if known in _TILE_CONFIGS:
        return launch(**_TILE_CONFIGS[known])
    configs = candidates()
    _TILE_CONFIGS.update(configs)
    names = tuple(configs)
    if LAUNCH_EVERY_CANDIDATE:
        for name in names[1:]:
            launch(**configs[name])

    def measure(name: str) -> float:
        return _time_launch(name, lambda: launch(**configs[name]), x.device)

    def can_measure() -> bool:
        return _measures_launches(x.device) and choose.measurable(x)

    return launch(**configs[choose.pick_name(site, key, names, names[0], measure, can_measure)])


def _shape_key(x: torch.Tensor) -> tuple:
    """A measured launch's key: x's dtype, shape and layout (channels contiguous or not)."""
    n, c, h, w = (int(v) for v in x.shape)
    layout = "channels_last" if c > 1 and h * w > 1 and x.stride(1) == 1 else "nchw"
    return (str(x.dtype).removeprefix("torch."), n, c, h, w, layout)


# name -> launch parameters of every configuration listed so far. A name spells out its
# parameters (and names of different kernels' configurations differ in form), so the table never
# goes stale; the winner `choose` remembers is looked up here.
_TILE_CONFIGS: dict[str, dict[str, int]] = {}


def _tile_config(tiles: Callable[[int], tuple[int, int]], elements: int,
                 warps: Callable[[int, int], int]) -> tuple[str, dict[str, int]]:
    """The configuration of tiles of `elements` at most: its name and launch parameters."""
    block_c, block_hw = tiles(max(1, elements))
    num_warps = warps(block_c, block_hw)
    return f"{block_c}x{block_hw}/{num_warps}w", {"block_c": block_c, "block_hw": block_hw, "num_warps": num_warps}


def _tile_candidates(tiles: Callable[[int], tuple[int, int]], tile: int,
                     warps: Callable[[int, int], int]) -> dict[str, dict[str, int]]:
    """The launch configurations a GPU measures for a kernel over [BLOCK_C, BLOCK_HW] tiles:
    the static rule's tile first (`tiles(tile)` -> (BLOCK_C, BLOCK_HW), `warps(BLOCK_C,
    BLOCK_HW)` warps), then half its elements (more programs, for maps too small to fill the
    device) and twice them (fewer loop trips or programs over long planes). Named by their
    blocks and warps, as `choose.explain()` lists them; duplicates dropped."""
    configs: dict[str, dict[str, int]] = {}
    for elements in (tile, tile // 2, tile * 2):
        name, params = _tile_config(tiles, elements, warps)
        configs.setdefault(name, params)
    return configs


def _halved_blocks(blocks: tuple[int, ...], dims: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The block tuples a GPU measures for a tl.dot kernel: the rule's `blocks` first, then, for
    each index in `dims`, `blocks` with that block halved, where the half is still a tl.dot
    block (>= _MIN_DOT_BLOCK). Only smaller tiles: the rule's are the largest known to compile
    within the shared-memory and spill limits (`make triton-aot`)."""
    halved = [blocks]
    for d in dims:
        if blocks[d] // 2 >= _MIN_DOT_BLOCK:
            halved.append(tuple(b // 2 if i == d else b for i, b in enumerate(blocks)))
    return halved


def _measures_launches(device: torch.device) -> bool:
    """Whether launch configurations are measured on `device`: on GPUs (the interpreter's
    timings say nothing about a GPU). Tests replace it."""
    return device.type == "cuda"


def _time_launch(name: str, run: Callable[[], None], device: torch.device) -> float:
    """Seconds of one launch of configuration `name` (`choose.time_once`). Tests replace it."""
    return choose.time_once(run, device)


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


# ----------------------------------------------------------------------------------------
# Reductions split over programs: the split count and the fixed-order sum of the partials
# ----------------------------------------------------------------------------------------
# Module attributes, so tests can force many splits and small sum tiles.
# Fewest splits of a reduction over tiles (more when the GPU needs more programs).
_MIN_SPLITS = 1
# _sum_partials' default tile: up to _SUM_BLOCK_L columns, _SUM_TILE elements.
_SUM_BLOCK_L = 256
_SUM_TILE = 4096


def _splits(tiles: int, programs_per_split: int, device: torch.device) -> int:
    """How many fixed sets the `tiles` of a reduction are split into: enough programs to fill
    the device, at least _MIN_SPLITS, at most one tile each."""
    want = max(_MIN_SPLITS, triton.cdiv(_min_programs(device), programs_per_split))
    return max(1, min(tiles, want))


def _sum_partials(part: torch.Tensor, blocks: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """part (R, L) -> (L,), or (B, R, L) -> (B, L), contiguous: the sum over the R rows of
    partial results, in a fixed order (deterministic): each column accumulates the rows in
    chunks of BLOCK_R into a [BLOCK_R, BLOCK_L] tile, which is then summed over its rows.

    `blocks` = (BLOCK_R, BLOCK_L): the caller's tile, which fixes the order of the sum (a
    caller keeps its own, so its results do not change); by default up to _SUM_BLOCK_L
    columns and _SUM_TILE elements.
    """
    *batch, rows, length = part.shape
    if blocks is None:
        block_l = min(_pow2(length), _SUM_BLOCK_L)
        block_r = min(_pow2(rows), max(1, _SUM_TILE // block_l))
    else:
        block_r, block_l = blocks
    out = torch.empty((*batch, length), dtype=part.dtype, device=part.device)
    num_lb = triton.cdiv(length, block_l)
    wrap_triton(_sum_rows_kernel)[((batch[0] if batch else 1) * num_lb,)](
        part, out, rows, length, num_lb, BLOCK_R=block_r, BLOCK_L=block_l,
    )
    return out


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
def _max_update(acc, v):
    """NaN-propagating running max: a NaN, once in, stays (NaN > y and y > NaN are false)."""
    return tl.where((v > acc) | (v != v), v, acc)


@triton.jit
def _max_reduce(t, axis: tl.constexpr):
    """max of t along axis, NaN if any lane there is NaN (as torch.amax): tl.max does not
    promise NaN propagation, so the NaN is put back explicitly."""
    mx = tl.max(t, axis=axis)
    has_nan = tl.max((t != t).to(tl.int32), axis=axis) > 0
    return tl.where(has_nan, float("nan"), mx)


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
def _pixel_block(num_pb, HW, BLOCK_P: tl.constexpr):
    """This program's sample n (int64), its pixel block pb, the block's BLOCK_P flat pixels
    p = h*W + w, and p < HW. The grid is 1-D over (n, pixel block), pixel blocks fastest."""
    pid = tl.program_id(0)
    n = (pid // num_pb).to(tl.int64)
    pb = pid % num_pb
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    return n, pb, p, p < HW


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
def _sum_rows_kernel(part_ptr, out_ptr, R, L, num_lb, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """out[b, j] = sum_r part[b, r, j] for this program's batch b and BLOCK_L columns j, the
    rows in a fixed order (a 1-D grid over (b, column block), as _channel_block's)."""
    b, j, j_mask = _channel_block(num_lb, L, BLOCK_L)
    acc = tl.zeros([BLOCK_R, BLOCK_L], dtype=out_ptr.dtype.element_ty)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        acc += _tile(part_ptr, b * R * L, rows, L, rows < R, j, 1, j_mask)
    tl.store(out_ptr + b * L + j, tl.sum(acc, axis=0), mask=j_mask)
