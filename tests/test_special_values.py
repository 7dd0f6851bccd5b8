"""NaN and +-inf through every fused op and fused module, forward and every gradient, on the
C++ `cpu` backend, the `triton` backend (the interpreter on CPU tensors; CUDA on a GPU) and,
on a GPU, the `cuda` backend: the NaN positions, the infinities and every finite value match
the reference (docs/contract.md "NaN propagation", "Max reductions and ties").

The cases place NaN, +inf, -inf, ties of +inf at a maximum and a whole -inf plane in x (and in
parameters and BatchNorm running statistics), in float64, on tiny shapes (the interpreter is
slow). Sample 0 of x stays finite, so a case also checks that the special value stays where
the reference puts it.
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch

import helpers
from attnkernels import backend
from attnkernels import functional as AF
from attnkernels import nn as N

F64 = torch.float64
NAN, INF = math.nan, math.inf

#: On CPU tensors Triton runs under its interpreter (conftest.py switches it on); else on CUDA.
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

#: (backend, device) of every fused backend; `cuda`, and Triton off the interpreter, need a GPU.
BACKENDS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", TRITON_DEVICE, id="triton", marks=helpers.needs_gpu if TRITON_DEVICE == "cuda" else ()),
    pytest.param("cuda", "cuda", id="cuda", marks=helpers.needs_gpu),
]

# ----------------------------------------------------------------------------------------
# Special values
# ----------------------------------------------------------------------------------------
#: kind -> [(index, value)], indices into an (N >= 2, C >= 7, H >= 3, W >= 3) tensor; sample 0
#: stays finite. "inf_ties": two +inf in one channel plane (a tie at its max) and a third at the
#: same pixel in another channel (a tie at that pixel's max over C). "neg_inf_plane": a whole
#: channel of -inf (its max is -inf, tied by every element).
SPECIALS = {
    "nan": [((1, 3, 2, 1), NAN)],
    "pos_inf": [((1, 3, 2, 1), INF)],
    "neg_inf": [((1, 3, 2, 1), -INF)],
    "inf_ties": [((1, 3, 2, 1), INF), ((1, 3, 0, 2), INF), ((1, 6, 2, 1), INF)],
    "neg_inf_plane": [((1, 4), -INF)],
}
KINDS = list(SPECIALS)


def poison(t: torch.Tensor, kind: str) -> torch.Tensor:
    """A copy of t with the special values of `kind` (indices taken modulo t's shape, so an
    (N, C) map or a small conv input gets them too)."""
    t = t.detach().clone()
    for index, value in SPECIALS[kind]:
        t[tuple(i % s for i, s in zip(index, t.shape))] = value
    return t


# ----------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------
def assert_same_special_values(got, want, names) -> None:
    """Each pair equal up to float64 rounding, NaN where the reference has NaN, the same
    infinities: torch.testing.assert_close with equal_nan."""
    assert len(got) == len(want)
    for name, a, b in zip(names, got, want, strict=True):
        if b is None:  # an input the reference does not use: the fused gradient is None or exactly 0
            assert a is None or torch.equal(a, torch.zeros_like(a)), name
            continue
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")


def output_grads(outputs: tuple) -> list[torch.Tensor]:
    """Fixed random gradients for the differentiable outputs (the same for every backend)."""
    gen = torch.Generator().manual_seed(1234)
    return [torch.randn(o.shape, dtype=o.dtype, generator=gen).to(o.device) for o in outputs]


def run_op(fn, args: list, differentiable: list[int], backend_name: str):
    """fn(*args) on `backend_name`: its outputs and the gradient of every differentiable arg
    (indices `differentiable`) for fixed random output gradients."""
    args = [helpers.leaf(a, i in differentiable) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    with backend.use_backend(backend_name):
        out = fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    live = [o for o in outs if o.requires_grad]
    inputs = [args[i] for i in differentiable]
    grads = torch.autograd.grad(live, inputs, output_grads(live), allow_unused=True)
    return [o.detach() for o in outs], list(grads)


# The reference runs on CPU, whatever the device under test: the literal sums of the contract.
# On a GPU, cuDNN's convs multiply the zero padding by a non-finite gradient (NaN) where the
# conv's sum has no padded term at all (torch's CPU convs and the kernels leave it out). The
# contract leaves those padding products open ("NaN propagation"), so a case whose conv is the
# library's (torch's conv on the device under test) takes the reference on that device: the same
# conv, the same products.
def reference_device(case: str, device: torch.device | str) -> torch.device:
    """Where the reference runs for op or module case `case` tested on `device`."""
    return torch.device(device if "library" in case else "cpu")


def on_device(values: list, device: torch.device) -> list:
    return [v.to(device) if isinstance(v, torch.Tensor) else v for v in values]


def assert_op_matches_reference(fn, args: list, differentiable: list[int], backend_name: str,
                                reference_on: torch.device | str = "cpu") -> bool:
    """fn's outputs and gradients on `backend_name` equal the reference backend's (run on
    `reference_on`), special values included. Returns whether the reference's own results hold
    a non-finite value."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    want_out, want_grads = (on_device(r, device)
                            for r in run_op(fn, on_device(args, reference_on), differentiable, "reference"))
    got_out, got_grads = run_op(fn, args, differentiable, backend_name)
    names = [f"output {i}" for i in range(len(want_out))] + [f"grad of arg {i}" for i in differentiable]
    assert_same_special_values(got_out + got_grads, want_out + want_grads, names)
    return any(not torch.isfinite(t).all() for t in want_out + want_grads if t is not None)


def rand(*shape: int, device: str = "cpu", low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """Uniform random float64 values in [low, high) on `device`."""
    return torch.empty(shape, dtype=F64).uniform_(low, high).to(device)


# ----------------------------------------------------------------------------------------
# Op cases: (fn, args, differentiable arg indices, the args that get the special values)
# ----------------------------------------------------------------------------------------
SHAPE = (2, 8, 4, 5)


def channel_gate_case(mode: str):
    def make(device):
        n, c = SHAPE[:2]
        avg, mx = rand(n, c, device=device), rand(n, c, device=device)
        alpha, beta = torch.tensor(0.3, dtype=F64, device=device), torch.tensor(-0.2, dtype=F64, device=device)
        args = [avg, mx, rand(1, 1, 3, device=device), alpha, beta]
        targets = {"avg": [0], "max": [1], "mix": [0, 1]}[mode]  # the maps the mode reads
        return lambda *a: AF.channel_gate(*a, mode=mode), args, [0, 1, 2, 3, 4], targets
    return make


def mlp_case(device):
    c, rd = SHAPE[1], 3
    args = [rand(*SHAPE, device=device), rand(rd, c, 1, 1, device=device), rand(rd, device=device),
            rand(c, rd, 1, 1, device=device), rand(c, device=device)]
    return AF.channel_mlp_attention, args, [0, 1, 2, 3, 4], [0]


def ham_pool_case(device):
    n, c = SHAPE[:2]
    args = [rand(*SHAPE, device=device), rand(n, c, device=device, low=0.05, high=0.95), 3]
    return AF.ham_spatial_pool, args, [0, 1], [0, 1]


def ham_apply_case(device):
    n, c, h, w = SHAPE
    gate = rand(n, c, device=device, low=0.05, high=0.95)
    mask = (torch.arange(c) % 3 == 0).to(F64).expand(n, c).contiguous().to(device)
    args = [rand(*SHAPE, device=device), gate, mask, rand(n, 1, h, w, device=device, low=0.5, high=1.0),
            rand(n, 1, h, w, device=device, low=0.5, high=1.0)]
    return AF.ham_spatial_apply, args, [0, 1, 3, 4], [0, 1, 3]


def ham_conv_case(device):
    n, _, h, w = SHAPE
    return AF.ham_spatial_conv, [rand(2 * n, 2, h, w, device=device), rand(1, 2, 3, 3, device=device)], [0, 1], [0]


def nonlocal_case(device):
    n, _, h, w = SHAPE
    d, dv = 2, 3
    args = [rand(n, d, h, w, device=device), rand(n, d, h, w, device=device), rand(n, dv, h, w, device=device),
            rand(n, dv, h, w, device=device), torch.tensor([0.7], dtype=F64, device=device)]
    return AF.nonlocal_attn, args, [0, 1, 2, 3, 4], [0, 1, 2, 3]


def gam_channel_case(device):
    c, rd = SHAPE[1], 3
    args = [rand(*SHAPE, device=device), rand(rd, c, device=device), rand(rd, device=device),
            rand(c, rd, device=device), rand(c, device=device)]
    return AF.gam_channel, args, [0, 1, 2, 3, 4], [0]


def softmax_spatial_case(rescale: bool):
    """One map per pair of channels (g = C/2 needs C even; else g = 1) and its bias; a special
    value in x spreads over its sample, one in the weight over the whole batch."""

    def make(device):
        c = SHAPE[1]
        g = c // 2 if c % 2 == 0 else 1
        args = [rand(*SHAPE, device=device), rand(g, c, device=device), rand(g, device=device)]
        return (lambda *a: AF.softmax_spatial(*a, rescale)), args, [0, 1, 2], [0, 1]

    return make


def shuffle_conv_case(conv: str, epilogue: str):
    """GAM's second conv: relu(in_scale * s + in_shift) through the shuffle on load, then the
    raw output ("raw"), BN folded into the gate ("gate") or BN's batch statistics ("bn")."""

    def make(device):
        n, c_out, h, w = SHAPE
        c_in, g = 4, 2
        s = rand(n, c_in, h, w, device=device)
        # in_scale > 0 and in_shift around 0: the prologue's values fall on both sides of the ReLU.
        base = [s, rand(c_out, c_in // g, 3, 3, device=device), rand(c_out, device=device), g, g,
                rand(c_in, device=device, low=0.5, high=1.5), rand(c_in, device=device)]
        gate_x = rand(*SHAPE, device=device)
        diff = [0, 1, 2, 5, 6]
        if epilogue == "raw":
            return lambda *a: AF.shuffle_conv(*a, conv=conv), base, diff, [0, 5, 6]
        if epilogue == "gate":
            args = base + [gate_x, rand(c_out, device=device), rand(c_out, device=device)]
            return lambda *a: AF.shuffle_conv(*a, conv=conv), args, diff + [7, 8, 9], [0, 7]
        # gate_x keeps finite values here: with an infinite gate_x beside a finite z, the folded
        # BatchNorm's weight gradient (sum dpre*z - mean * sum dpre) * rstd is inf - inf = NaN
        # where BatchNorm's own, sum dpre*(z - mean) * rstd, is infinite (GAM never gets there:
        # its z is non-finite wherever its gate_x is).
        args = base + [gate_x, rand(c_out, device=device, low=0.5, high=1.5), rand(c_out, device=device)]
        return (lambda *a: AF.shuffle_conv_bn_gate(*a, 1e-5, conv)[0]), args, diff + [7, 8, 9], [0, 5, 6]

    return make


OP_CASES = {
    "channel_pool": lambda d: (AF.channel_pool, [rand(*SHAPE, device=d)], [0], [0]),
    "channel_gate-avg": channel_gate_case("avg"),
    "channel_gate-max": channel_gate_case("max"),
    "channel_gate-mix": channel_gate_case("mix"),
    "channel_rescale": lambda d: (AF.channel_rescale, [rand(*SHAPE, device=d), rand(*SHAPE[:2], device=d)], [0, 1],
                                  [0, 1]),
    "channel_attention": lambda d: ((lambda *a: AF.channel_attention(*a, mode="avg")),
                                    [rand(*SHAPE, device=d), rand(1, 1, 3, device=d)], [0, 1], [0]),
    "channel_mlp_attention": mlp_case,
    "ham_spatial_pool": ham_pool_case,
    "ham_spatial_apply": ham_apply_case,
    "ham_spatial_conv": ham_conv_case,
    "nonlocal_attn": nonlocal_case,
    "gam_channel": gam_channel_case,
    "softmax_spatial-rescale": softmax_spatial_case(True),
    "softmax_spatial-plain": softmax_spatial_case(False),
    **{f"shuffle_conv-{conv}-{epi}": shuffle_conv_case(conv, epi)
       for conv in ("direct", "library") for epi in ("raw", "gate", "bn")},
}

#: Ops with a kernel of the C++ CPU backend only (elsewhere they run the reference's torch op).
CPU_ONLY = {"ham_spatial_conv"}


def op_params() -> list:
    """(backend, device, case) for every op case a backend has a kernel for."""
    return [pytest.param(*b.values, case, id=f"{b.id}-{case}", marks=b.marks)
            for b in BACKENDS for case in OP_CASES if case not in CPU_ONLY or b.values[0] == "cpu"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend_name,device,case", op_params())
def test_op_special_values(backend_name, device, case, kind) -> None:
    """Each op with a special value in each of its main inputs (one at a time): its outputs
    and the gradients of all its inputs match the reference backend's."""
    fn, args, differentiable, targets = OP_CASES[case](device)
    special = []
    for target in targets:
        poisoned = list(args)
        poisoned[target] = poison(args[target], kind)
        try:
            special.append(assert_op_matches_reference(fn, poisoned, differentiable, backend_name,
                                                       reference_device(case, device)))
        except AssertionError as err:
            raise AssertionError(f"special values in arg {target}: {err}") from None
    assert any(special), "no target gave the reference a non-finite result: the case tests nothing"


# ----------------------------------------------------------------------------------------
# Fused modules against the reference modules
# ----------------------------------------------------------------------------------------
CHANNELS = 16
MODULE_SHAPE = (2, CHANNELS, 4, 5)

#: name -> (fused class, constructor kwargs, GAM's conv algorithm or None).
MODULES = {
    "se": (N.SE, {}, None),
    "eca": (N.ECA, {}, None),
    "ham": (N.HAM, {}, None),
    "pam": (N.PAM, {}, None),
    "csm": (N.CSM, {}, None),
    "gam-direct": (N.GAM, {"reduction": 4}, "direct"),
    "gam-library": (N.GAM, {"reduction": 4}, "library"),
    "gam_gc-direct": (N.GAM, {"reduction": 4, "groups": 4}, "direct"),
    "gam_gc-library": (N.GAM, {"reduction": 4, "groups": 4}, "library"),
    "softmax_spatial": (N.SoftmaxSpatial, {}, None),
    "softmax_spatial-g4": (N.SoftmaxSpatial, {"groups": 4, "rescale": False}, None),
    "bridge": (N.Bridge, helpers.module_kwargs("bridge", CHANNELS), None),  # maps from x: FeedsBridges
}


def module_pair(name: str, device: str, train: bool):
    """(fused, reference): the same random weights and running statistics, in `train` mode."""
    cls, kwargs, conv = MODULES[name]
    f, ref = helpers.fused_pair(cls, N.reference_class(cls), CHANNELS, dtype=F64, device=device, **kwargs)
    if conv is not None:
        f.conv_algorithm = conv
    return f.train(train), ref.train(train)


def reference_output(ref: torch.nn.Module, x: torch.Tensor, reference_on: torch.device) -> torch.Tensor:
    """ref(x), a copy of ref run on `reference_on`, the result on x's device."""
    return copy.deepcopy(ref).to(reference_on)(x.to(reference_on)).to(x.device)


def assert_module_matches(f, ref, x: torch.Tensor, backend_name: str, reference_on: torch.device | str = "cpu") -> None:
    """Output, the gradients of x and of every parameter, and the BatchNorm buffers afterwards;
    the reference module runs on `reference_on`."""
    g = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(7))
    ref = copy.deepcopy(ref).to(reference_on)
    y_r, grads_r = helpers.forward_backward(ref, x.to(reference_on), g.to(reference_on))
    y_r, *grads_r = on_device([y_r, *grads_r], x.device)
    y_f, grads_f = helpers.forward_backward(f, x, g.to(x.device), backend_name)
    names = ["y", "grad x"] + [f"grad {n}" for n, _ in ref.named_parameters()]
    assert_same_special_values([y_f, *grads_f], [y_r, *grads_r], names)
    buffers = {name: b.to(x.device) for name, b in ref.named_buffers()}
    assert_same_special_values([b for _, b in f.named_buffers()], list(buffers.values()), list(buffers))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("backend_name,device", BACKENDS)
def test_module_special_values_in_x(backend_name, device, name, kind, train) -> None:
    """Each fused module with special values in x: output, every gradient and the running
    statistics match the reference module's (in training a non-finite x poisons the batch
    statistics, and so every output: the fused module must be NaN everywhere too)."""
    f, ref = module_pair(name, device, train)
    x = poison(torch.randn(MODULE_SHAPE, dtype=F64), kind).to(device)
    with torch.no_grad():
        assert not torch.isfinite(copy.deepcopy(ref)(x)).all(), "the case has no special value in the output"
    assert_module_matches(f, ref, x, backend_name, reference_device(name, device))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("backend_name,device", BACKENDS)
def test_module_inference_special_values(backend_name, device, name, kind) -> None:
    """Inference (eval mode, no autograd), where some backends run other kernels (the C++ CPU
    backend: HAM's per-sample ham_attention, GAM's conv with BN folded into its epilogue)."""
    f, ref = module_pair(name, device, train=False)
    x = poison(torch.randn(MODULE_SHAPE, dtype=F64), kind).to(device)
    with torch.no_grad():
        want = reference_output(ref, x, reference_device(name, device))
        with backend.use_backend(backend_name):
            got = f(x)
    assert not torch.isfinite(want).all()
    assert_same_special_values([got], [want], ["y"])


#: (module, parameter or buffer, value, train): special values in the weights and state.
PARAMETER_CASES = [
    ("ham", "bn.running_mean", NAN, False),
    ("ham", "bn.running_var", INF, False),
    ("ham", "alpha", INF, True),
    ("ham", "spatial_conv.weight", NAN, True),
    ("se", "fc1.bias", NAN, True),
    ("pam", "gamma", NAN, True),
    ("pam", "query.bias", INF, True),
    ("gam-library", "bn1.running_mean", NAN, False),
    ("gam-direct", "bn1.running_mean", NAN, False),
    ("gam-direct", "bn2.running_mean", NAN, False),
    ("gam_gc-direct", "fc1.bias", NAN, False),
    ("gam-library", "bn1.running_var", INF, False),
    ("softmax_spatial-g4", "conv.bias", INF, True),
    ("softmax_spatial", "conv.weight", NAN, False),
    ("bridge", "attn.bn.2.running_mean", NAN, False),  # x's BN, folded into the per-sample op
    ("bridge", "attn.bn.0.running_var", INF, False),  # a bridge's BN: its term of b1
    ("bridge", "attn.proj.2.weight", INF, True),
]


def set_entry(module: torch.nn.Module, name: str, value: float) -> None:
    """Entry 0 of the parameter or buffer `name` of module set to value."""
    t = module.get_parameter(name) if name in dict(module.named_parameters()) else module.get_buffer(name)
    with torch.no_grad():
        t.view(-1)[0] = value


@pytest.mark.parametrize("name,entry,value,train", PARAMETER_CASES,
                         ids=[f"{n}-{e}-{v}-{'train' if t else 'eval'}" for n, e, v, t in PARAMETER_CASES])
@pytest.mark.parametrize("backend_name,device", BACKENDS)
def test_module_special_values_in_state(backend_name, device, name, entry, value, train) -> None:
    """A special value in a parameter or a BatchNorm running statistic: training (or eval with
    autograd) and inference both match the reference."""
    f, ref = module_pair(name, device, train)
    set_entry(f, entry, value)
    set_entry(ref, entry, value)
    x = torch.randn(MODULE_SHAPE, dtype=F64).to(device)
    assert_module_matches(copy.deepcopy(f), copy.deepcopy(ref), x, backend_name, reference_device(name, device))
    if not train:
        with torch.no_grad():
            want = reference_output(ref, x, reference_device(name, device))
            with backend.use_backend(backend_name):
                got = f(x)
        assert_same_special_values([got], [want], ["inference y"])


@pytest.mark.parametrize("backend_name,device", BACKENDS)
def test_nonlocal_attn_query_with_every_energy_minus_inf(backend_name, device) -> None:
    """A query whose energies are all -inf (q = +inf in a channel where every key is negative):
    torch's softmax row is 0/0 = NaN, so that query's output and every gradient summing over
    the row (all of grad_v and grad_k) are NaN. Before, the CPU backward took that row's P as 0
    and gave a finite grad_v."""
    n, d, dv, h, w = 2, 2, 3, 3, 4
    q, k = rand(n, d, h, w, device=device), rand(n, d, h, w, device=device)
    k[:, 0] = -(k[:, 0].abs() + 0.5)  # every key negative in channel 0 ...
    q[1, 0, 2, 1] = INF  # ... so sample 1's query (2, 1) has S = -inf against all of them
    args = [q, k, rand(n, dv, h, w, device=device), rand(n, dv, h, w, device=device),
            torch.tensor([0.7], dtype=F64, device=device)]
    assert assert_op_matches_reference(AF.nonlocal_attn, args, [0, 1, 2, 3, 4], backend_name)
    _, grads = run_op(AF.nonlocal_attn, args, [2], "reference")
    assert grads[0][1].isnan().all() and not grads[0][0].isnan().any()  # what the case is about


# ----------------------------------------------------------------------------------------
# Underflow: PAM's gamma starts at 0
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name,device", BACKENDS)
def test_nonlocal_attn_half_gradients_scale_with_small_gamma(backend_name, device) -> None:
    """Every gradient of q, k, v is linear in gamma: at gamma = 2^-10 (PAM early in training)
    it is exactly 2^-10 times the one at gamma = 1 but for the rounding of the (then partly
    subnormal) fp16 result. Kernels that round dS to fp16/bf16 for a matmul must apply gamma
    after it, to the accumulated gradient: gamma * dS would fall into fp16's subnormals and
    lose its low digits (docs/contract.md "PAM")."""
    n, d, dv, h, w = 1, 2, 16, 8, 8
    q, k = (torch.randn(n, d, h, w, dtype=F64).to(device, torch.float16) for _ in range(2))
    v, x, grad_y = (torch.randn(n, dv, h, w, dtype=F64).to(device, torch.float16) for _ in range(3))
    scale = 2.0**-10  # a power of two: scaling by it is exact until the result is subnormal

    def grads(gamma: float) -> list[torch.Tensor]:
        inputs = [helpers.leaf(t, True) for t in (q, k, v)]
        g = torch.tensor([gamma], dtype=torch.float16, device=device)
        with backend.use_backend(backend_name):
            y = AF.nonlocal_attn(*inputs, x, g)
        return [t.double() for t in torch.autograd.grad(y, inputs, grad_y)]

    # The small result's own rounding: at most half fp16's subnormal spacing 2^-24, times 1/scale.
    bound = 2.0**-25 / scale
    for name, small, unit in zip(["grad_q", "grad_k", "grad_v"], grads(scale), grads(1.0), strict=True):
        err = (small / scale - unit).abs().max().item()
        assert err <= bound, (name, err, bound)
