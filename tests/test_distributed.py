"""Distributed training with the fused modules: DDP and SyncBatchNorm.

Two processes (torch.multiprocessing spawn, env:// init on a free localhost port) train a small
backbone holding HAM and GAM for a few SGD steps, each on its own random shard, once with the
reference modules and once with the fused ones (`attnkernels.fuse`, the same initial weights).
Parameters and BatchNorm running stats must agree.

On CPU (gloo) torch refuses SyncBatchNorm twice: its forward trains GPU tensors only and DDP
takes no CPU module holding one. So the CPU run proves what CPU can:
* plain BatchNorm under DDP: fused == reference;
* cross-process BatchNorm: `GlooSyncBatchNorm`, a SyncBatchNorm whose statistics are
  all-reduced over gloo, stands in for torch's, and the gradients are averaged by hand as DDP
  averages them; fused == reference proves the fused modules take their batch statistics from
  the SyncBatchNorm child instead of from the local batch;
* torch's SyncBatchNorm children: the fused modules meet the same errors as the reference
  modules in a training forward and in DDP (nothing trains silently on local statistics), and
  evaluate (running stats, no sync) as they do.
With two GPUs the same run uses nccl, DDP and torch's SyncBatchNorm itself.
"""
from __future__ import annotations

import copy
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import load_compiled_ops, randomize
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import attnkernels
from attnkernels import nn as fused
from attnkernels import reference as R

WORLD_SIZE = 2
STEPS = 3
SHARD_SHAPE = (4, 3, 8, 8)  # each rank's batch per step
NUM_CLASSES = 5
TOL = {"rtol": 1e-9, "atol": 1e-10}  # float64: fused and reference differ by rounding only
CPU_REFUSAL = "SyncBatchNorm expected input tensor to be on GPU"
NORMS = ("batchnorm", "syncbatchnorm")

convert_sync_batchnorm = nn.SyncBatchNorm.convert_sync_batchnorm


# --- the model and the training run ---------------------------------------------------------


def small_net() -> nn.Sequential:
    """A small randomized float64 backbone: conv-BN-ReLU units, reference HAM and GAM (the
    grouped, shuffled variant), a linear head."""
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        R.HAM(16),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        R.GAM(16, reduction=4, groups=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, NUM_CLASSES),
    )
    return randomize(net).double()


def shard(rank: int, step: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s random inputs and labels for `step` (every rank a different shard)."""
    gen = torch.Generator().manual_seed(100 * rank + step)
    x = torch.randn(SHARD_SHAPE, generator=gen, dtype=torch.float64)
    labels = torch.randint(NUM_CLASSES, (SHARD_SHAPE[0],), generator=gen)
    return x.to(device), labels.to(device)


def train(model: nn.Module, rank: int, device: str, ddp: bool = True) -> dict[str, torch.Tensor]:
    """STEPS SGD steps of `model` on this rank's shards, the gradients averaged over the ranks
    by DDP or (`ddp=False`, where DDP refuses the model) by hand as DDP does; the state after."""
    model.to(device).train()
    forward = DDP(model, device_ids=[rank] if device.startswith("cuda") else None) if ddp else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        x, labels = shard(rank, step, device)
        opt.zero_grad()
        F.cross_entropy(forward(x), labels).backward()
        if not ddp:
            average_gradients(model)
        opt.step()
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def average_gradients(model: nn.Module) -> None:
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def reference_and_fused(sync: bool) -> tuple[nn.Module, nn.Module]:
    """The reference net and a fused copy with the same weights. With `sync`, BatchNorm
    becomes SyncBatchNorm in both, converted after `fuse` in the fused one (the reference
    converts the plain net): `fuse` then `convert_sync_batchnorm` under DDP."""
    ref = small_net()
    model = attnkernels.fuse(copy.deepcopy(ref))
    if sync:
        ref, model = convert_sync_batchnorm(ref), convert_sync_batchnorm(model)
    return ref, model


# --- a SyncBatchNorm that syncs CPU tensors ---------------------------------------------------


class GlooSyncBatchNorm(nn.SyncBatchNorm):
    """nn.SyncBatchNorm's math for CPU tensors over gloo, where torch's refuses non-GPU inputs:
    in training, the mean and biased variance of the whole world's batch (sums all-reduced,
    differentiably, so the gradient crosses processes as SyncBatchNorm's does), and the running
    stats updated with them (unbiased variance over the world's count). Equal shard sizes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        count = x.numel() // x.shape[1] * dist.get_world_size()
        mean = dist_fn.all_reduce(x.sum(dims)) / count
        var = dist_fn.all_reduce((x - mean.view(shape)).square().sum(dims)) / count
        self.update_running_stats(mean.detach(), var.detach() * count / (count - 1))
        x_hat = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return x_hat * self.weight.view(shape) + self.bias.view(shape)

    @torch.no_grad()
    def update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased_var, factor)


def sync_on_cpu(model: nn.Module) -> nn.Module:
    """`model` with each of its nn.SyncBatchNorm modules a GlooSyncBatchNorm (same state)."""
    for m in model.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = GlooSyncBatchNorm
    return model


# --- what each rank runs ---------------------------------------------------------------------


def trained_pair(rank: int, device: str, sync: bool) -> dict[str, dict[str, torch.Tensor]]:
    """The reference and fused nets' states after the same distributed run, SyncBatchNorm or
    not. On CPU a synced run uses GlooSyncBatchNorm and averages the gradients by hand: DDP
    refuses SyncBatchNorm layers in CPU modules."""
    ref, model = reference_and_fused(sync)
    ddp = not (sync and device == "cpu")
    if not ddp:
        ref, model = sync_on_cpu(ref), sync_on_cpu(model)
    return {"reference": train(ref, rank, device, ddp), "fused": train(model, rank, device, ddp)}


def error_of(run: Callable[[], object]) -> tuple[str, str] | None:
    """(exception class, message) of `run()`, or None when it runs."""
    try:
        run()
    except Exception as err:  # noqa: BLE001 - the test compares whatever is raised
        return type(err).__name__, str(err)
    return None


def cpu_sync_batchnorm_outcomes() -> dict[str, dict]:
    """HAM and GAM with torch's SyncBatchNorm children in this process group, on CPU: the
    errors (reference, fused) of a training forward and of wrapping in DDP, and the eval
    outputs (no sync)."""
    outcomes = {}
    for name, module in (("ham", R.HAM(16)), ("gam", R.GAM(16, reduction=4, groups=2))):
        ref = convert_sync_batchnorm(randomize(module).double())
        model = attnkernels.fuse(copy.deepcopy(ref))
        x = torch.randn(3, 16, 6, 5, dtype=torch.float64)
        train_errors = {"reference": error_of(lambda: ref.train()(x)), "fused": error_of(lambda: model.train()(x))}
        ddp_errors = {"reference": error_of(lambda: DDP(ref)), "fused": error_of(lambda: DDP(model))}
        with torch.no_grad():
            evaluated = {"reference": ref.eval()(x), "fused": model.eval()(x)}
        outcomes[name] = {"train": train_errors, "ddp": ddp_errors, "eval": evaluated}
    return outcomes


def run_rank(rank: int, port: int, device: str, out_dir: str) -> None:
    """One process: join the group, run the device's cases, save the results for the test."""
    torch.set_num_threads(1)  # two ranks share the machine's cores
    load_compiled_ops()  # before any collective: a slow load must not time a peer out
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    backend_name = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend_name, rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=120))
    try:
        torch.manual_seed(0)  # the same initial weights on every rank
        results = {norm: trained_pair(rank, device, sync=norm == "syncbatchnorm") for norm in NORMS}
        if device == "cpu":
            results["cpu_syncbatchnorm"] = cpu_sync_batchnorm_outcomes()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_run(device: str, out_dir: Path) -> list[dict]:
    """Run `run_rank` in WORLD_SIZE spawned processes; each rank's results."""
    load_compiled_ops()  # build (first use) here, not in two racing ranks
    mp.spawn(run_rank, args=(free_port(), device, str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl DDP needs 2 GPUs")


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=needs_two_gpus)])
def ranks(request, tmp_path_factory) -> tuple[str, list[dict]]:
    """(device, each rank's results): one spawned run per device for all the tests below."""
    return request.param, spawn_run(request.param, tmp_path_factory.mktemp(f"ddp-{request.param}"))


# --- the tests -------------------------------------------------------------------------------


def assert_states_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL, msg=lambda m, key=key: f"{what} {key}: {m}")


@pytest.mark.parametrize("norm", NORMS)
def test_ddp_fused_matches_reference(ranks, norm):
    """The fused net's parameters and running stats after the DDP steps are the reference's,
    on every rank; DDP kept the parameters the same across ranks."""
    device, results = ranks
    for rank, result in enumerate(results):
        assert_states_match(result[norm]["fused"], result[norm]["reference"], f"{device} rank {rank} {norm}:")
    params = [name for name, _ in small_net().named_parameters()]
    first, second = (r[norm]["fused"] for r in results)
    assert_states_match({k: second[k] for k in params}, {k: first[k] for k in params}, "rank 1 vs rank 0:")


def test_syncbatchnorm_stats_span_ranks(ranks):
    """SyncBatchNorm's running stats come from the world's batch: the same on both ranks,
    while plain BatchNorm's come from each rank's shard (so the shards did differ)."""
    _, (first, second) = ranks
    stats = [k for k in first["batchnorm"]["fused"] if k.endswith(("running_mean", "running_var"))]
    for key in stats:
        torch.testing.assert_close(second["syncbatchnorm"]["fused"][key], first["syncbatchnorm"]["fused"][key], **TOL)
        assert not torch.allclose(second["batchnorm"]["fused"][key], first["batchnorm"]["fused"][key]), key


@pytest.mark.parametrize("module", ["ham", "gam"])
def test_cpu_syncbatchnorm_training_refused_like_reference(ranks, module):
    """On CPU in a process group, torch's SyncBatchNorm refuses to train and DDP refuses a
    module holding one: the fused module raises the same errors as the reference (GAM used to
    train on local statistics), and in eval (running stats, no sync) gives its output."""
    device, results = ranks
    if device != "cpu":
        pytest.skip("SyncBatchNorm trains on GPUs")
    for result in results:
        outcome = result["cpu_syncbatchnorm"][module]
        ref_error = outcome["train"]["reference"]
        assert ref_error is not None and ref_error[0] == "ValueError" and CPU_REFUSAL in ref_error[1]
        assert outcome["train"]["fused"] == ref_error
        ddp_error = outcome["ddp"]["reference"]
        assert ddp_error is not None and "SyncBatchNorm layers only work with GPU modules" in ddp_error[1]
        assert outcome["ddp"]["fused"] == ddp_error
        torch.testing.assert_close(outcome["eval"]["fused"], outcome["eval"]["reference"], **TOL)


# --- fuse and convert_sync_batchnorm, in either order (one process, no group) -----------------


def one_process_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One SGD step outside any process group (SyncBatchNorm acts as BatchNorm); the state after."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model.train()(x), labels).backward()
    opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fuse_and_convert_sync_batchnorm_in_either_order():
    """`fuse` after `convert_sync_batchnorm` and `convert_sync_batchnorm` after `fuse` give
    the same model: fused HAM and GAM with SyncBatchNorm children, training and evaluating as
    the converted reference does; `unfuse` gives the reference classes back, children kept."""
    net = small_net()
    ref = convert_sync_batchnorm(copy.deepcopy(net))
    orders = {
        "fuse, convert": convert_sync_batchnorm(attnkernels.fuse(copy.deepcopy(net))),
        "convert, fuse": attnkernels.fuse(convert_sync_batchnorm(copy.deepcopy(net))),
    }
    x, labels = shard(0, 0, "cpu")
    with torch.no_grad():
        want_eval = ref.eval()(x)
    want = one_process_step(ref, x, labels)
    for order, model in orders.items():
        assert type(model[3]) is fused.HAM and type(model[7]) is fused.GAM, order
        assert all(type(bn) is nn.SyncBatchNorm for bn in (model[3].bn, model[7].bn1, model[7].bn2)), order
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), want_eval, **TOL, msg=lambda m, o=order: f"{o}: {m}")
        assert_states_match(one_process_step(model, x, labels), want, f"{order}:")
        back = attnkernels.unfuse(model)
        assert type(back[3]) is R.HAM and type(back[7].bn2) is nn.SyncBatchNorm, order
