"""Builders and assertions shared by the test files (`import helpers`: pytest puts tests/ on
sys.path). conftest.py keeps only the fixtures and the Triton interpreter switch.

* cases: `needs_gpu`, `backend_cases`, `without_reference`, `COMPILED_BACKENDS`, `LAYOUTS`;
* explicit op registration: `load_compiled_ops`, `load_ops` (no test relies on choosing a
  backend to register ops);
* registry modules (tests/test_reference.py and friends): `SHAPES`, `module_kwargs`,
  `randomize`, `build`, `bridge_inputs`, `train_modes`;
* fused against reference: `fused_pair` (`FeedsBridges`, `bridge_maps`), `make_input`,
  `leaf`, `forward_backward`, `training_step`, `gradient_names`, `op_forward_backward`,
  `on_backend`, `low_precision_runs`, `compiled_and_eager`, `flat`;
* assertions: `assert_matches`, `assert_all_close`, `assert_steps_match`, `assert_error_like_eager`,
  `assert_layout_of`, `assert_bitwise_equal`, `assert_keeps_reference_interface`.
"""
from __future__ import annotations

import copy
import importlib

import pytest
import torch

from attnkernels import backend
from attnkernels import reference as R

# ----------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA tests need a GPU")

#: The backends of the C++ library (its ops live in torch.ops.attnkernels): CUDA only on a GPU.
COMPILED_BACKENDS = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

#: Input layouts of `make_input`.
LAYOUTS = ["nchw", "channels_last", "sliced"]


def backend_cases(cpu=("cpu", "reference"), cuda=("cuda", "triton", "reference"), algorithms=None) -> list:
    """pytest params (backend_name, device) for each backend on CPU and, marked `needs_gpu`,
    on CUDA; with `algorithms`, (backend_name, device, algorithm) for each algorithm too.
    Ids: "<backend>-<device>" or "<backend>-<device>-<algorithm>"."""
    cases = []
    for device, names in (("cpu", cpu), ("cuda", cuda)):
        marks = needs_gpu if device == "cuda" else ()
        for name in names:
            if algorithms is None:
                cases.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
            else:
                cases += [pytest.param(name, device, a, id=f"{name}-{device}-{a}", marks=marks) for a in algorithms]
    return cases


def without_reference(cases: list) -> list:
    """The cases of `backend_cases` that run a fused backend."""
    return [c for c in cases if c.values[0] != "reference"]


# ----------------------------------------------------------------------------------------
# Explicit op registration
# ----------------------------------------------------------------------------------------
def load_compiled_ops():
    """Build (first use) and load the C++ library, which registers every hot path's ops with
    their fakes, autograd and composites; `torch.ops.attnkernels`."""
    from attnkernels import _ext

    _ext.load()
    return torch.ops.attnkernels


def load_ops(backend_name: str, hot_path: str):
    """The op namespace of a compiled backend, registered explicitly: the C++ library for
    "cpu" / "cuda", importing `attnkernels.triton.<hot_path>` for "triton"."""
    if backend_name == "triton":
        importlib.import_module(f"attnkernels.triton.{hot_path}")
        return torch.ops.attnkernels_triton
    return load_compiled_ops()


# ----------------------------------------------------------------------------------------
# Registry modules
# ----------------------------------------------------------------------------------------
# (N, C, H, W): C not a power of two, H != W, HW = 1, N = 1.
SHAPES = [(2, 24, 7, 5), (1, 40, 3, 4), (3, 16, 1, 1), (2, 8, 6, 6)]

# Modules holding BatchNorm1d cannot train on one sample (torch refuses).
BATCHNORM1D_MODULES = {"bridge", "bam"}


def module_kwargs(name: str, channels: int) -> dict:
    """Constructor arguments that make every module valid at every test channel count."""
    if name in ("gam", "bam"):
        return {"reduction": 8}
    if name == "bridge":
        return {"bridge_channels": [max(channels // 2, 1), 3]}
    return {}


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Random parameters and running stats, so no term of a formula hides behind 0 or 1."""
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.6, 0.6)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.uniform_(-0.3, 0.3)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return module


def build(name: str, channels: int, dtype: torch.dtype = torch.float64, train: bool = True):
    """A randomized module of registry `name`, in `dtype` and train/eval mode."""
    m = R.create(name, channels, **module_kwargs(name, channels))
    randomize(m).to(dtype)
    return m.train(train)


def bridge_inputs(module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Random bridge maps for a Bridge module (each its own spatial size); [] otherwise."""
    if not getattr(module, "takes_bridges", False):
        return []
    n, _, h, w = x.shape
    return [
        torch.randn(n, c, h + i + 1, w + 2 * i, dtype=x.dtype) for i, c in enumerate(module.bridge_channels)
    ]


def train_modes(name: str, n: int) -> list[bool]:
    """Training and eval, except training where torch's BatchNorm1d needs more than one sample."""
    return [False] if n == 1 and name in BATCHNORM1D_MODULES else [True, False]


# ----------------------------------------------------------------------------------------
# Fused against reference: builders and runs
# ----------------------------------------------------------------------------------------
def fused_pair(fused_cls, ref_cls, *args, dtype: torch.dtype, device: str, feed_bridges: bool = True, **kwargs):
    """(fused, reference): a randomized `ref_cls(*args, **kwargs)` and a `fused_cls` loaded
    from its state_dict, both in `dtype` on `device`, each its own copy. A module that takes
    bridge maps comes inside `FeedsBridges` (called as `module(x)`) unless `feed_bridges` is False."""
    ref = randomize(ref_cls(*args, **kwargs)).to(device, dtype)
    f = fused_cls(*args, **kwargs).to(device, dtype)
    f.load_state_dict(ref.state_dict())
    if feed_bridges:
        return feeding_bridges(f), feeding_bridges(ref)
    return f, ref


def bridge_maps(x: torch.Tensor, channels) -> list[torch.Tensor]:
    """Bridge maps made from x by fixed differentiable ops, as a block's earlier layers make
    them: map i has channels[i] channels (x's, reversed and repeated) and its own spatial size
    (zero padding), so every map's gradient reaches x's gradient."""
    maps = []
    for i, c in enumerate(channels):
        t = x.flip(1).repeat(1, -(-c // x.shape[1]), 1, 1)[:, :c]
        maps.append(torch.nn.functional.pad(t, (0, i + 1, i % 2, 0)))
    return maps


class FeedsBridges(torch.nn.Module):
    """A module that takes bridges (Bridge), fed as a block feeds it: `forward(x)` passes
    `bridge_maps(x, ...)` after x. The generic tests (they call `module(x)`) run Bridge this
    way; its parameters and buffers are the wrapped module's, under `attn.`."""

    def __init__(self, attn: torch.nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, *bridge_maps(x, self.attn.bridge_channels))


def feeding_bridges(module: torch.nn.Module) -> torch.nn.Module:
    """`module` inside FeedsBridges if it takes bridge maps and has any; else module itself."""
    if getattr(module, "takes_bridges", False) and module.bridge_channels:
        return FeedsBridges(module)
    return module


def make_input(shape: tuple, layout: str, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Random x in the given layout; `sliced` is a strided view dense in neither format."""
    if layout == "sliced":
        n, c, h, w = shape
        return torch.randn(n, c, h + 2, 2 * w, dtype=dtype, device=device)[:, :, 1 : h + 1, ::2]
    x = torch.randn(shape, dtype=dtype, device=device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def leaf(t: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """A fresh leaf copy of t (requiring grad or not), so no sample's requires_grad leaks."""
    return t.detach().clone().requires_grad_(grad)


def forward_backward(module, x: torch.Tensor, g: torch.Tensor, backend_name: str | None = None):
    """Output, x's gradient and every parameter gradient, optionally on a forced backend. x
    keeps its strides (a detached alias, not a clone, which would make a sliced view dense)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with backend.use_backend(backend_name):
        y = module(x)
    y.backward(g)
    return y.detach(), [x.grad] + [p.grad for p in module.parameters()]


def training_step(module, x: torch.Tensor, g: torch.Tensor, backend_name: str | None = None):
    """`forward_backward`'s output and gradients, and a copy of every buffer after the step
    (BatchNorm's running statistics)."""
    return (*forward_backward(module, x, g, backend_name), [b.clone() for b in module.buffers()])


def gradient_names(ref) -> list[str]:
    """The names of `forward_backward`'s gradients: x, then every parameter of `ref`."""
    return ["x"] + [n for n, _ in ref.named_parameters()]


def assert_steps_match(got, want, dtype: torch.dtype, names: list[str]) -> None:
    """Two `training_step` results agree (NaN where the other has NaN): fp64 to 1e-10, else to
    fp32 module tolerances; a failing gradient is named."""
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-5}
    (y, grads, buffers), (y_ref, grads_ref, buffers_ref) = got, want
    torch.testing.assert_close(y, y_ref, **tol, equal_nan=True)
    for name, a, b in zip(names, grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, **tol, equal_nan=True, msg=lambda m, name=name: f"grad of {name}: {m}")
    for a, b in zip(buffers, buffers_ref, strict=True):
        torch.testing.assert_close(a, b, **tol)


def full_size_saved(module, x: torch.Tensor, backend_name: str) -> set[int]:
    """The storages of the full-size tensors (x's numel or more) autograd saves for backward
    of module(x) on `backend_name`."""
    storages = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() >= x.numel():
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), backend.use_backend(backend_name):
        module(x)
    return storages


def grads_of(fn, inputs, grads, backend_name: str) -> list[torch.Tensor]:
    """[*outputs, *grads of every input]: fn(*inputs) on `backend_name` (one output or a tuple)
    and autograd's gradients for `grads` (one per output). The inputs keep their strides."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    with backend.use_backend(backend_name):
        out = fn(*inputs)
    outs = list(out) if isinstance(out, tuple) else [out]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, inputs, grads))


def assert_cpp_error_like_python(compiled_ops, ops_module, op: str, args: dict, error: type, start: str) -> None:
    """The C++ CPU kernel of `op` (called below the dispatcher's meta routing) and the Python
    check `ops_module.check_<op>` (what the reference and Triton backends and the fakes run)
    raise `error` with the same message, which starts with "<op>: <start>"."""
    cpu_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(error) as from_cpp:
        getattr(compiled_ops, op).default.redispatch(cpu_kernel, *args.values())
    with pytest.raises(error) as from_python:
        getattr(ops_module, f"check_{op}")(*args.values())
    assert str(from_cpp.value).startswith(f"{op}: {start}"), str(from_cpp.value)
    assert str(from_cpp.value) == str(from_python.value)


def op_forward_backward(op, inputs: list[torch.Tensor], grad: torch.Tensor, backend_name: str):
    """`op(*inputs)` on `backend_name`: its output and the gradient of every input."""
    with backend.use_backend(backend_name):
        y = op(*inputs)
    return y.detach(), list(torch.autograd.grad(y, inputs, grad))


def on_backend(fn, backend_name: str):
    """fn, run on `backend_name` at each call (for gradcheck)."""

    def run(*args):
        with backend.use_backend(backend_name):
            return fn(*args)

    return run


def flat(out) -> list[torch.Tensor]:
    """[y, *grads] of a (y, grads) result."""
    return [out[0], *out[1]]


def low_precision_runs(f, ref, x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype, backend_name: str):
    """Flat [y, *grads] of: the fp64 reference (the truth), a copy of the fused module in
    `dtype` on `backend_name`, and a copy of the reference in `dtype` (eager)."""
    exact = forward_backward(ref, x, g)
    low = forward_backward(copy.deepcopy(f).to(dtype), x.to(dtype), g.to(dtype), backend_name)
    eager = forward_backward(copy.deepcopy(ref).to(dtype), x.to(dtype), g.to(dtype))
    return flat(exact), flat(low), flat(eager)


def seeded_low_precision_runs(fused_cls, ref_cls, shape: tuple, dtype: torch.dtype, device: str, seed: int,
                              backend_name: str | None = None):
    """(names, exact, low, eager): low_precision_runs of a module pair with C = shape[1], its
    weights, x and the output gradient drawn after torch.manual_seed(seed), the fused module on
    `backend_name` (default: the device's); names are "y", "x" and the parameters'."""
    torch.manual_seed(seed)
    f, ref = fused_pair(fused_cls, ref_cls, shape[1], dtype=torch.float64, device=device)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    g = torch.randn_like(x)
    exact, low, eager = low_precision_runs(f, ref, x, g, dtype, backend_name or device)
    return ["y", "x"] + [n for n, _ in ref.named_parameters()], exact, low, eager


def compiled_and_eager(module, layout: str, shape: tuple = (2, 24, 7, 5)):
    """(compiled, eager) forward_backward results of torch.compile(module, fullgraph=True)
    and of module itself, fp32 on the cpu backend."""
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    x = make_input(shape, layout, torch.float32, "cpu")
    g = torch.randn(shape)
    with backend.use_backend("cpu"):
        eager = forward_backward(module, x, g)
        got = forward_backward(compiled, x, g)
    return got, eager


# ----------------------------------------------------------------------------------------
# Assertions
# ----------------------------------------------------------------------------------------
def assert_matches(fused_out, ref_out, dtype: torch.dtype) -> None:
    """Two forward_backward results agree: output and every gradient."""
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}
    (y_f, grads_f), (y_r, grads_r) = fused_out, ref_out
    torch.testing.assert_close(y_f, y_r, **tol)
    assert len(grads_f) == len(grads_r)
    for a, b in zip(grads_f, grads_r):
        torch.testing.assert_close(a, b, **tol)


def assert_all_close(got, want, names, truths=None, **tol) -> None:
    """torch.testing.assert_close on each pair, the failure naming the pair. With `truths` (a
    callable giving the float64 results, called at the first miss), a pair outside `tol` still
    passes if it is `as_accurate` as the reference."""
    for i, (name, a, b) in enumerate(zip(names, got, want, strict=True)):
        try:
            torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")
        except AssertionError:
            if truths is None or not as_accurate(a, b, truths()[i]):
                raise


def as_accurate(got: torch.Tensor, want: torch.Tensor, truth: torch.Tensor) -> bool:
    """Whether `got` is off the float64 `truth` by at most twice `want`'s error plus two roundings
    of got's dtype at the truth's scale (flash-attention's criterion). For float32 results of long
    reductions: two float32 sums over thousands of terms in different orders (a kernel's ordered
    tiles, cuBLAS's split-K) part by more than any fixed tolerance (on an H200, GAM's grad_w1 at
    C = 256, 28x28: 5e-5 apart where the tests allowed 2e-5); the truth says whether the kernel's
    is the less accurate."""
    return within_twice(max_error(got, truth), max_error(want, truth), rounding_floor(got.dtype), truth)


def max_error(a: torch.Tensor, truth: torch.Tensor) -> float:
    """The largest |a - truth|, in float64."""
    return (a.double() - truth).abs().max().item()


def within_twice(err: float, err_base: float, floor: float, *truths: torch.Tensor) -> bool:
    """flash-attention's bound: err <= 2 * err_base + floor * (the truths' largest magnitudes, summed)."""
    return err <= 2 * err_base + floor * sum(t.abs().max().item() for t in truths)


def rounding_floor(dtype: torch.dtype) -> float:
    """assert_error_like_eager's floor for results in `dtype`: two units of rounding at the
    result's scale. A scalar or a sum is rounded once to fp16/bf16 at the end, and the eager
    path's single rounding may be lucky; twice its error alone would then ask for luck too."""
    return 2 * torch.finfo(dtype).eps


def assert_error_like_eager(got, eager, exact, floor: float, names=None) -> None:
    """flash-attention's criterion for low precision: each fused result's largest error
    against the fp64 truth is at most twice the eager same-precision result's, plus `floor`
    times the truth's largest magnitude."""
    names = names or [str(i) for i in range(len(exact))]
    assert len(names) == len(got) == len(eager) == len(exact)
    assert_error_like_eager_over_seeds([(got, eager, exact)], floor, names)


def assert_error_like_eager_over_seeds(runs, floor: float, names) -> None:
    """assert_error_like_eager on errors summed over several seeds: `runs` holds one
    (got, eager, exact) triple of result lists per seed. A result that sums noise over a whole
    map (a weight gradient) has a max error that is one draw, and an eager run whose roundings
    happen to cancel fails a kernel whose error is typical: CSM's fp16 fc1 gradients on an H200
    were 0.85x eager's at the median of 8 seeds and 2.7x at seed 0. A kernel's bias shows in
    every seed, and so in the sums."""
    for i, name in enumerate(names):
        err_fused = sum(max_error(got[i], exact[i]) for got, _, exact in runs)
        err_eager = sum(max_error(eager[i], exact[i]) for _, eager, exact in runs)
        assert within_twice(err_fused, err_eager, floor, *(exact[i] for *_, exact in runs)), (name, err_fused, err_eager)


def assert_layout_of(out: torch.Tensor, x: torch.Tensor) -> None:
    """out is in x's layout: channels_last if x is (and is not NCHW-dense too), else NCHW."""
    want_cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last if want_cl else torch.contiguous_format)


def assert_bitwise_equal(a, b) -> None:
    """Two (y, grads) results are bitwise the same."""
    assert torch.equal(a[0], b[0]) and all(torch.equal(s, t) for s, t in zip(a[1], b[1]))


def assert_keeps_reference_interface(f: torch.nn.Module, r: torch.nn.Module) -> None:
    """Fused module f keeps reference module r's interface: the same state_dict keys (r loads
    f's strictly), an instance of r's class, and the reference's channel check."""
    assert f.state_dict().keys() == r.state_dict().keys(), type(r).__name__
    r.load_state_dict(f.state_dict())
    assert isinstance(f, type(r))
    with pytest.raises(ValueError, match=rf"x must have {r.channels} channels"):
        f(torch.randn(2, r.channels // 2, 4, 4))
