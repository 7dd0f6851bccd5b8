"""Triton backend of the shuffle_conv hot path against the torch references of the same math.

The ops are called directly (`torch.ops.attnkernels_triton.shuffle_conv[_backward]`,
`shuffle_conv_epilogue[_backward]`): the forward ops against the reference backend's
`attnkernels.ops.shuffle_conv.Reference.shuffle_conv` / `.shuffle_conv_epilogue`, the
backward ops against torch autograd through them (the raw conv w.r.t. s, weight, bias,
in_scale, in_shift; the epilogue w.r.t. z, gate_x, out_scale, out_shift, or with mean/rstd
BatchNorm's training backward through z's own batch statistics). The contract is
csrc/shuffle_conv_ops.cpp ("shuffle_conv hot path"). Without CUDA the kernels run on CPU
tensors under the Triton interpreter: shapes stay tiny.
"""
import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

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
    small_reductions,
    within_half_budget,
)
from triton_cases import close as _close
from triton_cases import randn as _t

from attnkernels.ops.shuffle_conv import Reference
from attnkernels.triton import _common
from attnkernels.triton import shuffle_conv as T

TOL = {F64: dict(rtol=1e-10, atol=1e-10), F32: dict(rtol=3e-5, atol=3e-5)}
EPS = 1e-5  # the BatchNorm eps of the mean/rstd tests
CONV_NAMES = ("grad_s", "grad_weight", "grad_bias", "grad_in_scale", "grad_in_shift")
EPI_NAMES = ("grad_z", "grad_gate_x", "grad_out_scale", "grad_out_shift")


@dataclass(frozen=True)
class Case:
    """One conv: s (n, c_in, h, w), weight (c_out, c_in / groups, k, k)."""

    n: int
    c_in: int
    c_out: int
    h: int
    w: int
    k: int
    groups: int = 1
    shuffle_groups: int = 1
    prologue: bool = False
    gated: bool = False
    bias: bool = True

    def __str__(self) -> str:
        flags = "".join(f for f, on in (("P", self.prologue), ("G", self.gated), ("b", self.bias)) if on)
        return (
            f"{self.n}x{self.c_in}to{self.c_out}x{self.h}x{self.w}-k{self.k}"
            f"-g{self.groups}-sg{self.shuffle_groups}-{flags}"
        )


# Odd H != W; k = 7 on 4 x 6 and 3 x 2 images (the kernel overhangs the image); H*W = 1 with
# k = 1; N = 1; C not a power of two; groups 1, 2, 4; shuffle_groups 1, 2, 3, 4; GAM's conv1
# (C -> C/4, groups 4, no shuffle, raw) and conv2 (prologue, shuffle = groups, gated) in
# miniature; H*W = 42 (two fp64 pixel blocks).
CASES = [
    Case(2, 6, 4, 5, 3, 3, groups=2, shuffle_groups=3, prologue=True),
    Case(1, 8, 12, 4, 6, 7, groups=4, shuffle_groups=2, prologue=True, gated=True),
    Case(2, 5, 3, 1, 1, 1),
    Case(1, 4, 8, 3, 2, 7, shuffle_groups=4, gated=True, bias=False),
    Case(1, 16, 4, 5, 5, 7, groups=4),
    Case(1, 4, 16, 5, 5, 7, groups=4, shuffle_groups=4, prologue=True, gated=True),
    Case(2, 3, 5, 7, 6, 3, shuffle_groups=3, prologue=True),
]
LAYOUTS = ["nchw", "channels_last", "sliced", "channel_slice"]


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------
def param(count, dtype, scale=0.5, offset=0.0, shape=None):
    t = (torch.randn(count, dtype=F64) * scale + offset).to(dtype=dtype, device=DEVICE)
    return t if shape is None else t.reshape(shape)


def conv_inputs(case: Case, dtype, layout, pdtype=None):
    """(s, weight, bias, groups, shuffle_groups, in_scale, in_shift, gate_x, out_scale,
    out_shift) and grad_z. in_shift around 0 leaves some of the ReLU's inputs negative."""
    pdtype = pdtype or dtype
    c = case
    s = make_t((c.n, c.c_in, c.h, c.w), dtype, layout)
    fan_in = c.c_in // c.groups * c.k * c.k
    weight = param(c.c_out * fan_in, pdtype, fan_in**-0.5, shape=(c.c_out, c.c_in // c.groups, c.k, c.k))
    bias = param(c.c_out, pdtype) if c.bias else None
    in_scale = param(c.c_in, pdtype, 0.5, 1.0) if c.prologue else None
    in_shift = param(c.c_in, pdtype, 0.5) if c.prologue else None
    out_shape = (c.n, c.c_out, c.h, c.w)
    other = "channels_last" if layout != "channels_last" else "nchw"
    gate_x = make_t(out_shape, dtype, other) if c.gated else None
    out_scale = param(c.c_out, pdtype, 0.7, 0.5) if c.gated else None
    out_shift = param(c.c_out, pdtype) if c.gated else None
    grad_z = make_t(out_shape, dtype, layout)
    args = (s, weight, bias, c.groups, c.shuffle_groups, in_scale, in_shift, gate_x, out_scale, out_shift)
    return args, grad_z


def close(actual, expected, dtype, equal_nan=False, name="", truth=None):
    _close(actual, expected, TOL[dtype], equal_nan, name, check_dtype=False, truth=truth)


# ----------------------------------------------------------------------------------------
# shuffle_conv and its backward against the reference and autograd
# ----------------------------------------------------------------------------------------
def conv_reference_grads(args, grad_z, on_cpu=False):
    """Autograd of the raw reference w.r.t. s, weight, bias, in_scale, in_shift (None where
    absent); `on_cpu`: computed on CPU copies, returned on grad_z's device."""
    if on_cpu:
        device = grad_z.device
        grads = conv_reference_grads(cpu_args(args), grad_z.cpu())
        return [None if g is None else g.to(device) for g in grads]
    s, weight, bias, groups, sg, in_scale, in_shift = args[:7]
    tensors = [s, weight, bias, in_scale, in_shift]
    leaves = [None if t is None else t.detach().requires_grad_() for t in tensors]
    z = Reference.shuffle_conv(leaves[0], leaves[1], leaves[2], groups, sg, leaves[3], leaves[4])
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(z, present, grad_z))
    return [None if t is None else next(grads) for t in leaves]


def cpu_args(args):
    return tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)


def run_conv(args, grad_z):
    s, weight, _, groups, sg, in_scale, in_shift = args[:7]
    return ops.shuffle_conv(*args), ops.shuffle_conv_backward(grad_z, s, weight, groups, sg, in_scale, in_shift)


def check_conv(args, grad_z, equal_nan=False, reference_on_cpu=False):
    """Both ops against the reference (computed on CPU with `reference_on_cpu`): values,
    dtypes, shapes, layouts."""
    s, weight, bias, _, _, in_scale, in_shift, gate_x = args[:8]
    dtype, acc = s.dtype, acc_of(s.dtype)
    out, grads = run_conv(args, grad_z)
    want = Reference.shuffle_conv(*cpu_args(args)).to(s.device) if reference_on_cpu else Reference.shuffle_conv(*args)
    if gate_x is None:
        assert out.dtype == acc and out.is_contiguous(memory_format=expected_format(s))
    else:
        assert out.dtype == gate_x.dtype and out.is_contiguous(memory_format=expected_format(gate_x))

    @functools.cache
    def truths():  # float64 [out, *grads]: which of two float32 reductions is the more accurate
        args64 = tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)
        return [Reference.shuffle_conv(*args64), *conv_reference_grads(args64, grad_z.double())]

    def truth(i):
        return (lambda: truths()[i]) if dtype == F32 else None

    close(out, want, dtype, equal_nan, "out", truth(0))

    wants = conv_reference_grads(args, grad_z, reference_on_cpu)
    grad_s, grad_weight, grad_bias, grad_in_scale, grad_in_shift = grads
    assert grad_s.dtype == dtype and grad_s.is_contiguous(memory_format=expected_format(s))
    assert grad_weight.shape == weight.shape and grad_weight.dtype == weight.dtype
    assert grad_bias.shape == (weight.shape[0],) and grad_bias.dtype == weight.dtype
    if in_scale is None:
        for g in (grad_in_scale, grad_in_shift):
            assert g.shape == (0,) and g.dtype == acc
    else:
        assert grad_in_scale.shape == in_scale.shape and grad_in_scale.dtype == in_scale.dtype
        assert grad_in_shift.shape == in_shift.shape and grad_in_shift.dtype == in_shift.dtype
    for i, (name, g, w) in enumerate(zip(CONV_NAMES, grads, wants)):
        exact = truth(i + 1)
        if name == "grad_bias" and bias is None:  # the reference has no bias leaf: sum of grad_z
            w = grad_z.to(acc).sum(dim=(0, 2, 3))
            exact = (lambda: grad_z.double().sum(dim=(0, 2, 3))) if dtype == F32 else None
        if w is not None:
            close(g, w, dtype, equal_nan, name, exact)
    return out, grads


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv_matches_reference_f64(case):
    layout = LAYOUTS[CASES.index(case) % len(LAYOUTS)]
    check_conv(*conv_inputs(case, F64, layout))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_layouts_f64(layout):
    check_conv(*conv_inputs(Case(2, 6, 6, 3, 4, 3, groups=2, shuffle_groups=2, prologue=True, gated=True), F64, layout))


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv_matches_reference_f32(case, layout):
    check_conv(*conv_inputs(case, F32, layout))


def small_blocks(monkeypatch):
    """16 x 16 x 16 conv tiles, three splits of the weight-gradient reduction, 4-column sums."""
    monkeypatch.setattr(T, "_CONV_BLOCKS", {dt: (16, 16, 16) for dt in (F64, F32, F16, BF16)})
    small_reductions(monkeypatch)


SMALL_BLOCKS_CASE = Case(2, 20, 18, 5, 7, 3, shuffle_groups=4, prologue=True)


def test_small_blocks(monkeypatch):
    """Cg = 20 (2 input chunks), Og = 18 (2 output blocks), H*W = 35 (3 pixel blocks): every
    loop several times with partial ends; 6 (n, pixel block) tiles in 3 splits. (fp32 runs
    these tiles in test_conv_deterministic.)"""
    small_blocks(monkeypatch)
    assert T._conv_blocks(F64, 35, 20, 18) == (16, 16, 16)
    check_conv(*conv_inputs(SMALL_BLOCKS_CASE, F64, "channels_last"))


def one_fastest(configs: dict[str, list[str]], index: dict[str, int]) -> set[str]:
    """The names to run fastest on the fake clock: configs[site][index[site]] of each site, and
    no other candidate of any site (sites' candidates share names)."""
    fastest = {configs[site][i] for site, i in index.items()}
    assert all(sum(name in fastest for name in names) == 1 for names in configs.values())
    return fastest


@pytest.mark.parametrize("fastest", [1, 2], ids=["half_pixels", "half_outputs"])
def test_measured_conv_configurations_match_the_reference(monkeypatch, fastest):
    """Where launches are measured (GPUs; a fake clock here), the forward conv times each
    candidate (the rule's blocks, half the pixel block, half the output-channel block) once per
    shape and conv and runs the fastest: every output and gradient stays the reference's, a
    known shape times nothing, and explain() names the choice."""
    from attnkernels import choose

    case = Case(2, 20, 40, 9, 8, 3, prologue=True, gated=True)
    configs = list(T._conv_candidates("shuffle_conv", T._conv_blocks(F64, 72, 20, 40)))
    assert configs == ["p32ci16o32/4w", "p16ci16o32/4w", "p32ci16o16/4w"]
    args, grad_z = conv_inputs(case, F64, "nchw")
    with measured_launches(monkeypatch, {configs[fastest]}) as timed:
        check_conv(args, grad_z)
        assert set(configs) <= set(timed)  # and the backward's candidates
        assert "triton.shuffle_conv [float64 2 20 9 8 nchw 40 3 1 1 " in choose.explain()
        assert measured_choice("shuffle_conv") == (configs[fastest], configs)
        timed.clear()
        check_conv(args, grad_z)
        assert timed == []  # a known key is a lookup


GRAD_SITES = ("shuffle_conv_backward.grad_s", "shuffle_conv_backward.grad_weight")


@pytest.mark.parametrize("fastest", [1, 2], ids=["half_pixels_outputs", "half_inputs"])
def test_measured_conv_backward_configurations_match_the_reference(monkeypatch, fastest):
    """The backward's launches measured as the forward's: grad_s over the rule's blocks, half
    the pixel block and half the input block; grad_weight over the rule's, half the input block
    and half the output block. With the prologue on, grad_s's per-pixel-block partials (part_in)
    and grad_weight's per-split partials (part_w) follow the winner's blocks; every gradient
    stays the reference's, each site times each candidate, a known shape times nothing."""
    monkeypatch.setattr(T, "_CONV_BLOCKS", {**T._CONV_BLOCKS, F64: (32, 32, 32)})  # fp64's 16-channel chunk has no half
    case = Case(2, 32, 32, 9, 8, 3, shuffle_groups=2, prologue=True)  # 72 pixels, 32 channels per group
    blocks = T._conv_blocks(F64, 72, 32, 32)
    configs = {site: list(T._conv_candidates(site, blocks)) for site in GRAD_SITES}
    assert configs == {
        GRAD_SITES[0]: ["p32ci32o32/4w", "p16ci32o32/4w", "p32ci16o32/4w"],
        GRAD_SITES[1]: ["p32ci32o32/4w", "p32ci16o32/4w", "p32ci32o16/4w"],
    }
    # half_pixels_outputs: grad_s's half pixel block, grad_weight's half output block;
    # half_inputs: both sites' half input block (one name)
    index = {GRAD_SITES[0]: fastest, GRAD_SITES[1]: 3 - fastest}
    args, grad_z = conv_inputs(case, F64, "channels_last")
    with measured_launches(monkeypatch, one_fastest(configs, index)) as timed:
        check_conv(args, grad_z)
        for site in GRAD_SITES:
            assert measured_choice(site) == (configs[site][index[site]], configs[site]), site
        timed.clear()
        check_conv(args, grad_z)
        assert timed == []  # a known key is a lookup


def test_params_in_another_dtype():
    """fp64 weight, bias, in_scale and an fp16 in_shift on fp32 s (used in fp32): each gradient
    in its parameter's dtype, the same values as with fp32 parameters."""
    case = Case(2, 4, 6, 3, 5, 3, groups=2, shuffle_groups=2, prologue=True)
    args, grad_z = conv_inputs(case, F32, "nchw", pdtype=F64)
    args = args[:6] + (args[6].half(),) + args[7:]
    out, grads = check_conv(args, grad_z)
    args32 = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)
    out32, grads32 = run_conv(args32, grad_z)
    assert torch.equal(out, out32)
    assert [g.dtype for g in grads] == [F32, F64, F64, F64, F16]
    for g, g32 in zip(grads[:4], grads32):
        torch.testing.assert_close(g.float(), g32)
    torch.testing.assert_close(grads[4], grads32[4].half())


def test_gated_in_another_dtype():
    """fp32 s with an fp16 gate_x: the gated output in fp16 and gate_x's layout, z in fp32."""
    case = Case(1, 4, 6, 3, 5, 3, prologue=True, gated=True)
    args, _ = conv_inputs(case, F32, "nchw")
    gate_x = make_t((1, 6, 3, 5), F16, "channels_last")
    args = args[:7] + (gate_x,) + args[8:]
    out = ops.shuffle_conv(*args)
    assert out.dtype == F16 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, Reference.shuffle_conv(*args), rtol=1e-3, atol=1e-3)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: NaN
def test_conv_nan_propagates():
    """A NaN in s reaches the k x k neighbourhood of its pixel in its group's output channels
    (through the shuffle and the prologue); a NaN in grad_z reaches grad_s, grad_weight,
    grad_bias and the prologue's gradients exactly where torch's do."""
    case = Case(1, 4, 4, 5, 6, 3, groups=2, shuffle_groups=2, prologue=True)
    args, grad_z = conv_inputs(case, F64, "nchw")
    s = args[0]
    s[0, 1, 2, 3] = float("nan")  # s's channel 1 = shuffled channel 2, group 1: outputs 2, 3
    out, _ = check_conv(args, grad_z, equal_nan=True)
    expected = torch.zeros(out.shape, dtype=torch.bool)
    expected[0, 2:4, 1:4, 2:5] = True
    assert torch.equal(torch.isnan(out).cpu(), expected)
    args, grad_z = conv_inputs(case, F64, "channels_last")
    grad_z[0, 1, 4, 0] = float("nan")
    # The reference on CPU: on a GPU, cuDNN's weight gradient multiplies the zero padding by
    # the NaN, where the conv's sum has no padded term (torch's CPU conv leaves it out too).
    check_conv(args, grad_z, equal_nan=True, reference_on_cpu=True)


def test_conv_deterministic(monkeypatch):
    """Same inputs, bitwise the same outputs and gradients (split partials summed in order)."""
    small_blocks(monkeypatch)
    case = Case(2, 20, 18, 5, 7, 1, shuffle_groups=4, prologue=True)  # k = 1: a quick one
    args, grad_z = conv_inputs(case, F32, "channel_slice")
    (out1, grads1), (out2, grads2) = run_conv(args, grad_z), run_conv(args, grad_z)
    assert torch.equal(out1, out2)
    for a, b in zip(grads1, grads2):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------
# The epilogue ops
# ----------------------------------------------------------------------------------------
def epilogue_inputs(shape, dtype, layouts=("nchw", "channels_last", "sliced"), gdtype=None):
    """z, gate_x, out_scale, out_shift, grad_y, and z's batch statistics (mean, rstd) with the
    out_scale = w * rstd, out_shift = b - mean * out_scale they fold to (w, b random)."""
    n, c, h, w = shape
    z = make_t(shape, dtype, layouts[0], 2.0)
    gate_x = make_t(shape, gdtype or dtype, layouts[1])
    grad_y = make_t(shape, gdtype or dtype, layouts[2])
    out_scale, out_shift = param(c, dtype, 0.7, 0.5), param(c, dtype)
    return z, gate_x, out_scale, out_shift, grad_y, fold_bn(z, param(c, dtype, 0.5, 1.0), param(c, dtype))


def fold_bn(z, bn_w, bn_b):
    """BatchNorm(w, b) in training on z, folded: z's mean and rstd (acc(z)), and out_scale,
    out_shift (w's dtype)."""
    var, mean = torch.var_mean(z.to(acc_of(z.dtype)), dim=(0, 2, 3), correction=0)
    rstd = torch.rsqrt(var + EPS)
    out_scale = (bn_w * rstd).to(bn_w.dtype)
    out_shift = (bn_b - mean * out_scale).to(bn_w.dtype)
    return dict(w=bn_w, b=bn_b, mean=mean, rstd=rstd, out_scale=out_scale, out_shift=out_shift)


def epilogue_reference_grads(z, gate_x, out_scale, out_shift, grad_y):
    leaves = [t.detach().requires_grad_() for t in (z, gate_x, out_scale, out_shift)]
    return torch.autograd.grad(Reference.shuffle_conv_epilogue(*leaves), leaves, grad_y)


def bn_reference_grads(z, gate_x, bn, grad_y):
    """(grad_z, grad_gate_x) by autograd through BatchNorm in training: z's own batch
    statistics, w and b constants."""
    acc = acc_of(z.dtype)
    zl, gl = z.detach().requires_grad_(), gate_x.detach().requires_grad_()
    var, mean = torch.var_mean(zl.to(acc), dim=(0, 2, 3), correction=0)
    xhat = (zl.to(acc) - mean[:, None, None]) * torch.rsqrt(var + EPS)[:, None, None]
    pre = xhat * bn["w"].to(acc)[:, None, None] + bn["b"].to(acc)[:, None, None]
    y = gl.to(acc) * torch.sigmoid(pre)
    return torch.autograd.grad(y, (zl, gl), grad_y.to(acc))


def check_epilogue(z, gate_x, out_scale, out_shift, grad_y, bn=None, equal_nan=False):
    dtype = z.dtype
    y = ops.shuffle_conv_epilogue(z, gate_x, out_scale, out_shift)
    assert y.dtype == gate_x.dtype and y.is_contiguous(memory_format=expected_format(gate_x))
    close(y, Reference.shuffle_conv_epilogue(z, gate_x, out_scale, out_shift), dtype, equal_nan, "y")
    stats = (bn["mean"], bn["rstd"]) if bn is not None else (None, None)
    grads = ops.shuffle_conv_epilogue_backward(grad_y, z, gate_x, out_scale, out_shift, *stats)
    wants = list(epilogue_reference_grads(z, gate_x, out_scale, out_shift, grad_y))
    if bn is not None:
        wants[:2] = bn_reference_grads(z, gate_x, bn, grad_y)
    for name, g, w, ref in zip(EPI_NAMES, grads, wants, (z, gate_x, out_scale, out_shift)):
        assert g.shape == ref.shape and g.dtype == ref.dtype, name
        close(g, w, dtype, equal_nan, name)
    for g, ref in zip(grads[:2], (z, gate_x)):
        assert g.is_contiguous(memory_format=expected_format(ref))
    return y, grads


EPI_SHAPES = [(2, 5, 3, 7), (1, 3, 1, 1), (3, 20, 9, 8)]


@pytest.mark.parametrize("shape", EPI_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
@pytest.mark.parametrize("stats", ["plain", "batch_stats"])
def test_epilogue_matches_reference(stats, dtype, shape):
    z, gate_x, out_scale, out_shift, grad_y, bn = epilogue_inputs(shape, dtype)
    if stats == "plain":
        check_epilogue(z, gate_x, out_scale, out_shift, grad_y)
    else:
        check_epilogue(z, gate_x, bn["out_scale"], bn["out_shift"], grad_y, bn)


@pytest.mark.parametrize("layouts", [("channels_last",) * 3, ("sliced", "channel_slice", "nchw")], ids=str)
def test_epilogue_layouts(layouts, monkeypatch):
    """Channels-last tiles and non-flat pixels; tiny tiles: many channel and pixel blocks."""
    for tile in (2048, 8):
        monkeypatch.setattr(T, "_EPI_TILE", tile)
        monkeypatch.setattr(T, "_EPI_MAX_BLOCK_P", 4 if tile == 8 else 256)
        z, gate_x, _, _, grad_y, bn = epilogue_inputs((2, 6, 5, 3), F64, layouts)
        check_epilogue(z, gate_x, bn["out_scale"], bn["out_shift"], grad_y, bn)


def test_epilogue_gate_in_another_dtype():
    """fp32 z with fp16 gate_x and grad_y: y and grad_gate_x in fp16, grad_z fp32."""
    z, gate_x, out_scale, out_shift, grad_y, bn = epilogue_inputs((2, 4, 3, 3), F32, gdtype=F16)
    y = ops.shuffle_conv_epilogue(z, gate_x, out_scale, out_shift)
    grads = ops.shuffle_conv_epilogue_backward(grad_y, z, gate_x, out_scale, out_shift, bn["mean"], bn["rstd"])
    assert y.dtype == F16 and grads[0].dtype == F32 and grads[1].dtype == F16
    torch.testing.assert_close(y, Reference.shuffle_conv_epilogue(z, gate_x, out_scale, out_shift))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: NaN
def test_epilogue_nan_propagates():
    """A NaN in z: y NaN there only; the plain backward NaN there (and in the parameter sums);
    with batch statistics the channel's sums carry it to the channel's grad_z."""
    z, gate_x, out_scale, out_shift, grad_y, bn = epilogue_inputs((2, 3, 2, 3), F64)
    z[1, 2, 0, 1] = float("nan")
    y, _ = check_epilogue(z, gate_x, out_scale, out_shift, grad_y, equal_nan=True)
    assert torch.isnan(y).sum() == 1
    bn = fold_bn(z, bn["w"], bn["b"])  # channel 2's statistics are NaN
    _, grads = check_epilogue(z, gate_x, bn["out_scale"], bn["out_shift"], grad_y, bn, equal_nan=True)
    assert torch.isnan(grads[0][:, 2]).all() and not torch.isnan(grads[0][:, :2]).any()


def test_epilogue_deterministic(monkeypatch):
    monkeypatch.setattr(T, "_EPI_TILE", 8)
    monkeypatch.setattr(T, "_EPI_MAX_BLOCK_P", 4)
    z, gate_x, _, _, grad_y, bn = epilogue_inputs((3, 6, 5, 3), F32)
    args = (grad_y, z, gate_x, bn["out_scale"], bn["out_shift"], bn["mean"], bn["rstd"])
    for a, b in zip(ops.shuffle_conv_epilogue_backward(*args), ops.shuffle_conv_epilogue_backward(*args)):
        assert torch.equal(a, b)


EPI_SITES = ("shuffle_conv_epilogue", "shuffle_conv_epilogue_backward.grad", "shuffle_conv_epilogue_backward.bn_grad_z")


@pytest.mark.parametrize("fastest", [1, 2], ids=["half_tile", "twice_tile"])
@pytest.mark.parametrize("stats", ["plain", "batch_stats"])
def test_measured_epilogue_configurations_match_the_reference(monkeypatch, stats, fastest):
    """The epilogue's launches measured as the conv's, each over tiles of the rule's, half and
    twice its elements (y's tiles by gate_x, the backward's by z; the partial sums per pixel
    block follow the winner's): every result stays the reference's, each site times each
    candidate, a known shape times nothing. With batch statistics BatchNorm's grad_z kernel
    runs (and is measured) too."""
    z, gate_x, out_scale, out_shift, grad_y, bn = epilogue_inputs((3, 20, 9, 8), F64)  # z NCHW, gate_x channels_last
    sites = EPI_SITES if stats == "batch_stats" else EPI_SITES[:2]
    configs = {
        site: list(_common._tile_candidates(lambda e, t=t: T._epi_blocks(t, e), T._EPI_TILE, T._epi_warps))
        for site, t in zip(sites, (gate_x, z, z))
    }
    assert configs[EPI_SITES[0]] == ["32x64/4w", "32x32/4w", "32x128/8w"]
    assert configs[EPI_SITES[1]] == ["16x128/4w", "8x128/4w", "32x128/8w"]
    args = (z, gate_x, out_scale, out_shift, grad_y) if stats == "plain" else (
        z, gate_x, bn["out_scale"], bn["out_shift"], grad_y, bn)
    with measured_launches(monkeypatch, one_fastest(configs, dict.fromkeys(sites, fastest))) as timed:
        check_epilogue(*args)
        for site in sites:
            assert measured_choice(site) == (configs[site][fastest], configs[site]), site
        timed.clear()
        check_epilogue(*args)
        assert timed == []  # a known key is a lookup


# ----------------------------------------------------------------------------------------
# Registration, input checks
# ----------------------------------------------------------------------------------------
def test_schemas_match_the_cpp_contract():
    check_schemas(T.__all__, 4)


def _opcheck_cases():
    case = Case(1, 4, 4, 3, 2, 3, groups=2, shuffle_groups=2, prologue=True, gated=True)
    args, grad_z = conv_inputs(case, F32, "nchw")
    s, weight, _, groups, sg, in_scale, in_shift, gate_x, out_scale, out_shift = args
    z = ops.shuffle_conv(*args[:7], None, None, None)
    mean, rstd = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    return [
        (ops.shuffle_conv, args),
        (ops.shuffle_conv_backward, (grad_z, s, weight, groups, sg, in_scale, in_shift)),
        (ops.shuffle_conv_epilogue, (z, gate_x, out_scale, out_shift)),
        (ops.shuffle_conv_epilogue_backward, (grad_z, z, gate_x, out_scale, out_shift, mean, rstd)),
    ]


def test_opcheck_schema():
    for op, args in _opcheck_cases():
        torch.library.opcheck(op.default, args, test_utils=("test_schema",))


@pytest.mark.skipif(INTERPRET, reason="fake tensors have no data for the Triton interpreter")
def test_opcheck_fake_gpu():
    for op, args in _opcheck_cases():
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))


def _conv(**kw):
    args = dict(s=_t(2, 6, 3, 4), weight=_t(4, 3, 3, 3), bias=_t(4), groups=2, shuffle_groups=3,
                in_scale=_t(6), in_shift=_t(6), gate_x=_t(2, 4, 3, 4), out_scale=_t(4), out_shift=_t(4))
    args.update(kw)
    return ops.shuffle_conv(*args.values())


def _conv_bwd(**kw):
    args = dict(grad_z=_t(2, 4, 3, 4), s=_t(2, 6, 3, 4), weight=_t(4, 3, 3, 3), groups=2, shuffle_groups=3,
                in_scale=_t(6), in_shift=_t(6))
    args.update(kw)
    return ops.shuffle_conv_backward(*args.values())


def _epi(**kw):
    args = dict(z=_t(2, 4, 3, 4), gate_x=_t(2, 4, 3, 4), out_scale=_t(4), out_shift=_t(4))
    args.update(kw)
    return ops.shuffle_conv_epilogue(*args.values())


def _epi_bwd(**kw):
    args = dict(grad_y=_t(2, 4, 3, 4), z=_t(2, 4, 3, 4), gate_x=_t(2, 4, 3, 4), out_scale=_t(4), out_shift=_t(4),
                mean=_t(4), rstd=_t(4))
    args.update(kw)
    return ops.shuffle_conv_epilogue_backward(*args.values())


OP, BW, EP, EB = "shuffle_conv", "shuffle_conv_backward", "shuffle_conv_epilogue", "shuffle_conv_epilogue_backward"
BAD_INPUTS = [
    (lambda: _conv(s=_t(2, 6, 3)), ValueError, rf"{OP}: s must be 4-D \(N, C, H, W\), got 3-D"),
    (lambda: _conv(s=torch.ones(2, 6, 3, 4, dtype=torch.int32, device=DEVICE)), TypeError,
     rf"{OP}: s must be a floating-point tensor"),
    (lambda: _conv(groups=4), ValueError, rf"{OP}: groups must be a positive divisor of s's 6 channels, got 4"),
    (lambda: _conv(groups=0), ValueError, rf"{OP}: groups must be a positive divisor"),
    (lambda: _conv(shuffle_groups=4), ValueError,
     rf"{OP}: shuffle_groups must be a positive divisor of s's 6 channels, got 4"),
    (lambda: _conv(weight=_t(4, 2, 3, 3)), ValueError,
     rf"{OP}: weight must have shape \(C_out, C_in / groups, k, k\) = \(C_out, 3, k, k\) .*got \[4, 2, 3, 3\]"),
    (lambda: _conv(weight=_t(4, 3, 2, 2)), ValueError, rf"{OP}: weight must have shape .* with k odd"),
    (lambda: _conv(weight=_t(5, 3, 3, 3), bias=_t(5)), ValueError, rf"{OP}: weight must have shape .*dividing C_out"),
    (lambda: _conv(weight=_t(4, 3, 3, 3, dtype=F64).to(torch.int64)), TypeError,
     rf"{OP}: weight must be a floating-point tensor"),
    (lambda: _conv(bias=_t(3)), ValueError, rf"{OP}: bias must hold C_out = 4 values, got shape \[3\]"),
    (lambda: _conv(in_shift=None), ValueError, rf"{OP}: in_scale and in_shift must be given together"),
    (lambda: _conv(in_scale=_t(5)), ValueError, rf"{OP}: in_scale must hold C_in = 6 values"),
    (lambda: _conv(out_scale=None), ValueError, rf"{OP}: gate_x, out_scale and out_shift must be given together"),
    (lambda: _conv(gate_x=_t(2, 4, 4, 3)), ValueError,
     rf"{OP}: gate_x must have the output's shape \(N, C_out, H, W\) = \[2, 4, 3, 4\], got \[2, 4, 4, 3\]"),
    (lambda: _conv(out_shift=_t(6)), ValueError, rf"{OP}: out_shift must hold C_out = 4 values"),
    (lambda: _conv(weight=torch.ones(4, 3, 3, 3, device="meta")), ValueError,
     rf"{OP}: weight must be on \w+(:\d+)?, got meta"),
    (lambda: _conv_bwd(grad_z=_t(2, 6, 3, 4)), ValueError,
     rf"{BW}: grad_z must have the output's shape \(N, C_out, H, W\) = \(2, 4, 3, 4\), got \[2, 6, 3, 4\]"),
    (lambda: _conv_bwd(in_scale=None), ValueError, rf"{BW}: in_scale and in_shift must be given together"),
    (lambda: _conv_bwd(grad_z=torch.ones(2, 4, 3, 4, dtype=torch.int32, device=DEVICE)), TypeError,
     rf"{BW}: grad_z must be a floating-point tensor"),
    (lambda: _epi(z=_t(2, 4, 3)), ValueError, rf"{EP}: z must be 4-D"),
    (lambda: _epi(gate_x=_t(2, 5, 3, 4)), ValueError, rf"{EP}: gate_x must have the output's shape"),
    (lambda: _epi(out_scale=_t(5)), ValueError, rf"{EP}: out_scale must hold C_out = 4 values"),
    (lambda: _epi_bwd(grad_y=_t(2, 4, 3, 5)), ValueError,
     rf"{EB}: grad_y must have z's shape \[2, 4, 3, 4\], got \[2, 4, 3, 5\]"),
    (lambda: _epi_bwd(rstd=None), ValueError, rf"{EB}: mean and rstd must be given together"),
    (lambda: _epi_bwd(mean=_t(3)), ValueError, rf"{EB}: mean must hold C = 4 values"),
    (lambda: _epi_bwd(rstd=torch.ones(4, device="meta")), ValueError, rf"{EB}: rstd must be on \w+(:\d+)?, got meta"),
]


@pytest.mark.parametrize("call,error,pattern", bad_input_params(BAD_INPUTS))
def test_bad_inputs(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


# ----------------------------------------------------------------------------------------
# GPU only: half precision, GAM sizes
# ----------------------------------------------------------------------------------------
def torch_path_conv(args, grad_z, dtype):
    """(out, grad_s, grad_weight, grad_bias, grad_in_scale, grad_in_shift) by plain torch ops
    computing in `dtype` (a half-precision nn.Module's conv), for the half-precision error budget."""
    s, weight, bias, groups, sg, in_scale, in_shift, gate_x, out_scale, out_shift = args
    leaves = [t.detach().to(dtype).requires_grad_() for t in (s, weight, bias, in_scale, in_shift)]
    u = F.relu(leaves[0] * leaves[3][:, None, None] + leaves[4][:, None, None])
    n, c, h, w = u.shape
    u = u.view(n, sg, c // sg, h, w).transpose(1, 2).reshape(n, c, h, w)
    z = F.conv2d(u, leaves[1], leaves[2], padding=weight.shape[-1] // 2, groups=groups)
    grads = torch.autograd.grad(z, leaves, grad_z.to(dtype))
    pre = z.detach() * out_scale.to(dtype)[:, None, None] + out_shift.to(dtype)[:, None, None]
    y = gate_x.to(dtype) * torch.sigmoid(pre)
    return [y, *grads]


@pytest.mark.skipif(INTERPRET, reason="half precision on GPU only")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=dtype_id)
def test_conv_half_gpu(dtype, layout):
    """fp16/bf16 s, grad_z and gate_x (fp32 parameters): the error against an fp64 computation
    at most twice the error of plain torch ops in that dtype (plus a rounding's worth)."""
    cases = [
        Case(2, 16, 64, 28, 28, 7, groups=4, shuffle_groups=4, prologue=True, gated=True),
        Case(2, 8, 12, 9, 7, 3, groups=2, shuffle_groups=2, prologue=True, gated=True),
    ]
    for case in cases:
        args, grad_z = conv_inputs(case, dtype, layout, pdtype=F32)
        out, grads = run_conv(args, grad_z)
        args64 = tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)
        truth = [Reference.shuffle_conv(*args64), *conv_reference_grads(args64, grad_z.double())]
        theirs = torch_path_conv(args, grad_z, dtype)
        within_half_budget(("out",) + CONV_NAMES, [out, *grads], theirs, truth, dtype)


@pytest.mark.skipif(INTERPRET, reason="half precision on GPU only")
@pytest.mark.parametrize("dtype", [F16, BF16], ids=dtype_id)
def test_epilogue_half_gpu(dtype):
    """fp16/bf16 z, gate_x, grad_y: error at most twice plain torch's in that dtype."""
    z, gate_x, out_scale, out_shift, grad_y, _ = epilogue_inputs((4, 64, 14, 14), dtype)
    ours = [ops.shuffle_conv_epilogue(z, gate_x, out_scale, out_shift),
            *ops.shuffle_conv_epilogue_backward(grad_y, z, gate_x, out_scale, out_shift, None, None)]
    d64 = [t.double() for t in (z, gate_x, out_scale, out_shift)]
    truth = [Reference.shuffle_conv_epilogue(*d64), *epilogue_reference_grads(*d64, grad_y.double())]
    leaves = [t.detach().requires_grad_() for t in (z, gate_x, out_scale, out_shift)]
    y = leaves[1] * torch.sigmoid(leaves[0] * leaves[2][:, None, None] + leaves[3][:, None, None])
    theirs = [y.detach(), *torch.autograd.grad(y, leaves, grad_y)]
    within_half_budget(("y",) + EPI_NAMES, ours, theirs, truth, dtype)


@pytest.mark.skipif(INTERPRET, reason="GPU sizes")
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_gam_sizes_gpu(dtype):
    """GAM's convs at C = 256, rd = 16, 28 x 28, k = 7: conv1 (groups 1 and 4, raw) and conv2
    (prologue, shuffle = groups, gated)."""
    for g in (1, 4):
        conv1 = Case(2, 256, 16, 28, 28, 7, groups=g)
        conv2 = Case(2, 16, 256, 28, 28, 7, groups=g, shuffle_groups=g, prologue=True, gated=True)
        for case in (conv1, conv2):
            check_conv(*conv_inputs(case, dtype, "channels_last"))
