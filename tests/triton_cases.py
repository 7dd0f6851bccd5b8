"""Shared setup and helpers of the Triton hot-path tests (tests/test_*_triton.py).

Import this module before any `attnkernels.triton` kernel module: without CUDA it switches the
Triton interpreter on, which must happen before triton is first imported, and the kernels then
run on CPU tensors (DEVICE "cpu", shapes kept tiny). Importing a kernel module registers its
ops under torch.ops.attnkernels_triton, with their autograd and the hot path's composites.
"""
import contextlib
import os
from collections.abc import Collection, Iterator

import helpers
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attnkernels.triton import _common  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
DEVICE = "cpu" if INTERPRET else "cuda"
ops = torch.ops.attnkernels_triton

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16


def shape_id(s) -> str:
    return "x".join(map(str, s))


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def acc_of(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return F64 if dtype == F64 else F32


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------
def data(shape, dtype, kind="randn", scale=1.0):
    """A random tensor of `shape` on DEVICE, made in fp64 and cast to `dtype`:
    * "randn": normal, times `scale`;
    * "ties": small integers (repeated maxima everywhere) and constant channels 1, 4, 7, ...;
    * "relu": relu(normal) (exact zeros: ties at a maximum of 0);
    * "sparse": relu(normal - 1) with all-zero channels 1, 4, 7, ... (channels whose maximum is
      a run of zeros);
    * "constant": -0.75 everywhere."""
    if kind == "randn":
        t = torch.randn(shape, dtype=F64) * scale
    elif kind == "ties":
        t = torch.randint(-2, 3, shape).to(F64)
        t[:, 1::3] = 1.0
    elif kind == "relu":
        t = torch.relu(torch.randn(shape, dtype=F64))
    elif kind == "sparse":
        t = torch.relu(torch.randn(shape, dtype=F64) - 1.0)
        t[:, 1::3] = 0.0
    elif kind == "constant":
        t = torch.full(shape, -0.75, dtype=F64)
    else:
        raise AssertionError(kind)
    return t.to(dtype=dtype, device=DEVICE)


def make_t(shape, dtype, layout, scale=1.0, kind="randn"):
    """A tensor of `shape` (values: `data(..., kind, scale)`) in `layout`:
    * "nchw", "channels_last";
    * "sliced": a strided H*W slice whose pixels do not flatten to one stride (H, W > 1);
    * "channel_slice": a channel slice (sample stride != C*H*W);
    * "sliced_all": N, C, H and W sliced at once (both of the above);
    * "sliced_channels_last": a slice of a channels_last tensor (channel stride 1, pixels not
      flat)."""
    n, c, h, w = shape

    def values(*size):  # scaled and cast before slicing: a cast densifies a sliced view
        return data(size, dtype, kind, scale)

    if layout == "nchw":
        t = values(*shape)
        assert t.is_contiguous()
    elif layout == "channels_last":
        t = values(*shape).to(memory_format=torch.channels_last)
        assert t.is_contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        t = values(n, c, 2 * h, w + 1)[:, :, ::2, 1:]
        assert (_common._flat_hw_stride(t) is None) == (h > 1 and w > 1)
    elif layout == "channel_slice":
        t = values(n, c + 3, h, w)[:, 2 : c + 2]
        assert t.stride(0) == (c + 3) * h * w
    elif layout == "sliced_all":
        t = values(n + 1, c + 3, h + 2, 2 * w + 1)[1:, 2 : c + 2, 1 : h + 1, 1::2]
    elif layout == "sliced_channels_last":
        t = values(n, c + 2, h + 1, w + 2).to(memory_format=torch.channels_last)[:, 1 : c + 1, 1:, 2:]
    else:
        raise AssertionError(layout)
    assert t.shape == shape
    if layout in ("sliced_all", "sliced_channels_last"):
        assert not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last)
        if h > 1 and w > 1:  # the kernels' non-flat (h, w) addressing
            assert _common._flat_hw_stride(t) is None
    return t


def randn(*shape, dtype=F32):
    """A plain random tensor on DEVICE (the input-check tests' arguments)."""
    return torch.randn(shape, dtype=dtype, device=DEVICE)


def small_reductions(monkeypatch):
    """The split reductions of _common in small pieces: at least three splits, and their
    ordered sum over tiles of 4 columns and 2 rows (partial ends included)."""
    monkeypatch.setattr(_common, "_MIN_SPLITS", 3)
    # The CPU's program target (1) on a GPU too: splits come from _MIN_SPLITS alone.
    monkeypatch.setattr(_common, "_min_programs", lambda device: 1)
    monkeypatch.setattr(_common, "_SUM_BLOCK_L", 4)
    monkeypatch.setattr(_common, "_SUM_TILE", 8)


# ham_spatial's pixel-tile knobs (`_pixel_tiles`: the tiles of its pixel kernels, which
# cbam_spatial and bam launch too), small: several channel chunks and pixel blocks, partial ones
# included, so a reduction over pixels sums pixel-block partials (`_SUM_TILE_ELEMENTS`: in
# several row chunks).
SMALL_PIXEL_TILES = dict(
    _TILE_ELEMENTS={F32: 16, F64: 16},
    _MAX_BLOCK_HW=4,
    _MIN_BLOCK_HW=1,
    _MAX_BLOCK_C_CHANNELS_LAST=4,
    _SUM_TILE_ELEMENTS=8,
    # The CPU's program target on every device, so a GPU run splits exactly as the asserts say.
    _min_programs=lambda device: 1,
)


def small_pixel_tiles(monkeypatch, **more):
    """ham_spatial's pixel tiles small (SMALL_PIXEL_TILES), and its other knobs in `more`."""
    from attnkernels.triton import ham_spatial

    for name, value in {**SMALL_PIXEL_TILES, **more}.items():
        monkeypatch.setattr(ham_spatial, name, value)


# ----------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def measured_launches(monkeypatch, fastest: Collection[str]) -> Iterator[list[str]]:
    """Launch configurations measured as on a GPU (`choose` in measure mode, no choices file),
    on a fake clock: each candidate runs for real, those named in `fastest` take 0.1 ms and
    the others 1 ms, in choose.MIN_ROUNDS rounds. Yields the list of the configuration names timed, in order; `choose`'s
    memory is cleared before and after."""
    from attnkernels import choose

    monkeypatch.setenv(choose.ENV_MODE, "measure")
    monkeypatch.delenv(choose.ENV_FILE, raising=False)
    monkeypatch.setattr(_common, "_measures_launches", lambda device: True)
    timed: list[str] = []

    def fake_time(name, run, device):
        run()
        timed.append(name)
        return 1e-4 if name in fastest else 1e-3

    monkeypatch.setattr(_common, "_time_launch", fake_time)
    monkeypatch.setattr(choose, "BUDGET_S", 0.0)  # the fewest rounds: fewer interpreter runs
    choose.clear()
    try:
        yield timed
    finally:
        choose.clear()


def measured_choice(site, key=None):
    """(winner, the configurations timed, in order) of the measured launch at `site` (a site
    of `_common._launch_choice`), from its `choose.explain()` line at `key` (the bracketed
    key; by default the site's first line); None without such a line. The choice must say
    measured: launches at one shape share configuration names, so a site is read by its line."""
    from attnkernels import choose

    head = f"triton.{site} [" + ("" if key is None else f"{key}]: ")
    line = next((line.strip() for line in choose.explain().splitlines() if line.strip().startswith(head)), None)
    if line is None:
        return None
    winner, how = line.split("]: ", 1)[1].split(" (", 1)
    assert how.startswith("measured: "), line
    return winner, [entry.split(" ")[0] for entry in how.removeprefix("measured: ").split(", ")]


def expected_format(t):
    """The layout of an output that follows t: channels_last when t is channels_last-dense
    and not NCHW-contiguous, NCHW otherwise."""
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def close(actual, expected, tol, equal_nan=False, name="", check_dtype=True, truth=None):
    """torch.testing.assert_close with `tol` (rtol, atol), its message prefixed by `name`. With
    `truth` (a callable giving the float64 result, called on a miss), a result outside `tol`
    still passes if it is `helpers.as_accurate` as `expected`."""
    try:
        torch.testing.assert_close(actual, expected, **tol, equal_nan=equal_nan, check_dtype=check_dtype)
    except AssertionError as err:
        if truth is None or not helpers.as_accurate(actual, expected, truth()):
            raise AssertionError(f"{name}: {err}") from None


def within_half_budget(names, ours, theirs, truth, dtype):
    """Half-precision kernels: each of `ours` off the fp64 `truth` by at most twice the error
    of `theirs` (plain torch ops in `dtype`) plus a rounding of the tensor's scale."""
    helpers.assert_error_like_eager(ours, theirs, truth, floor=torch.finfo(dtype).eps, names=list(names))


def bad_input_params(cases):
    """pytest params (call, error, pattern) of an input-check table, each with the id
    "<op>-<row>": `@pytest.mark.parametrize("call,error,pattern", bad_input_params(BAD_INPUTS))`."""
    return [pytest.param(call, error, pattern, id=f"{pattern.split(':')[0]}-{i}")
            for i, (call, error, pattern) in enumerate(cases)]


# ----------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------
def check_schemas(names, count):
    """The ops in `names`, `count` of them, are registered under torch.ops.attnkernels_triton
    with the schema the C++ library registers for them (torch.ops.attnkernels, loaded, its
    namespace aside): the library's own view of csrc/, not a parse of it."""
    from attnkernels import _ext

    _ext.load()
    assert len(set(names)) == count
    prefix = "attnkernels::"
    for name in names:
        theirs = str(getattr(torch.ops.attnkernels, name).default._schema)
        assert theirs.startswith(prefix), theirs
        ours = str(getattr(ops, name).default._schema)
        assert ours == "attnkernels_triton::" + theirs[len(prefix):], name
