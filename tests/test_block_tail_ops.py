"""block_tail's ops on the C++ CPU backend, and the public function `block_tail` composed of them.

The three ops (`torch.ops.attnkernels.block_tail_*`, csrc/cpu/block_tail.cpp) against
`attnkernels.ops.block_tail.Reference` (csrc/block_tail_ops.cpp's formulas): every dtype (fp16
and bf16 judged against fp64 relative to the same-precision Reference's error), every layout,
odd and empty shapes, NaN, the statistics of data with |mean| >> std, opcheck, bad input,
thread-count independence. Then `block_tail` on the cpu and reference backends against eager
`relu(bn(z) * gate(mean(bn(z))) + shortcut)` with a torch BatchNorm2d: forward, every gradient,
running statistics, and gradcheck.
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    LAYOUTS,
    assert_all_close,
    assert_cpp_error_like_python,
    assert_error_like_eager,
    assert_layout_of,
    leaf,
    make_input,
    on_backend,
    rounding_floor,
)

from attnkernels import backend
from attnkernels.ops import block_tail as ops_module
from attnkernels.ops.block_tail import block_tail

Ref = ops_module.Reference
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPES = [F64, F32, F16, BF16]
# C = 1, odd C, C past the vector width and not a multiple of it; H = 1, W = 1, H = W = 1; N = 1;
# channels_last: several pixel chunks (H*W = 1320 > 1024) and several statistics sub-blocks per
# chunk (C = 19 and C = 300); NCHW: a plane of several sub-blocks (130 * 131 > 16384 values).
SHAPES = [(2, 24, 7, 5), (3, 1, 4, 4), (2, 37, 5, 9), (3, 16, 1, 1), (2, 5, 1, 9), (2, 6, 7, 1), (1, 40, 3, 4),
          (2, 19, 33, 40), (1, 2, 130, 131), (2, 300, 9, 7)]
EMPTY_SHAPES = [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0)]
TOL = {F64: {"rtol": 1e-12, "atol": 1e-12}, F32: {"rtol": 2e-5, "atol": 2e-6}}
NAMES = {"block_tail_stats": ["mean", "m2"], "block_tail_apply": ["out"],
         "block_tail_backward_reduce": ["grad_u", "s1", "s2"]}


def shape_id(s) -> str:
    return "x".join(map(str, s))


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else F32


# ----------------------------------------------------------------------------------------
# Arguments of each op, and the check against the Reference
# ----------------------------------------------------------------------------------------
def coefficients(x: torch.Tensor, count: int = 3) -> list[torch.Tensor]:
    """`count` random (N, C) maps in acc(x), of either sign."""
    n, c = x.shape[:2]
    return [torch.randn(n, c, dtype=acc_of(x.dtype)) for _ in range(count)]


def relu_output(z: torch.Tensor) -> torch.Tensor:
    """An `out` for the backward: z's shape, dtype and strides, positive, zero (a fifth of the
    values, as relu leaves them) and negative values."""
    out = torch.randn_like(z)
    return out.masked_fill_(torch.rand(z.shape) < 0.2, 0)


def op_args(op: str, shape: tuple, layout: str, dtype: torch.dtype) -> list:
    """Random arguments of `op`: feature maps in `layout` and `dtype`, coefficients in acc."""
    z = make_input(shape, layout, dtype, "cpu")
    if op == "block_tail_stats":
        return [z]
    if op == "block_tail_apply":
        return [z, make_input(shape, layout, dtype, "cpu"), *coefficients(z), True]
    return [make_input(shape, layout, dtype, "cpu"), relu_output(make_input(shape, layout, dtype, "cpu")), z]


def in_f64(args: list) -> list:
    return [a.double() if isinstance(a, torch.Tensor) else a for a in args]


def as_list(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


def check_op(ops, op: str, args: list, **tol) -> list[torch.Tensor]:
    """op on the C++ CPU kernel against Reference's: shapes, dtypes, layouts; grad_u bitwise;
    fp64 to 1e-12, fp32 to 2e-5 or as accurate as the Reference against fp64; fp16 and bf16
    no worse against fp64 than twice the Reference's error in the same precision, plus two
    roundings. Returns the kernel's results."""
    got, want = getattr(ops, op)(*args), getattr(Ref, op)(*args)
    got, want = as_list(got), as_list(want)
    exact = lambda: as_list(getattr(Ref, op)(*in_f64(args)))  # noqa: E731
    feature = args[0] if op != "block_tail_backward_reduce" else args[2]
    for name, g, w in zip(NAMES[op], got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        if g.dim() == 4:
            assert_layout_of(g, feature)
    for i, (name, g, w) in enumerate(zip(NAMES[op], got, want)):
        if name == "grad_u":  # a selection: exactly the Reference's
            assert torch.equal(g, w) or (tol.get("equal_nan") and torch.equal(g.nan_to_num(7), w.nan_to_num(7)))
        elif g.dtype in (F16, BF16):
            assert_error_like_eager([g], [w], [exact()[i]], floor=rounding_floor(g.dtype), names=[name])
        else:
            assert_all_close([g], [w], [name], lambda i=i: [exact()[i]], **(tol or TOL[g.dtype]))
    return got


OPS = list(NAMES)


# ----------------------------------------------------------------------------------------
# Against the Reference: shapes, dtypes, layouts
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_ops_match_reference(compiled_ops, op, dtype, layout, shape) -> None:
    check_op(compiled_ops, op, op_args(op, shape, layout, dtype))


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
def test_apply_relu_flag_and_coefficients(compiled_ops, relu, dtype) -> None:
    """relu on and off; c = 1 (the forward's) and c = 0 (the eval backward's); both layouts."""
    for layout in ("nchw", "channels_last"):
        x, y = make_input((2, 13, 6, 5), layout, dtype, "cpu"), make_input((2, 13, 6, 5), layout, dtype, "cpu")
        a, b, _ = coefficients(x)
        for c in (torch.ones_like(a), torch.zeros_like(a), torch.randn_like(a)):
            out = check_op(compiled_ops, "block_tail_apply", [x, y, a, b, c, relu])[0]
            assert (out < 0).any() != relu


@pytest.mark.parametrize("op", ["block_tail_apply", "block_tail_backward_reduce"])
def test_feature_maps_in_different_layouts(compiled_ops, op) -> None:
    """The x-shaped arguments each in its own layout: read where they are, the result in the
    first's (apply: x's; backward_reduce: z's)."""
    shape = (2, 11, 6, 7)
    for layouts in (("channels_last", "nchw", "sliced"), ("nchw", "sliced", "channels_last"),
                    ("sliced", "channels_last", "nchw")):
        t = [make_input(shape, layout, F64, "cpu") for layout in layouts]
        if op == "block_tail_apply":
            args = [t[0], t[1], *coefficients(t[0]), True]
        else:
            args = [t[1], relu_output(t[2]), t[0]]
        check_op(compiled_ops, op, args)


# ----------------------------------------------------------------------------------------
# Empty tensors, NaN, statistics of data far from zero
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=shape_id)
def test_empty_inputs(compiled_ops, op, shape) -> None:
    """No samples, channels or pixels: empty results, and (N, C) maps as the Reference's:
    mean NaN (0 / 0, as torch.mean) and m2, s1, s2 zero where P = 0."""
    got = check_op(compiled_ops, op, op_args(op, shape, "nchw", F32), **TOL[F32], equal_nan=True)
    if op == "block_tail_stats" and shape[0] * shape[1] > 0:
        assert torch.isnan(got[0]).all() and torch.equal(got[1], torch.zeros_like(got[1]))


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_and_inf(compiled_ops, dtype, layout) -> None:
    """NaN poisons its own plane's statistics and output values only, through relu too (relu(NaN)
    = NaN, as torch.relu); an inf in z gives m2 NaN (inf - inf), as the Reference; the backward
    passes grad_out where out is NaN, drops a NaN grad_out where out <= 0, and a NaN z makes its
    plane's s2 NaN (0 * NaN)."""
    shape, tol = (2, 9, 5, 6), {**TOL[dtype], "equal_nan": True}
    z = make_input(shape, layout, dtype, "cpu")
    z[1, 2, 1, 1], z[0, 4, 2, 3] = float("nan"), float("inf")
    mean, m2 = check_op(compiled_ops, "block_tail_stats", [z], **tol)
    assert torch.isnan(mean[1, 2]) and torch.isnan(m2[1, 2]) and mean[0, 4] == float("inf") and torch.isnan(m2[0, 4])
    assert torch.isfinite(mean[0, :4]).all() and torch.isfinite(m2[:, 5:]).all()

    y = make_input(shape, layout, dtype, "cpu")
    y[0, 1, 0, 0] = float("nan")
    a, b, c = coefficients(z)
    a[1, 7] = float("nan")
    for relu in (True, False):
        out = check_op(compiled_ops, "block_tail_apply", [z, y, a, b, c, relu], **tol)[0]
        assert torch.isnan(out[1, 2, 1, 1]) and torch.isnan(out[0, 1, 0, 0]) and torch.isnan(out[1, 7]).all()
        assert torch.isfinite(out[0, 5:]).all()

    grad_out, out = make_input(shape, layout, dtype, "cpu"), relu_output(make_input(shape, layout, dtype, "cpu"))
    out[0, 0, 0, 0], out[0, 0, 0, 1], grad_out[0, 0, 0, 1] = float("nan"), -1.0, float("nan")
    out[0, 3, 1, 1], grad_out[0, 3, 1, 1] = 1.0, float("nan")
    grad_u, s1, s2 = check_op(compiled_ops, "block_tail_backward_reduce", [grad_out, out, z], **tol)
    assert grad_u[0, 0, 0, 0] == grad_out[0, 0, 0, 0] and grad_u[0, 0, 0, 1] == 0
    assert torch.isnan(grad_u[0, 3, 1, 1]) and torch.isnan(s1[0, 3]) and torch.isfinite(s1[0, :3]).all()
    assert torch.isnan(s2[1, 2]) and torch.isfinite(s2[1, 3:]).all()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 24, 7, 5), (2, 19, 33, 40), (1, 2, 130, 131), (2, 300, 9, 7)], ids=shape_id)
def test_stats_of_data_far_from_zero(compiled_ops, layout, shape) -> None:
    """z = 1000 + noise of std 0.01 in fp32: m2 summed from deviations keeps 4 digits, where
    sum z^2 - P mean^2 in fp32 loses them all (the check below shows it would)."""
    noise = make_input(shape, layout, F32, "cpu")
    z = 1000 + 0.01 * noise  # in noise's layout
    assert_layout_of(z, noise)
    mean, m2 = compiled_ops.block_tail_stats(z)
    zd = z.double()
    m2_exact = (zd - zd.mean((2, 3), keepdim=True)).square().sum((2, 3))
    torch.testing.assert_close(mean, zd.mean((2, 3)).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(m2.double(), m2_exact, rtol=1e-4, atol=0)
    pixels = shape[2] * shape[3]
    naive = z.square().sum((2, 3)) - pixels * z.mean((2, 3)).square()
    assert ((naive.double() - m2_exact).abs() > 0.1 * m2_exact).any()


# ----------------------------------------------------------------------------------------
# opcheck, determinism
# ----------------------------------------------------------------------------------------
def _op_samples(op: str) -> list:
    samples = []
    for layout, dtype in (("nchw", F64), ("channels_last", F64), ("sliced", F64), ("channels_last", F16),
                          ("nchw", BF16)):
        samples.append(op_args(op, (2, 6, 5, 3), layout, dtype))
    samples.append(op_args(op, (0, 6, 5, 3), "nchw", F32))  # not P = 0: opcheck compares NaN means unequal
    return samples


@pytest.mark.parametrize("op", OPS)
def test_opcheck(compiled_ops, op) -> None:
    for args in _op_samples(op):
        torch.library.opcheck(getattr(compiled_ops, op).default, args)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_thread_count_changes_nothing(compiled_ops, op, layout) -> None:
    """Bitwise the same results with one thread as with two: several chunks and sub-blocks."""
    args = op_args(op, (3, 37, 33, 40), layout, F32)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(as_list(getattr(compiled_ops, op)(*args)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


# ----------------------------------------------------------------------------------------
# Bad input: the C++ kernels raise the Python checks' errors, word for word
# ----------------------------------------------------------------------------------------
def _t(*shape, dtype=F32, device="cpu"):
    return torch.rand(*shape, dtype=dtype, device=device)


def _valid(op: str) -> dict:
    """Valid float32 arguments of `op`, by schema name."""
    x, a = _t(2, 3, 4, 4), _t(2, 3)
    return {
        "block_tail_stats": {"z": x},
        "block_tail_apply": {"x": x, "y": _t(2, 3, 4, 4), "a": a, "b": _t(2, 3), "c": _t(2, 3), "relu": True},
        "block_tail_backward_reduce": {"grad_out": _t(2, 3, 4, 4), "out": _t(2, 3, 4, 4), "z": x},
    }[op]


# (op, the arguments that differ from _valid's, the error, the message's start)
BAD_INPUTS = [
    ("block_tail_stats", {"z": _t(2, 3, 4)}, ValueError, "z must be 4-D (N, C, H, W), got 3-D"),
    ("block_tail_stats", {"z": _t(2, 3, 4, 4).int()}, TypeError, "z must be a floating-point tensor, got Int"),
    ("block_tail_stats", {"z": _t(2, 3, 4, 4).to(torch.float8_e4m3fn)}, TypeError,
     "z must be float64, float32, float16 or bfloat16, got Float8_e4m3fn"),
    ("block_tail_apply", {"x": _t(2, 3, 4, 4, 1)}, ValueError, "x must be 4-D (N, C, H, W), got 5-D"),
    ("block_tail_apply", {"x": _t(2, 3, 4, 4) > 0.5}, TypeError, "x must be a floating-point tensor, got Bool"),
    ("block_tail_apply", {"y": _t(2, 3, 4, 5)}, ValueError,
     "y must match x's shape [2, 3, 4, 4] and dtype Float, got [2, 3, 4, 5] Float"),
    ("block_tail_apply", {"y": _t(2, 3, 4, 4, dtype=F64)}, ValueError,
     "y must match x's shape [2, 3, 4, 4] and dtype Float, got [2, 3, 4, 4] Double"),
    ("block_tail_apply", {"y": _t(2, 3, 4, 4, device="meta")}, ValueError, "y must be on cpu, got meta"),
    ("block_tail_apply", {"a": _t(2, 4)}, ValueError, "a must have shape (N, C) = (2, 3), got [2, 4]"),
    ("block_tail_apply", {"b": _t(2, 3, 1, 1)}, ValueError, "b must have shape (N, C)"),
    ("block_tail_apply", {"c": _t(3)}, ValueError, "c must have shape (N, C) = (2, 3), got [3]"),
    ("block_tail_apply", {"a": _t(2, 3, dtype=F64)}, TypeError,
     "a must be Float (the accumulation dtype of x, Float), got Double"),
    ("block_tail_apply", {"x": _t(2, 3, 4, 4, dtype=F16), "y": _t(2, 3, 4, 4, dtype=F16), "b": _t(2, 3, dtype=F16)},
     TypeError, "b must be Float (the accumulation dtype of x, Half), got Half"),
    ("block_tail_apply", {"x": _t(2, 3, 4, 4, dtype=F64), "y": _t(2, 3, 4, 4, dtype=F64), "a": _t(2, 3, dtype=F64),
                          "b": _t(2, 3, dtype=F64)}, TypeError,
     "c must be Double (the accumulation dtype of x, Double), got Float"),
    ("block_tail_apply", {"c": _t(2, 3, device="meta")}, ValueError, "c must be on cpu, got meta"),
    ("block_tail_backward_reduce", {"z": _t(4, 4)}, ValueError, "z must be 4-D (N, C, H, W), got 2-D"),
    ("block_tail_backward_reduce", {"z": _t(2, 3, 4, 4).long()}, TypeError,
     "z must be a floating-point tensor, got Long"),
    ("block_tail_backward_reduce", {"grad_out": _t(2, 3, 4, 4, dtype=BF16)}, ValueError,
     "grad_out must match x's shape [2, 3, 4, 4] and dtype Float, got [2, 3, 4, 4] BFloat16"),
    ("block_tail_backward_reduce", {"out": _t(2, 3, 5, 4)}, ValueError,
     "out must match x's shape [2, 3, 4, 4] and dtype Float, got [2, 3, 5, 4] Float"),
    ("block_tail_backward_reduce", {"out": _t(2, 3, 4, 4, device="meta")}, ValueError, "out must be on cpu, got meta"),
]


@pytest.mark.parametrize("op,changed,error,start",
                         [pytest.param(*case, id=f"{case[0]}-{i}") for i, case in enumerate(BAD_INPUTS)])
def test_bad_inputs(compiled_ops, op, changed, error, start) -> None:
    """The C++ CPU kernel (called below the dispatcher's meta routing), and the Python check the
    reference and Triton backends and the fakes run, raise the same error with the same words."""
    assert_cpp_error_like_python(compiled_ops, ops_module, op, _valid(op) | changed, error, start)


# ----------------------------------------------------------------------------------------
# The public function against eager BatchNorm2d, gate and ReLU
# ----------------------------------------------------------------------------------------
class Tail(torch.nn.Module):
    """A residual block's tail with torch's BatchNorm2d and, optionally, an SE-like gate
    sigmoid(Linear(mean of bn(z) over H*W)): `eager` composes torch ops, `forward` calls
    block_tail with the same modules."""

    def __init__(self, channels: int, gated: bool, affine: bool = True) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(channels, affine=affine)
        self.fc = torch.nn.Linear(channels, channels) if gated else None
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-0.8, 0.8)
            if affine:
                self.bn.weight.add_(1.0)
            self.bn.running_mean.uniform_(-0.3, 0.3)
            self.bn.running_var.uniform_(0.5, 1.5)

    def gate(self, avg: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(avg))

    def eager(self, z: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        u = self.bn(z)
        if self.fc is not None:
            u = u * self.gate(u.mean((2, 3)))[:, :, None, None]
        return torch.relu(u + shortcut)

    def forward(self, z: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """The fused tail: block_tail with the same modules."""
        bn = self.bn
        return block_tail(z, shortcut, bn.running_mean, bn.running_var, bn.weight, bn.bias, self.training,
                          bn.momentum, bn.eps, None if self.fc is None else self.gate)


def tail_step(module: Tail, fused: bool, z: torch.Tensor, shortcut: torch.Tensor, g: torch.Tensor, backend_name):
    """[out, grad_z, grad_shortcut, *grads of the parameters, running mean and var after the step]
    (num_batches_tracked is BatchNorm2d's own count, which eager's module call increments)."""
    z, shortcut = z.detach().requires_grad_(), shortcut.detach().requires_grad_()
    params = list(module.parameters())
    with backend.use_backend(backend_name):
        out = (module if fused else module.eager)(z, shortcut)
    grads = torch.autograd.grad(out, [z, shortcut, *params], g)
    return [out.detach(), *grads, module.bn.running_mean.clone(), module.bn.running_var.clone()]


def tail_names(module: Tail) -> list[str]:
    return ["out", "grad_z", "grad_shortcut", *(f"grad_{n}" for n, _ in module.named_parameters()),
            "running_mean", "running_var"]


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("gated", [True, False], ids=["gate", "no_gate"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_block_tail_matches_eager(compiled_ops, backend_name, dtype, layout, gated, train) -> None:
    """Output, the gradients of z, the shortcut, BatchNorm's weight and bias and the gate's
    parameters, and the running statistics after the step (updated in training, untouched in
    eval), against the eager composition with a copy of the same modules (fp32: or as accurate
    as it, against the fp64 composition: grad_bias sums thousands of terms)."""
    for shape in ((2, 24, 7, 5), (2, 19, 33, 40)):
        module = Tail(shape[1], gated).to(dtype).train(train)
        z, shortcut = make_input(shape, layout, dtype, "cpu"), make_input(shape, layout, dtype, "cpu")
        g, eager, eager64 = torch.randn_like(z), copy.deepcopy(module), copy.deepcopy(module).double()
        got = tail_step(module, True, z, shortcut, g, backend_name)
        want = tail_step(eager, False, z, shortcut, g, "reference")
        truths = lambda: tail_step(eager64, False, *in_f64([z, shortcut, g]), "reference")  # noqa: E731
        tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == F64 else {"rtol": 2e-4, "atol": 2e-5}
        assert_all_close(got, want, tail_names(module), truths, **tol)
        assert_layout_of(got[0], z)
        assert_layout_of(got[1], z)


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("gated,affine,train", [(True, True, True), (True, True, False), (False, True, True),
                                                (False, False, True), (True, False, False)])
def test_block_tail_gradcheck(compiled_ops, backend_name, layout, gated, affine, train) -> None:
    """fp64 gradcheck in z, the shortcut, BatchNorm's weight and bias (where affine) and the
    gate's weight and bias."""
    module = Tail(6, gated, affine).double().train(train)
    z, shortcut = make_input((2, 6, 4, 3), layout, F64, "cpu"), make_input((2, 6, 4, 3), layout, F64, "cpu")
    names = [n for n, _ in module.named_parameters()]

    def tail(z, shortcut, *values):  # module.fused with gradcheck's parameter values
        return torch.func.functional_call(module, dict(zip(names, values, strict=True)), (z, shortcut))

    inputs = [leaf(z, True), leaf(shortcut, True), *(leaf(p, True) for p in module.parameters())]
    assert torch.autograd.gradcheck(on_backend(tail, backend_name), inputs, eps=1e-6, atol=1e-7)
