"""Every fused module under `torch.autocast` against the reference module under the same autocast.

Autocast runs the reference modules' convs and linears in the autocast dtype (bf16 / fp16)
while their elementwise ops promote back to x's dtype. The fused modules run their ops with
autocast off (`attnkernels.nn._fused.without_autocast`): in x's dtype, accumulating in
acc(x). Each fused module must return the reference's output dtype and gradients of the
reference's dtypes, with an error against the fp64 truth (the same weights, fp64 input, no
autocast) no worse than the reference-under-autocast's own: the output, the gradient of x
and of every parameter, training and eval, for an fp32 x (an fp32 model under autocast) and
for an x in the autocast dtype (the output of the autocast conv before the module in a
network, with fp32 parameters); eval without autograd too (the inference paths).

CPU bf16 on the cpu and reference backends, and the Triton backend in its interpreter; CUDA
fp16 and bf16 on the cuda, triton and reference backends on a GPU (scripts/gpu_check.sh runs
this file). torch.compile(fullgraph=True) over a fused module that enters autocast, on CPU.

Before the fix PAM and CSM raised TypeError under autocast (q, k, v from the autocast conv in
bf16 beside an fp32 x), GAM's gradients were several times the reference's error (its library
conv ran in bf16 forward and in fp32 in the backward that recomputes it), HAM on the reference
backend rounded its gates to bf16, and SE on CUDA ran into a TypeError (its composite's MLP
gate came out in fp16 where channel_rescale requires fp32; the same composite on the C++ CPU
ops raises it under CPU autocast).
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from helpers import (
    assert_all_close,
    module_kwargs,
    backend_cases,
    flat,
    forward_backward,
    fused_pair,
)
from test_ham_spatial import input_with_gate_margin
from torch import nn

from attnkernels import backend
from attnkernels import nn as fused
from attnkernels.nn import reference_class
from attnkernels.reference import GAM

#: Autocast dtypes per device: bf16 on CPU (fp16 autocast on CPU is rare and slow), both on CUDA.
AUTOCAST_DTYPES = {"cpu": (torch.bfloat16,), "cuda": (torch.float16, torch.bfloat16)}

#: Case name -> (fused class, constructor kwargs): every module of attnkernels.nn.FUSED with
#: helpers.module_kwargs (Bridge: two bridge maps, fed from x by helpers.FeedsBridges), and
#: GAM's "gc" variant (grouped convs with the channel shuffle). C = 32 below: GAM's rd = 4.
SHAPE = (4, 32, 12, 12)
MODULES = {name: (cls, module_kwargs(name, SHAPE[1])) for name, cls in fused.FUSED.items()}
MODULES["gam-gc"] = (fused.GAM, {"reduction": 8, "groups": 4})
#: Random draws (weights, x, grad_y) per case, whose errors are summed (see the assertion).
DRAWS = 4

#: HAM's top-k mask switches by a finite step when a channel crosses the boundary; the input
#: keeps a gate margin there of twice the largest gate error seen under bf16 autocast (4e-3:
#: the reference's bf16 conv1d and sigmoid), so no path's rounding moves a channel across it
#: and the error measures precision, not luck.
HAM_GATE_MARGIN = 8e-3
#: GAM's ReLU input keeps this distance from 0 (`keep_relu_off_its_kink`): five times the
#: largest error of bn1's output seen under bf16 autocast (0.1, in eval, where z1 reaches 25).
RELU_MARGIN = 0.5


def autocast_cases() -> list:
    """pytest params (backend_name, device, autocast dtype): cpu and reference on CPU in bf16;
    cuda, triton and reference on CUDA (marked needs_gpu) in fp16 and bf16."""
    cases = []
    for param in backend_cases(cpu=("cpu", "reference"), cuda=("cuda", "triton", "reference")):
        backend_name, device = param.values
        for dtype in AUTOCAST_DTYPES[device]:
            dtype_id = str(dtype).removeprefix("torch.")
            cases.append(pytest.param(backend_name, device, dtype, id=f"{param.id}-{dtype_id}", marks=param.marks))
    return cases


CASES = autocast_cases()


class Autocast(nn.Module):
    """`module` whose forward runs under `torch.autocast(device_type, dtype)`; the backward
    runs outside it, as in a training loop. Its parameters are `module`'s, in order."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(x)


@functools.lru_cache(maxsize=None)
def draw(name: str, device: str, x_dtype: torch.dtype, seed: int):
    """(fused, reference, x, grad_y) of draw `seed`: fp32 modules with the same random weights
    and running stats (in training mode), a random x in `x_dtype` and grad_y in x's dtype.
    For HAM, x's gate (as the fp64 module computes it from x's rounded values) has a margin
    of HAM_GATE_MARGIN at the top-k boundary; weights whose gate cannot spread that far are
    drawn again. Cached: HAM's draws take a while, and every backend and mode reuses them
    (callers copy the modules); its own generator state, so no test order changes a draw."""
    cls, kwargs = MODULES[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(10):
            f, ref = fused_pair(cls, reference_class(cls), SHAPE[1], dtype=torch.float32, device=device, **kwargs)
            x = ham_input(ref, x_dtype) if name == "ham" else torch.randn(SHAPE, device=device).to(x_dtype)
            if x is not None:
                return f, ref, x, torch.randn(SHAPE, device=device).to(x_dtype)
    raise AssertionError(f"no HAM weights and input with a gate margin of {HAM_GATE_MARGIN} in 10 draws")


def ham_input(ref: nn.Module, x_dtype: torch.dtype) -> torch.Tensor | None:
    """A random x in `x_dtype` whose gate keeps a margin of HAM_GATE_MARGIN at HAM's top-k
    boundary in every sample once rounded, or None if `ref`'s weights give none."""
    exact = copy.deepcopy(ref).double()
    device = next(ref.parameters()).device
    try:
        x = input_with_gate_margin(exact, SHAPE, 1.25 * HAM_GATE_MARGIN, device).to(x_dtype)
    except AssertionError:  # these weights spread the gate too little
        return None
    gate = exact.channel_attention(x.double()).sort(dim=1, descending=True).values
    return x if (gate[:, exact.c_im - 1] - gate[:, exact.c_im]).min() > HAM_GATE_MARGIN else None


def keep_relu_off_its_kink(f: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    """GAM: set bn1's bias (in both modules) so that `relu(bn1(conv1(x1)))` has its input at
    least RELU_MARGIN away from 0 everywhere in the fp64 truth, alternate channels all on or
    all off. With bf16 x the fused GAM's convs run in bf16 beside the reference's, and an
    input that rounds across the kink changes a gradient element by a finite step on either
    path, at random: the error would measure luck, not precision (as HAM's gate margin). The
    kink itself is checked in fp64 and fp32 (tests/test_gam.py)."""
    exact = copy.deepcopy(ref).double()
    pre = []  # bn1's output without its bias: what the bias shifts
    hook = exact.bn1.register_forward_hook(lambda bn, _, out: pre.append(out - bn.bias[:, None, None]))
    with torch.no_grad():
        exact(x.double())
    hook.remove()
    low, high = pre[0].amin(dim=(0, 2, 3)), pre[0].amax(dim=(0, 2, 3))
    on = torch.arange(low.numel(), device=low.device) % 2 == 0
    bias = torch.where(on, RELU_MARGIN - low, -RELU_MARGIN - high).float()
    with torch.no_grad():
        for m in (f, ref):
            m.bn1.bias.copy_(bias)


def build_case(name: str, device: str, train: bool, x_dtype: torch.dtype, seed: int):
    """Copies of `draw`'s modules in training or eval mode, and its x and grad_y; GAM's bn1
    bias keeps its ReLU off the kink in that mode (`keep_relu_off_its_kink`)."""
    f, ref, x, g = draw(name, device, x_dtype, seed)
    f, ref = copy.deepcopy(f).train(train), copy.deepcopy(ref).train(train)
    if isinstance(ref, GAM):
        keep_relu_off_its_kink(f, ref, x)
    return f, ref, x, g


def autocast_runs(f, ref, x, g, amp_dtype: torch.dtype, backend_name: str):
    """Flat [y, grad_x, *parameter grads] of: the fp64 reference on x's values without autocast
    (the truth), a copy of the fused module under autocast on `backend_name`, and a copy of the
    reference module under the same autocast."""
    device = x.device.type
    exact = forward_backward(copy.deepcopy(ref).double(), x.double(), g.double())
    got = forward_backward(Autocast(copy.deepcopy(f), device, amp_dtype), x, g, backend_name)
    want = forward_backward(Autocast(copy.deepcopy(ref), device, amp_dtype), x, g)
    return flat(exact), flat(got), flat(want)


def inference_runs(f, ref, x, amp_dtype: torch.dtype, backend_name: str):
    """[y] of the same three runs in inference: eval mode, no autograd (HAM's per-sample op on
    the CPU backend, GAM's BN2 folded into conv2's epilogue)."""
    device = x.device.type
    with torch.no_grad():
        exact = copy.deepcopy(ref).double()(x.double())
        with torch.autocast(device, dtype=amp_dtype):
            want = ref(x)
            with backend.use_backend(backend_name):
                got = f(x)
    return [exact], [got], [want]


def assert_like_reference_under_autocast(draws, names, amp_dtype: torch.dtype) -> None:
    """For each result (y and each gradient) over the (exact, fused, reference) `draws`: the
    fused result has the reference's dtype, and its largest error against the fp64 truth,
    summed over the draws, is at most twice the reference-under-autocast's plus two units of
    `amp_dtype` rounding at the truth's scale (flash-attention's criterion, as
    `assert_error_like_eager`, on sums).

    Why twice: the two paths round at different places. The fused ops keep their pooled maps,
    gates and attention in the accumulation dtype where the reference under autocast rounds
    them to bf16 / fp16, so the fused error is mostly far smaller; but given a bf16 x the fused
    GAM runs its 7x7 convs in bf16 as the reference does, and its error is then comparable.
    A factor 2 tolerates the scatter of comparable errors, while one more rounding in the
    autocast dtype at every element would exceed it. Why sums: one draw scatters. A gradient
    that is a sum with cancellation (a conv bias's) can come out nearly exact on one path by
    luck; summed over four draws the comparison held on 16 draws of every CPU case.
    (tests/test_gam.py sums over draws for the same reason.) The floor covers results whose
    reference error is zero by luck (e.g. a scalar gradient rounded the same way).

    Gradients whose truth is 0 (a conv bias followed by BatchNorm with batch statistics, PAM's
    key bias under the softmax) are rounding noise on every path; their floor takes the scale
    of the draw's largest gradient instead.
    """
    floor = 2 * torch.finfo(amp_dtype).eps
    totals = {name: [0.0, 0.0, 0.0] for name in names}
    for exact, got, want in draws:
        largest_grad = max(t.abs().max().item() for t in exact[1:]) if len(exact) > 1 else 0.0
        for name, truth, a, b in zip(names, exact, got, want, strict=True):
            assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
            scale = truth.abs().max().item()
            total = totals[name]
            total[0] += (a.double() - truth).abs().max().item()
            total[1] += (b.double() - truth).abs().max().item()
            total[2] += scale if scale > 1e-9 * max(largest_grad, 1.0) else largest_grad
    for name, (err_fused, err_ref, scale) in totals.items():
        assert err_fused <= 2 * err_ref + floor * scale, (name, err_fused, err_ref, scale)


def result_names(module: nn.Module) -> list[str]:
    """Names of the flat results: y, x's gradient, each parameter's gradient."""
    return ["y", "x", *(name for name, _ in module.named_parameters())]


def x_dtype_of(x_dtype: str, amp_dtype: torch.dtype) -> torch.dtype:
    """The input's dtype: fp32 (an fp32 model under autocast) or the autocast dtype (the output
    of the autocast layer before the module)."""
    return torch.float32 if x_dtype == "float32" else amp_dtype


@pytest.mark.parametrize("backend_name,device,amp_dtype", CASES)
@pytest.mark.parametrize("x_dtype", ["float32", "autocast"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(MODULES))
def test_training_step_like_reference(name, train, x_dtype, backend_name, device, amp_dtype) -> None:
    """Forward under autocast, backward outside: output and every gradient have the reference's
    dtypes and an error against fp64 no worse than the reference's (see the assertion's doc).
    Before the fix, PAM and CSM raised TypeError (q from the autocast conv in bf16, x fp32)."""
    draws = []
    for seed in range(DRAWS):
        f, ref, x, g = build_case(name, device, train, x_dtype_of(x_dtype, amp_dtype), seed)
        draws.append(autocast_runs(f, ref, x, g, amp_dtype, backend_name))
    assert_like_reference_under_autocast(draws, result_names(ref), amp_dtype)


@pytest.mark.parametrize("backend_name,device,amp_dtype", CASES)
@pytest.mark.parametrize("x_dtype", ["float32", "autocast"])
@pytest.mark.parametrize("name", list(MODULES))
def test_inference_like_reference(name, x_dtype, backend_name, device, amp_dtype) -> None:
    """Eval mode without autograd takes the inference paths: same dtype, error no worse."""
    draws = []
    for seed in range(DRAWS):
        f, ref, x, _ = build_case(name, device, False, x_dtype_of(x_dtype, amp_dtype), seed)
        draws.append(inference_runs(f, ref, x, amp_dtype, backend_name))
    assert_like_reference_under_autocast(draws, ["y"], amp_dtype)


@pytest.mark.parametrize("name", list(MODULES))
def test_triton_interpreter_training_step(name) -> None:
    """The Triton backend under CPU autocast, in its interpreter: its host code and the
    composites around its kernels run in x's dtype too (before the fix, GAM's library conv ran
    in bf16 forward and in fp32 in the backward that recomputes it: several times the
    reference's error). One draw, fp32 x, training: the interpreter is slow, and with an fp32 x
    the fused path is fp32 throughout, far from the bound. A GPU runs the matrix above on CUDA."""
    problem = backend.why_unavailable("triton", MODULES[name][0].hot_paths[0], "cpu")
    if problem is not None:
        pytest.skip(f"Triton on CPU: {problem}")
    f, ref, x, g = build_case(name, "cpu", True, torch.float32, 0)
    draws = [autocast_runs(f, ref, x, g, torch.bfloat16, "triton")]
    assert_like_reference_under_autocast(draws, result_names(ref), torch.bfloat16)


#: (module, torch.compile backend): aot_eager traces every module (dynamo and the ops' fakes
#: under autocast); inductor, a minute of compiling per module on CPU, PAM only.
COMPILE_CASES = [(name, "aot_eager") for name in MODULES] + [("pam", "inductor")]


@pytest.mark.parametrize("name,compiler", COMPILE_CASES)
def test_compile_with_autocast_inside(name, compiler) -> None:
    """torch.compile(fullgraph=True) of a fused module whose forward enters autocast, the
    training step: no graph break, and eager's numbers (for an fp32 x, fp32 throughout:
    `without_autocast` holds inside the graph too). The tolerance allows fp32 sums in another
    order (PAM's key weights' gradient, whose bias's is exactly 0, cancels to 1e-4 of it); a
    bf16 rounding leaking in would be 4e-3 of every result."""
    f, ref, x, g = build_case(name, "cpu", True, torch.float32, 0)
    wrapped = Autocast(f, "cpu", torch.bfloat16)
    torch._dynamo.reset()
    with backend.use_backend("cpu"):
        eager = flat(forward_backward(copy.deepcopy(wrapped), x, g))
        compiled = flat(forward_backward(torch.compile(copy.deepcopy(wrapped), backend=compiler, fullgraph=True), x, g))
    assert_all_close(compiled, eager, result_names(ref), rtol=1e-3, atol=1e-4)
