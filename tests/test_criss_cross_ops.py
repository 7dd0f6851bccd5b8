"""criss_cross on the C++ / CUDA / reference backends, against its Reference ops.

The op through the public function (`attnkernels.functional.criss_cross`) on a backend, forward
and autograd's gradients, against `attnkernels.ops.criss_cross.Reference`'s forward and explicit
backward (csrc/criss_cross_ops.cpp's formulas); the Reference against reference.CrissCross's
own composition. The Triton ops under the interpreter are in tests/test_criss_cross_triton.py;
the module in tests/test_criss_cross.py. On a GPU the CUDA and Triton backends run here too.
"""
from __future__ import annotations

import pytest
import torch
from helpers import (
    LAYOUTS,
    assert_all_close,
    assert_cpp_error_like_python,
    assert_error_like_eager,
    assert_layout_of,
    backend_cases,
    grads_of,
    leaf,
    make_input,
    needs_gpu,
    on_backend,
    rounding_floor,
)

from attnkernels import backend
from attnkernels import functional as AF
from attnkernels import reference as R
from attnkernels.ops import criss_cross as ops_module

Ref = ops_module.Reference
F64, F32 = torch.float64, torch.float32
CASES = backend_cases(cpu=("cpu", "reference"), cuda=("cuda", "triton", "reference"))
# (N, C, D, H, W): H != W; H = 1 (no column keys but the pixel's own row); W = 1 (the row is
# the pixel itself); C = 1 and D = 1; C and D over a block; a map wider than a 64-key tile.
SHAPES = [(2, 16, 2, 5, 7), (1, 8, 3, 1, 6), (2, 8, 4, 7, 1), (3, 1, 1, 4, 4), (2, 70, 9, 9, 11),
          (1, 12, 5, 3, 70)]
TOL = {F64: {"rtol": 1e-10, "atol": 1e-10}, F32: {"rtol": 1e-4, "atol": 1e-4}}
NAMES = ["y", "grad_q", "grad_k", "grad_v", "grad_x", "grad_gamma"]


def shape_id(s) -> str:
    return "x".join(map(str, s))


def make_args(shape, layout, dtype, device, scale: float = 0.5) -> list[torch.Tensor]:
    """q, k (N, D, H, W), v, x (N, C, H, W) in `layout`, gamma 0.7."""
    n, c, d, h, w = shape
    q, k = (make_input((n, d, h, w), layout, dtype, device) * scale for _ in range(2))
    v, x = (make_input((n, c, h, w), layout, dtype, device) for _ in range(2))
    gamma = torch.tensor([0.7], dtype=dtype if dtype in (F64, F32) else F32, device=device)
    return [q, k, v, x, gamma]


# ----------------------------------------------------------------------------------------
# Runs: the backend through autograd, and the Reference's forward and explicit backward
# ----------------------------------------------------------------------------------------
def cc_run(args, g_y, backend_name):
    return grads_of(AF.criss_cross, args, g_y, backend_name)


def cc_want(args, g_y):
    q, k, v, x, gamma = args
    y, out, lse = Ref.criss_cross(*args)
    grad_q, grad_k, grad_v, grad_gamma = Ref.criss_cross_backward(g_y, q, k, v, gamma, out, lse)
    return [y, grad_q, grad_k, grad_v, g_y, grad_gamma]


def check_cc(args, backend_name, **kw) -> list[torch.Tensor]:
    """y and the gradients on the backend against the Reference (fp32: or as accurate, against
    fp64); returns the backend's results."""
    g_y = torch.randn_like(args[3])
    got = cc_run(args, g_y, backend_name)
    truths = lambda: cc_want([t.double() for t in args], g_y.double())  # noqa: E731
    dtype = args[3].dtype
    assert_all_close(got, cc_want(args, g_y), NAMES, truths, **(kw or TOL[F64 if dtype == F64 else F32]))
    return got


# ----------------------------------------------------------------------------------------
# The Reference against reference.CrissCross
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (1, 8, 1, 6), (2, 8, 6, 1)], ids=shape_id)
def test_reference_is_criss_cross_composition(shape) -> None:
    """Reference.criss_cross is reference.CrissCross's pass on its projections, and its explicit
    backward is autograd's gradient of that pass."""
    m = R.CrissCross(shape[1]).double()
    with torch.no_grad():
        m.gamma.fill_(0.7)
    x = leaf(torch.randn(shape, dtype=F64), True)
    q, k, v = (leaf(p(x).detach(), True) for p in (m.query, m.key, m.value))
    g = torch.randn_like(x)
    y_ref, out, lse = Ref.criss_cross(q.detach(), k.detach(), v.detach(), x.detach(), m.gamma.detach())
    torch.testing.assert_close(y_ref, m.criss_cross(x), **TOL[F64])
    y = Ref.criss_cross(q, k, v, x, m.gamma)[0]  # differentiable by autograd: the reference backend
    want = torch.autograd.grad(y, (q, k, v, x, m.gamma), g)
    got = Ref.criss_cross_backward(g, q.detach(), k.detach(), v.detach(), m.gamma.detach(), out, lse)
    assert_all_close([*got[:3], g, got[3]], list(want), NAMES[1:], **TOL[F64])


# ----------------------------------------------------------------------------------------
# Against the Reference: shapes, dtypes, layouts
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_op_matches_reference(backend_name, device, dtype, layout, shape) -> None:
    args = make_args(shape, layout, dtype, device)
    y, grad_q, grad_k, grad_v, _, grad_gamma = check_cc(args, backend_name)
    assert grad_gamma.shape == (1,)
    for t, like in ((y, args[3]), (grad_q, args[0]), (grad_k, args[1]), (grad_v, args[2])):
        assert t.dtype == dtype
        if t is y or backend_name != "reference":  # autograd picks the reference's gradients' layouts
            assert_layout_of(t, like)


@pytest.mark.parametrize("backend_name,device", CASES)
def test_mixed_layouts_and_channel_slices(backend_name, device) -> None:
    """q, k, v as channel slices of one projection output (as the fused module passes them), x
    channels_last, and a large-energy case whose softmax is one-hot (the max must be subtracted)."""
    n, c, d, h, w = 2, 12, 3, 6, 5
    qkv = torch.randn(n, 2 * d + c, h, w, dtype=F64, device=device)
    x = make_input((n, c, h, w), "channels_last", F64, device)
    gamma = torch.tensor([0.7], dtype=F64, device=device)
    check_cc([qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :], x, gamma], backend_name)
    check_cc([qkv[:, :d] * 30, qkv[:, d : 2 * d] * 30, qkv[:, 2 * d :], x, gamma], backend_name)


@pytest.mark.parametrize("backend_name,device", CASES)
def test_gamma_zero_and_other_shapes(backend_name, device) -> None:
    """gamma = 0 (CCNet's initialisation): y = x, grad_gamma = sum(grad_y * out) is live; gamma
    as a 0-d and a (1, 1, 1) tensor of another dtype."""
    args = make_args((2, 9, 2, 4, 5), "nchw", F64, device)
    args[4] = torch.zeros(1, dtype=F64, device=device)
    y, *_, grad_gamma = check_cc(args, backend_name)
    assert torch.equal(y, args[3]) and grad_gamma.abs().item() > 0
    for gamma in (torch.tensor(0.3, dtype=F64, device=device), torch.full((1, 1, 1), 0.3, device=device)):
        g_y = torch.randn_like(args[3])
        got = cc_run([*args[:4], gamma], g_y, backend_name)
        want = cc_want([*args[:4], gamma.double()], g_y)
        assert got[5].shape == gamma.shape and got[5].dtype == gamma.dtype
        torch.testing.assert_close(got[0], want[0], **TOL[F64])
        torch.testing.assert_close(got[5].double(), want[5].reshape(gamma.shape), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_half_precision_error_like_eager(device, dtype, layout) -> None:
    """fp16/bf16: the fused results' error against fp64 (on the same rounded inputs) is no worse
    than twice reference.CrissCross's eager same-precision path's (energies, softmax and out in
    fp32, out rounded to x's dtype, then gamma * out + x in x's dtype), plus two roundings."""
    args = make_args((2, 40, 5, 9, 11), layout, dtype, device)
    g_y = torch.randn_like(args[3])

    def eager(q, k, v, x, gamma):
        y = Ref.criss_cross(q.float(), k.float(), v.float(), x.float(), gamma)[1].to(x.dtype)
        return gamma.to(x.dtype) * y + x

    got = grads_of(AF.criss_cross, args, g_y, device)
    exact = grads_of(lambda *a: Ref.criss_cross(*a)[0], [t.double() for t in args], g_y.double(), "reference")
    low = grads_of(eager, args, g_y, "reference")
    assert_error_like_eager(got, low, exact, floor=rounding_floor(dtype), names=NAMES)


# ----------------------------------------------------------------------------------------
# NaN
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_reaches_its_row_and_column_only(backend_name, device, layout) -> None:
    """A NaN in k at (1, :, 2, 3) enters the energies of the pixels of row 2 and column 3 of
    sample 1 only: those y are NaN as the reference's; sample 0 stays finite."""
    args = make_args((2, 6, 2, 5, 4), layout, F64, device)
    args[1][1, 1, 2, 3] = float("nan")
    y, grad_q, *_ = check_cc(args, backend_name, **TOL[F64], equal_nan=True)
    assert torch.isnan(y[1, :, 2]).all() and torch.isnan(y[1, :, :, 3]).all()
    assert torch.isfinite(y[1, :, :2, :3]).all() and torch.isfinite(y[0]).all() and torch.isfinite(grad_q[0]).all()


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("which", ["q", "k", "v", "x"])
def test_nan_in_each_input_lands_where_the_references_does(backend_name, device, which) -> None:
    """A NaN in any input: the results hold NaN exactly where the Reference's do."""
    args = make_args((2, 8, 2, 5, 6), "nchw", F64, device)
    args["qkvx".index(which)][1, 0, 2, 3] = float("nan")
    got = check_cc(args, backend_name, **TOL[F64], equal_nan=True)
    g_y = torch.randn_like(args[3])
    for a, b in zip(cc_run(args, g_y, backend_name), cc_want(args, g_y)):
        assert torch.equal(a.isnan(), b.isnan())
    assert torch.isnan(got[0]).any()


@pytest.mark.parametrize("backend_name,device", CASES)
def test_infinite_energy_gives_torchs_lse(backend_name, device) -> None:
    """An energy of +inf (q = inf against k > 0): lse is +inf there, as torch.logsumexp's (not
    inf - inf = NaN), so the backward's P = exp(S - lse) is 0 at the pixel's finite energies and
    grad_v of a key only finite energies reach stays finite (H = 1, W = 2: hypothesis's case)."""
    t = lambda *v: torch.tensor(v, dtype=F64, device=device).reshape(1, 1, 1, len(v))  # noqa: E731
    args = [t(1.541, float("inf")), t(-float("inf"), 0.249), t(-float("inf"), float("inf")), t(-0.72, float("nan")),
            torch.tensor([0.41], dtype=F64, device=device)]
    lse = cc_lse(args, backend_name)
    assert lse[0, 1].item() == float("inf") and torch.isfinite(lse[0, 0])
    grad_v = check_cc(args, backend_name, **TOL[F64], equal_nan=True)[3]
    assert grad_v[0, 0, 0, 0].item() == 0 and torch.isnan(grad_v[0, 0, 0, 1])


def cc_lse(args, backend_name) -> torch.Tensor:
    """The op's lse on the backend."""
    with backend.use_backend(backend_name):
        return ops_module.criss_cross_ops(args[3].device).criss_cross(*args)[2]


# ----------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, determinism, saved tensors, empty inputs
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(backend_name, device, layout) -> None:
    args = [leaf(t, True) for t in make_args((2, 3, 2, 3, 4), layout, F64, device)]
    assert torch.autograd.gradcheck(on_backend(AF.criss_cross, backend_name), tuple(args), eps=1e-6, atol=1e-7)


def _op_samples():
    samples = {"criss_cross": [], "criss_cross_backward": []}
    for layout, dtype in (("nchw", F64), ("channels_last", F64), ("sliced", F64), ("channels_last", torch.float16)):
        q, k, v, x, gamma = make_args((2, 6, 2, 5, 3), layout, dtype, "cpu")
        grad = dtype == F64  # autograd's check wants fp64
        samples["criss_cross"].append(tuple(leaf(t, grad) for t in (q, k, v, x, gamma)))
        _, out, lse = Ref.criss_cross(q, k, v, x, gamma)
        samples["criss_cross_backward"].append(
            (torch.randn_like(x), *(leaf(t) for t in (q, k, v, gamma, out, lse))))
    return samples


@pytest.mark.parametrize("op_name", list(_op_samples()))
def test_opcheck(op_name, compiled_ops) -> None:
    op = getattr(compiled_ops, op_name).default
    for args in _op_samples()[op_name]:
        torch.library.opcheck(op, args)


def criss_cross_block(x, w, gamma):
    """The three 1x1 projections as one conv, then the public criss_cross, as a network uses it."""
    qkv = torch.nn.functional.conv2d(x, w)
    return AF.criss_cross(qkv[:, :3], qkv[:, 3:6], qkv[:, 6:], x, gamma)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_compile_fullgraph_on_cpu(layout, compiled_ops) -> None:
    torch._dynamo.reset()
    x = make_input((2, 24, 7, 5), layout, F32, "cpu")
    w, gamma, g = torch.randn(30, 24, 1, 1) * 0.1, torch.tensor([0.5]), torch.randn(2, 24, 7, 5)
    compiled = torch.compile(criss_cross_block, fullgraph=True)
    eager = grads_of(criss_cross_block, [x, w, gamma], g, "cpu")
    got = grads_of(compiled, [x, w, gamma], g, "cpu")
    assert_all_close(got, eager, ["y", "grad_x", "grad_w", "grad_gamma"], **TOL[F32])


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_deterministic(backend_name, device, layout) -> None:
    """Bitwise the same results twice."""
    args = make_args((3, 37, 5, 13, 11), layout, F32, device)
    g_y = torch.randn_like(args[3])
    first = cc_run(args, g_y, backend_name)
    assert all(torch.equal(a, b) for a, b in zip(first, cc_run(args, g_y, backend_name)))


def test_independent_of_thread_count(compiled_ops) -> None:
    """The CPU kernels' results are bitwise the same on 1, 2 and 3 threads (every sum runs in
    a fixed order, whatever the split)."""
    args = make_args((2, 16, 3, 9, 11), "nchw", F32, "cpu")
    g_y = torch.randn_like(args[3])
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(cc_run(args, g_y, "cpu"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))


@pytest.mark.parametrize("backend_name,device", CASES)
def test_empty_inputs(backend_name, device) -> None:
    """No pixels, no channels or no samples: every result is empty; grad_gamma is 0."""
    for n, c, h, w in ((2, 3, 0, 4), (2, 0, 3, 4), (0, 3, 2, 2), (2, 3, 4, 0)):
        args = make_args((n, c, 2, h, w), "nchw", F32, device)
        got = cc_run(args, torch.randn_like(args[3]), backend_name)
        assert [t.shape for t in got[:5]] == [args[i].shape for i in (3, 0, 1, 2, 3)]
        assert got[5].item() == 0


def test_saves_no_energies() -> None:
    """Backward keeps q, k, v, out and the (N, H*W) lse: nothing of the (N, H+W-1, H, W)
    energies; the only x-sized tensors are v and out."""
    args = [leaf(t, True) for t in make_args((2, 16, 2, 8, 8), "nchw", F32, "cpu")]
    saved = []
    with backend.use_backend("cpu"), torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t) or t, lambda t: t
    ):
        AF.criss_cross(*args)
    assert sorted(tuple(t.shape) for t in saved) == sorted(
        [(2, 2, 8, 8), (2, 2, 8, 8), (2, 16, 8, 8), (1,), (2, 16, 8, 8), (2, 64)])
    assert sum(t.numel() for t in saved) < 3 * args[3].numel()


# ----------------------------------------------------------------------------------------
# Bad input: the C++ kernels raise the Python checks' errors, word for word
# ----------------------------------------------------------------------------------------
def _t(*shape, dtype=F32, device="cpu"):
    return torch.rand(*shape, dtype=dtype, device=device)


def _valid(op: str) -> dict:
    """Valid float32 arguments of `op`, by schema name."""
    q, k, v, x, gamma = _t(2, 2, 4, 5), _t(2, 2, 4, 5), _t(2, 3, 4, 5), _t(2, 3, 4, 5), _t(1)
    return {
        "criss_cross": {"q": q, "k": k, "v": v, "x": x, "gamma": gamma},
        "criss_cross_backward": {"grad_y": _t(2, 3, 4, 5), "q": q, "k": k, "v": v, "gamma": gamma,
                                 "out": _t(2, 3, 4, 5), "lse": _t(2, 20)},
    }[op]


# (op, the arguments that differ from _valid's, the error, the message's start)
BAD_INPUTS = [
    ("criss_cross", {"x": _t(2, 3, 4)}, ValueError, "x must be 4-D (N, C, H, W), got 3-D"),
    ("criss_cross", {"x": _t(2, 3, 4, 5).int()}, TypeError, "x must be a floating-point tensor, got Int"),
    ("criss_cross", {"q": _t(2, 2, 5, 4)}, ValueError, "q must have shape (N, D_qk, H, W) = (2, D_qk, 4, 5), got [2, 2, 5, 4]"),
    ("criss_cross", {"k": _t(2, 3, 4, 5)}, ValueError, "k must have q's shape (N, D_qk, H, W) = [2, 2, 4, 5], got [2, 3, 4, 5]"),
    ("criss_cross", {"v": _t(2, 4, 4, 5)}, ValueError, "v must have x's shape (N, D_v, H, W) = [2, 3, 4, 5], got [2, 4, 4, 5]"),
    ("criss_cross", {"k": _t(2, 2, 4, 5, dtype=F64)}, TypeError, "k must have x's dtype Float, got Double"),
    ("criss_cross", {"v": _t(2, 3, 4, 5, device="meta")}, ValueError, "v must be on cpu, got meta"),
    ("criss_cross", {"gamma": _t(2)}, ValueError, "gamma must hold one value, got shape [2]"),
    ("criss_cross", {"gamma": torch.ones(1, dtype=torch.int64)}, TypeError, "gamma must be a floating-point tensor, got Long"),
    ("criss_cross_backward", {"lse": _t(2, 4, 5)}, ValueError, "lse must have shape (N, H*W) = (2, 20), got [2, 4, 5]"),
    ("criss_cross_backward", {"lse": _t(2, 20, dtype=F64)}, TypeError,
     "lse must be Float (the accumulation dtype of x, Float), got Double"),
    ("criss_cross_backward", {"grad_y": _t(2, 3, 4, 6)}, ValueError,
     "grad_y must match x's shape [2, 3, 4, 5] and dtype Float, got [2, 3, 4, 6] Float"),
    ("criss_cross_backward", {"q": _t(2, 2, 4, 5, device="meta")}, ValueError, "q must be on cpu, got meta"),
]


@pytest.mark.parametrize("op,changed,error,start",
                         [pytest.param(*case, id=f"{case[0]}-{i}") for i, case in enumerate(BAD_INPUTS)])
def test_bad_inputs(compiled_ops, op, changed, error, start) -> None:
    """The C++ CPU kernel (called below the dispatcher's meta routing), and the Python check the
    reference and Triton backends and the fakes run, raise the same error with the same words."""
    assert_cpp_error_like_python(compiled_ops, ops_module, op, _valid(op) | changed, error, start)
