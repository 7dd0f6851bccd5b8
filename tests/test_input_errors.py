"""Bad inputs and bad configurations raise ValueError/TypeError naming the argument."""
from __future__ import annotations

import pytest
import torch
from helpers import bridge_inputs, build, fused_pair, on_backend

from attnkernels import backend
from attnkernels import functional as AF
from attnkernels import nn as fused
from attnkernels import reference as R
from attnkernels.ops import HOT_PATHS, hot_path_module
from attnkernels.ops._schemas import schemas


@pytest.mark.parametrize("name", R.names())
class TestForwardInputs:
    def test_wrong_rank(self, name: str) -> None:
        m = build(name, 16, dtype=torch.float32)
        with pytest.raises(ValueError, match=r"x must be 4-D"):
            m(torch.randn(2, 16, 5))

    def test_wrong_channel_count(self, name: str) -> None:
        m = build(name, 16, dtype=torch.float32)
        x = torch.randn(2, 12, 5, 5)
        with pytest.raises(ValueError, match=r"x must have 16 channels"):
            m(x, *bridge_inputs(m, x))

    def test_integer_dtype(self, name: str) -> None:
        m = build(name, 16, dtype=torch.float32)
        with pytest.raises(TypeError, match=r"x must be a floating-point tensor"):
            m(torch.ones(2, 16, 5, 5, dtype=torch.int64))

    def test_not_a_tensor(self, name: str) -> None:
        m = build(name, 16, dtype=torch.float32)
        with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
            m([[1.0]])

    def test_dtype_differs_from_parameters(self, name: str) -> None:
        m = build(name, 16, dtype=torch.float32)
        if next(m.parameters(), None) is None:
            pytest.fail("every registry module has parameters")
        x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
        with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the module's parameters are torch.float32"):
            m(x, *bridge_inputs(m, x))

    def test_device_differs_from_parameters(self, name: str) -> None:
        m = build(name, 16, dtype=torch.float32)
        with pytest.raises(ValueError, match=r"x is on meta but the module's parameters are on cpu"):
            m(torch.empty(2, 16, 5, 5, device="meta"))

    def test_empty(self, name: str) -> None:
        m = build(name, 16, dtype=torch.float32)
        with pytest.raises(ValueError, match=r"x must not be empty"):
            m(torch.randn(0, 16, 5, 5))


@pytest.mark.parametrize(
    "name,channels,kwargs,error,pattern",
    [
        ("se", 0, {}, ValueError, r"channels must be >= 1"),
        ("se", 16.0, {}, TypeError, r"channels must be an int"),
        ("se", 16, {"reduction": 0}, ValueError, r"reduction must be >= 1"),
        ("eca", 16, {"kernel_size": 4}, ValueError, r"kernel_size must be odd"),
        ("cbam", 16, {"spatial_kernel_size": 6}, ValueError, r"spatial_kernel_size must be odd"),
        ("ham", 16, {"separation_rate": 1.0}, ValueError, r"separation_rate must be in \(0, 1\)"),
        ("ham", 16, {"kernel_size": 0}, ValueError, r"kernel_size must be >= 1"),
        ("gam", 8, {}, ValueError, r"channels // reduction must be >= 1, got 8 // 16 = 0"),
        ("gam", 64, {"groups": 3}, ValueError, r"groups \(3\) must divide channels \(64\)"),
        ("gam", 48, {"reduction": 8, "groups": 4}, ValueError, r"groups \(4\) must divide channels // reduction \(6\)"),
        ("gam", 64, {"groups": 0}, ValueError, r"groups must be >= 1"),
        ("pam", 7, {}, ValueError, r"channels must be >= 8"),
        ("csm", 4, {}, ValueError, r"channels must be >= 8"),
        ("criss_cross", 4, {}, ValueError, r"channels must be >= 8"),
        ("criss_cross", 16, {"recurrence": 0}, ValueError, r"recurrence must be >= 1"),
        ("softmax_spatial", 24, {"groups": 5}, ValueError, r"groups \(5\) must divide channels \(24\)"),
        ("bridge", 16, {"bridge_channels": 8}, TypeError, r"bridge_channels must be a sequence"),
        ("bridge", 16, {"bridge_channels": [8, 0]}, ValueError, r"bridge_channels\[1\] must be >= 1"),
        ("bam", 8, {}, ValueError, r"reduction \(16\) must not exceed channels \(8\)"),
        ("triplet", 16, {"kernel_size": 2}, ValueError, r"kernel_size must be odd"),
    ],
    ids=str,
)
def test_bad_configuration(name, channels, kwargs, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        R.create(name, channels, **kwargs)


def test_bridge_argument_errors() -> None:
    m = R.Bridge(16, bridge_channels=[8, 4])
    x = torch.randn(2, 16, 5, 5)
    with pytest.raises(ValueError, match=r"expected 2 bridge maps"):
        m(x, torch.randn(2, 8, 5, 5))
    with pytest.raises(ValueError, match=r"bridges\[1\] must have 4 channels"):
        m(x, torch.randn(2, 8, 5, 5), torch.randn(2, 5, 5, 5))
    with pytest.raises(ValueError, match=r"bridges\[0\] must match x in batch size"):
        m(x, torch.randn(3, 8, 5, 5), torch.randn(2, 4, 5, 5))
    with pytest.raises(TypeError, match=r"bridges\[0\] must be a floating-point tensor"):
        m(x, torch.ones(2, 8, 5, 5, dtype=torch.int32), torch.randn(2, 4, 5, 5))


def test_non_bridge_modules_take_one_input() -> None:
    with pytest.raises(TypeError):
        R.SE(16)(torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4))



# ----------------------------------------------------------------------------------------
# Every tensor argument of every op on the op's feature map's device
# ----------------------------------------------------------------------------------------
N, C, H, W = 2, 6, 4, 5


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64)


def _positive(*shape: int) -> torch.Tensor:
    return torch.rand(shape, dtype=torch.float64) + 0.5


def _op_arguments() -> dict[str, tuple]:
    """Valid random CPU arguments (float64) of every op of torch.ops.attnkernels, in schema order,
    every optional tensor given (channel_gate's mix mode; shuffle_conv's prologue and epilogue)."""
    x, gate, taps, alpha, beta = _rand(N, C, H, W), torch.sigmoid(_rand(N, C)), _rand(3), _rand(), _rand()
    avg, max_ = x.mean((2, 3)), x.amax((2, 3))
    mask = (torch.rand(N, C) > 0.5).double()
    important = torch.rand(N, C) > 0.5  # spatial_tail's two channel groups
    s1, s2 = torch.sigmoid(_rand(N, 1, H, W)), torch.sigmoid(_rand(N, 1, H, W))
    q, k, gamma = _rand(N, 2, H, W), _rand(N, 2, H, W), _rand(1)
    w1, b1, w2, b2 = _rand(3, C), _rand(3), _rand(C, 3), _rand(C)
    d, spatial_weight = _rand(2 * N, 2, H, W), _rand(1, 2, 3, 3)
    conv_weight, scale, shift, gate_x = _rand(C, C // 2, 3, 3), _positive(C), _rand(C), _rand(N, C, H, W)
    return {
        "channel_pool": (x,),
        "channel_pool_backward": (_rand(N, C), _rand(N, C), x, max_),
        "channel_gate": (avg, max_, taps, alpha, beta, 2),
        "channel_gate_backward": (_rand(N, C), gate, avg, max_, taps, alpha, beta, 2),
        "channel_rescale": (x, gate),
        "channel_rescale_backward": (_rand(N, C, H, W), x, gate),
        "channel_attention": (x, taps, alpha, beta, 2),
        "channel_mlp_attention": (x, w1, b1, w2, b2),
        "ham_spatial_pool": (x, gate, 3),
        "ham_spatial_pool_backward": (_rand(N, 2, H, W), _rand(N, 2, H, W), x, gate, mask, _rand(N, 2, H, W),
                                      _rand(N, 2, H, W), 3),
        "ham_spatial_apply": (x, gate, mask, s1, s2),
        "ham_spatial_apply_backward": (_rand(N, C, H, W), x, gate, mask, s1, s2),
        "ham_spatial_conv": (d, spatial_weight),
        "ham_spatial_conv_backward": (_rand(2 * N, 1, H, W), d, spatial_weight),
        "ham_attention": (x, taps, alpha, beta, 3, spatial_weight, _positive(), _rand()),
        "nonlocal_attn": (q, k, _rand(N, C, H, W), x, gamma),
        "nonlocal_attn_backward": (_rand(N, C, H, W), q, k, _rand(N, C, H, W), gamma, x, _rand(N, H * W)),
        "gam_channel": (x, w1, b1, w2, b2),
        "gam_channel_backward": (_rand(N, C, H, W), x, w1, b1, w2, b2),
        "softmax_spatial": (x, _rand(3, C), _rand(3), True),
        "softmax_spatial_backward": (_rand(N, C, H, W), x, _rand(3, C), _positive(N, 3, H, W), True),
        "shuffle_conv": (x, conv_weight, _rand(C), 2, 3, scale, shift, gate_x, _rand(C), _rand(C)),
        "shuffle_conv_backward": (_rand(N, C, H, W), x, conv_weight, 2, 3, scale, shift),
        "shuffle_conv_epilogue": (_rand(N, C, H, W), gate_x, _rand(C), _rand(C)),
        "shuffle_conv_epilogue_backward": (_rand(N, C, H, W), _rand(N, C, H, W), gate_x, _rand(C), _rand(C), _rand(C),
                                           _positive(C)),
        "shuffle_conv_bn_gate": (x, conv_weight, _rand(C), 2, 3, scale, shift, gate_x, _rand(C), _rand(C), _rand(C),
                                 _positive(C), 1e-5, 0),
        "cbam_spatial_pool": (x, gate),
        "cbam_spatial_pool_backward": (_rand(N, 2, H, W), x, gate, _rand(N, 2, H, W)),
        "cbam_spatial_apply": (x, gate, s1),
        "cbam_spatial_apply_backward": (_rand(N, C, H, W), x, gate, s1),
        "triplet_pool": (x,),
        "triplet_pool_backward": (_rand(N, 2, H, W), _rand(N, 2, C, W), _rand(N, 2, H, C), x, _rand(N, 2, H, W),
                                  _rand(N, 2, C, W), _rand(N, 2, H, C)),
        "triplet_apply": (x, s1, _rand(N, 1, C, W), _rand(N, 1, H, C)),
        "triplet_apply_backward": (_rand(N, C, H, W), x, s1, _rand(N, 1, C, W), _rand(N, 1, H, C)),
        "bam_apply": (x, gate, s1),
        "bam_apply_backward": (_rand(N, C, H, W), x, gate, s1),
        "cam": (x, gamma),
        "cam_backward": (_rand(N, C, H, W), x, gamma, _rand(N, C, C)),
        "criss_cross": (q, k, _rand(N, C, H, W), x, gamma),
        "criss_cross_backward": (_rand(N, C, H, W), q, k, _rand(N, C, H, W), gamma, x, _rand(N, H * W)),
        "block_tail_stats": (x,),
        "block_tail_apply": (x, _rand(N, C, H, W), _rand(N, C), _rand(N, C), _rand(N, C), True),
        "block_tail_backward_reduce": (_rand(N, C, H, W), _rand(N, C, H, W), x),
        "spatial_tail_stats": (x,),
        "spatial_tail_pool": (x, _rand(N, C), _rand(N, C), important),
        "spatial_tail_apply": (x, _rand(N, C, H, W), _rand(N, C), _rand(N, C), _rand(N, 2, H, W), important),
        "spatial_tail_backward_reduce": (_rand(N, C, H, W), _rand(N, C, H, W), x, _rand(N, C), _rand(N, C),
                                         _rand(N, 2, H, W), important),
        "spatial_tail_pool_backward": (x, _rand(N, C), _rand(N, C), important, *(_rand(N, 2, H, W) for _ in range(3))),
        "spatial_tail_backward_apply": (_rand(N, C, H, W), x, _rand(N, C), _rand(N, C), important,
                                        *(_rand(N, 2, H, W) for _ in range(4)), *(_rand(N, C) for _ in range(6))),
    }


def _all_schemas() -> dict[str, str]:
    """{op: schema} of every op of torch.ops.attnkernels: csrc's and the Python composites'."""
    found = {}
    for hot_path in HOT_PATHS:
        found.update(schemas(hot_path))
        for name, composite in hot_path_module(hot_path).REGISTRATION.composites.items():
            found.setdefault(name, composite.schema)
    return found


def _argument_names(schema: str) -> list[tuple[str, str]]:
    """(type, name) of each argument of a schema."""
    inner = schema[schema.index("(") + 1 : schema.index(") ->")]
    return [tuple(a.split()) for a in inner.split(",")]


def _tensor_names(op: str) -> list[str]:
    return [name for kind, name in _argument_names(_all_schemas()[op]) if kind in ("Tensor", "Tensor?")]


#: The argument each op's checks compare devices against: its feature map ("x" unless listed).
_ANCHORS = {"channel_gate": "avg", "channel_gate_backward": "avg", "nonlocal_attn_backward": "out",
            "criss_cross_backward": "out",
            "ham_spatial_conv": "d", "ham_spatial_conv_backward": "d", "shuffle_conv": "s",
            "shuffle_conv_backward": "s", "shuffle_conv_bn_gate": "s", "shuffle_conv_epilogue": "z",
            "shuffle_conv_epilogue_backward": "z", "block_tail_backward_reduce": "z",
            **{f"spatial_tail_{op}": "z" for op in ("pool", "apply", "backward_reduce", "pool_backward",
                                                     "backward_apply")}}
#: The op name in the messages, where it is not the op's own (the composite reports as shuffle_conv).
_MESSAGE_NAMES = {"shuffle_conv_bn_gate": "shuffle_conv"}
#: The Python check of each op (the one the reference backend, the Triton ops and the fakes run).
_CHECK_NAMES = {"channel_mlp_attention": "check_mlp_args"}

DEVICE_CASES = [pytest.param(op, arg, id=f"{op}-{arg}") for op in _all_schemas() for arg in _tensor_names(op)
                if len(_tensor_names(op)) > 1]  # channel_pool(x), triplet_pool(x), *_tail_stats(z): one tensor


def _with_one_on_meta(op: str, arg: str) -> list:
    """The op's valid arguments with `arg` alone moved to the meta device."""
    args = list(_op_arguments()[op])
    i = [name for _, name in _argument_names(_all_schemas()[op])].index(arg)
    args[i] = args[i].to("meta")
    return args


def _device_error(op: str, arg: str) -> str:
    """The error expected: `arg` named as on the wrong device, or (when `arg` is the feature map
    itself) another argument named as not on the feature map's device."""
    name = _MESSAGE_NAMES.get(op, op)
    if arg == _ANCHORS.get(op, "x"):
        return rf"^{name}: \w+ must be on meta, got cpu"
    return rf"^{name}: {arg} must be on cpu, got meta"


def _python_check(op: str):
    for hot_path in HOT_PATHS:
        module = hot_path_module(hot_path)
        check = getattr(module, _CHECK_NAMES.get(op, f"check_{op}"), None)
        if check is not None:
            return check
    raise LookupError(op)


def test_the_device_cases_cover_every_op() -> None:
    assert _op_arguments().keys() == _all_schemas().keys()
    single_tensor = {"channel_pool", "triplet_pool", "block_tail_stats", "spatial_tail_stats"}
    assert {op for op, _ in (c.values for c in DEVICE_CASES)} == _all_schemas().keys() - single_tensor


@pytest.mark.parametrize("op,arg", DEVICE_CASES)
def test_op_refuses_an_argument_on_another_device(compiled_ops, op: str, arg: str) -> None:
    """One argument on meta, the others on CPU: a clear ValueError from the op called directly
    (the dispatcher sends any call with a meta argument to the op's fake), from its C++ CPU
    kernel, and from the Python check the reference and Triton backends run. Before, the fake
    returned uninitialised memory and some C++ checks looked at the first parameter only."""
    args, pattern = _with_one_on_meta(op, arg), _device_error(op, arg)
    with pytest.raises(ValueError, match=pattern):
        getattr(compiled_ops, op)(*args)
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"attnkernels::{op}", "CPU"):
        cpu_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
        with pytest.raises(ValueError, match=pattern):
            getattr(compiled_ops, op).default.redispatch(cpu_kernel, *args)
    with pytest.raises(ValueError, match=pattern):
        _python_check(op)(*args)


def _public(op: str, conv: str):
    """The public function of op `op` taking the op's own arguments (mode 2 as "mix")."""
    functions = {
        "channel_gate": lambda a, m, w, al, be, _mode: AF.channel_gate(a, m, w, al, be, mode="mix"),
        "channel_rescale": AF.channel_rescale,
        "channel_attention": lambda x, w, al, be, _mode: AF.channel_attention(x, w, al, be, mode="mix"),
        "channel_mlp_attention": AF.channel_mlp_attention,
        "ham_spatial_pool": AF.ham_spatial_pool,
        "ham_spatial_apply": AF.ham_spatial_apply,
        "ham_spatial_conv": AF.ham_spatial_conv,
        "ham_attention": hot_path_module("ham_spatial").ham_attention,
        "cbam_spatial_pool": AF.cbam_spatial_pool,
        "cbam_spatial_apply": AF.cbam_spatial_apply,
        "nonlocal_attn": AF.nonlocal_attn,
        "gam_channel": AF.gam_channel,
        "softmax_spatial": AF.softmax_spatial,
        "triplet_apply": AF.triplet_apply,
        "bam_apply": AF.bam_apply,
        "cam": AF.cam,
        "criss_cross": AF.criss_cross,
        "shuffle_conv": lambda *args: AF.shuffle_conv(*args, conv=conv),
        "shuffle_conv_bn_gate": lambda *a: AF.shuffle_conv_bn_gate(*a[:10], a[12], conv=conv, bn_mean=a[10],
                                                                   bn_var=a[11]),
    }
    return functions.get(op)


PUBLIC_CASES = [c for c in DEVICE_CASES if _public(c.values[0], "auto") is not None]


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
@pytest.mark.parametrize("op,arg", PUBLIC_CASES)
def test_public_function_refuses_an_argument_on_another_device(compiled_ops, backend_name, op, arg) -> None:
    """The public functions (attnkernels.functional) on the C++ and reference backends, both conv
    algorithms for shuffle_conv: the same clear error, never uninitialised memory."""
    for conv in ("direct", "library") if op.startswith("shuffle_conv") else ("auto",):
        with backend.use_backend(backend_name), pytest.raises(ValueError, match=_device_error(op, arg)):
            _public(op, conv)(*_with_one_on_meta(op, arg))


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_se_with_fc2_on_meta(backend_name, train) -> None:
    """The module check compares x with the first parameter only (fc1's); the op names fc2's."""
    f, _ = fused_pair(fused.SE, R.SE, 16, dtype=torch.float32, device="cpu")
    f.fc2.to("meta")
    f.train(train)
    with backend.use_backend(backend_name):
        with pytest.raises(ValueError, match=r"channel_mlp_attention: (w2|b2) must be on cpu, got meta"):
            f(torch.randn(2, 16, 5, 5))


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_gam_with_conv2_on_meta(backend_name, train) -> None:
    """Only conv2 on meta: conv2's shuffle_conv names its weight, with and without autograd."""
    f, _ = fused_pair(fused.GAM, R.GAM, 32, dtype=torch.float32, device="cpu", reduction=8)
    f.conv2.to("meta")
    f.train(train)
    x = torch.randn(2, 32, 5, 5)
    for grad in (True, False):  # with autograd: shuffle_conv_bn_gate; without, in eval: shuffle_conv
        with torch.set_grad_enabled(grad), backend.use_backend(backend_name):
            with pytest.raises(ValueError, match=r"shuffle_conv: weight must be on cpu, got meta"):
                f(x)


def test_functional_channel_rescale_with_gate_on_meta(compiled_ops) -> None:
    """The issue's case: a CPU x with a meta gate, through the public function and the op."""
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match=r"channel_rescale: gate must be on cpu, got meta"):
        AF.channel_rescale(x, torch.rand(2, 8, device="meta"))
    with pytest.raises(ValueError, match=r"channel_rescale: gate must be on cpu, got meta"):
        compiled_ops.channel_rescale(x, torch.rand(2, 8, device="meta"))


# ----------------------------------------------------------------------------------------
# channel_gate's mix: alpha and beta of one element, any shape
# ----------------------------------------------------------------------------------------
def _mix_inputs(shape: tuple) -> list[torch.Tensor]:
    """x (N, C, H, W), weight (3 taps), alpha, beta of `shape` (one element), float64, requiring grad."""
    return [t.requires_grad_() for t in (_rand(3, 7, 4, 5), _rand(3), _rand(*shape), _rand(*shape))]


def _gate_of(x, weight, alpha, beta):
    avg, max_ = AF.channel_pool(x)
    return AF.channel_gate(avg, max_, weight, alpha, beta, mode="mix")


def _attention_of(x, weight, alpha, beta):
    return AF.channel_attention(x, weight, alpha, beta, mode="mix")


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
@pytest.mark.parametrize("shape", [(1,), (1, 1)], ids=str)
@pytest.mark.parametrize("fn", [_gate_of, _attention_of], ids=["channel_gate", "channel_attention"])
def test_mix_takes_alpha_and_beta_of_any_one_element_shape(compiled_ops, backend_name, shape, fn) -> None:
    """alpha, beta of shape (1,) (as checkpoints of other HAM code store them): gradcheck passes
    and the result and every gradient equal the 0-d parameters' on the reference backend
    (HAM's formula), each gradient in its parameter's own shape. Before, the forward took them and
    the backward failed on the gradient's shape."""
    inputs = _mix_inputs(shape)
    assert torch.autograd.gradcheck(on_backend(fn, backend_name), inputs)
    grad = _rand(3, 7, 4, 5) if fn is _attention_of else _rand(3, 7)
    with backend.use_backend(backend_name):
        y = fn(*inputs)
    got = [y, *torch.autograd.grad(y, inputs, grad)]
    scalars = [inputs[0], inputs[1], *(t.detach().reshape(()).requires_grad_() for t in inputs[2:])]
    with backend.use_backend("reference"):
        y0 = fn(*scalars)
    want = [y0, *torch.autograd.grad(y0, scalars, grad)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b.reshape(a.shape), rtol=1e-12, atol=1e-12)
    assert [g.shape for g in got[3:]] == [torch.Size(shape)] * 2


# ----------------------------------------------------------------------------------------
# shuffle_conv: every argument's dtype rule, both conv algorithms
# ----------------------------------------------------------------------------------------
_SHUFFLE_TENSORS = ("s", "weight", "bias", "in_scale", "in_shift", "gate_x", "out_scale", "out_shift")
_BN_GATE_TENSORS = _SHUFFLE_TENSORS[:6] + ("bn_weight", "bn_bias", "bn_mean", "bn_var")
#: Feature maps: computed in their own dtype, so one of float64/32/16 and bfloat16 (small
#: parameters of any floating dtype are used in the accumulation dtype).
_FEATURE_MAPS = ("s", "gate_x")
_C10 = {torch.int64: "Long", torch.complex64: "ComplexFloat", torch.bool: "Bool",
        torch.float8_e4m3fn: "Float8_e4m3fn"}


def _dtype_error(name: str, dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return rf"^shuffle_conv: {name} must be float64, float32, float16 or bfloat16, got {_C10[dtype]}"
    return rf"^shuffle_conv: {name} must be a floating-point tensor, got {_C10[dtype]}"


def _dtype_cases(names) -> list:
    return [pytest.param(name, dtype, id=f"{name}-{_C10[dtype]}") for name in names for dtype in _C10
            if not dtype.is_floating_point or name in _FEATURE_MAPS]


def _shuffle_arguments() -> dict[str, torch.Tensor]:
    args = dict(zip(("s", "weight", "bias", "groups", "shuffle_groups", "in_scale", "in_shift", "gate_x", "out_scale",
                     "out_shift"), _op_arguments()["shuffle_conv"]))
    return {name: t.float() if isinstance(t, torch.Tensor) else t for name, t in args.items()}


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
@pytest.mark.parametrize("name,dtype", _dtype_cases(_SHUFFLE_TENSORS))
def test_shuffle_conv_refuses_a_dtype_alike_for_both_algorithms(compiled_ops, backend_name, name, dtype) -> None:
    """Every argument, both conv algorithms, both backends, and the C++ op: the same TypeError.
    Before, a float8 s or gate_x ran on the library conv and failed deep in the direct one."""
    args = _shuffle_arguments()
    args[name] = args[name].to(dtype)
    for conv in ("direct", "library"):
        with backend.use_backend(backend_name), pytest.raises(TypeError, match=_dtype_error(name, dtype)):
            AF.shuffle_conv(**args, conv=conv)
    with pytest.raises(TypeError, match=_dtype_error(name, dtype)):
        compiled_ops.shuffle_conv(*args.values())


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
@pytest.mark.parametrize("name,dtype", _dtype_cases(_BN_GATE_TENSORS))
def test_shuffle_conv_bn_gate_refuses_a_dtype_alike_for_both_algorithms(compiled_ops, backend_name, name, dtype):
    """shuffle_conv_bn_gate's arguments (BatchNorm's too), both conv algorithms, both backends."""
    args = {k: v for k, v in _shuffle_arguments().items() if k not in ("out_scale", "out_shift")}
    args.update(bn_weight=torch.randn(C), bn_bias=torch.randn(C), bn_mean=torch.randn(C), bn_var=torch.rand(C) + 0.5)
    args[name] = args[name].to(dtype)
    for conv in ("direct", "library"):
        with backend.use_backend(backend_name), pytest.raises(TypeError, match=_dtype_error(name, dtype)):
            AF.shuffle_conv_bn_gate(**args, conv=conv)


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
@pytest.mark.parametrize("conv", ["direct", "library"])
def test_shuffle_conv_bn_gate_refuses_batch_statistics_of_one_value(compiled_ops, backend_name, conv) -> None:
    """N * H * W = 1 without running statistics: BatchNorm raises, and so does the op (the
    public function, its fake, and torch.ops directly). Before, the fused op normalised by var 0."""
    s, gate_x = _rand(1, C, 1, 1), _rand(1, C, 1, 1)
    args = (s, _rand(C, C, 1, 1), _rand(C), 1, 1, None, None, gate_x, _positive(C), _rand(C))
    want = r"^shuffle_conv_bn_gate: batch statistics need more than one value per channel"
    with backend.use_backend(backend_name), pytest.raises(ValueError, match=want):
        AF.shuffle_conv_bn_gate(*args, conv=conv)
    with pytest.raises(ValueError, match=want):
        compiled_ops.shuffle_conv_bn_gate(*args, None, None, 1e-5, 0 if conv == "direct" else 1)
    with pytest.raises(ValueError, match=want):
        compiled_ops.shuffle_conv_bn_gate(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args),
                                          None, None, 1e-5, 0)
    # Running statistics make one value per channel fine, as in BatchNorm's eval.
    y, _, _ = AF.shuffle_conv_bn_gate(*args, conv=conv, bn_mean=_rand(C), bn_var=_positive(C))
    assert y.shape == gate_x.shape and torch.isfinite(y).all()
