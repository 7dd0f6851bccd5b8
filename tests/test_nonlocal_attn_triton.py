"""Triton backend of the nonlocal_attn hot path against the reference path of the same function.

`attnkernels.functional.nonlocal_attn` runs the Triton ops under `use_backend("triton")` and
plain PyTorch (the whole HW x HW softmax) under `use_backend("reference")`; y and the
gradients of q, k, v, x and gamma (autograd through the registered backward op) must agree.
The contract is csrc/nonlocal_attn_ops.cpp ("nonlocal_attn hot path"). Without CUDA
the kernels run on CPU tensors under the Triton interpreter: shapes stay tiny.
"""
import pytest
import torch

# triton_cases first: it switches the Triton interpreter on without CUDA.
from triton_cases import (
    BF16,
    DEVICE,
    F16,
    F32,
    F64,
    INTERPRET,
    acc_of,
    bad_input_params,
    check_schemas,
    dtype_id,
    expected_format,
    make_t,
    measured_choice,
    measured_launches,
    ops,
    shape_id,
)
from triton_cases import close as _close
from triton_cases import randn as _t

from attnkernels import functional as AF
from attnkernels.backend import use_backend
from attnkernels.triton import nonlocal_attn as T

TOL = {
    F64: dict(rtol=1e-10, atol=1e-10),
    F32: dict(rtol=3e-5, atol=3e-5),
}
# Half inputs: P and dS are rounded to the input dtype for their matmuls (flash-style), and
# the reference rounds out before gamma * out + x: compare relative to each tensor's scale.
HALF_TOL = {F16: 1e-2, BF16: 4e-2}

# (N, D_qk, D_v, H, W): HW = 35 (partial blocks), HW = 1 with N = 1 and D_qk = 1, D_qk = 1,
# D_v = 40 (two D_v chunks of fp64's 32 and the separate grad_v kernel), H = 1.
SHAPES = [(2, 3, 5, 5, 7), (1, 1, 4, 1, 1), (2, 1, 3, 3, 2), (1, 8, 40, 4, 3), (2, 5, 2, 1, 6)]
LAYOUTS = ["nchw", "channels_last", "sliced", "channel_slice", "mixed"]


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------
def make_inputs(shape, dtype, layout, gamma=0.7, qk_scale=0.6):
    """q, k, v, x, gamma, grad_y; layout "mixed" gives each tensor a different layout."""
    n, dqk, dv, h, w = shape
    layouts = ["nchw", "channels_last", "sliced", "channel_slice"] if layout == "mixed" else [layout] * 4
    q = make_t((n, dqk, h, w), dtype, layouts[0], qk_scale)
    k = make_t((n, dqk, h, w), dtype, layouts[1], qk_scale)
    v = make_t((n, dv, h, w), dtype, layouts[2])
    x = make_t((n, dv, h, w), dtype, layouts[3])
    g = torch.tensor([gamma], dtype=dtype, device=DEVICE)
    gy = make_t((n, dv, h, w), dtype, "channels_last" if layout == "channels_last" else "nchw")
    return q, k, v, x, g, gy


def close(actual, expected, dtype, equal_nan=False, name=""):
    if dtype in HALF_TOL:
        a, e = actual.double(), expected.double()
        scale = e.abs().max().clamp_min(1.0)
        assert ((a - e).abs().max() / scale).item() <= HALF_TOL[dtype], name
    else:
        _close(actual, expected, TOL[dtype], equal_nan, name)


# ----------------------------------------------------------------------------------------
# One forward + backward on a backend
# ----------------------------------------------------------------------------------------
NAMES = ("grad_q", "grad_k", "grad_v", "grad_x", "grad_gamma")


def run(backend, inputs):
    """{name: tensor}: y and the gradients of q, k, v, x, gamma for upstream grad_y."""
    *args, gy = inputs
    # detach, not clone: clone would make a sliced tensor dense.
    leaves = [t.detach().requires_grad_() for t in args]
    assert all(l.stride() == t.stride() for l, t in zip(leaves, args))
    with use_backend(backend):
        y = AF.nonlocal_attn(*leaves)
    grads = torch.autograd.grad(y, leaves, gy)
    return dict(y=y, **dict(zip(NAMES, grads)))


def compare(inputs, equal_nan=False):
    """Triton vs reference on y and every gradient; returns the Triton results."""
    dtype = inputs[0].dtype
    got = run("triton", inputs)
    want = run("reference", inputs)
    for name in got:
        g, w = got[name], want[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        close(g, w, dtype, equal_nan, name)
    return got


def check_layouts(inputs, out):
    """y and each gradient follow their tensor's dtype and layout; grad_gamma gamma's shape."""
    q, k, v, x, g, _ = inputs
    for name, t in (("y", x), ("grad_q", q), ("grad_k", k), ("grad_v", v)):
        assert out[name].dtype == t.dtype, name
        assert out[name].is_contiguous(memory_format=expected_format(t)), name
    assert out["grad_gamma"].shape == g.shape and out["grad_gamma"].dtype == g.dtype


SMALL_TILES = dict(
    _FWD_BLOCKS={dt: (16, 16, 16) for dt in (F64, F32, F16, BF16)},
    _BWD_BLOCKS={dt: (16, 16, 16, 16) for dt in (F64, F32, F16, BF16)},
    _MAX_BLOCK_DQK=16,
    _MAX_FMA_BLOCK_DQK=16,
    _MAX_ROW_BLOCK_P=4,
    _ROW_TILE_ELEMENTS=8,
    _SUM_BLOCK=2,
)


def small_tiles(monkeypatch):
    for name, value in SMALL_TILES.items():
        monkeypatch.setattr(T, name, value)


# The candidates of every fp64 tl.dot launch at HW = 72 and D_v > 16 (rule blocks 32, 32, D_v
# chunk 32; FMA dots: 8 warps): the rule's, half the query block, half the key block.
DOT_CANDIDATES = ["m32n32dv32/8w", "m16n32dv32/8w", "m32n16dv32/8w"]
# The R kernel's tiles at HW = 72, D_v > 32: the rule's 2048 values (64 pixels), half, twice.
ROW_CANDIDATES = ["32x64/4w", "16x64/4w", "64x64/4w"]


@pytest.mark.parametrize("fastest", [1, 2], ids=["half_queries", "half_keys"])
def test_measured_forward_configurations_match_the_reference(monkeypatch, fastest):
    """Where launches are measured (GPUs; a fake clock here), the forward times each candidate
    (the rule's blocks, half the query block, half the key block) once per shape and D_qk and
    runs the fastest: outputs and gradients stay the reference's, a known shape times nothing,
    and explain() names the choice."""
    inputs = make_inputs((2, 18, 33, 9, 8), F64, "nchw")
    configs = DOT_CANDIDATES
    with measured_launches(monkeypatch, {configs[fastest]}) as timed:
        compare(inputs)
        assert measured_choice("nonlocal_attn", "float64 2 33 9 8 nchw 18") == (configs[fastest], configs)
        assert set(configs) <= set(timed)  # (the backward's launches are measured too)
        timed.clear()
        compare(inputs)
        assert timed == []  # a known key is a lookup


@pytest.mark.parametrize("fastest", [1, 2], ids=["half_queries", "half_keys"])
def test_measured_backward_configurations_match_the_reference(monkeypatch, fastest):
    """Where launches are measured (a fake clock here), the R rows' launch (the rule's tile,
    half and twice its values) and each tl.dot launch of the backward (grad_q, grad_k, grad_v)
    times its candidates (the rule's blocks, half the query block, half the key block; the
    rule's D_v chunk) once per shape and D_qk and runs the fastest: gradients stay the
    reference's, a known shape times nothing, explain() names each site's choice. D_v = 33 (two
    fp64 D_v chunks of 32) runs grad_v as its own kernel; D_v = 20 fuses it into grad_k."""
    for dv, sites in ((33, ("grad_q", "grad_k", "grad_v")), (20, ("grad_q", "grad_k"))):
        inputs = make_inputs((2, 18, dv, 9, 8), F64, "nchw")
        assert T._backward_blocks(inputs[2], 72, dv, 1) == (32, 32, 32, 32)
        configs = DOT_CANDIDATES
        rows = ROW_CANDIDATES if dv > 32 else ROW_CANDIDATES[:2]  # D_v = 20: twice the tile is the rule's
        with measured_launches(monkeypatch, {configs[fastest], rows[fastest % len(rows)]}) as timed:
            compare(inputs)
            key = f"float64 2 {dv} 9 8 nchw 18"
            for site in sites:  # each site timed each candidate and runs the fastest
                assert measured_choice(f"nonlocal_attn_backward.{site}", key) == (configs[fastest], configs), site
            assert measured_choice("nonlocal_attn_backward.rows", key[:-3]) == (rows[fastest % len(rows)], rows)
            if "grad_v" not in sites:  # fused into grad_k: no launch of its own
                assert measured_choice("nonlocal_attn_backward.grad_v", key) is None
            assert set(configs) <= set(timed)
            timed.clear()
            compare(inputs)
            assert timed == []  # known keys are lookups


@pytest.fixture(params=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch):
    """Small tiles force many query/key blocks, D_qk chunks (no single q tile), D_v chunks
    (no fused grad_v), R channel chunks and grad_gamma partials, partial ones included."""
    if request.param == "small_tiles":
        small_tiles(monkeypatch)
    return request.param


# ----------------------------------------------------------------------------------------
# Forward and gradients vs the reference
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference_f64(layout, shape):
    inputs = make_inputs(shape, F64, layout)
    check_layouts(inputs, compare(inputs))


# D_v = 80: two D_v chunks of fp32's 64 in the forward and the separate grad_v kernel.
@pytest.mark.parametrize("shape", [(2, 3, 5, 5, 7), (1, 1, 4, 1, 1), (1, 4, 80, 3, 3)], ids=shape_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed"])
def test_matches_reference_f32(layout, shape):
    inputs = make_inputs(shape, F32, layout, gamma=-1.3)
    check_layouts(inputs, compare(inputs))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_small_tiles(dtype, layout, monkeypatch):
    """Every loop with several iterations and partial ends: HW = 25 (2 blocks of 16),
    D_qk = 18 (2 chunks), D_v = 33 (3 chunks); and a fused grad_v (D_v = 9 <= 16)."""
    small_tiles(monkeypatch)
    for shape in [(2, 18, 33, 5, 5), (1, 3, 9, 6, 3)]:
        inputs = make_inputs(shape, dtype, layout)
        check_layouts(inputs, compare(inputs))


def test_small_tiles_really_split(monkeypatch):
    """The small tiles do split the work as test_small_tiles says."""
    small_tiles(monkeypatch)
    x = torch.empty((2, 33, 5, 5), dtype=F64, device=DEVICE)
    assert T._forward_blocks(x, 25, 33) == (16, 16, 16)  # 2 query, 2 key blocks, 3 D_v chunks
    assert T._dqk_block(18) == (16, False) and T._dqk_block(3) == (16, True)
    assert T._backward_blocks(x, 25, 33, 2) == (16, 16, 16, 16)
    assert T._row_blocks(25, 33) == (2, 4)
    # Default tiles: the f64/f32 tests' D_v = 40 / 80 do not fit one chunk, D_v = 5 does.
    monkeypatch.undo()
    assert T._forward_blocks(x, 12, 40)[2] == 32 and T._forward_blocks(x.float(), 9, 80)[2] == 64
    assert T._backward_blocks(x, 12, 40, 1)[2] == 32 and T._backward_blocks(x.float(), 9, 80, 1)[2:] == (32, 64)
    assert T._backward_blocks(x, 35, 5, 1)[2] == 16
    # FMA-dot forwards (fp32, fp64) contract D_qk = 128 (C = 1024) in chunks of 32 (no spills);
    # tensor-core ones and every backward hold it as one tile.
    for dtype in (F32, F64):
        assert T._dqk_block(128, dtype) == (32, False)
    assert T._dqk_block(128, F16) == T._dqk_block(128, BF16) == T._dqk_block(128) == (128, True)


def test_out_and_lse(tiles):
    """The op's own outputs: out = softmax(q^T k) v in x's dtype and layout, lse (N, H*W)
    contiguous in acc, against a direct computation."""
    for dtype in (F64, F32):
        q, k, v, x, g, _ = make_inputs((2, 5, 7, 4, 5), dtype, "channels_last")
        y, out, lse = ops.nonlocal_attn(q, k, v, x, g)
        acc = acc_of(dtype)
        s = torch.einsum("ndi,ndj->nij", q.to(acc).flatten(2), k.to(acc).flatten(2))
        want_out = torch.einsum("nij,ncj->nci", torch.softmax(s, -1), v.to(acc).flatten(2)).view(x.shape)
        assert lse.shape == (2, 20) and lse.dtype == acc and lse.is_contiguous()
        close(lse, torch.logsumexp(s, -1), dtype)
        close(out, want_out.to(dtype), dtype)
        close(y, (0.7 * want_out + x.to(acc)).to(dtype), dtype)
        for t in (y, out):
            assert t.dtype == dtype and t.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_large_energies(dtype, tiles):
    """Energies of several hundred: the online softmax rescales its running sums from key
    block to key block without overflow (exp of raw energies would be inf)."""
    inputs = make_inputs((2, 6, 5, 5, 7), dtype, "nchw", qk_scale=8.0)
    s = torch.einsum("ndi,ndj->nij", inputs[0].double().flatten(2), inputs[1].double().flatten(2))
    assert s.abs().max() > 200
    compare(inputs)


@pytest.mark.parametrize("gamma", [0.0, -2.5])
def test_gamma_values(gamma):
    """gamma = 0 (DANet's initial value): y == x bit for bit, and grad_gamma still flows."""
    inputs = make_inputs((2, 3, 6, 3, 3), F32, "nchw", gamma=gamma)
    out = compare(inputs)
    if gamma == 0.0:
        assert torch.equal(out["y"], inputs[3])
        assert out["grad_gamma"].abs().item() > 0 and out["grad_v"].eq(0).all()


def test_gamma_shapes_and_dtypes():
    """gamma of shape (), (1,) or (1, 1, 1, 1), in another dtype than x: grad_gamma has
    gamma's shape and dtype (computed in acc(x))."""
    q, k, v, x, _, gy = make_inputs((1, 2, 3, 2, 3), F32, "nchw")
    ref = None
    for g in (torch.tensor(0.7), torch.tensor([0.7]), torch.full((1, 1, 1, 1), 0.7), torch.tensor([0.7], dtype=F64)):
        g = g.to(DEVICE)
        y, out, lse = ops.nonlocal_attn(q, k, v, x, g)
        grads = ops.nonlocal_attn_backward(gy, q, k, v, g, out, lse)
        assert grads[3].shape == g.shape and grads[3].dtype == g.dtype
        if ref is None:
            ref = (y, grads)
        assert torch.equal(y, ref[0])
        for a, b in zip(grads[:3], ref[1][:3]):
            assert torch.equal(a, b)
        assert grads[3].item() == ref[1][3].item()  # one fp32 sum, whatever gamma's dtype


def test_grads_from_expanded_and_sliced_upstream():
    """Autograd may hand the backward op an expanded (stride 0) or sliced grad_y."""
    inputs = make_inputs((2, 3, 5, 3, 4), F64, "channels_last")
    grads = {}
    for backend in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in inputs[:5]]
        with use_backend(backend):
            y = AF.nonlocal_attn(*leaves)
        loss = y.sum() + (y[:, :, ::2, 1:] ** 2).sum()
        grads[backend] = torch.autograd.grad(loss, leaves)
    for g, r in zip(grads["triton"], grads["reference"]):
        close(g, r, F64)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: NaN, inf - inf
# ----------------------------------------------------------------------------------------
# NaN
# ----------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: NaN, inf - inf
@pytest.mark.parametrize("where", ["q", "k", "v", "x"])
def test_nan_propagates(where, tiles):
    """A NaN energy makes its query row's softmax NaN even where the row also holds padded
    (masked) keys; a NaN in v spreads over its channel, in x stays in place; the gradients
    carry NaN exactly where torch's do."""
    shape = (2, 3, 4, 5, 7)  # HW = 35: the last key block is partial under every tiling
    q, k, v, x, g, gy = make_inputs(shape, F64, "nchw")
    if where == "q":
        q[0, 1, 2, 3] = float("nan")  # query row i = 2*7 + 3 of sample 0
    elif where == "k":
        k[1, 0, 4, 6] = float("nan")  # key 34 of sample 1: every row of sample 1
    elif where == "v":
        v[0, 2, 0, 0] = float("nan")  # channel 2 of sample 0, every query
    else:
        x[1, 3, 1, 1] = float("nan")
    out = compare((q, k, v, x, g, gy), equal_nan=True)
    nan = torch.isnan(out["y"])
    expected = torch.zeros(shape[:1] + shape[2:], dtype=torch.bool).view(2, 4, 5, 7)
    if where == "q":
        expected[0, :, 2, 3] = True
    elif where == "k":
        expected[1] = True
    elif where == "v":
        expected[0, 2] = True
    else:
        expected[1, 3, 1, 1] = True
    assert torch.equal(nan.cpu(), expected)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: NaN, inf - inf
@pytest.mark.parametrize("hw", [(1, 1), (1, 3)])
def test_nan_in_tiny_maps(hw):
    """HW = 1 and 3 (one block, mostly padding): the padded keys' -inf never hides a NaN energy."""
    q, k, v, x, g, gy = make_inputs((1, 2, 3) + hw, F32, "nchw")
    q[0, 0, 0, 0] = float("nan")
    y, out, lse = ops.nonlocal_attn(q, k, v, x, g)
    assert torch.isnan(lse[0, 0]) and torch.isnan(out[0, :, 0, 0]).all() and torch.isnan(y[0, :, 0, 0]).all()
    assert not torch.isnan(lse[0, 1:]).any()
    compare((q, k, v, x, g, gy), equal_nan=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: NaN, inf - inf
def test_overflowing_energies(tiles):
    """Finite inputs whose energies overflow to -inf: a query whose first key blocks are all
    -inf but whose last keys are finite is not poisoned by them (the running max stays -inf
    for a while); a query whose every energy is -inf is NaN, as torch's softmax."""
    q, k, v, x, g, gy = make_inputs((2, 1, 3, 5, 7), F64, "nchw")
    q[:, 0, 0, 0] = 1e200
    k[0, 0] = -1e200
    k[0, 0, 4, :] = 0.5  # sample 0, query 0: -inf on keys 0..27, 5e199 on keys 28..34
    k[1, 0] = -1e200  # sample 1, query 0: -inf everywhere
    inputs = (q, k, v, x, g, gy)
    got, want = run("triton", inputs), run("reference", inputs)
    close(got["y"], want["y"], F64, equal_nan=True)
    y, out, lse = ops.nonlocal_attn(q, k, v, x, g)
    close(out[0, :, 0, 0], v[0, :, 4, :].mean(dim=-1), F64)  # uniform over the 7 finite keys
    assert torch.isnan(out[1, :, 0, 0]).all() and not torch.isnan(out[0]).any()
    # Gradients through energies of 1e199 are ill-conditioned (rounding times |k| = 1e200):
    # compare where they are NaN, and that sample 0's are finite.
    for name in NAMES:
        assert torch.equal(torch.isnan(got[name]), torch.isnan(want[name])), name
    assert torch.isfinite(got["grad_q"][0]).all() and torch.isfinite(got["grad_v"][0]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: NaN, inf - inf
@pytest.mark.parametrize("k_row", [(-float("inf"), 0.249), (-0.5, 0.249)], ids=["k_neg_inf", "k_finite"])
def test_infinite_energy_gives_torchs_lse(k_row):
    """An energy of +inf (q = inf against k > 0): lse is +inf there, as torch.logsumexp's (not
    inf - inf = NaN), and the backward's P of that row is NaN, as torch.softmax's row (not
    exp(S - inf) = 0 at its finite energies): NaN where the reference's results are."""
    t = lambda *v: torch.tensor(v, dtype=F64, device=DEVICE).reshape(1, 1, 1, len(v))  # noqa: E731
    inputs = (t(1.541, float("inf")), t(*k_row), t(-0.72, 0.33), t(0.1, 0.2),
              torch.tensor([0.41], dtype=F64, device=DEVICE), t(1.0, -0.5))
    y, out, lse = ops.nonlocal_attn(*inputs[:5])
    s = torch.einsum("ndi,ndj->nij", inputs[0].flatten(2), inputs[1].flatten(2))
    close(lse, torch.logsumexp(s, -1), F64, equal_nan=True)
    assert lse[0, 1].item() == float("inf") and torch.isfinite(lse[0, 0])
    got = compare(inputs, equal_nan=True)
    assert torch.isnan(got["grad_v"]).all()  # the +inf row's P is NaN at every key


# ----------------------------------------------------------------------------------------
# Determinism, registration, input checks
# ----------------------------------------------------------------------------------------
def test_deterministic(monkeypatch):
    """Same input, same outputs and gradients, bit for bit (partial sums included)."""
    small_tiles(monkeypatch)
    inputs = make_inputs((2, 20, 9, 5, 7), F32, "mixed")
    first, second = (run("triton", inputs) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_schemas_match_the_cpp_contract():
    """Both ops are registered under attnkernels_triton with the C++ library's schemas (csrc/nonlocal_attn_ops.cpp)."""
    check_schemas(T.__all__, 2)


def _opcheck_cases(dtype):
    q, k, v, x, g, gy = make_inputs((2, 3, 5, 3, 4), dtype, "mixed")
    y, out, lse = ops.nonlocal_attn(q, k, v, x, g)
    return [
        (ops.nonlocal_attn, (q, k, v, x, g)),
        (ops.nonlocal_attn_backward, (gy, q, k, v, g, out, lse)),
    ]


def test_opcheck_schema_and_autograd():
    """Under the interpreter only these two opcheck tests run: the fake-tensor ones hand
    the kernels fake tensors, whose data the interpreter cannot read (see the GPU test).
    The autograd that opcheck checks was registered by importing the kernel module."""
    for op, args in _opcheck_cases(F64):
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.skipif(INTERPRET, reason="fake tensors have no data for the Triton interpreter")
def test_opcheck_full_gpu():
    for op, args in _opcheck_cases(F32):
        torch.library.opcheck(op.default, args)


@pytest.mark.skipif(INTERPRET, reason="half precision on GPU only (the interpreter has no bf16 dot)")
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=dtype_id)
def test_half_gpu(dtype, layout):
    """fp16/bf16 on the tensor cores, PAM-like sizes (several blocks and D_v chunks)."""
    for shape in [(2, 16, 128, 9, 13), (1, 32, 256, 32, 32), (2, 3, 5, 5, 7)]:
        inputs = make_inputs(shape, dtype, layout, qk_scale=0.3)
        check_layouts(inputs, compare(inputs))


@pytest.mark.skipif(INTERPRET, reason="GPU sizes")
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_pam_sizes_gpu(dtype):
    """PAM-like sizes with the default tiles: D_qk = 64 (one tile), D_v = 512, HW = 1023."""
    inputs = make_inputs((2, 64, 512, 31, 33), dtype, "channels_last", qk_scale=0.2)
    compare(inputs)


def _fwd(**kw):
    args = dict(q=_t(2, 3, 4, 4), k=_t(2, 3, 4, 4), v=_t(2, 5, 4, 4), x=_t(2, 5, 4, 4), gamma=_t(1))
    args.update(kw)
    return ops.nonlocal_attn(*args.values())


def _bwd(**kw):
    args = dict(grad_y=_t(2, 5, 4, 4), q=_t(2, 3, 4, 4), k=_t(2, 3, 4, 4), v=_t(2, 5, 4, 4), gamma=_t(1),
                out=_t(2, 5, 4, 4), lse=_t(2, 16))
    args.update(kw)
    return ops.nonlocal_attn_backward(*args.values())


OP, BW = "nonlocal_attn", "nonlocal_attn_backward"
BAD_INPUTS = [
    (lambda: _fwd(x=_t(2, 5, 4)), ValueError, rf"{OP}: x must be 4-D \(N, C, H, W\), got 3-D"),
    (lambda: _fwd(q=_t(2, 3, 0, 4), k=_t(2, 3, 0, 4), v=_t(2, 5, 0, 4), x=_t(2, 5, 0, 4)), ValueError,
     rf"{OP}: x must not be empty"),
    (lambda: _fwd(v=_t(2, 6, 4, 4)), ValueError,
     rf"{OP}: v must have x's shape \(N, D_v, H, W\) = \[2, 5, 4, 4\], got \[2, 6, 4, 4\]"),
    (lambda: _fwd(q=_t(2, 3, 4, 5)), ValueError,
     rf"{OP}: q must have shape \(N, D_qk, H, W\) = \(2, D_qk, 4, 4\), got \[2, 3, 4, 5\]"),
    (lambda: _fwd(q=_t(1, 3, 4, 4)), ValueError, rf"{OP}: q must have shape \(N, D_qk, H, W\)"),
    (lambda: _fwd(k=_t(2, 2, 4, 4)), ValueError,
     rf"{OP}: k must have q's shape \(N, D_qk, H, W\) = \[2, 3, 4, 4\], got \[2, 2, 4, 4\]"),
    (lambda: _fwd(q=_t(2, 0, 4, 4), k=_t(2, 0, 4, 4)), ValueError,
     rf"{OP}: q must have shape \(N, D_qk, H, W\) = \(2, D_qk, 4, 4\), got \[2, 0, 4, 4\]"),
    (lambda: _fwd(k=_t(2, 3, 4, 4, dtype=F64)), TypeError, rf"{OP}: k must have x's dtype Float, got Double"),
    (lambda: _fwd(v=torch.ones(2, 5, 4, 4, dtype=torch.int64, device=DEVICE)), TypeError,
     rf"{OP}: v must be a floating-point tensor, got Long"),
    (lambda: _fwd(gamma=_t(2)), ValueError, rf"{OP}: gamma must hold one value, got shape \[2\]"),
    (lambda: _fwd(gamma=torch.ones(1, dtype=torch.int32, device=DEVICE)), TypeError,
     rf"{OP}: gamma must be a floating-point tensor"),
    (lambda: _fwd(gamma=torch.ones(1, device="meta")), ValueError, rf"{OP}: gamma must be on \w+(:\d+)?, got meta"),
    # The backward checks nonlocal_attn's arguments with out in x's place (named x, as the C++ ops do).
    (lambda: _bwd(grad_y=_t(2, 5, 4, 3)), ValueError,
     rf"{BW}: grad_y must match x's shape \[2, 5, 4, 4\] and dtype Float, got \[2, 5, 4, 3\] Float"),
    (lambda: _bwd(out=_t(2, 4, 4, 4)), ValueError, rf"{BW}: v must have x's shape"),
    (lambda: _bwd(lse=_t(2, 15)), ValueError,
     rf"{BW}: lse must have shape \(N, H\*W\) = \(2, 16\), got \[2, 15\]"),
    (lambda: _bwd(q=_t(2, 3, 4, 4, dtype=F64)), TypeError, rf"{BW}: q must have x's dtype Float, got Double"),
    (lambda: _bwd(grad_y=_t(2, 5, 4, 4, dtype=F64)), ValueError,
     rf"{BW}: grad_y must match x's shape \[2, 5, 4, 4\] and dtype Float, got \[2, 5, 4, 4\] Double"),
    (lambda: _bwd(k=_t(2, 3, 4)), ValueError, rf"{BW}: k must have q's shape"),
    (lambda: _bwd(gamma=_t(1, 2)), ValueError, rf"{BW}: gamma must hold one value"),
    (lambda: _bwd(lse=torch.ones(2, 16, device="meta")), ValueError, rf"{BW}: lse must be on \w+(:\d+)?, got meta"),
    # cpu_tile (the C++ CPU kernels' thread split) is checked here too, in the C++ ops' words.
    (lambda: _fwd(cpu_tile=-1), ValueError, rf"{OP}: cpu_tile must be 0 \(the default tile\) or 1 to 1024 pixels, got -1"),
    (lambda: _bwd(cpu_tile=2048), ValueError, rf"{BW}: cpu_tile must be 0 \(the default tile\) or 1 to 1024 pixels"),
]


@pytest.mark.parametrize("call,error,pattern", bad_input_params(BAD_INPUTS))
def test_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
