"""The reference modules against docs/contract.md: independent oracles, precision, layout, determinism."""
from __future__ import annotations

import copy

import oracles
import pytest
import torch
from helpers import SHAPES, bridge_inputs, build, randomize, train_modes

from attnkernels import reference as R

ORACLE_CASES = [
    (name, shape, train)
    for name in oracles.ORACLES
    for shape in SHAPES
    for train in train_modes(name, shape[0])
]


def _grads(module: torch.nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.grad.clone() for t in inputs] + [p.grad.clone() for p in module.parameters()]


def _run(module, fn, x, bridges, grad_out):
    """Forward `fn` then backward `grad_out`; the output and every input/parameter gradient."""
    module.zero_grad(set_to_none=True)
    inputs = [t.detach().clone().requires_grad_() for t in [x, *bridges]]
    y = fn(*inputs)
    y.backward(grad_out)
    return y.detach(), _grads(module, inputs)


@pytest.mark.parametrize("name,shape,train", ORACLE_CASES, ids=str)
def test_matches_oracle(name: str, shape: tuple, train: bool) -> None:
    """Forward and all gradients (x, bridges, every parameter) equal the oracle's in fp64."""
    m = build(name, shape[1], train=train)
    x = torch.randn(shape, dtype=torch.float64)
    bridges = bridge_inputs(m, x)
    g = torch.randn(shape, dtype=torch.float64)
    y_ref, grads_ref = _run(m, m, x, bridges, g)
    y_orc, grads_orc = _run(m, lambda *a: oracles.ORACLES[name](m, *a), x, bridges, g)
    torch.testing.assert_close(y_ref, y_orc, rtol=1e-10, atol=1e-10)
    assert len(grads_ref) == len(grads_orc) > 1
    for a, b in zip(grads_ref, grads_orc):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# Non-default configurations: the group paths, RCCA's recurrence, HAM's kernel sizes.
VARIANTS = [
    ("gam", 16, {"reduction": 4, "groups": 2}),
    ("gam", 32, {"reduction": 4, "groups": 4}),
    ("softmax_spatial", 24, {"groups": 4}),
    ("softmax_spatial", 24, {"groups": 3, "rescale": False}),
    ("criss_cross", 16, {"recurrence": 2}),
    ("ham", 24, {"kernel_size": 1}),
    ("ham", 24, {"kernel_size": 9, "separation_rate": 0.3}),
    ("bridge", 16, {"bridge_channels": []}),
]


@pytest.mark.parametrize("name,channels,kwargs", VARIANTS, ids=str)
@pytest.mark.parametrize("train", [True, False])
def test_variant_matches_oracle(name: str, channels: int, kwargs: dict, train: bool) -> None:
    m = randomize(R.create(name, channels, **kwargs)).double().train(train)
    x = torch.randn(2, channels, 6, 7, dtype=torch.float64)
    bridges = bridge_inputs(m, x)
    g = torch.randn_like(x)
    y_ref, grads_ref = _run(m, m, x, bridges, g)
    y_orc, grads_orc = _run(m, lambda *a: oracles.ORACLES[name](m, *a), x, bridges, g)
    torch.testing.assert_close(y_ref, y_orc, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads_ref, grads_orc):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", R.names())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_close_to_fp64(name: str, shape: tuple) -> None:
    """The same module and data in fp32 stays within fp32 error of fp64, forward and backward."""
    train = train_modes(name, shape[0])[0]
    m64 = build(name, shape[1], train=train)
    m32 = copy.deepcopy(m64).float()
    x = torch.randn(shape, dtype=torch.float64)
    bridges = bridge_inputs(m64, x)
    g = torch.randn(shape, dtype=torch.float64)
    y64, grads64 = _run(m64, m64, x, bridges, g)
    y32, grads32 = _run(m32, m32, x.float(), [b.float() for b in bridges], g.float())
    assert y32.dtype == torch.float32
    # fp32 accumulation keeps errors near fp32 epsilon (~1e-7); an fp16 rounding would give ~1e-3.
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=2e-6)
    # Gradients that are ~0 in exact arithmetic (a bias before a softmax) keep fp32
    # cancellation noise of a few 1e-6, so they get a looser, scaled bound.
    for a, b in zip(grads32, grads64):
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a.double() / scale, b / scale, rtol=1e-4, atol=5e-5)


def _gradcheck_inputs(name: str, seed_limit: int = 50):
    """A small fp64 module and input; for HAM, one whose top-k boundary has a clear margin,
    so gradcheck's finite differences never flip the channel mask."""
    for seed in range(seed_limit):
        torch.manual_seed(seed)
        m = build(name, 8, train=True)
        x = torch.randn(2, 8, 4, 3, dtype=torch.float64)
        if name != "ham":
            return m, x
        ac = m.channel_attention(x).detach()
        top = ac.sort(dim=1, descending=True).values
        if (top[:, m.c_im - 1] - top[:, m.c_im]).min() > 1e-3:
            return m, x
    raise AssertionError("no seed gave HAM a top-k margin")


@pytest.mark.parametrize("name", R.names())
def test_gradcheck(name: str) -> None:
    """Analytic gradients match finite differences for x, bridges and every parameter (fp64)."""
    m, x = _gradcheck_inputs(name)
    bridges = bridge_inputs(m, x)
    params = dict(m.named_parameters())
    keys = list(params)

    def f(x, *rest):
        bridge_args, param_values = rest[: len(bridges)], rest[len(bridges):]
        return torch.func.functional_call(m, dict(zip(keys, param_values)), (x, *bridge_args))

    inputs = [t.detach().clone().requires_grad_() for t in [x, *bridges, *params.values()]]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", R.names())
def test_channels_last_and_sliced(name: str) -> None:
    """channels_last in gives channels_last out; sliced inputs give the contiguous result."""
    m = build(name, 16, train=False)
    base = torch.randn(2, 16, 9, 12, dtype=torch.float64)
    x = base[:, :, 1:8, ::2]  # sliced: dense in neither format
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    bridges = bridge_inputs(m, x)
    y = m(x.contiguous(), *bridges)
    assert y.is_contiguous()
    torch.testing.assert_close(m(x, *bridges), y, rtol=1e-12, atol=1e-12)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y_cl = m(x_cl, *bridges)
    assert y_cl.is_contiguous(memory_format=torch.channels_last) and not y_cl.is_contiguous()
    torch.testing.assert_close(y_cl, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", R.names())
def test_deterministic(name: str) -> None:
    """Two runs on the same input are bitwise identical, output and every gradient (fp32)."""
    m = build(name, 24, dtype=torch.float32, train=True)
    x = torch.randn(2, 24, 7, 5)
    bridges = bridge_inputs(m, x)
    g = torch.randn_like(x)
    y1, grads1 = _run(m, m, x, bridges, g)
    y2, grads2 = _run(m, m, x, bridges, g)
    assert torch.equal(y1, y2)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2))


@pytest.mark.parametrize("name", R.names())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs(name: str, dtype: torch.dtype) -> None:
    """fp16/bf16 in gives the same dtype out, finite, and forward+backward run."""
    m = build(name, 16, dtype=dtype, train=True)
    x = torch.randn(2, 16, 6, 5, dtype=dtype, requires_grad=True)
    y = m(x, *bridge_inputs(m, x))
    y.float().square().mean().backward()
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
