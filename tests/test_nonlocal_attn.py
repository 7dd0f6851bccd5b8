"""nonlocal_attn and the fused PAM / CSM on the C++ / CUDA / reference backends, against the references.

The op is checked through `attnkernels.functional.nonlocal_attn` (fused backend vs the
reference path, which materialises the attention as the reference PAM does) and through the
modules (fused PAM / CSM vs reference PAM / CSM, every parameter gradient). Triton under the
interpreter has its own file (tests/test_nonlocal_attn_triton.py, tiny shapes); on a GPU the
CUDA and Triton backends run here. Only CUDA cases skip, on machines without a GPU.
"""
from __future__ import annotations

import pytest
import torch
from helpers import (
    COMPILED_BACKENDS,
    LAYOUTS,
    assert_all_close,
    assert_bitwise_equal,
    assert_error_like_eager,
    assert_error_like_eager_over_seeds,
    rounding_floor,
    assert_keeps_reference_interface,
    assert_layout_of,
    assert_matches,
    backend_cases,
    compiled_and_eager,
    flat,
    forward_backward,
    fused_pair,
    load_compiled_ops,
    make_input,
    needs_gpu,
    on_backend,
    op_forward_backward,
    randomize,
    seeded_low_precision_runs,
    without_reference,
)

from attnkernels import backend, choose
from attnkernels import functional as AF
from attnkernels import nn as fused
from attnkernels import reference as R
from attnkernels.ops import nonlocal_attn as nonlocal_attn_ops
from attnkernels.ops._common import backend_ops
from attnkernels.profiling import peak_memory

CASES = backend_cases(cpu=("cpu", "reference"), cuda=("cuda", "triton", "reference"))
# (N, D_qk, D_v, H, W): HW not a multiple of any tile (and above the CPU forward's 512-key
# tile, so the online softmax rescales), HW = 1, D_qk = 1, D_v != D_qk, N = 1.
OP_SHAPES = [(2, 3, 5, 7, 9), (1, 1, 4, 1, 1), (2, 8, 64, 23, 29), (1, 2, 6, 3, 5), (3, 4, 24, 4, 4)]
MODULES = {"pam": (fused.PAM, R.PAM), "csm": (fused.CSM, R.CSM)}
MODULE_SHAPES = [(2, 32, 5, 7), (1, 16, 1, 1), (2, 40, 9, 6)]


def op_inputs(shape: tuple, layout: str, dtype: torch.dtype, device: str, scale: float = 1.0):
    """Random q, k, v, x in `layout`, and gamma != 0. `scale` spreads the energies (q^T k)."""
    n, d_qk, d_v, h, w = shape
    q = make_input((n, d_qk, h, w), layout, dtype, device) * scale
    k = make_input((n, d_qk, h, w), layout, dtype, device)
    v = make_input((n, d_v, h, w), layout, dtype, device)
    x = make_input((n, d_v, h, w), layout, dtype, device)
    gamma = torch.tensor([0.7], dtype=dtype, device=device)
    return [t.detach().requires_grad_() for t in (q, k, v, x, gamma)]


def attn_forward_backward(inputs, grad_y: torch.Tensor, backend_name: str):
    return op_forward_backward(AF.nonlocal_attn, inputs, grad_y, backend_name)


def op_tolerance(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("shape", OP_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_op_matches_reference(backend_name, device, shape, dtype, layout) -> None:
    """Forward and the gradients of q, k, v, x and gamma, against the materialised attention."""
    inputs = op_inputs(shape, layout, dtype, device, scale=2.0)
    grad_y = torch.randn_like(inputs[3])
    y, grads = attn_forward_backward(inputs, grad_y, backend_name)
    y_ref, grads_ref = attn_forward_backward(inputs, grad_y, "reference")
    tol = op_tolerance(dtype)
    torch.testing.assert_close(y, y_ref, **tol)
    assert_all_close(grads, grads_ref, [f"grad_{name}" for name in "q k v x gamma".split()], **tol)
    assert_layout_of(y, inputs[3])


@pytest.mark.parametrize("backend_name,device", CASES)
def test_op_mixed_layouts(backend_name, device) -> None:
    """q, k, v and x each in its own layout (channel slices of one conv output included)."""
    n, d_qk, d_v, h, w = 2, 4, 12, 6, 7
    qkv = torch.randn(n, 2 * d_qk + d_v, h, w, dtype=torch.float64, device=device)
    q, k = qkv[:, :d_qk], qkv[:, d_qk : 2 * d_qk].contiguous(memory_format=torch.channels_last)
    v = qkv.contiguous(memory_format=torch.channels_last)[:, 2 * d_qk :]
    x = make_input((n, d_v, h, w), "sliced", torch.float64, device)
    gamma = torch.tensor([-1.3], dtype=torch.float64, device=device)
    inputs = [t.detach().requires_grad_() for t in (q, k, v, x, gamma)]
    grad_y = torch.randn(n, d_v, h, w, dtype=torch.float64, device=device)
    y, grads = attn_forward_backward(inputs, grad_y, backend_name)
    y_ref, grads_ref = attn_forward_backward(inputs, grad_y, "reference")
    torch.testing.assert_close(y, y_ref, **op_tolerance(torch.float64))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, **op_tolerance(torch.float64))


@pytest.mark.parametrize("backend_name,device", CASES)
def test_op_large_energies(backend_name, device) -> None:
    """Energies of several hundred: the online softmax's max shifts must keep exp finite."""
    inputs = op_inputs((2, 6, 10, 13, 45), "nchw", torch.float32, device, scale=12.0)
    grad_y = torch.randn_like(inputs[3])
    y, grads = attn_forward_backward(inputs, grad_y, backend_name)
    y64, grads64 = attn_forward_backward([t.detach().double().requires_grad_() for t in inputs], grad_y.double(), "reference")
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(y.double(), y64, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend_name,device", CASES)
def test_op_propagates_nan(backend_name, device) -> None:
    """A NaN in one key's features poisons every query's softmax, as torch.softmax does;
    a NaN in one value channel poisons only that channel of out."""
    q, k, v, x, gamma = (t.detach() for t in op_inputs((1, 3, 5, 4, 6), "nchw", torch.float32, device))
    k_nan = k.clone()
    k_nan[0, 1, 2, 3] = float("nan")
    with backend.use_backend(backend_name):
        y = AF.nonlocal_attn(q, k_nan, v, x, gamma)
    assert torch.isnan(y).all()
    v_nan = v.clone()
    v_nan[0, 2, 1, 1] = float("nan")
    with backend.use_backend(backend_name):
        y = AF.nonlocal_attn(q, k, v_nan, x, gamma)
    assert torch.isnan(y[:, 2]).all() and not torch.isnan(y[:, [0, 1, 3, 4]]).any()


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("k_row", [(-float("inf"), 0.249), (-0.5, 0.249)], ids=["k_neg_inf", "k_finite"])
def test_infinite_energy_gives_torchs_lse(backend_name, device, k_row) -> None:
    """An energy of +inf (q = inf against k > 0): lse is +inf there, as torch.logsumexp's (not
    inf - inf = NaN), and the backward's P of that row is NaN, as torch.softmax's row (not
    exp(S - inf) = 0 at its finite energies): y, out, lse and every gradient are the
    Reference's, NaN where its are (H = 1, W = 2: hypothesis's case, and one with finite k)."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64, device=device).reshape(1, 1, 1, len(v))  # noqa: E731
    inputs = [a.requires_grad_() for a in (t(1.541, float("inf")), t(*k_row), t(-0.72, 0.33), t(0.1, 0.2),
                                           torch.tensor([0.41], dtype=torch.float64, device=device))]
    got, want = nonlocal_attn_outputs(inputs, backend_name), nonlocal_attn_outputs(inputs, "reference")
    assert got[2][0, 1].item() == float("inf") and torch.isfinite(got[2][0, 0])
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, **op_tolerance(torch.float64), equal_nan=True)
    grad_y = t(1.0, -0.5)
    y, grads = attn_forward_backward(inputs, grad_y, backend_name)
    y_ref, grads_ref = attn_forward_backward(inputs, grad_y, "reference")
    torch.testing.assert_close(y, y_ref, **op_tolerance(torch.float64), equal_nan=True)
    for got_g, want_g in zip(grads, grads_ref):
        torch.testing.assert_close(got_g, want_g, **op_tolerance(torch.float64), equal_nan=True)
    assert torch.isnan(grads[2]).all()  # grad_v: the +inf row's P is NaN at every key


def nonlocal_attn_outputs(inputs, backend_name: str) -> tuple[torch.Tensor, ...]:
    """The op's (y, out, lse) on the backend."""
    x = inputs[3]
    with torch.no_grad(), backend.use_backend(backend_name):
        ops = backend_ops(nonlocal_attn_ops.HOT_PATH, x.device, nonlocal_attn_ops.Reference)
        return ops.nonlocal_attn(*inputs)


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("shape", MODULE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_module_matches_reference(backend_name, device, name, shape, dtype, layout) -> None:
    """Fused PAM / CSM vs the reference: output and the gradients of x and every parameter
    (query, key, value convs, gamma; CSM's SE too), gamma != 0."""
    f, ref = fused_pair(*MODULES[name], shape[1], dtype=dtype, device=device)
    x = make_input(shape, layout, dtype, device)
    g = torch.randn(shape, dtype=dtype, device=device)
    got = forward_backward(f, x, g, backend_name)
    want = forward_backward(ref, x, g)
    if dtype == torch.float64:
        assert_matches(got, want, dtype)
    else:  # an H*W-term softmax sum in fp32: a little looser than the pointwise modules
        for a, b in zip(flat(got), flat(want)):
            torch.testing.assert_close(a, b, **op_tolerance(dtype))


@pytest.mark.parametrize("backend_name,device", CASES)
def test_gradcheck(backend_name, device) -> None:
    """fp64 gradcheck of the op through autograd (q, k, v, x, gamma), on a small odd shape."""
    inputs = op_inputs((2, 3, 5, 3, 5), "nchw", torch.float64, device)
    assert torch.autograd.gradcheck(on_backend(AF.nonlocal_attn, backend_name), inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend_name,device", without_reference(CASES))
def test_deterministic(backend_name, device) -> None:
    inputs = op_inputs((2, 8, 48, 19, 27), "nchw", torch.float32, device, scale=2.0)
    grad_y = torch.randn_like(inputs[3])
    assert_bitwise_equal(attn_forward_backward(inputs, grad_y, backend_name),
                         attn_forward_backward(inputs, grad_y, backend_name))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(MODULES))
def test_half_precision_error_like_eager(device, dtype, name) -> None:
    """In fp16/bf16 the fused module's error against an fp64 reference is no worse than twice
    the eager same-precision module's (flash-attention's criterion), plus a small floor; errors
    summed over 4 seeds (CSM's SE gradients sum noise over the whole map: one seed is one draw)."""
    shape = (2, 64, 12, 12)
    runs = []
    for seed in range(4):
        names, exact, low, eager = seeded_low_precision_runs(*MODULES[name], shape, dtype, device, seed)
        # softmax over keys ignores q_i . key.bias (the same for every key j): its exact gradient
        # is 0, and what each low-precision path returns is rounding noise.
        noise = [i for i, n in enumerate(names) if n.endswith("key.bias")]
        assert all(exact[i].abs().max().item() < 1e-9 for i in noise)
        keep = [i for i in range(len(names)) if i not in noise]
        runs.append(tuple([t[i] for i in keep] for t in (low, eager, exact)))
    assert_error_like_eager_over_seeds(runs, floor=max(1e-3, rounding_floor(dtype)), names=[names[i] for i in keep])


# The GPU kernels' tensor-core path (fp16/bf16 tl.dot / mma): key counts that are not a
# multiple of any tile (100 = 10x10, 137 = 1x137), head sizes the block choice treats apart
# (D_qk 16 and 128 = C/8 at C = 128 and 1024; D_v 64 and 160, not a power of two).
TENSOR_CORE_SHAPES = [(2, 16, 64, 10, 10), (1, 128, 160, 1, 137), (2, 64, 64, 10, 10)]


@needs_gpu
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
@pytest.mark.parametrize("shape", TENSOR_CORE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_tensor_core_path_error_like_eager(backend_name, shape, dtype, layout) -> None:
    """fp16/bf16 forward and every gradient against fp64: no worse than twice the error of the
    reference path (the materialised attention) in the same precision, plus a small floor.
    scripts/gpu_check.sh runs this first after the build: it is the riskiest GPU code."""
    truth_inputs = op_inputs(shape, layout, torch.float64, "cuda", scale=0.5)
    grad_y = make_input(tuple(truth_inputs[3].shape), layout, torch.float64, "cuda")
    exact = flat(attn_forward_backward(truth_inputs, grad_y, "reference"))
    low_inputs = [t.detach().to(dtype).requires_grad_() for t in truth_inputs]
    low = flat(attn_forward_backward(low_inputs, grad_y.to(dtype), backend_name))
    eager = flat(attn_forward_backward(low_inputs, grad_y.to(dtype), "reference"))
    assert_error_like_eager(low, eager, exact, floor=2e-3, names=["y", "q", "k", "v", "x", "gamma"])


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_compile_fullgraph_on_cpu(name, layout) -> None:
    """torch.compile(fullgraph=True) over the fused module: no graph break, same numbers."""
    f, _ = fused_pair(*MODULES[name], 24, dtype=torch.float32, device="cpu")
    got, eager = compiled_and_eager(f, layout)
    for a, b in zip(flat(got), flat(eager)):  # inductor reorders the convs' sums
        torch.testing.assert_close(a, b, **op_tolerance(torch.float32))


def _op_samples():
    """Inputs per op; backward ops get inputs that do not require grad (no double backward)."""
    q, k, v, x, gamma = (t.detach() for t in op_inputs((2, 3, 5, 4, 3), "nchw", torch.float64, "cpu"))
    _, out, lse = load_compiled_ops().nonlocal_attn(q, k, v, x, gamma)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (q, k, v, x)]
    return {
        "nonlocal_attn": [
            tuple(t.clone().requires_grad_() for t in (q, k, v, x, gamma)),
            (*cl, gamma.clone().requires_grad_()),
            (*(t.clone().requires_grad_() for t in (q, k, v, x, gamma)), 4),
        ],
        "nonlocal_attn_backward": [(torch.randn_like(x), q, k, v, gamma, out, lse),
                                   (torch.randn_like(x), q, k, v, gamma, out, lse, 5)],
    }


@pytest.mark.parametrize("op_name", ["nonlocal_attn", "nonlocal_attn_backward"])
def test_opcheck(op_name, compiled_ops) -> None:
    """Schema, fake implementation, autograd registration and AOT dispatch of each C++ op."""
    op = getattr(compiled_ops, op_name).default
    for args in _op_samples()[op_name]:
        torch.library.opcheck(op, args)


def test_fused_pam_allocates_far_less_than_one_attention_matrix() -> None:
    """N=2, C=64, 64x64 on CPU: forward + backward of the fused PAM peaks far below one
    (HW x HW) fp32 matrix (64 MiB); the reference holds several. Allocations are measured
    (the profiler's allocator events), with one thread so every allocation is on the
    profiled thread."""
    hw_matrix = (64 * 64) ** 2 * 4
    ref = randomize(R.PAM(64))
    f = fused.PAM(64)
    f.load_state_dict(ref.state_dict())
    x = torch.randn(2, 64, 64, 64, requires_grad=True)
    g = torch.randn_like(x)

    def step(module, backend_name):
        def run():
            with backend.use_backend(backend_name):
                module(x).backward(g)

        return run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step(f, "cpu")()  # build and warm up outside the measurement
        fused_peak = peak_memory(step(f, "cpu"), "cpu")
        reference_peak = peak_memory(step(ref, "reference"), "cpu")
    finally:
        torch.set_num_threads(threads)
    assert reference_peak > 2 * hw_matrix  # the measurement sees the reference's matrices
    assert fused_peak < hw_matrix / 4, (fused_peak, hw_matrix)


@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_op_input_errors(backend_name, compiled_ops) -> None:
    """The C++/CUDA ops name the argument and what they expected."""
    device = "cuda" if backend_name == "cuda" else "cpu"
    op = compiled_ops.nonlocal_attn
    q, k, v, x, gamma = (t.detach() for t in op_inputs((2, 3, 5, 4, 3), "nchw", torch.float32, device))
    with pytest.raises(ValueError, match=r"nonlocal_attn: x must be 4-D"):
        op(q, k, v, x[0], gamma)
    with pytest.raises(ValueError, match=r"nonlocal_attn: k must have q's shape"):
        op(q, k[:, :2], v, x, gamma)
    with pytest.raises(ValueError, match=r"nonlocal_attn: v must have x's shape"):
        op(q, k, v[:, :4], x, gamma)
    with pytest.raises(ValueError, match=r"nonlocal_attn: q must have shape \(N, D_qk, H, W\)"):
        op(q[:, :, :3], k, v, x, gamma)
    with pytest.raises(TypeError, match=r"nonlocal_attn: q must have x's dtype"):
        op(q.double(), k, v, x, gamma)
    with pytest.raises(ValueError, match=r"nonlocal_attn: gamma must hold one value"):
        op(q, k, v, x, torch.ones(2, device=device))
    with pytest.raises(ValueError, match=r"nonlocal_attn: cpu_tile must be 0 \(the default tile\) or 1 to 1024 "
                                         r"pixels, got -1"):
        op(q, k, v, x, gamma, -1)
    with pytest.raises(ValueError, match=r"nonlocal_attn: cpu_tile must be 0 .* got 1025"):
        op(q, k, v, x, gamma, 1025)
    _, out, lse = op(q, k, v, x, gamma)
    with pytest.raises(ValueError, match=r"nonlocal_attn_backward: cpu_tile must be 0 .* got -32"):
        compiled_ops.nonlocal_attn_backward(torch.randn_like(x), q, k, v, gamma, out, lse, -32)
    with pytest.raises(ValueError, match=r"nonlocal_attn_backward: lse must have shape \(N, H\*W\)"):
        compiled_ops.nonlocal_attn_backward(torch.randn_like(x), q, k, v, gamma, out, lse[:, :5])
    with pytest.raises(ValueError, match=r"nonlocal_attn_backward: grad_y must match x's shape"):
        compiled_ops.nonlocal_attn_backward(torch.randn_like(x)[:1], q, k, v, gamma, out, lse)


def test_functional_argument_errors() -> None:
    q, k, v, x, gamma = (t.detach() for t in op_inputs((2, 3, 5, 4, 3), "nchw", torch.float32, "cpu"))
    with pytest.raises(ValueError, match=r"nonlocal_attn: k must have q's shape \(N, D_qk, H, W\) = \[2, 3, 4, 3\]"):
        AF.nonlocal_attn(q, k[:, :2], v, x, gamma)
    with pytest.raises(ValueError, match=r"nonlocal_attn: v must have x's shape \(N, D_v, H, W\) = \[2, 5, 4, 3\]"):
        AF.nonlocal_attn(q, k, v[:, :4], x, gamma)
    with pytest.raises(ValueError, match=r"nonlocal_attn: gamma must hold one value"):
        AF.nonlocal_attn(q, k, v, x, torch.ones(3))
    with pytest.raises(ValueError, match=r"nonlocal_attn: q must have shape \(N, D_qk, H, W\)"):
        AF.nonlocal_attn(q[0], k, v, x, gamma)


def test_fused_modules_keep_reference_interface() -> None:
    for fused_cls, ref_cls in MODULES.values():
        assert_keeps_reference_interface(fused_cls(64), ref_cls(64))
    csm = fused.CSM(32)
    assert type(csm.channel) is fused.SE and type(csm.spatial) is fused.PAM


@pytest.mark.parametrize("shape", [(2, 3, 5, 0, 4), (0, 3, 5, 4, 3)], ids=["no_pixels", "no_samples"])
@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
def test_empty_inputs_give_empty_results(shape, backend_name, compiled_ops) -> None:
    """H = 0 (forward) and N = 0 (backward) once crashed the CPU kernels (a division by zero
    while sizing their tiles): empty inputs give empty outputs and gradients, grad_gamma 0."""
    q, k, v, x, gamma = op_inputs(shape, "nchw", torch.float64, "cpu")
    with backend.use_backend(backend_name):
        y = AF.nonlocal_attn(q, k, v, x, gamma)
    assert y.shape == x.shape
    grads = torch.autograd.grad(y, (q, k, v, x, gamma), torch.ones_like(y))
    for t, g in zip((q, k, v, x, gamma), grads):
        assert g.shape == t.shape
    assert grads[4].item() == 0


# ----------------------------------------------------------------------------------------
# The CPU kernels' thread split (cpu_tile), chosen by measurement
# ----------------------------------------------------------------------------------------
def test_cpu_tile_rule() -> None:
    """Halve the kernels' default tile (256) until every thread has a task (two each
    forward), not below 32, at most H*W."""
    rule = nonlocal_attn_ops.cpu_tile_rule
    assert rule("forward", 4, 784, 2) == 256  # 4 samples x 4 tiles >= 2 x 2 threads
    assert rule("forward", 1, 784, 8) == 32  # 13 tasks at 64 < 16, 25 at 32
    assert rule("backward", 1, 784, 8) == 64  # 7 key blocks at 128 < 8, 13 at 64
    assert rule("forward", 1, 4096, 128) == 32  # 128 tasks < 256 wanted: the floor
    assert rule("backward", 2, 20, 1) == 20  # at most H*W


@pytest.mark.parametrize("cpu_tile", [0, 1, 7, 32, 100, 1000])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_every_cpu_tile_matches_the_reference(cpu_tile, layout, compiled_ops) -> None:
    """Any tile the chooser might pass cuts the work differently and gives the same math:
    forward and every gradient against the materialised attention (H*W = 667 takes several
    tiles of each size, with a ragged last one)."""
    q, k, v, x, gamma = (t.detach() for t in op_inputs((2, 8, 24, 23, 29), layout, torch.float64, "cpu", scale=2.0))
    grad_y = torch.randn_like(x)
    y, out, lse = compiled_ops.nonlocal_attn(q, k, v, x, gamma, cpu_tile)
    grads = compiled_ops.nonlocal_attn_backward(grad_y, q, k, v, gamma, out, lse, cpu_tile)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, x, gamma)]
    y_ref, grads_ref = attn_forward_backward(inputs, grad_y, "reference")
    tol = op_tolerance(torch.float64)
    torch.testing.assert_close(y, y_ref, **tol)
    assert_all_close(list(grads), [grads_ref[i] for i in (0, 1, 2, 4)], ["grad_q", "grad_k", "grad_v", "grad_gamma"],
                     **tol)


def test_cpu_tile_is_chosen_by_measurement(monkeypatch, compiled_ops) -> None:
    """On a fake clock that makes 64 the fastest forward tile and 32 the fastest backward one,
    the fused PAM's op runs with them (its results equal the op's with those tiles, and the
    reference's), explain() lists both choices, and a second call measures nothing."""
    fastest = {"forward": 64, "backward": 32}
    measured: list[tuple[str, int]] = []

    def fake_clock(site, value, run, device):
        direction = site.split(".")[1]
        measured.append((direction, value))
        run(value)  # the candidate runs, as it would be timed
        return 1e-3 if value == fastest[direction] else 1.0

    monkeypatch.setattr(choose, "measure_setting", fake_clock)
    q, k, v, x, gamma = op_inputs((1, 4, 6, 16, 16), "nchw", torch.float64, "cpu", scale=2.0)
    grad_y = torch.randn_like(x)
    with choose.mode("measure"), backend.use_backend("cpu"):
        y = AF.nonlocal_attn(q, k, v, x, gamma)
        grads = torch.autograd.grad(y, (q, k, v, gamma), grad_y)
        first = len(measured)
        AF.nonlocal_attn(q, k, v, x, gamma).backward(grad_y)
    assert {value for _, value in measured} == {256, 128, 64, 32} and len(measured) == first  # 512 capped at H*W = 256
    text = choose.explain()
    assert "nonlocal_attn.forward.cpu_tile [float64 1 4 6 16 16 nchw nchw" in text and ": 64 (measured" in text
    assert "nonlocal_attn.backward.cpu_tile [" in text and ": 32 (measured" in text
    assert {(c.site, c.winner) for c in choose.made()} == {("nonlocal_attn.forward.cpu_tile", "64"),
                                                          ("nonlocal_attn.backward.cpu_tile", "32")}
    plain = [t.detach() for t in (q, k, v, x, gamma)]
    want_y, out, lse = compiled_ops.nonlocal_attn(*plain, 64)
    want_grads = compiled_ops.nonlocal_attn_backward(grad_y, *plain[:3], plain[4], out, lse, 32)
    assert_bitwise_equal([y.detach(), *grads], [want_y, *(want_grads[i] for i in (0, 1, 2, 3))])
    y_ref, grads_ref = attn_forward_backward([t.clone().requires_grad_() for t in plain], grad_y, "reference")
    torch.testing.assert_close(y.detach(), y_ref, **op_tolerance(torch.float64))


def test_cpu_tile_static_mode_and_other_backends_measure_nothing(monkeypatch) -> None:
    """Static mode passes the rule's tile; the reference backend gets 0; neither measures."""
    monkeypatch.setattr(choose, "measure_setting", lambda *a: pytest.fail("measured"))
    q, k, v, x, gamma = (t.detach() for t in op_inputs((1, 4, 6, 16, 16), "nchw", torch.float32, "cpu"))
    seen = []
    with choose.mode("static"):
        assert nonlocal_attn_ops.cpu_tile("forward", torch.ops.attnkernels, q, x, seen.append) == \
            nonlocal_attn_ops.cpu_tile_rule("forward", 1, 256, torch.get_num_threads())
    with choose.mode("measure"):
        assert nonlocal_attn_ops.cpu_tile("forward", nonlocal_attn_ops.Reference, q, x, seen.append) == 0
    assert seen == []


def test_cpu_tiles_benchmark_reports_each_direction(capsys) -> None:
    """benchmarks/cpu_tiles.py measures for real on a tiny shape and prints the rule, the
    winner and every candidate's time for both directions."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "cpu_tiles.py"
    spec = importlib.util.spec_from_file_location("cpu_tiles", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--shapes", "2x16x5x7"]) == 0
    rows = [line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.startswith("2x16x5x7")]
    assert [row[0] for row in rows] == ["forward", "backward"]
    threads = torch.get_num_threads()
    for direction, rule, winner, *times in rows:  # H*W = 35: every tile above it is 35
        assert rule == str(nonlocal_attn_ops.cpu_tile_rule(direction, 2, 35, threads))
        assert times[0::2][0] == rule and sorted(times[0::2]) == ["32", "35"] and winner in ("32", "35")
