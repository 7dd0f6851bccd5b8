"""Tail-fused residual blocks (attnkernels.nn.block_tail: the block_tail ops, and the
spatial_tail ops for CBAM and HAM) against the unfused blocks of attnkernels.models: output,
every gradient and the BatchNorm buffers after a step, train and eval, fp64 and fp32, NCHW and
channels_last, identity and projection shortcuts, no attention, SE, ECA, CBAM and HAM;
fuse()/unfuse() of whole models; SGD steps of a CIFAR ResNet-20 with each attention; what
backward saves; BatchNorm's bookkeeping variants (a zero BatchNorm weight, as timm's
zero_init_last gives, included); NaN; bad gates; timm's ResNets (SE, ECA, CBAM, none).
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    assert_all_close,
    assert_layout_of,
    assert_steps_match,
    backend_cases,
    full_size_saved,
    training_step,
)

import attnkernels
from attnkernels import backend
from attnkernels.models import cifar_resnet, resnet
from attnkernels.models._blocks import attention_factory
from attnkernels.nn import block_tail as tail_blocks
from attnkernels.ops.block_tail import block_tail
from attnkernels.ops.spatial_tail import spatial_tail

CASES = backend_cases(cpu=("cpu", "reference"))
ATTENTIONS = [None, "se", "eca", "cbam", "ham"]
# (block, in_ch, out_ch, stride): identity shortcuts and 1x1-conv + BN projections.
BLOCKS = {
    "basic-identity": (resnet.BasicBlock, 16, 16, 1, {}),
    "basic-projection": (resnet.BasicBlock, 8, 16, 2, {}),
    "bottleneck-identity": (resnet.Bottleneck, 32, 32, 1, {"width": 8}),
    "bottleneck-projection": (resnet.Bottleneck, 16, 32, 2, {"width": 8}),
}


def randomize_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics (scale of either sign)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


def block_pair(kind: str, attention: str | None, dtype: torch.dtype):
    """An unfused block with random weights, and a deep copy of it fused by `attnkernels.fuse`."""
    cls, in_ch, out_ch, stride, kwargs = BLOCKS[kind]
    make_attn = attention_factory(attention, {"reduction": 4} if attention in ("se", "cbam") else None)
    ref = randomize_batch_norms(cls(in_ch, out_ch, stride, make_attn, **kwargs)).to(dtype)
    fused = attnkernels.fuse(copy.deepcopy(ref))
    assert type(fused) is tail_blocks.TAIL_FUSED[cls]
    return fused, ref


def assert_block_steps_match(got, want, dtype, truth, names) -> None:
    """Two `training_step` results agree: fp64 to 1e-10; fp32 to module tolerances, or, for a
    result outside them (a conv weight's gradient summed through BatchNorm's backward), as
    accurate against the fp64 `truth()` as eager fp32 (flash-attention's criterion)."""
    if dtype == torch.float64:
        assert_steps_match(got, want, dtype, names)
        return
    exact = truth()
    flat = lambda step: [step[0], *step[1], *step[2]]  # noqa: E731
    assert_all_close(flat(got), flat(want), ["y", *names, *(f"buffer {i}" for i in range(len(got[2])))],
                     truths=lambda: flat(exact), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("attention", ATTENTIONS, ids=str)
@pytest.mark.parametrize("kind", BLOCKS)
def test_tail_fused_block_matches_block(backend_name, device, layout, train, dtype, attention, kind) -> None:
    fused, ref = block_pair(kind, attention, dtype)
    fused.train(train), ref.train(train)
    in_ch = BLOCKS[kind][1]
    x = torch.randn(3, in_ch, 9, 7, dtype=dtype)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    fused, ref = fused.to(memory_format=memory_format), ref.to(memory_format=memory_format)
    x = x.contiguous(memory_format=memory_format)
    y_shape = ref(x).shape
    ref.load_state_dict(fused.state_dict())  # undo that call's running-statistics update
    g = torch.randn(y_shape, dtype=dtype).contiguous(memory_format=memory_format)
    truth_model = copy.deepcopy(ref).double()
    got = training_step(fused, x, g, backend_name)
    want = training_step(ref, x, g)
    assert_block_steps_match(got, want, dtype, lambda: training_step(truth_model, x.double(), g.double()),
                             ["x"] + [n for n, _ in ref.named_parameters()])
    assert_layout_of(got[0], x)
    assert got[0].abs().sum() > 0 and (got[0] == 0).any()  # the ReLU is live, and so is the rest


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("attention", ATTENTIONS, ids=str)
def test_sgd_steps_give_the_same_losses(backend_name, device, attention) -> None:
    """A few SGD steps of a CIFAR ResNet-20: the fused model follows the unfused one."""
    torch.manual_seed(0)
    ref = randomize_batch_norms(cifar_resnet.resnet20(attention=attention)).double()
    fused = attnkernels.fuse(copy.deepcopy(ref))
    images, labels = torch.randn(8, 3, 12, 12, dtype=torch.float64), torch.randint(0, 10, (8,))
    losses = {}
    for name, model in (("fused", fused), ("ref", ref)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses[name] = []
        for _ in range(4):
            opt.zero_grad()
            with backend.use_backend(backend_name if name == "fused" else None):
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(losses["fused"], losses["ref"], rtol=1e-9, atol=1e-12)
    assert losses["ref"][-1] != losses["ref"][0]
    for a, b in zip(fused.state_dict().values(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_fuse_reports_blocks_and_unfuse_restores_them() -> None:
    model = cifar_resnet.resnet20(attention="se")
    keys = list(model.state_dict())
    fused, rep = attnkernels.fuse(model, report=True)
    blocks = [m for m in fused.modules() if isinstance(m, resnet.BasicBlock)]
    assert len(blocks) == 9 and all(type(b) is tail_blocks.BasicBlock for b in blocks)
    swapped = {e.detail for e in rep.swapped}
    assert "attnkernels.nn.block_tail.BasicBlock" in swapped and "attnkernels.nn.se.SE" in swapped
    assert list(fused.state_dict()) == keys
    back, rep = attnkernels.unfuse(fused, report=True)
    assert all(type(m) is resnet.BasicBlock for m in back.modules() if isinstance(m, resnet.BasicBlock))
    assert len(rep.swapped) == 18 and list(back.state_dict()) == keys
    # tails=False fuses the attention modules only.
    kept = attnkernels.fuse(cifar_resnet.resnet20(attention="se"), tails=False)
    assert all(type(m) is resnet.BasicBlock for m in kept.modules() if isinstance(m, resnet.BasicBlock))


def test_blocks_with_other_attention_are_left_and_reported() -> None:
    model, rep = attnkernels.fuse(cifar_resnet.resnet20(attention="gam"), report=True)
    left = [e for e in rep.left if e.module == "attnkernels.models.resnet.BasicBlock"]
    assert len(left) == 9 and all("tail not fused: attention GAM" in e.detail for e in left)
    assert all(type(m) is resnet.BasicBlock for m in model.modules() if isinstance(m, resnet.BasicBlock))
    # Their attention modules are still fused.
    assert any(e.detail == "attnkernels.nn.gam.GAM" for e in rep.swapped)


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("attention", ["se", "cbam", "ham"])
def test_backward_saves_no_more_than_eager(backend_name, device, attention) -> None:
    fused, ref = block_pair("basic-identity", attention, torch.float32)
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    saved = len(full_size_saved(fused, x, backend_name))
    # The block's input, conv1's output and its ReLU's (for conv1, BatchNorm and conv2), then
    # z and the output of the tail, which eager's BatchNorm and ReLU save too. Eager also keeps
    # bn(z) and the gated maps for the gates' products: the fused tail keeps none of its own.
    assert saved == 5 and saved < len(full_size_saved(ref, x, None))


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("config", ["momentum-none", "no-running-stats", "no-affine"])
def test_batch_norm_configurations(backend_name, device, config) -> None:
    """nn.BatchNorm2d's other configurations: a cumulative average, no running statistics
    (batch statistics in eval too), no affine parameters."""
    fused, ref = block_pair("basic-identity", "eca", torch.float64)
    for model in (fused, ref):
        bn = model.conv2[1]
        if config == "momentum-none":
            bn.momentum = None
        elif config == "no-running-stats":
            bn.track_running_stats = False
            bn.running_mean = bn.running_var = bn.num_batches_tracked = None
        else:
            bn.weight = bn.bias = None
    for train in (True, False, True):
        fused.train(train), ref.train(train)
        x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
        g = torch.randn(2, 16, 5, 6, dtype=torch.float64)
        got, want = training_step(fused, x, g, backend_name), training_step(ref, x, g)
        assert_steps_match(got, want, torch.float64, ["x"] + [n for n, _ in ref.named_parameters()])


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("attention", ["se", "cbam", "ham"])
def test_zero_batch_norm_weight(backend_name, device, attention) -> None:
    """timm's zero_init_last: the last BatchNorm starts at weight 0 and bias 0, so bn(z) is 0
    everywhere and every maximum (over a plane, over channels) ties everywhere: the gradients of
    BatchNorm's parameters split among the ties as eager's torch.amax splits them."""
    fused, ref = block_pair("bottleneck-identity", attention, torch.float64)
    for model in (fused, ref):
        with torch.no_grad():
            model.conv3[1].weight.zero_(), model.conv3[1].bias.zero_()
    x = torch.randn(2, 32, 6, 5, dtype=torch.float64)
    g = torch.randn(2, 32, 6, 5, dtype=torch.float64)
    got, want = training_step(fused, x, g, backend_name), training_step(ref, x, g)
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    assert_steps_match(got, want, torch.float64, names)
    assert want[1][names.index("conv3.1.weight")].abs().sum() > 0  # the case is live


@pytest.mark.parametrize("backend_name,device", CASES)
def test_nan_propagates_as_in_eager(backend_name, device) -> None:
    fused, ref = block_pair("basic-identity", "se", torch.float64)
    fused.eval(), ref.eval()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    x[1, 3, 2, 2] = float("nan")
    with backend.use_backend(backend_name):
        got = fused(x)
    torch.testing.assert_close(got, ref(x), equal_nan=True)
    assert got[1].isnan().any() and not got[0].isnan().any()


def test_block_tail_checks_its_arguments() -> None:
    z, s = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match=r"block_tail: gate must return an \(N, C\) = \(2, 4\)"):
        block_tail(z, s, rm, rv, gate=lambda avg: avg[:, :2])
    with pytest.raises(ValueError, match="block_tail: shortcut must match x's shape"):
        block_tail(z, s[:, :3], rm, rv)
    with pytest.raises(ValueError, match=r"block_tail: running_mean must hold C = 4 values"):
        block_tail(z, s, torch.zeros(3), rv)
    with pytest.raises(ValueError, match="block_tail: running_mean and running_var are needed"):
        block_tail(z, s, None, None)
    with pytest.raises(ValueError, match="block_tail: expected more than 1 value per channel"):
        block_tail(z[:1, :, :1, :1], s[:1, :, :1, :1], rm, rv, training=True)
    with pytest.raises(ValueError, match="tail_gate: attention Triplet"):
        tail_blocks.tail_gate(attnkernels.reference.create("triplet", 8))


def test_spatial_tail_checks_its_arguments() -> None:
    z, s = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    rm, rv = torch.zeros(4), torch.ones(4)
    gates = {"channel_gate": lambda avg, max_: torch.sigmoid(avg + max_),
             "spatial_gate": lambda d: torch.sigmoid(d[:, :1] + d[:, 1:2])}
    with pytest.raises(ValueError, match=r"spatial_tail: important must be an int in \[1, C\] = \[1, 4\], got 5"):
        spatial_tail(z, s, rm, rv, important=5, **gates)
    with pytest.raises(ValueError, match=r"spatial_tail: channel_gate must return an \(N, C\) = \(2, 4\)"):
        spatial_tail(z, s, rm, rv, channel_gate=lambda avg, max_: avg[:, :2], spatial_gate=gates["spatial_gate"])
    with pytest.raises(ValueError, match=r"spatial_tail: spatial_gate must return an \(N, G, H, W\) = \(2, 2, 3, 3\)"):
        spatial_tail(z, s, rm, rv, important=2, **gates)
    with pytest.raises(ValueError, match="spatial_tail: shortcut must match x's shape"):
        spatial_tail(z, s[:, :3], rm, rv, **gates)
    with pytest.raises(ValueError, match="spatial_tail_gates: attention Triplet"):
        tail_blocks.spatial_tail_gates(attnkernels.reference.create("triplet", 8))
    with pytest.raises(ValueError, match="tail_gate: attention CBAM: only SE and ECA"):
        tail_blocks.tail_gate(attnkernels.reference.create("cbam", 8))


def test_unfused_tail_where_the_shortcut_dtype_differs() -> None:
    """Under autocast the shortcut can arrive in another dtype than z: the block runs its tail
    unfused, as eager does (promoting)."""
    fused, ref = block_pair("basic-identity", None, torch.float32)
    fused.eval(), ref.eval()
    x = torch.randn(2, 16, 5, 5)
    z = fused.conv2[0](fused.conv1(x)).to(torch.float64)
    want = torch.relu(ref.conv2[1].double()(z) + x)
    fused.conv2[1].double()
    torch.testing.assert_close(fused.tail(z, fused.conv2[1], None, x), want)


# --- timm's ResNets ------------------------------------------------------------------------


#: timm models by test id: (model name, create_model's keyword arguments).
TIMM_MODELS = {
    "seresnet50": ("seresnet50", {}),
    "ecaresnet50d": ("ecaresnet50d", {}),
    "resnet18": ("resnet18", {}),
    "cbam-resnet18": ("resnet18", {"block_args": {"attn_layer": "cbam"}}),
}


def timm_pair(name: str, **kwargs):
    """A timm model with random weights (BatchNorms too) in fp64, and a fused deep copy."""
    import timm

    torch.manual_seed(0)
    ref = randomize_batch_norms(timm.create_model(name, pretrained=False, num_classes=10, **kwargs)).double()
    fused, rep = attnkernels.fuse(copy.deepcopy(ref), report=True)
    return fused, ref, rep


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("model_id", TIMM_MODELS)
def test_timm_resnets_give_the_same_logits_and_gradients(backend_name, device, model_id) -> None:
    name, kwargs = TIMM_MODELS[model_id]
    fused, ref, rep = timm_pair(name, **kwargs)
    blocks = [e for e in rep.swapped if "block_tail.timm_" in e.detail]
    assert len(blocks) == (8 if name == "resnet18" else 16) and rep.left == []
    for train in (True, False):
        fused.train(train), ref.train(train)
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        g = torch.randn(2, 10, dtype=torch.float64)
        got, want = training_step(fused, x, g, backend_name), training_step(ref, x, g)
        assert_steps_match(got, want, torch.float64, ["x"] + [n for n, _ in ref.named_parameters()])
    back = attnkernels.unfuse(fused)
    assert {type(m) for m in back.modules()} == {type(m) for m in ref.modules()}
    assert list(back.state_dict()) == list(ref.state_dict())


def test_timm_blocks_with_drop_path_are_left_and_reported() -> None:
    fused, _, rep = timm_pair("resnet18", drop_path_rate=0.1)
    # timm's stochastic depth grows linearly from 0: the first block has none and is fused.
    left = [e for e in rep.left if e.module == "timm.models.resnet.BasicBlock"]
    assert len(left) == 7 and all("drop_path is on" in e.detail for e in left)
    assert [e.name for e in rep.swapped if "timm_" in e.detail] == ["layer1.0"]


def test_tail_fused_timm_model_pickles() -> None:
    """The timm classes are made on first use; pickle finds them by name."""
    import pickle

    fused, ref, _ = timm_pair("resnet18")
    back = pickle.loads(pickle.dumps(fused))
    assert type(back.layer1[0]) is type(fused.layer1[0]) and type(back.layer1[0]).__name__ == "BasicBlock"
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    fused.eval(), back.eval()
    with backend.use_backend("reference"):
        torch.testing.assert_close(back(x), fused(x))


def test_sync_batch_norm_keeps_the_tail_unfused() -> None:
    """SyncBatchNorm's statistics span processes: a block converted before `fuse` is left
    (reported), one converted after runs its tail unfused; both match the converted reference."""
    convert = torch.nn.SyncBatchNorm.convert_sync_batchnorm
    fused, ref = block_pair("basic-identity", "se", torch.float64)
    ref = convert(ref)
    after = convert(fused)
    before, rep = attnkernels.fuse(convert(copy.deepcopy(block_pair("basic-identity", "se", torch.float64)[1])),
                                   report=True)
    assert type(before) is resnet.BasicBlock
    assert any("its last norm is SyncBatchNorm" in e.detail for e in rep.left)
    before.load_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    for model in (after, before, ref):
        model.eval()
    want = ref(x)
    torch.testing.assert_close(after(x), want)
    torch.testing.assert_close(before(x), want)


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("attention", ["se", "cbam", "ham"])
def test_compiles_without_graph_breaks(backend_name, device, batch, attention) -> None:
    """torch.compile(fullgraph=True) traces the autograd Functions and the gates between them:
    the compiled tail-fused block matches the eager block, output and gradients (on torch
    2.11 too: no Function returns one of its forward's intermediates, ops._common.as_layout)."""
    torch._dynamo.reset()  # a fresh compile each case, not past the recompile limit
    fused, ref = block_pair("bottleneck-projection", attention, torch.float32)
    fused, ref = fused.to(device), ref.to(device)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(batch, 16, 8, 8, device=device)
    g = torch.randn(batch, 32, 4, 4, device=device)
    got, want = training_step(compiled, x, g, backend_name), training_step(ref, x, g)
    assert_steps_match(got, want, torch.float32, ["x"] + [n for n, _ in ref.named_parameters()])


@pytest.mark.parametrize("backend_name,device", CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("important", [None, 5])
def test_spatial_tail_compiles_right(backend_name, device, layout, dtype, batch, important) -> None:
    """Compiled, `spatial_tail` gives eager's output, gradients and running statistics, on
    every torch (2.11 included): no autograd Function returns one of its forward's
    intermediates, which torch 2.11's compile returns from the traced Function too, losing the
    output's gradient (a batch of 1 makes the pool's sum map contiguous as sliced; fp32 and
    fp64 make the reference apply's rounding a no-op)."""
    torch._dynamo.reset()  # a fresh compile of `tail` each case, not past the recompile limit
    torch.manual_seed(0)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    weight, bias = (torch.randn(8, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
    z, shortcut, g = (torch.randn(batch, 8, 5, 4, dtype=dtype, device=device).contiguous(memory_format=memory_format)
                      for _ in range(3))
    z.requires_grad_(), shortcut.requires_grad_()
    spatial_gate = ((lambda d: torch.sigmoid(d.sum(1, keepdim=True))) if important is None
                    else (lambda d: torch.sigmoid(d[:, 0::2] + d[:, 1::2])))

    def tail(z, shortcut, weight, bias, running_mean, running_var):
        return spatial_tail(z, shortcut, running_mean, running_var, weight, bias, True,
                            channel_gate=lambda avg, max_: torch.sigmoid(avg + max_),
                            spatial_gate=spatial_gate, important=important)

    def step(fn):
        running_mean, running_var = torch.zeros(8, dtype=dtype, device=device), torch.ones(8, dtype=dtype, device=device)
        with backend.use_backend(backend_name):
            y = fn(z, shortcut, weight, bias, running_mean, running_var)
            return (y, *torch.autograd.grad(y, (z, shortcut, weight, bias), g), running_mean, running_var)

    compiled = torch.compile(tail, fullgraph=True, backend="aot_eager")
    for got, want in zip(step(compiled), step(tail), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("winner", ["fused", "eager"])
@pytest.mark.parametrize("attention", ATTENTIONS, ids=str)
def test_tail_choice_whichever_wins_is_the_blocks_step(attention, winner, train, monkeypatch) -> None:
    """The tail measured against the unfused one (`pick_tail`, measure mode), each made the
    winner by a clock that runs the candidates as the real one does (on copies of bn and attn,
    forward and backward): the step's output, gradients and buffers are the unfused block's
    after exactly one step, so the measurement left no trace; explain() names the choice."""
    from attnkernels import choose

    def running_clock(name, fn, args, prepared):
        choose.forward_backward(fn, args)()
        return 1e-3 if name == winner else 1.0

    monkeypatch.setenv(choose.ENV_MODE, "measure")
    monkeypatch.setattr(choose, "measure_candidate", running_clock)
    choose.clear()
    try:
        fused, ref = block_pair("bottleneck-projection", attention, torch.float64)
        fused.train(train), ref.train(train)
        x = torch.randn(3, 16, 9, 7, dtype=torch.float64)
        g = torch.randn(3, 32, 5, 4, dtype=torch.float64)
        got = training_step(fused, x, g, "cpu")
        assert_steps_match(got, training_step(ref, x, g), torch.float64, ["x"] + [n for n, _ in ref.named_parameters()])
        assert f"Bottleneck tail [cpu float64 (3, 32, 5, 4)" in choose.explain()
        assert f": {winner} (measured" in choose.explain()
    finally:
        choose.clear()


def test_tail_choice_measured_for_real(monkeypatch) -> None:
    """On the real clock both tails are timed once, and the step is the unfused block's."""
    from attnkernels import choose

    monkeypatch.setenv(choose.ENV_MODE, "measure")
    choose.clear()
    try:
        fused, ref = block_pair("basic-identity", "se", torch.float64)
        x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
        g = torch.randn(2, 16, 6, 5, dtype=torch.float64)
        got = training_step(fused, x, g, "cpu")
        assert_steps_match(got, training_step(ref, x, g), torch.float64, ["x"] + [n for n, _ in ref.named_parameters()])
        lines = [line for line in choose.explain().splitlines() if "BasicBlock tail [" in line]
        assert len(lines) == 1 and "measured: fused " in lines[0] and ", eager " in lines[0], choose.explain()
    finally:
        choose.clear()
