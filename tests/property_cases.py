"""Shared machinery of the property tests: tests/test_properties.py (the C++ CPU backend) and
tests/test_properties_triton.py (Triton under the interpreter) run the same properties on
their backend.

* profiles: `examples(n)` the settings of one property (hypothesis profile "ci", derandomized,
  unless ATTNKERNELS_PROPERTIES=thorough asks for a random, 20x longer search);
* drawn inputs: `Maker` (feature maps in a drawn dtype, layout and value kind; small
  parameters), the `LAYOUTS`, value `KINDS` and `Sizes`;
* one `Problem` builder per fused op (`OPS`); `module_case` for the fused modules;
* the properties: `check_full_precision`, `check_low_precision` (ops) and their module
  counterparts, each run against the `reference` backend / the reference modules.

A falsifying example prints as the draws of `st.data()`, labelled (shape, dtype, layout,
values, seed, ...): every tensor of an example is made from `seed`, so the draws are the repro.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from helpers import BATCHNORM1D_MODULES, fused_pair
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from attnkernels import backend
from attnkernels import functional as AF
from attnkernels import nn as fused
from attnkernels.reference._base import memory_format_of
from attnkernels.reference.formulas import accumulate_dtype, important_channel_mask

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16

# ----------------------------------------------------------------------------------------
# Profiles
# ----------------------------------------------------------------------------------------
settings.register_profile(
    "ci", deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", settings.get_profile("ci"), derandomize=False)
PROFILE = os.environ.get("ATTNKERNELS_PROPERTIES", "ci")
_SCALE = 20 if PROFILE == "thorough" else 1


def examples(n: int, shrink: bool = True) -> settings:
    """The settings of a property with `n` examples in the CI profile (deterministic: the same
    examples every run), 20 times more, randomized, in the "thorough" profile. Without
    `shrink`, a failing example is reported as drawn, not minimised (under the Triton
    interpreter shrinking one failure takes minutes)."""
    phases = tuple(settings.get_profile(PROFILE).phases)
    if not shrink:
        phases = tuple(p for p in phases if p not in (Phase.shrink, Phase.explain))
    return settings(settings.get_profile(PROFILE), max_examples=n * _SCALE, phases=phases)


# ----------------------------------------------------------------------------------------
# Drawn inputs
# ----------------------------------------------------------------------------------------
#: Strides of a feature map: dense in NCHW or channels_last; an H, W slice with steps; a channel
#: slice (sample stride != C*H*W); a slice of a channels_last tensor (dense in neither format);
#: a broadcast over N and W (stride 0). The slices sit in NaN-filled buffers: a kernel that
#: reads outside its view returns NaN.
LAYOUTS = ("nchw", "channels_last", "sliced", "channel_slice", "sliced_channels_last", "expanded")

#: Values of a feature map: normal; small integers with constant channels (ties in every sum,
#: max and gate); relu(normal) (exact zeros tie at a maximum of 0); normal x 1e3 (saturated
#: sigmoids); normal with NaN, +-inf, or both at a few positions.
FINITE_KINDS = ("randn", "ties", "relu")
KINDS = FINITE_KINDS + ("large", "nan", "inf", "nan_inf")
SPECIAL_KINDS = ("nan", "inf", "nan_inf")


@dataclass(frozen=True)
class Sizes:
    """Bounds of the drawn sizes (each from 1: 1s, odd sizes, C not a power of two)."""

    batch: int = 3
    channels: int = 12
    side: int = 6  # H and W
    kernel: int = 9  # odd kernel sizes and 1-D taps

    def shapes(self, max_channels: int | None = None) -> st.SearchStrategy:
        """(N, C, H, W)."""
        return st.tuples(self.batches(), st.integers(1, max_channels or self.channels), self.sides(), self.sides())

    def nhw(self) -> st.SearchStrategy:
        """(N, H, W)."""
        return st.tuples(self.batches(), self.sides(), self.sides())

    def batches(self) -> st.SearchStrategy:
        return st.integers(1, self.batch)

    def sides(self) -> st.SearchStrategy:
        return st.integers(1, self.side)

    def kernels(self, largest: int | None = None) -> st.SearchStrategy:
        """Odd kernel sizes up to `largest` (and the bound)."""
        return odd(1, min(largest or self.kernel, self.kernel))


def odd(low: int, high: int) -> st.SearchStrategy:
    """Odd ints in [low, high]."""
    return st.integers((low - 1) // 2, (high - 1) // 2).map(lambda i: 2 * i + 1)


#: The C++ CPU backend's sizes, and the Triton interpreter's (it runs each program in Python).
CPU_SIZES = Sizes()
INTERPRETER_SIZES = Sizes(batch=2, channels=8, side=4, kernel=3)


@dataclass
class Maker:
    """Builds one example's tensors from its draws: feature maps in `dtype`, `layout` and value
    `kind`; small random parameters. Every tensor comes from one generator seeded by `seed`,
    so a failing example is reproduced by its draws alone."""

    dtype: torch.dtype
    layout: str
    kind: str
    seed: int
    sizes: Sizes = CPU_SIZES
    gen: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.gen = torch.Generator().manual_seed(self.seed)

    def normal(self, shape, scale: float = 1.0) -> torch.Tensor:
        """A float64 normal tensor times `scale`."""
        return torch.randn(shape, dtype=F64, generator=self.gen) * scale

    def uniform(self, shape, low: float, high: float) -> torch.Tensor:
        return torch.rand(shape, dtype=F64, generator=self.gen) * (high - low) + low

    def values(self, shape, large: bool = True, special: bool = True) -> torch.Tensor:
        """float64 values of `kind` ("large" only where `large`: inputs whose products are
        ill-conditioned at that scale, such as attention energies, stay at scale 1; normal
        values instead of NaN and inf unless `special`)."""
        kind = self.kind if special or self.kind not in SPECIAL_KINDS else "randn"
        if kind == "ties":
            t = torch.randint(-2, 3, shape, generator=self.gen).to(F64)
            t[:, 1::3] = 1.0
            return t
        if kind == "relu":
            return torch.relu(self.normal(shape))
        t = self.normal(shape, 1e3 if kind == "large" and large else 1.0)
        if kind in SPECIAL_KINDS:
            self.poison(t)
        return t

    def poison(self, t: torch.Tensor) -> None:
        """NaN, +inf, -inf (as `kind` says) at one to three positions of t, in place."""
        specials = {"nan": [math.nan], "inf": [math.inf, -math.inf], "nan_inf": [math.nan, math.inf, -math.inf]}
        choices = specials[self.kind]
        flat = t.view(-1)
        count = int(torch.randint(1, 4, (), generator=self.gen))
        for _ in range(count):
            i = int(torch.randint(0, flat.numel(), (), generator=self.gen))
            flat[i] = choices[int(torch.randint(0, len(choices), (), generator=self.gen))]

    def feature(self, shape, large: bool = True, special: bool = True) -> torch.Tensor:
        """A feature map of `shape` with the example's values (`values`), dtype and layout, a
        leaf requiring grad."""
        return in_layout(self.values(shape, large, special).to(self.dtype), self.layout).requires_grad_()

    def param(self, shape, scale: float = 1.0, dtype: torch.dtype | None = None, grad: bool = True) -> torch.Tensor:
        """A small contiguous normal parameter times `scale` (never special), a leaf."""
        return self.normal(shape, scale).to(dtype or self.dtype).requires_grad_(grad)


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values (all but "expanded", which broadcasts t[:1, :, :, :1]) in `layout`."""
    n, c, h, w = t.shape
    if layout == "nchw":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "expanded":
        return t[:1, :, :, :1].clone().expand(n, c, h, w)
    nan = torch.full((), math.nan, dtype=t.dtype)
    if layout == "sliced":
        view = nan.expand(n, c, 2 * h, w + 1).clone()[:, :, ::2, 1:]
    elif layout == "channel_slice":
        view = nan.expand(n, c + 3, h, w).clone()[:, 2 : c + 2]
    elif layout == "sliced_channels_last":
        buffer = nan.expand(n, c + 2, h + 1, w + 2).contiguous(memory_format=torch.channels_last)
        view = buffer[:, 1 : c + 1, 1:, 2:]
    else:
        raise AssertionError(layout)
    return view.copy_(t)


def maker(data, dtypes, kinds=KINDS, sizes: Sizes = CPU_SIZES) -> Maker:
    """The example's dtype, layout, value kind and seed, drawn (and printed on failure)."""
    return Maker(
        data.draw(st.sampled_from(dtypes), label="dtype"),
        data.draw(st.sampled_from(LAYOUTS), label="layout"),
        data.draw(st.sampled_from(kinds), label="values"),
        data.draw(st.integers(0, 2**16), label="seed"),
        sizes,
    )


# ----------------------------------------------------------------------------------------
# Problems: one call of a fused op or module, and what its result must look like
# ----------------------------------------------------------------------------------------
@dataclass
class Problem:
    """`fn(*inputs)` on a backend, its outputs `differentiable` (indices) back-propagated with
    seeded upstream gradients into every input. Outputs listed in `full_size` are feature maps
    that follow `layout_of`'s layout (docs/contract.md#layout)."""

    fn: Callable
    inputs: list[torch.Tensor]
    names: list[str]
    differentiable: tuple[int, ...] = (0,)
    full_size: tuple[int, ...] = (0,)
    layout_of: torch.Tensor | None = None
    seed: int = 0
    #: Upstream gradients are rounded to this dtype first (the low-precision runs' dtype, so
    #: their float64 truth back-propagates the very same values).
    grad_dtype: torch.dtype | None = None
    #: Result name -> the conv taps that only ever multiply zero padding (`padding_taps`).
    padding: dict[str, torch.Tensor] = field(default_factory=dict)

    def with_inputs(self, inputs: list[torch.Tensor], layout_of: torch.Tensor | None = None) -> Problem:
        """The same call on other inputs (`layout_of` the one whose layout outputs follow)."""
        return dataclasses.replace(self, inputs=inputs, layout_of=layout_of)


def padding_taps(weight_shape, extents, reaching: bool = False) -> torch.Tensor:
    """Which taps of a "same"-padded conv weight only ever multiply zero padding: those whose
    offset from the centre, along one of the conv's axes (the last len(extents) of the weight),
    is at least the input's extent there (k > C for the 1-D channel conv; k > H or W). With
    `reaching`, the taps that multiply the padding at some output pixel: every offset but 0.

    Their gradient sums `upstream * 0` over those pixels, which a NaN or inf upstream makes NaN
    where the padding is multiplied (torch's conv1d; an im2col) and not where it is skipped
    (torch's float32 conv2d). docs/contract.md leaves it open; the comparisons accept NaN
    against a number there."""
    mask = torch.zeros(weight_shape, dtype=torch.bool)
    for axis, extent in zip(range(-len(extents), 0), extents):
        k = weight_shape[axis]
        offsets = (torch.arange(k) - (k - 1) // 2).abs() >= (1 if reaching else extent)
        view = [1] * len(weight_shape)
        view[axis] = k
        mask |= offsets.view(view)
    return mask


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def evaluate(problem: Problem, backend_name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(outputs, gradients of every input) of the problem on `backend_name`."""
    with backend.use_backend(backend_name):
        outs = as_tuple(problem.fn(*problem.inputs))
    gen = torch.Generator().manual_seed(problem.seed + 1)
    wanted = [outs[i] for i in problem.differentiable]
    # Upstream gradients in their output's layout, as torch.randn_like(output) would be.
    upstream = [torch.randn(o.shape, dtype=F64, generator=gen).to(problem.grad_dtype or o.dtype)
                .to(o.dtype).contiguous(memory_format=memory_format_of(o)) for o in wanted]
    grads = torch.autograd.grad(wanted, problem.inputs, upstream, allow_unused=True, materialize_grads=True)
    return [o.detach() for o in outs], list(grads)


def result_names(problem: Problem, outs) -> list[str]:
    return [f"out{i}" for i in range(len(outs))] + [f"grad {n}" for n in problem.names]


# ----------------------------------------------------------------------------------------
# The ops (attnkernels.functional), one problem builder each
# ----------------------------------------------------------------------------------------
def acc_map(m: Maker, shape, values=None) -> torch.Tensor:
    """An (N, C)-style small map in acc(dtype), a leaf (given values, or the example's kind)."""
    t = m.values(shape) if values is None else values
    return t.to(accumulate_dtype(m.dtype)).requires_grad_()


def channel_pool_problem(data, m: Maker) -> Problem:
    x = m.feature(data.draw(m.sizes.shapes(), label="shape"))
    return Problem(AF.channel_pool, [x], ["x"], differentiable=(0, 1), full_size=(), layout_of=x, seed=m.seed)


def channel_gate_problem(data, m: Maker) -> Problem:
    n, c = data.draw(m.sizes.shapes(), label="shape")[:2]
    k = data.draw(m.sizes.kernels(), label="taps")
    mode = data.draw(st.sampled_from(["avg", "max", "mix"]), label="mode")
    acc = accumulate_dtype(m.dtype)
    avg, max_ = acc_map(m, (n, c)), acc_map(m, (n, c))
    weight, alpha, beta = m.param((1, 1, k), 0.5, acc), m.param((), 1.0, acc), m.param((), 1.0, acc)
    return Problem(lambda *a: AF.channel_gate(*a, mode=mode), [avg, max_, weight, alpha, beta],
                   ["avg", "max", "weight", "alpha", "beta"], full_size=(), seed=m.seed,
                   padding={"grad weight": padding_taps(weight.shape, (c,))})


def channel_rescale_problem(data, m: Maker) -> Problem:
    shape = data.draw(m.sizes.shapes(), label="shape")
    x = m.feature(shape)
    gate = acc_map(m, shape[:2], m.uniform(shape[:2], 0.0, 1.0))
    return Problem(AF.channel_rescale, [x, gate], ["x", "gate"], layout_of=x, seed=m.seed)


def channel_attention_problem(data, m: Maker) -> Problem:
    shape = data.draw(m.sizes.shapes(), label="shape")
    k = data.draw(m.sizes.kernels(), label="taps")
    mode = data.draw(st.sampled_from(["avg", "max", "mix"]), label="mode")
    x = m.feature(shape)
    weight, alpha, beta = m.param((1, 1, k), 0.5), m.param(()), m.param(())
    return Problem(lambda *a: AF.channel_attention(*a, mode=mode), [x, weight, alpha, beta],
                   ["x", "weight", "alpha", "beta"], layout_of=x, seed=m.seed,
                   padding={"grad weight": padding_taps(weight.shape, shape[1:2])})


def channel_mlp_attention_problem(data, m: Maker) -> Problem:
    shape = data.draw(m.sizes.shapes(), label="shape")
    rd = data.draw(st.integers(1, 9), label="rd")
    biases = data.draw(st.booleans(), label="biases")
    c = shape[1]
    x = m.feature(shape)
    w1, w2 = m.param((rd, c, 1, 1), 0.5), m.param((c, rd, 1, 1), 0.5)
    if biases:
        inputs, names = [x, w1, m.param(rd), w2, m.param(c)], ["x", "w1", "b1", "w2", "b2"]
        fn = AF.channel_mlp_attention
    else:
        inputs, names = [x, w1, w2], ["x", "w1", "w2"]

        def fn(x, w1, w2):
            return AF.channel_mlp_attention(x, w1, None, w2, None)

    return Problem(fn, inputs, names, layout_of=x, seed=m.seed)


def gate_values(m: Maker, n: int, c: int) -> torch.Tensor:
    """HAM's gate Ac in (0, 1): quarters (ties at the top-k boundary) for the "ties" kind, a
    NaN channel for the NaN kinds (marked important without displacing another)."""
    if m.kind == "ties":
        return torch.randint(1, 4, (n, c), generator=m.gen).to(F64) / 4
    g = m.uniform((n, c), 0.05, 0.95)
    if "nan" in m.kind:
        g.view(-1)[int(torch.randint(0, n * c, (), generator=m.gen))] = math.nan
    return g


def ham_spatial_pool_problem(data, m: Maker) -> Problem:
    shape = data.draw(m.sizes.shapes(), label="shape")
    c_im = data.draw(st.integers(1, shape[1]), label="c_im")
    x = m.feature(shape)
    gate = acc_map(m, shape[:2], gate_values(m, *shape[:2]))
    return Problem(lambda x, gate: AF.ham_spatial_pool(x, gate, c_im), [x, gate], ["x", "gate"],
                   differentiable=(0, 1), full_size=(), layout_of=x, seed=m.seed)


def ham_spatial_apply_problem(data, m: Maker) -> Problem:
    shape = data.draw(m.sizes.shapes(), label="shape")
    c_im = data.draw(st.integers(1, shape[1]), label="c_im")
    n, c, h, w = shape
    x = m.feature(shape)
    g = gate_values(m, n, c)
    gate = acc_map(m, (n, c), g)
    mask = important_channel_mask(g, c_im).to(gate.dtype)
    s1, s2 = (acc_map(m, (n, 1, h, w), m.uniform((n, 1, h, w), 0.5, 1.0)) for _ in range(2))
    return Problem(lambda x, gate, s1, s2: AF.ham_spatial_apply(x, gate, mask, s1, s2), [x, gate, s1, s2],
                   ["x", "gate", "s1", "s2"], layout_of=x, seed=m.seed)


def cbam_spatial_pool_problem(data, m: Maker) -> Problem:
    shape = data.draw(m.sizes.shapes(), label="shape")
    x = m.feature(shape)
    gate = acc_map(m, shape[:2], gate_values(m, *shape[:2]))
    return Problem(AF.cbam_spatial_pool, [x, gate], ["x", "gate"], full_size=(), layout_of=x, seed=m.seed)


def cbam_spatial_apply_problem(data, m: Maker) -> Problem:
    n, c, h, w = shape = data.draw(m.sizes.shapes(), label="shape")
    x = m.feature(shape)
    gate = acc_map(m, (n, c), gate_values(m, n, c))
    s = acc_map(m, (n, 1, h, w), m.uniform((n, 1, h, w), 0.5, 1.0))
    return Problem(AF.cbam_spatial_apply, [x, gate, s], ["x", "gate", "s"], layout_of=x, seed=m.seed)


def bam_apply_problem(data, m: Maker) -> Problem:
    n, c, h, w = shape = data.draw(m.sizes.shapes(), label="shape")
    x = m.feature(shape)
    mc = acc_map(m, (n, c), m.uniform((n, c), -3.0, 3.0))  # logits: sigmoid from 0.05 to 0.95
    ms = acc_map(m, (n, 1, h, w), m.uniform((n, 1, h, w), -3.0, 3.0))
    return Problem(AF.bam_apply, [x, mc, ms], ["x", "mc", "ms"], layout_of=x, seed=m.seed)


def ham_spatial_conv_problem(data, m: Maker) -> Problem:
    n, _, h, w = data.draw(m.sizes.shapes(), label="shape")
    cd = data.draw(st.sampled_from([1, 2, 4]), label="C_d")  # HAM's: 2 (mean and max maps)
    k = data.draw(m.sizes.kernels(), label="k")
    d = acc_map(m, (n, cd, h, w))
    weight = m.param((1, cd, k, k), 0.3, d.dtype)
    return Problem(AF.ham_spatial_conv, [d, weight], ["d", "weight"], full_size=(), seed=m.seed,
                   padding={"grad weight": padding_taps(weight.shape, (h, w))})


def large_energies_ok(m: Maker) -> bool:
    """Whether attention energies (sums of q*k; softmax_spatial's logits w . x + b) may take
    "large" values: in float64 only. In fp32, energies of 1e6 carry rounding of 0.1, and the
    flash backward's `dS = P * (dP - rowsum(dO * O))` then leaves noise of eps * |dO| |v| |k|
    (hundreds) in gradients that vanish exactly (a single key): rounding, not a contract
    violation. softmax_spatial alike: at x ~ 1e3 its softmax saturates, and the logits'
    gradient, the difference of terms of eps * |g| |x|^2, is noise whose sum order decides it
    (grad weight 0.09 against 0.05 at 1x4 pixels, both right to fp32's precision)."""
    return m.dtype == F64


def nonlocal_attn_problem(data, m: Maker) -> Problem:
    n, c, h, w = data.draw(m.sizes.shapes(8), label="shape")
    d_qk = data.draw(st.integers(1, 4), label="D_qk")
    q, k = (m.feature((n, d_qk, h, w), large=large_energies_ok(m)) for _ in range(2))
    v, x = m.feature((n, c, h, w)), m.feature((n, c, h, w))
    gamma = m.param(1)
    return Problem(AF.nonlocal_attn, [q, k, v, x, gamma], ["q", "k", "v", "x", "gamma"], layout_of=x, seed=m.seed)


def criss_cross_problem(data, m: Maker) -> Problem:
    n, c, h, w = data.draw(m.sizes.shapes(8), label="shape")
    d_qk = data.draw(st.integers(1, 4), label="D_qk")
    q, k = (m.feature((n, d_qk, h, w), large=large_energies_ok(m)) for _ in range(2))
    v, x = m.feature((n, c, h, w)), m.feature((n, c, h, w))
    return Problem(AF.criss_cross, [q, k, v, x, m.param(1)], ["q", "k", "v", "x", "gamma"], layout_of=x, seed=m.seed)


def cam_problem(data, m: Maker) -> Problem:
    shape = data.draw(m.sizes.shapes(), label="shape")
    x = m.feature(shape, large=large_energies_ok(m))  # energies are sums of x * x
    return Problem(AF.cam, [x, m.param(1)], ["x", "gamma"], layout_of=x, seed=m.seed)


def gam_channel_problem(data, m: Maker) -> Problem:
    shape = data.draw(m.sizes.shapes(), label="shape")
    rd = data.draw(st.integers(1, 5), label="rd")
    c = shape[1]
    x = m.feature(shape)
    params = [m.param((rd, c), 0.5), m.param(rd, 0.5), m.param((c, rd), 0.5), m.param(c, 0.5)]
    return Problem(AF.gam_channel, [x, *params], ["x", "w1", "b1", "w2", "b2"], layout_of=x, seed=m.seed)


def softmax_spatial_problem(data, m: Maker) -> Problem:
    shape = data.draw(m.sizes.shapes(), label="shape")
    c = shape[1]
    g = data.draw(st.sampled_from([d for d in range(1, c + 1) if c % d == 0]), label="g")
    rescale = data.draw(st.booleans(), label="rescale")
    x = m.feature(shape, large=large_energies_ok(m))  # x makes the softmax's logits
    params = [m.param((g, c), 0.5), m.param(g, 0.5)]
    return Problem(lambda x, w, b: AF.softmax_spatial(x, w, b, rescale), [x, *params], ["x", "weight", "bias"],
                   layout_of=x, seed=m.seed)


@st.composite
def conv_geometry(draw, sizes: Sizes):
    """(groups, shuffle_groups, C_in, C_out, k): groups divides C_in and C_out, shuffle_groups C_in."""
    g = draw(st.integers(1, 4))
    c_in, c_out = g * draw(st.integers(1, 3)), g * draw(st.integers(1, 3))
    shuffle = draw(st.sampled_from([d for d in range(1, c_in + 1) if c_in % d == 0]))
    return g, shuffle, c_in, c_out, draw(sizes.kernels(7))


def conv_inputs(data, m: Maker):
    """shuffle_conv's inputs: s, weight, bias and (drawn) the BN+ReLU prologue's scale and shift.

    In fp16/bf16 the conv algorithm is "direct": "library" runs torch's conv in s's dtype by
    design (tensor cores), less precise than the op's reference (acc(s)); the fused GAM's
    property tests judge it against the reference GAM, whose convs run in that dtype too."""
    g, shuffle, c_in, c_out, k = data.draw(conv_geometry(m.sizes), label="(groups, shuffle_groups, C_in, C_out, k)")
    n, h, w = data.draw(m.sizes.nhw(), label="(N, H, W)")
    prologue = data.draw(st.booleans(), label="prologue")
    low_precision = m.dtype in (F16, BF16)
    algorithm = data.draw(st.sampled_from(["direct"] if low_precision else ["direct", "library"]), label="conv")
    s = m.feature((n, c_in, h, w))
    inputs = [s, m.param((c_out, c_in // g, k, k), 1 / k), m.param(c_out)]
    names = ["s", "weight", "bias"]
    if prologue:
        inputs += [m.uniform(c_in, 0.5, 1.5).to(m.dtype).requires_grad_(), m.param(c_in, 0.5)]
        names += ["in_scale", "in_shift"]
    return (g, shuffle, algorithm, prologue, (n, c_out, h, w)), inputs, names


def conv_padding(inputs) -> dict[str, torch.Tensor]:
    """shuffle_conv's taps that reach the padding (inputs: s, weight, ...): its direct conv's
    weight gradient multiplies the padding on the CPU (an im2col), torch's float32 conv2d skips it."""
    s, weight = inputs[:2]
    return {"grad weight": padding_taps(weight.shape, s.shape[2:], reaching=True)}


def split_conv_args(args, prologue: bool):
    """(s, weight, bias, in_scale, in_shift, rest) of a flat input list."""
    s, weight, bias, *rest = args
    if prologue:
        return s, weight, bias, rest[0], rest[1], rest[2:]
    return s, weight, bias, None, None, rest


def shuffle_conv_problem(data, m: Maker) -> Problem:
    (g, shuffle, algorithm, prologue, out_shape), inputs, names = conv_inputs(data, m)
    gated = data.draw(st.booleans(), label="gated")
    if gated:
        inputs += [m.feature(out_shape), m.uniform(out_shape[1], 0.5, 1.5).to(m.dtype).requires_grad_(),
                   m.param(out_shape[1])]
        names += ["gate_x", "out_scale", "out_shift"]

    def fn(*args):
        s, weight, bias, in_scale, in_shift, gate = split_conv_args(args, prologue)
        return AF.shuffle_conv(s, weight, bias, g, shuffle, in_scale, in_shift, *(gate or [None] * 3), conv=algorithm)

    return Problem(fn, inputs, names, layout_of=inputs[0], seed=m.seed, padding=conv_padding(inputs))


def shuffle_conv_bn_gate_problem(data, m: Maker) -> Problem:
    (g, shuffle, algorithm, prologue, out_shape), inputs, names = conv_inputs(data, m)
    running = data.draw(st.booleans(), label="running stats")
    n, c_out, h, w = out_shape
    if not running and n * h * w == 1:
        # Batch statistics over one value per channel: the op raises, as F.batch_norm does
        # (tests/test_input_errors.py); running statistics are fine there.
        running = True
    inputs += [m.feature(out_shape), m.uniform(c_out, 0.5, 1.5).to(m.dtype).requires_grad_(), m.param(c_out)]
    names += ["gate_x", "bn_weight", "bn_bias"]
    stats = [m.param(c_out, 0.5, grad=False), m.uniform(c_out, 0.5, 2.0).to(m.dtype)] if running else [None, None]

    def fn(*args):
        s, weight, bias, in_scale, in_shift, (gate_x, bn_w, bn_b) = split_conv_args(args, prologue)
        return AF.shuffle_conv_bn_gate(s, weight, bias, g, shuffle, in_scale, in_shift, gate_x, bn_w, bn_b,
                                       1e-5, algorithm, *stats)

    return Problem(fn, inputs, names, layout_of=inputs[names.index("gate_x")], seed=m.seed,
                   padding=conv_padding(inputs))


#: Every public op of every hot path, by name: a problem builder `(data, maker) -> Problem`.
OPS: dict[str, Callable] = {
    "channel_pool": channel_pool_problem,
    "channel_gate": channel_gate_problem,
    "channel_rescale": channel_rescale_problem,
    "channel_attention": channel_attention_problem,
    "channel_mlp_attention": channel_mlp_attention_problem,
    "ham_spatial_pool": ham_spatial_pool_problem,
    "ham_spatial_apply": ham_spatial_apply_problem,
    "ham_spatial_conv": ham_spatial_conv_problem,
    "cbam_spatial_pool": cbam_spatial_pool_problem,
    "cbam_spatial_apply": cbam_spatial_apply_problem,
    "bam_apply": bam_apply_problem,
    "nonlocal_attn": nonlocal_attn_problem,
    "cam": cam_problem,
    "criss_cross": criss_cross_problem,
    "gam_channel": gam_channel_problem,
    "softmax_spatial": softmax_spatial_problem,
    "shuffle_conv": shuffle_conv_problem,
    "shuffle_conv_bn_gate": shuffle_conv_bn_gate_problem,
}

#: Ops whose first argument is a small map in an accumulation dtype (fp32 or fp64 only).
ACC_ONLY_OPS = {"channel_gate", "ham_spatial_conv"}


# ----------------------------------------------------------------------------------------
# The fused modules (attnkernels.nn.FUSED)
# ----------------------------------------------------------------------------------------
@st.composite
def module_config(draw, name: str, sizes: Sizes) -> tuple[int, dict]:
    """(C, constructor kwargs) valid for module `name` per docs/contract.md."""
    if name in ("pam", "csm", "criss_cross"):
        c = draw(st.integers(8, 8 + sizes.channels // 2))
        if name == "criss_cross":
            return c, {"recurrence": draw(st.integers(1, 2))}
        return c, ({"reduction": draw(st.sampled_from([1, 4, 16]))} if name == "csm" else {})
    if name == "gam":
        # The spec's rule: rd = C // reduction >= 1; for groups g > 1, g divides C and rd.
        g = draw(st.sampled_from([1, 2, 4]))
        rd = g * draw(st.integers(1, 2))
        reduction = draw(st.integers(1, 4))
        c = draw(st.integers(rd * reduction, rd * reduction + reduction - 1).filter(lambda c: c % g == 0))
        return c, {"reduction": reduction, "groups": g, "kernel_size": draw(sizes.kernels(7))}
    c = draw(st.integers(1, sizes.channels))
    if name == "softmax_spatial":
        groups = draw(st.sampled_from([d for d in range(1, c + 1) if c % d == 0]))
        return c, {"groups": groups, "rescale": draw(st.booleans())}
    if name == "se":
        return c, {"reduction": draw(st.sampled_from([1, 4, 16])), "divisor": draw(st.sampled_from([1, 2, 8]))}
    if name == "eca":
        return c, {"kernel_size": draw(st.none() | sizes.kernels())}
    if name == "cbam":
        return c, {"reduction": draw(st.sampled_from([1, 4, 16])), "spatial_kernel_size": draw(sizes.kernels(7))}
    if name == "triplet":  # one kernel size for its three gates' convs
        return c, {"kernel_size": draw(sizes.kernels(7))}
    if name == "cam":  # no options
        return c, {}
    if name == "bam":  # rd = C // reduction >= 1
        reduction = draw(st.sampled_from([1, 2, 4]))
        c = draw(st.integers(reduction, reduction + sizes.channels))
        return c, {"reduction": reduction, "dilation": draw(st.integers(1, 3))}
    if name == "bridge":  # the maps come from x (helpers.FeedsBridges), none to three of them
        bridges = draw(st.lists(st.integers(1, sizes.channels), max_size=3))
        return c, {"bridge_channels": bridges, "reduction": draw(st.sampled_from([1, 4, 16]))}
    return c, {"kernel_size": draw(st.none() | sizes.kernels(5)), "spatial_kernel_size": draw(sizes.kernels(7))}  # ham


#: train: batch statistics, with gradients; eval: running statistics, with gradients;
#: inference: eval under no_grad (the per-sample and epilogue kernels: HAM, GAM, SE).
MODES = ("train", "eval", "inference")


@dataclass
class ModuleCase:
    """A fused module and its reference twin (same state), an input and the mode to run."""

    fused: torch.nn.Module
    ref: torch.nn.Module
    x: torch.Tensor
    mode: str
    seed: int
    #: The fused results may be NaN where the reference's are +-inf (docs/contract.md, CAM with
    #: a non-finite gamma: its kernels scale the attention weights by gamma before the product).
    nan_for_infinity: bool = False


def module_case(data, name: str, m: Maker) -> ModuleCase:
    """Draw a module `name`'s configuration, shape and mode; build the pair in m.dtype."""
    c, kwargs = data.draw(module_config(name, m.sizes), label="(C, kwargs)")
    n, h, w = data.draw(m.sizes.nhw(), label="(N, H, W)")
    mode = data.draw(st.sampled_from(MODES), label="mode")
    # Triplet's gates' BatchNorms see N*H*W, N*C*W and N*H*C values: with N = 1 one may be 1.
    one_value = n * h * w == 1 or (n == 1 and (name in BATCHNORM1D_MODULES or name == "triplet"))
    if mode == "train" and one_value:
        n = 2  # BatchNorm cannot train on one value per channel (the draws show N as drawn)
    cls = fused.FUSED[name]
    torch.manual_seed(m.seed)  # the pair's random parameters
    f, ref = fused_pair(cls, fused.reference_class(cls), c, dtype=m.dtype, device="cpu", **kwargs)
    padded = padded_conv_weights(ref)
    entries = [k for k, t in ref.state_dict().items() if t.is_floating_point() and k not in padded]
    where = "x"
    if m.kind in SPECIAL_KINDS and entries:
        where = data.draw(st.sampled_from(["x", "state", "both"]), label="special values in")
    if where != "x":
        poison_state(ref, data.draw(st.sampled_from(entries), label="special state entry"), m)
        f.load_state_dict(ref.state_dict())
    if name == "gam":
        f.conv_algorithm = data.draw(st.sampled_from(["auto", "direct", "library"]), label="conv_algorithm")
    f.train(mode == "train"), ref.train(mode == "train")
    # x feeds PAM's q and k, softmax_spatial's logits
    large = name not in ("pam", "csm", "criss_cross", "softmax_spatial") or large_energies_ok(m)
    x = m.feature((n, c, h, w), large, special=where != "state")
    nan_for_infinity = name == "cam" and not bool(torch.isfinite(ref.gamma).all())
    return ModuleCase(f, ref, x, mode, m.seed, nan_for_infinity)


def padded_conv_weights(module: torch.nn.Module) -> set[str]:
    """The weights of the module's zero-padded convs. A NaN there meets the padding in
    `w * 0` (torch's conv1d gives NaN, its conv2d skips the padding: see `padding_taps`),
    so the module tests put special values in the other entries only."""
    return {f"{name}.weight" for name, child in module.named_modules()
            if isinstance(child, (torch.nn.Conv1d, torch.nn.Conv2d)) and any(p > 0 for p in child.padding)}


def poison_state(module: torch.nn.Module, name: str, m: Maker) -> None:
    """Special values in the parameter or buffer `name` of module (BN's running statistics too)."""
    target = module.state_dict()[name]
    with torch.no_grad():
        values = target.double().clone()
        m.poison(values.view(-1) if values.dim() else values.view(1))
        target.copy_(values.view_as(target))


@dataclass
class ModuleRun:
    """One forward (and backward) of a module: y, then the gradients of x and every parameter
    (none in inference), their names, and the module's buffers after the step."""

    results: list[torch.Tensor]
    names: list[str]
    buffers: list[torch.Tensor]
    padding: dict[str, torch.Tensor] = field(default_factory=dict)


def run_module(module: torch.nn.Module, x: torch.Tensor, mode: str, seed: int, backend_name: str | None,
               grad_dtype: torch.dtype | None = None) -> ModuleRun:
    """`module(x)` on a copy of `module` (its state stays as it was, so every run starts from
    the same running statistics), on `backend_name` (None: automatic)."""
    module = copy.deepcopy(module)
    if mode == "inference":
        with torch.no_grad(), backend.use_backend(backend_name):
            y = module(x)
        return ModuleRun([y], ["y"], [b.clone() for b in module.buffers()])
    names = [n for n, _ in module.named_parameters()]
    problem = Problem(lambda x, *p: module(x), [x, *module.parameters()], ["x", *names], seed=seed,
                      grad_dtype=grad_dtype)
    outs, grads = evaluate(problem, backend_name)
    return ModuleRun(outs + grads, result_names(problem, outs), [b.clone() for b in module.buffers()],
                     module_padding(module, x))


def module_padding(module: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The padding-only taps of a module's convs: Conv1d over the channels (ECA's, HAM's: extent
    C), Conv2d over H and W."""
    padding = {}
    for name, child in module.named_modules():
        if isinstance(child, (torch.nn.Conv1d, torch.nn.Conv2d)):
            extents = x.shape[1:2] if isinstance(child, torch.nn.Conv1d) else x.shape[2:]
            padding[f"grad {name}.weight"] = padding_taps(child.weight.shape, extents)
    return padding


# ----------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------
def pairs(names, got, want):
    """(name, a, b) for each pair of results present on both sides (inference has no grads)."""
    for name, a, b in zip(names, got, want, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            yield name, a, b


#: Results where the fused op's NaN stands for the reference's +-inf: docs/contract.md, GAM's BN2
#: folded into shuffle_conv_bn_gate, whose weight gradient (sum dpre*z - mean * sum dpre) * rstd
#: is inf - inf where BatchNorm's sum dpre*(z - mean) * rstd is infinite.
NAN_FOR_INFINITY = {"grad bn_weight"}


def assert_same_specials(got, want, names, what: str, padding=None, nan_for_infinity: bool = False) -> None:
    """Same shapes and dtypes; NaN at the same places (except NaN against a number at `padding`
    taps, see `padding_taps`, and, in NAN_FOR_INFINITY's results or every result with
    `nan_for_infinity`, NaN against +-inf); the same infinities at the same places."""
    padding = padding or {}
    for name, a, b in pairs(names, got, want):
        assert (a.shape, a.dtype) == (b.shape, b.dtype), f"{what}, {name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        if not a.is_floating_point():
            assert torch.equal(a, b), f"{what}, {name}: {a} vs {b}"
            continue
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        differ = nan_a ^ nan_b
        open_question = padding[name] & differ if name in padding else torch.zeros_like(differ)
        if name in NAN_FOR_INFINITY or nan_for_infinity:
            open_question |= nan_a & torch.isinf(b)
        differ &= ~open_question
        assert not differ.any(), (
            f"{what}, {name}: NaN at {differ.nonzero()[0].tolist()}: {at(a, differ)} vs {at(b, differ)}")
        inf = (torch.isinf(a) | torch.isinf(b)) & ~open_question
        assert torch.equal(a[inf], b[inf]), f"{what}, {name}: infinities differ: {at(a, inf)} vs {at(b, inf)}"


def at(t: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return t[mask][:4].tolist()


def finite_max(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)]
    return finite.abs().max().item() if finite.numel() else 0.0


def example_scale(results) -> float:
    """The largest finite magnitude among an example's results, at least 1: results that
    vanish by cancellation (a key bias's gradient before softmax, a conv bias's before
    BatchNorm, a query's at H*W = 1) are rounding noise of terms of about that size."""
    return max([1.0] + [finite_max(t.double()) for t in results if t is not None and t.is_floating_point()])


def assert_close_at_scale(got, want, names, rel: float, what: str, padding=None, nan_for_infinity: bool = False) -> None:
    """Specials as `assert_same_specials`; finite values within `rel` relative, plus `rel`
    times the example's scale (`example_scale` of want)."""
    assert_same_specials(got, want, names, what, padding, nan_for_infinity)
    atol = rel * example_scale(want)
    for name, a, b in pairs(names, got, want):
        if not b.is_floating_point():
            continue  # compared exactly above
        finite = torch.isfinite(b) & torch.isfinite(a)
        torch.testing.assert_close(a[finite], b[finite], rtol=rel, atol=atol, check_dtype=False,
                                   msg=lambda msg, name=name: f"{what}, {name}: {msg}")


def assert_error_like_eager(got, eager, exact, dtype: torch.dtype, names, what: str) -> None:
    """flash-attention's criterion on finite values: each result's largest error against the
    float64 truth is at most twice the eager result's, plus two units of rounding of the
    example's scale (`example_scale` of the truth: helpers.assert_error_like_eager's floor,
    the result's own scale, would demand exactness of results that vanish by cancellation)."""
    floor = 2 * torch.finfo(dtype).eps * example_scale(exact)
    for name, a, base, truth in zip(names, got, eager, exact, strict=True):
        if a is None:
            continue
        finite = torch.isfinite(truth) & torch.isfinite(a.double()) & torch.isfinite(base.double())
        err = (a.double() - truth)[finite].abs().max().item() if finite.any() else 0.0
        err_eager = (base.double() - truth)[finite].abs().max().item() if finite.any() else 0.0
        assert err <= 2 * err_eager + floor, (
            f"{what}, {name}: error {err:.3g} against float64, eager's {err_eager:.3g}, floor {floor:.3g}")


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's raw bit patterns (so NaN equals the same NaN)."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
    return t.detach().contiguous().view(ints[t.element_size()])


def assert_bitwise(got, again, names) -> None:
    for name, a, b in pairs(names, got, again):
        assert a.dtype == b.dtype and torch.equal(bits(a), bits(b)), f"not bitwise repeatable: {name}"


def assert_layouts(problem: Problem, outs, grads) -> None:
    """Full-size outputs and the gradient of the feature map are in its layout
    (docs/contract.md#layout: channels_last in, channels_last out; NCHW otherwise)."""
    if problem.layout_of is None:
        return
    want = memory_format_of(problem.layout_of)
    for i in problem.full_size:
        assert outs[i].is_contiguous(memory_format=want), f"out{i} is not {want}: strides {outs[i].stride()}"
    i = next((j for j, t in enumerate(problem.inputs) if t is problem.layout_of), None)
    if i is not None:
        assert grads[i].is_contiguous(memory_format=want), f"grad {problem.names[i]} is not {want}: {grads[i].stride()}"


#: Fused against the reference in the same dtype, and one layout against another: relative
#: tolerance, and that fraction of the example's scale as absolute tolerance ("equal up to
#: summation order", docs/contract.md#matching). Not a flash-style criterion in fp32: the
#: eager fp32 reference often shares the float64 truth's formula and rounding structure
#: (torch's BatchNorm backward on two values, softmax over one key) where the fused kernels'
#: equivalent formulas leave a few ulps of the example's scale (BN folded into the epilogue,
#: the flash backward's rowsum(dO * O)).
SAME_DTYPE_REL = {F64: 1e-9, F32: 1e-4}
LAYOUT_REL = {F64: 1e-9, F32: 1e-5}


# ----------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------
def nchw_copy(problem: Problem) -> Problem:
    """The same problem with every feature map NCHW-contiguous (same values)."""
    inputs = [t.detach().contiguous().requires_grad_() for t in problem.inputs]
    return problem.with_inputs(inputs)


def in_float64(problem: Problem, dtype: torch.dtype) -> Problem:
    """The problem on its inputs' exact values in float64, upstream gradients rounded to
    `dtype` as the low-precision runs round them: their truth."""
    truth = problem.with_inputs([t.detach().double().requires_grad_() for t in problem.inputs])
    truth.grad_dtype = dtype
    return truth


def check_full_precision(problem: Problem, backend_name: str, dtype: torch.dtype) -> None:
    """fp64/fp32: the fused results match the reference backend's (values; NaN and inf
    positions; shapes and dtypes), are in the input's layout, do not depend on the layout,
    and repeat bitwise."""
    problem.grad_dtype = dtype
    outs, grads = evaluate(problem, backend_name)
    got = outs + grads
    names = result_names(problem, outs)
    want = flat(evaluate(problem, "reference"))
    assert_close_at_scale(got, want, names, SAME_DTYPE_REL[dtype], "fused vs reference", problem.padding)
    assert_layouts(problem, outs, grads)
    assert_bitwise(got, flat(evaluate(problem, backend_name)), names)
    assert_close_at_scale(got, flat(evaluate(nchw_copy(problem), backend_name)), names, LAYOUT_REL[dtype],
                          "layout vs NCHW", problem.padding)


def flat(result) -> list[torch.Tensor]:
    outs, grads = result
    return outs + grads


def check_low_precision(problem: Problem, backend_name: str, dtype: torch.dtype) -> None:
    """fp16/bf16 (flash-attention's criterion, docs/contract.md#matching): each fused result's
    error against the float64 truth is at most twice the eager reference's in the same dtype
    plus two units of rounding; dtypes and layouts as the reference's; bitwise repeatable."""
    problem.grad_dtype = dtype
    outs, grads = evaluate(problem, backend_name)
    got = outs + grads
    names = result_names(problem, outs)
    eager = flat(evaluate(problem, "reference"))
    assert_same_specials(got, eager, names, "fused vs eager", problem.padding)
    exact = flat(evaluate(in_float64(problem, dtype), "reference"))
    assert_error_like_eager(got, eager, exact, dtype, names, "fused vs eager")
    assert_layouts(problem, outs, grads)
    assert_bitwise(got, flat(evaluate(problem, backend_name)), names)


def check_module_full_precision(case: ModuleCase, backend_name: str, dtype: torch.dtype) -> None:
    """A fused module against its reference (fp64/fp32, as `check_full_precision`): output,
    gradients of x and every parameter, BatchNorm's buffers after the step; output shape,
    dtype and layout; layout independence; bitwise repeat."""
    got = run_module(case.fused, case.x, case.mode, case.seed, backend_name, dtype)
    want = run_module(case.ref, case.x, case.mode, case.seed, None, dtype)
    y = got.results[0]
    assert (y.shape, y.dtype) == (case.x.shape, case.x.dtype), (y.shape, y.dtype)
    assert y.is_contiguous(memory_format=memory_format_of(case.x)), f"output layout: strides {y.stride()}"
    buffer_names = [f"buffer {name}" for name, _ in case.ref.named_buffers()]
    assert_close_at_scale(got.results, want.results, got.names, SAME_DTYPE_REL[dtype], "fused vs reference",
                          got.padding, case.nan_for_infinity)
    assert_close_at_scale(got.buffers, want.buffers, buffer_names, SAME_DTYPE_REL[dtype], "fused vs reference")
    again = run_module(case.fused, case.x, case.mode, case.seed, backend_name, dtype)
    assert_bitwise(got.results + got.buffers, again.results + again.buffers, got.names + buffer_names)
    dense = run_module(case.fused, case.x.detach().contiguous().requires_grad_(), case.mode, case.seed, backend_name,
                       dtype)
    assert_close_at_scale(got.results + got.buffers, dense.results + dense.buffers, got.names + buffer_names,
                          LAYOUT_REL[dtype], "layout vs NCHW", got.padding)


def check_module_low_precision(case: ModuleCase, backend_name: str, dtype: torch.dtype) -> None:
    """A fused module in fp16/bf16: every result's error against the float64 truth (the
    reference module with the same low-precision state, in float64) at most twice the eager
    reference's plus two units of rounding; output dtype and layout as the contract says."""
    got = run_module(case.fused, case.x, case.mode, case.seed, backend_name, dtype)
    eager = run_module(case.ref, case.x, case.mode, case.seed, None, dtype)
    x64 = case.x.detach().double().requires_grad_()
    exact = run_module(copy.deepcopy(case.ref).double(), x64, case.mode, case.seed, None, dtype)
    y = got.results[0]
    assert y.dtype == dtype and y.is_contiguous(memory_format=memory_format_of(case.x)), (y.dtype, y.stride())
    assert_same_specials(got.results, eager.results, got.names, "fused vs eager", got.padding)
    assert_error_like_eager(got.results, eager.results, exact.results, dtype, got.names, "fused vs eager")
