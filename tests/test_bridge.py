"""Fused Bridge (BA-Net) against the reference module, and channel_mlp_attention's per-sample b1.

Backends: the C++ kernels (`cpu`), Triton under the interpreter (`triton`, tiny shapes: its
channel_pool and channel_rescale kernels, the per-sample op as its composite), the plain-PyTorch
`reference` path, and on a GPU CUDA and Triton. Training runs channel_pool on every map and
channel_rescale; eval folds x's BatchNorm1d and runs channel_mlp_attention with b1 (N, rd).
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    assert_error_like_eager,
    rounding_floor,
    assert_keeps_reference_interface,
    assert_layout_of,
    backend_cases,
    fused_pair,
    leaf,
    load_ops,
    make_input,
    needs_gpu,
    randomize,
)

import attnkernels
from attnkernels import backend, models
from attnkernels import functional as AF
from attnkernels import nn as fused
from attnkernels import reference as R
from attnkernels.nn import bridge as fused_bridge
from attnkernels.nn._fused import CACHE_ATTRIBUTE

CASES = backend_cases(cpu=("cpu", "triton", "reference"), cuda=("cuda", "triton", "reference"))

# (x shape, bridge maps as (C_i, H_i, W_i)): bridges larger, smaller and of x's own size.
SMALL = ((3, 24, 7, 5), [(12, 9, 7), (5, 3, 4), (24, 7, 5)])
TINY = ((2, 6, 3, 4), [(4, 5, 3), (3, 2, 2)])  # the interpreter runs Triton in Python
LAYOUTS = ["nchw", "channels_last", "sliced"]
REDUCTION = 4


def case_for(backend_name: str, device: str):
    return TINY if backend_name == "triton" and device == "cpu" else SMALL


def pair(shape, bridge_shapes, dtype, device, train: bool):
    """(fused, reference) Bridges with the same random weights and running stats."""
    f, r = fused_pair(fused.Bridge, R.Bridge, shape[1], dtype=dtype, device=device,
                      bridge_channels=[c for c, _, _ in bridge_shapes], reduction=REDUCTION, feed_bridges=False)
    return f.train(train), r.train(train)


def inputs(shape, bridge_shapes, layout: str, dtype, device, n: int | None = None):
    """x and its bridge maps (each in `layout`), with batch size n (default shape[0])."""
    n = shape[0] if n is None else n
    x = make_input((n, *shape[1:]), layout, dtype, device)
    return x, [make_input((n, *s), layout, dtype, device) for s in bridge_shapes]


def run(module, x, bridges, g, backend_name=None, grad: bool = True):
    """Output, then the gradients of x, of every bridge and of every parameter (with grad)."""
    module.zero_grad(set_to_none=True)
    ins = [t.detach().requires_grad_(grad) for t in (x, *bridges)]  # aliases: strides kept
    with backend.use_backend(backend_name), torch.set_grad_enabled(grad):
        y = module(*ins)
    if not grad:
        return [y]
    y.backward(g)
    return [y.detach()] + [t.grad for t in ins] + [p.grad for p in module.parameters()]


def tolerance(dtype, scale: float = 1.0):
    """fp64 checks the math; fp32 is looser than tests/helpers' because BatchNorm1d over 3
    samples amplifies a last-bit difference of the pooled means (channel_pool's summation
    order is not torch.mean's) in the parameter gradients. atol is at the result's `scale`
    (its largest magnitude, at least 1): those differences grow with it, and which elements
    they hit moves with the summation order (the thread count)."""
    return {"rtol": 1e-12, "atol": 1e-12 * scale} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5 * scale}


def scale_of(t: torch.Tensor) -> float:
    """The largest finite magnitude of t, at least 1."""
    finite = t[torch.isfinite(t)] if t.is_floating_point() else t.new_zeros(0)
    return max(1.0, finite.abs().max().item()) if finite.numel() else 1.0


def assert_same(got, want, dtype, **kw):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **tolerance(dtype, scale_of(b)), **kw, msg=lambda m, i=i: f"result {i}: {m}")


def assert_same_state(f, r, dtype):
    """Same buffers: BatchNorm1d's running stats and batch counts moved alike."""
    for key, value in r.state_dict().items():
        torch.testing.assert_close(f.state_dict()[key], value, **tolerance(dtype), msg=lambda m, key=key: f"{key}: {m}")


# ----------------------------------------------------------------------------------------
# Fused module against reference
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_matches_reference(backend_name, device, dtype, layout) -> None:
    """Output, grads of x, every bridge and every parameter; running stats after two steps."""
    shape, bridge_shapes = case_for(backend_name, device)
    f, r = pair(shape, bridge_shapes, dtype, device, train=True)
    for _ in range(2):
        x, bridges = inputs(shape, bridge_shapes, layout, dtype, device)
        g = torch.randn(shape, dtype=dtype, device=device)
        got = run(f, x, bridges, g, backend_name)
        assert_same(got, run(r, x, bridges, g), dtype)
        assert_layout_of(got[0], x)
    assert_same_state(f, r, dtype)


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_matches_reference(backend_name, device, grad, n, layout) -> None:
    """Eval, with autograd (grads through the folded BN and the per-sample b1) and without."""
    shape, bridge_shapes = case_for(backend_name, device)
    dtype = torch.float64
    f, r = pair(shape, bridge_shapes, dtype, device, train=False)
    x, bridges = inputs(shape, bridge_shapes, layout, dtype, device, n)
    g = torch.randn(x.shape, dtype=dtype, device=device)
    got = run(f, x, bridges, g, backend_name, grad)
    assert_same(got, run(r, x, bridges, g, grad=grad), dtype)
    assert_layout_of(got[0], x)
    assert_same_state(f, r, dtype)  # eval leaves the buffers alone


class RecordingOps:
    """A channel_gate op namespace that records the b1 shape of each channel_mlp_attention call."""

    def __init__(self, ops, calls: list) -> None:
        self.ops, self.calls = ops, calls

    def channel_mlp_attention(self, *args):
        self.calls.append(("op", args[2].shape))
        return self.ops.channel_mlp_attention(*args)


@pytest.mark.parametrize("mode", ["train", "eval_grad", "eval_no_grad"])
def test_eval_runs_the_per_sample_op(monkeypatch, mode) -> None:
    """Eval goes through one channel_mlp_attention call with b1 (N, rd) (x read once on the C++
    backend): the public function while autograd records, the backend's op without it (the
    module's own choice measured it against eager). Training never does (x's BatchNorm1d
    needs the whole batch's pooled maps first)."""
    calls = []
    real_function, real_ops = AF.channel_mlp_attention, fused_bridge.channel_gate_ops
    monkeypatch.setattr(fused_bridge.AF, "channel_mlp_attention",
                        lambda *a: calls.append(("function", a[2].shape)) or real_function(*a))
    monkeypatch.setattr(fused_bridge, "channel_gate_ops", lambda device: RecordingOps(real_ops(device), calls))
    shape, bridge_shapes = SMALL
    f, r = pair(shape, bridge_shapes, torch.float32, "cpu", train=mode == "train")
    x, bridges = inputs(shape, bridge_shapes, "nchw", torch.float32, "cpu")
    with torch.set_grad_enabled(mode == "eval_grad"), backend.use_backend("cpu"):
        torch.testing.assert_close(f(x, *bridges), r(x, *bridges), **tolerance(torch.float32))
    b1_shape = (shape[0], shape[1] // REDUCTION)
    assert calls == {"train": [], "eval_grad": [("function", b1_shape)], "eval_no_grad": [("op", b1_shape)]}[mode]


def change_in_place(m) -> None:
    with torch.no_grad():
        m.bn[0].running_var.mul_(1.5)
        m.proj[-1].weight.add_(0.25)


def optimizer_step(m) -> None:
    for p in m.parameters():
        p.grad = torch.full_like(p, 0.1)
    torch.optim.SGD(m.parameters(), lr=0.5).step()


def load_other_state(m) -> None:
    torch.manual_seed(7)  # the same state for the fused and the reference module
    m.load_state_dict(randomize(R.Bridge(m.channels, m.bridge_channels, REDUCTION)).double().state_dict())


def assign_data(m) -> None:
    m.bn[1].weight.data = m.bn[1].weight.data * 2  # new storage, same version counter


def change_eps(m) -> None:
    m.bn[0].eps = 0.25  # an attribute, not a tensor


def training_step(m) -> None:
    torch.manual_seed(7)  # the same batch for the fused and the reference module
    x, bridges = inputs(*SMALL, "nchw", torch.float64, "cpu")
    m.train()(x, *bridges)  # moves every running stat
    m.eval()


@pytest.mark.parametrize("change", [change_in_place, optimizer_step, load_other_state, assign_data, change_eps, training_step])
def test_eval_fold_is_kept_until_a_weight_or_stat_changes(monkeypatch, change) -> None:
    """Without autograd the folded weights are computed once and kept; a change to a weight or
    running stat made in any of the usual ways is seen, and the output stays the reference's.
    A forward with autograd after the cache is filled still differentiates the weights."""
    folds = []
    real = fused_bridge.Bridge.folded_weights
    monkeypatch.setattr(fused_bridge.Bridge, "folded_weights", lambda self, acc: folds.append(acc) or real(self, acc))
    shape, bridge_shapes = SMALL
    f, r = pair(shape, bridge_shapes, torch.float64, "cpu", train=False)
    x, bridges = inputs(shape, bridge_shapes, "nchw", torch.float64, "cpu")

    def folds_over_two_calls() -> int:
        folds.clear()
        for _ in range(2):
            with torch.no_grad(), backend.use_backend("cpu"):
                torch.testing.assert_close(f(x, *bridges), r(x, *bridges), **tolerance(torch.float64))
        return len(folds)

    assert folds_over_two_calls() == 1
    assert folds_over_two_calls() == 0
    change(f), change(r)
    assert folds_over_two_calls() == 1
    g = torch.randn(shape, dtype=torch.float64)
    assert_same(run(f, x, bridges, g, "cpu"), run(r, x, bridges, g), torch.float64)


def test_eval_fold_follows_a_dtype_change() -> None:
    """`module.float()` swaps every tensor's storage (keeping version counters): the next
    forward folds the float32 weights."""
    shape, bridge_shapes = SMALL
    f, r = pair(shape, bridge_shapes, torch.float64, "cpu", train=False)
    for dtype in (torch.float64, torch.float32):
        f, r = f.to(dtype), r.to(dtype)
        x, bridges = inputs(shape, bridge_shapes, "nchw", dtype, "cpu")
        with torch.no_grad(), backend.use_backend("cpu"):
            torch.testing.assert_close(f(x, *bridges), r(x, *bridges), **tolerance(dtype))


def test_eval_fold_of_inference_mode_weights() -> None:
    """Weights made under torch.inference_mode have no version counter: the fold is then
    computed on every call, not kept, and a change is still seen."""
    shape, bridge_shapes = SMALL
    with torch.inference_mode():
        f, r = pair(shape, bridge_shapes, torch.float64, "cpu", train=False)
        x, bridges = inputs(shape, bridge_shapes, "nchw", torch.float64, "cpu")
        for _ in range(2):
            with backend.use_backend("cpu"):
                torch.testing.assert_close(f(x, *bridges), r(x, *bridges), **tolerance(torch.float64))
            change_in_place(f), change_in_place(r)
    assert "_folded_weights" not in f.__dict__.get(CACHE_ATTRIBUTE, {})


def test_unfuse_drops_the_fold_cache() -> None:
    """A fused Bridge unfused after an eval call keeps no cache of the fold (the reference
    class never reads it), and fused again it folds afresh."""
    shape, bridge_shapes = SMALL
    f, r = pair(shape, bridge_shapes, torch.float64, "cpu", train=False)
    x, bridges = inputs(shape, bridge_shapes, "nchw", torch.float64, "cpu")
    with torch.no_grad(), backend.use_backend("cpu"):
        f(x, *bridges)
        assert "_folded_weights" in f.__dict__[CACHE_ATTRIBUTE]  # the cache this test is about
        plain = attnkernels.unfuse(f)
        assert CACHE_ATTRIBUTE not in plain.__dict__
        change_in_place(plain), change_in_place(r)
        again = attnkernels.fuse(plain)
        torch.testing.assert_close(again(x, *bridges), r(x, *bridges), **tolerance(torch.float64))


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_zero_bridges(backend_name, device, train) -> None:
    """Bridge(C) with no bridge maps: x's term alone (eval: b1 is the fold's shared shift)."""
    shape = case_for(backend_name, device)[0]
    f, r = pair(shape, [], torch.float64, device, train)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    g = torch.randn_like(x)
    assert_same(run(f, x, [], g, backend_name), run(r, x, [], g), torch.float64)
    assert_same_state(f, r, torch.float64)


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("where", ["x", "bridge"])
def test_nan_makes_its_sample_nan_in_eval(backend_name, device, where) -> None:
    """A NaN in x[1] or in a bridge's sample 1 makes all of y[1] NaN (its row of u is NaN),
    the other samples finite, as the reference; in training the batch statistics carry it
    to every sample, as the reference's BatchNorm1d does."""
    shape, bridge_shapes = case_for(backend_name, device)
    for train in (False, True):
        f, r = pair(shape, bridge_shapes, torch.float64, device, train)
        x, bridges = inputs(shape, bridge_shapes, "nchw", torch.float64, device)
        (x if where == "x" else bridges[0])[1, 0, 1, 1] = float("nan")
        got, want = run(f, x, bridges, None, backend_name, grad=False), run(r, x, bridges, None, grad=False)
        assert_same(got, want, torch.float64, equal_nan=True)
        assert torch.isnan(want[0][1]).all()
        if not train:
            assert torch.isfinite(want[0][0]).all()


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gradcheck(backend_name, device, train) -> None:
    """Finite differences in float64, with respect to x and every bridge map."""
    shape, bridge_shapes = TINY
    f, _ = pair(shape, bridge_shapes, torch.float64, device, train)
    x, bridges = inputs(shape, bridge_shapes, "nchw", torch.float64, device)
    ins = [t.requires_grad_() for t in (x, *bridges)]

    def forward(*ts):
        with backend.use_backend(backend_name):
            return f(*ts)

    assert torch.autograd.gradcheck(forward, ins, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_backward_saves_no_full_size_intermediate(train) -> None:
    """Autograd keeps x and the bridge maps themselves (inputs, alive anyway) and (N, C) or
    weight-sized maps only (eval: the folded weights): no full-size intermediate, no copy of
    an input. A saved tensor counts when it is larger than every parameter together and at
    least as large as some input."""
    shape, bridge_shapes = SMALL
    f, _ = pair(shape, bridge_shapes, torch.float32, "cpu", train)
    x, bridges = inputs(shape, bridge_shapes, "channels_last", torch.float32, "cpu")
    ins = [t.requires_grad_() for t in (x, *bridges)]
    smallest = max(min(t.numel() for t in ins), sum(p.numel() for p in f.parameters()) + 1)
    assert smallest < x.numel()
    saved = []

    def pack(t):
        if t.numel() >= smallest:
            saved.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), backend.use_backend("cpu"):
        f(*ins)
    assert saved and set(saved) <= {t.untyped_storage().data_ptr() for t in ins}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_compile_fullgraph_on_cpu(train, layout) -> None:
    """torch.compile(fullgraph=True): no graph break, the eager fused module's numbers."""
    shape, bridge_shapes = SMALL
    f, _ = pair(shape, bridge_shapes, torch.float32, "cpu", train)
    eager_f = copy.deepcopy(f)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    x, bridges = inputs(shape, bridge_shapes, layout, torch.float32, "cpu")
    g = torch.randn(shape)
    with backend.use_backend("cpu"):
        assert_same(run(compiled, x, bridges, g), run(eager_f, x, bridges, g), torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, *bridges), eager_f(x, *bridges), **tolerance(torch.float32))


def test_eval_trace_replays_at_other_map_sizes() -> None:
    """A torch.jit.trace of the eval forward, replayed with bridges of other sizes, computes
    their means anew (the fold's bridges' terms hold no 1/(H*W) of the traced size)."""
    shape, bridge_shapes = SMALL
    f, r = pair(shape, bridge_shapes, torch.float64, "cpu", train=False)
    x, bridges = inputs(shape, bridge_shapes, "nchw", torch.float64, "cpu")
    with backend.use_backend("cpu"), torch.no_grad():
        traced = torch.jit.trace(f, (x, *bridges), check_trace=False)
        other = [torch.randn(t.shape[0], t.shape[1], t.shape[2] + 2, t.shape[3] + 1, dtype=torch.float64) for t in bridges]
        torch.testing.assert_close(traced(x, *other), r(x, *other), **tolerance(torch.float64))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_half_precision_error_like_eager(device, dtype, train) -> None:
    """In fp16/bf16 every result's error against the fp64 reference is at most twice the
    eager same-precision module's plus two roundings at its scale (helpers.rounding_floor)."""
    shape, bridge_shapes = (4, 96, 14, 14), [(48, 28, 28), (96, 14, 14)]
    f, r = pair(shape, bridge_shapes, torch.float64, device, train)
    x, bridges = inputs(shape, bridge_shapes, "nchw", torch.float64, device)
    g = torch.randn(shape, dtype=torch.float64, device=device)
    exact = run(r, x, bridges, g)
    low_in = [t.to(dtype) for t in (x, *bridges)]
    low = run(copy.deepcopy(f).to(dtype), low_in[0], low_in[1:], g.to(dtype))
    eager = run(copy.deepcopy(r).to(dtype), low_in[0], low_in[1:], g.to(dtype))
    assert_error_like_eager(low, eager, exact, floor=rounding_floor(dtype))


def test_keeps_reference_interface() -> None:
    assert_keeps_reference_interface(fused.Bridge(64), R.Bridge(64))
    f, r = fused.Bridge(64, [32, 16]), R.Bridge(64, [32, 16])
    assert f.state_dict().keys() == r.state_dict().keys()
    with pytest.raises(ValueError, match=r"Bridge: expected 2 bridge maps"):
        f(torch.randn(2, 64, 4, 4), torch.randn(2, 32, 4, 4))


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_fuse_swaps_the_bridges_of_a_model(name) -> None:
    """attnkernels.fuse swaps every Bridge of a models.*(attention="bridge") network, and the
    fused network gives the reference's output, training step and eval, bridges fed by the blocks."""
    # float64: BatchNorm over a few values (N = 4 at 1x1 late stages) amplifies rounding a lot.
    ref = models.__dict__[name](num_classes=5, attention="bridge").double()
    model = attnkernels.fuse(copy.deepcopy(ref), backend="cpu")
    bridges = [m for m in model.modules() if isinstance(m, R.Bridge)]
    assert bridges and all(type(m) is fused.Bridge for m in bridges)
    assert any(m.bridge_channels for m in bridges)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    for train in (True, False):
        ref.train(train), model.train(train)
        torch.manual_seed(1)  # the same dropout masks for both (MobileNetV2's classifier)
        y = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(y, ref(x), rtol=1e-9, atol=1e-9)
    for key, value in ref.state_dict().items():  # every BatchNorm's running stats alike
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-9, atol=1e-9, msg=lambda m, key=key: f"{key}: {m}")


# ----------------------------------------------------------------------------------------
# channel_mlp_attention with a per-sample b1 (N, rd)
# ----------------------------------------------------------------------------------------
def mlp_formula(x, w1, b1, w2, b2):
    """docs: y = x * sigmoid(w2 @ relu(w1 @ mean_hw(x) + b1) + b2), b1 (rd,) or (N, rd)."""
    rd, c = w1.shape[0], x.shape[1]
    h = torch.relu(x.mean((2, 3)) @ w1.reshape(rd, c).T + b1)
    return x * torch.sigmoid(h @ w2.reshape(c, rd).T + b2)[:, :, None, None]


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_mlp_attention_per_sample_b1(backend_name, device, threads, n) -> None:
    """Output and every gradient (b1's per sample) against the formula; one thread runs the
    CPU per-sample kernel at every n, two threads its three-pass fallback at n = 1."""
    shape = (n, 7, 3, 5)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    w1, b1 = torch.randn(3, 7, dtype=torch.float64, device=device), torch.randn(n, 3, dtype=torch.float64, device=device)
    w2, b2 = torch.randn(7, 3, dtype=torch.float64, device=device), torch.randn(7, dtype=torch.float64, device=device)
    g = torch.randn(shape, dtype=torch.float64, device=device)
    ins = [leaf(t, True) for t in (x, w1, b1, w2, b2)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with backend.use_backend(backend_name):
            y = AF.channel_mlp_attention(*ins)
        got = [y.detach(), *torch.autograd.grad(y, ins, g)]
    finally:
        torch.set_num_threads(before)
    y_want = mlp_formula(*ins)
    assert_same(got, [y_want.detach(), *torch.autograd.grad(y_want, ins, g)], torch.float64)


def test_mlp_attention_per_sample_b1_gradcheck_and_opcheck(compiled_ops) -> None:
    x = torch.randn(3, 5, 2, 3, dtype=torch.float64, requires_grad=True)
    w1, b1 = torch.randn(2, 5, 1, 1, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    w2 = torch.randn(5, 2, 1, 1, dtype=torch.float64)
    params = [t.requires_grad_() for t in (w1, b1, w2)]
    with backend.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda *t: AF.channel_mlp_attention(t[0], t[1], t[2], t[3], None),
                                        (x, *params), eps=1e-6, atol=1e-7)
    op = compiled_ops.channel_mlp_attention.default
    torch.library.opcheck(op, (leaf(x, True), leaf(w1, True), leaf(b1, True), leaf(w2, True), None))
    torch.library.opcheck(op, (leaf(x).contiguous(memory_format=torch.channels_last), leaf(w1), leaf(b1), leaf(w2), None))


@pytest.mark.parametrize("backend_name", ["cpu", "triton", "reference"])
def test_mlp_attention_b1_shape_errors(backend_name) -> None:
    """A b1 neither rd values nor (N, rd) is refused in the same words on every backend."""
    x, w1, w2 = torch.randn(2, 6, 4, 4), torch.randn(3, 6), torch.randn(6, 3)
    calls = [lambda b1: AF.channel_mlp_attention(x, w1, b1, w2, None)]
    if backend_name != "reference":
        ns = load_ops(backend_name, "channel_gate")
        calls.append(lambda b1: ns.channel_mlp_attention(x, w1, b1, w2, None))
    for call in calls:
        for b1 in (torch.randn(3, 2), torch.randn(4), torch.randn(3, 3)):
            with backend.use_backend(backend_name), pytest.raises(
                ValueError, match=r"channel_mlp_attention: b1 must hold rd = 3 values or be \(N, rd\) = \(2, 3\)"
            ):
                call(b1)
