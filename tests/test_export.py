"""Exporting fused modules: torch.jit.trace (eval and train), ONNX through the plain
`torch.onnx.export(..., dynamo=True)` run in ONNX Runtime, torch.export with
`attnkernels.export.decompositions`, and a saved trace loaded in a fresh process. Every
result is compared with the reference module's on new random inputs."""
from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import FeedsBridges, assert_matches, feeding_bridges, forward_backward, fused_pair, randomize
from torch import nn

import attnkernels
from attnkernels import reference as R
from attnkernels.export import decompositions
from attnkernels.nn import FUSED, reference_class
from attnkernels.ops import HOT_PATHS
from attnkernels.ops._schemas import schemas

# Plain imports, not importorskip: onnx and onnxruntime are test extras, so a missing install
# must fail the run rather than skip the export tests silently.
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

# torch 2.14 deprecates torch.jit (trace, load) in favour of torch.export; users still trace.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")

#: Every fused module type: (registry name, constructor arguments) at SHAPE's 32 channels.
MODULES = {
    "eca": ("eca", {}),
    "se": ("se", {}),
    "ham": ("ham", {}),
    "pam": ("pam", {}),
    "csm": ("csm", {}),
    "gam": ("gam", {"reduction": 4}),
    "gam-gc": ("gam", {"reduction": 4, "groups": 4}),
    "softmax_spatial": ("softmax_spatial", {"groups": 4}),
    "bridge": ("bridge", {"bridge_channels": [16, 3]}),  # maps from x: helpers.FeedsBridges
}
SHAPE = (2, 32, 6, 5)
FP32 = {"rtol": 1e-5, "atol": 1e-5}


def fused_and_reference(case: str, train: bool, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    """A randomized reference module of `case` and the fused module with its weights."""
    name, kwargs = MODULES[case]
    cls = FUSED[name]
    f, r = fused_pair(cls, reference_class(cls), SHAPE[1], dtype=dtype, device="cpu", **kwargs)
    return f.train(train), r.train(train)


def trace(module: nn.Module, grad: bool = True, dtype: torch.dtype = torch.float32) -> torch.jit.ScriptModule:
    """torch.jit.trace with its default check (a second trace under no_grad, compared)."""
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the argument checks' shape tests
        return torch.jit.trace(module, (torch.randn(SHAPE, dtype=dtype),))


def run_onnx(model_proto, x: torch.Tensor) -> torch.Tensor:
    """The ONNX model's output for x, on ONNX Runtime's CPU provider."""
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def fused_op_targets(program: torch.export.ExportedProgram) -> set[str]:
    """The attnkernels ops an exported program calls."""
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function" and "attnkernels" in str(n.target)}


# ----------------------------------------------------------------------------------------
# torch.jit.trace
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("grad", [True, False], ids=["traced-with-grad", "traced-no-grad"])
@pytest.mark.parametrize("case", MODULES)
def test_trace_eval_matches_reference(compiled_ops, case, grad):
    """HAM and GAM chose their path by the grad mode, which the trace's check changes; the
    trace runs without and with autograd (output, input and parameter gradients)."""
    f, r = fused_and_reference(case, train=False, dtype=torch.float64)
    traced = trace(f, grad, torch.float64)
    x, g = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), r(x), rtol=1e-12, atol=1e-12)
    assert_matches(forward_backward(traced, x, g), forward_backward(r, x, g), torch.float64)


@pytest.mark.parametrize("case", MODULES)
def test_trace_train_matches_reference(compiled_ops, case):
    f, r = fused_and_reference(case, train=True, dtype=torch.float64)
    traced = trace(f, dtype=torch.float64)
    r.load_state_dict(traced.state_dict())  # the trace's own runs moved the running stats
    x, g = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    assert_matches(forward_backward(traced, x, g), forward_backward(r, x, g), torch.float64)
    for key, value in r.state_dict().items():  # running stats updated as the reference does
        torch.testing.assert_close(traced.state_dict()[key], value, rtol=1e-12, atol=1e-12, msg=key)


def test_saved_trace_loads_in_a_fresh_process(compiled_ops, tmp_path: Path):
    """TorchScript resolves the fused ops as it loads: `jit_load` loads them first."""
    f, r = fused_and_reference("ham", train=False)
    torch.jit.save(trace(f), tmp_path / "ham.pt")
    x = torch.randn(SHAPE)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch, attnkernels.export as E\n"
        "m = E.jit_load(sys.argv[1] + '/ham.pt')\n"
        "torch.save(m(torch.load(sys.argv[1] + '/x.pt')), sys.argv[1] + '/y.pt')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, cwd=Path(__file__).parents[1])
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), r(x), **FP32)


# ----------------------------------------------------------------------------------------
# ONNX: the plain torch.onnx.export of a fused model
# ----------------------------------------------------------------------------------------
def small_backbone(name: str, kwargs: dict) -> nn.Sequential:
    """conv-BN-ReLU, the reference attention module (Bridge fed maps from x), pooling and a
    classifier (randomized)."""
    c = SHAPE[1]
    layers = [nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), feeding_bridges(R.create(name, c, **kwargs)),
              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    return randomize(nn.Sequential(*layers)).eval()


@pytest.mark.parametrize("case", MODULES)
def test_onnx_export_of_fused_backbone_runs_like_reference(compiled_ops, case):
    """Exported with a dynamic batch and size, checked, run at two shapes in ONNX Runtime."""
    ref = small_backbone(*MODULES[case])
    fused = attnkernels.fuse(copy.deepcopy(ref))
    attention = fused[3].attn if isinstance(fused[3], FeedsBridges) else fused[3]
    assert isinstance(attention, FUSED[MODULES[case][0]])
    n, _, h, w = SHAPE
    dims = ({0: "batch", 2: "height", 3: "width"},)
    program = torch.onnx.export(fused, (torch.randn(n, 3, h, w),), dynamo=True, dynamic_shapes=dims, verbose=False)
    onnx.checker.check_model(program.model_proto, full_check=True)
    for shape in ((n, 3, h, w), (3, 3, h + 2, w - 1)):
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(run_onnx(program.model_proto, x), ref(x), **FP32)


# ----------------------------------------------------------------------------------------
# torch.export keeps the fused ops; decompositions() turns them into standard ops
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", MODULES)
def test_torch_export_keeps_fused_ops_with_a_dynamic_batch(compiled_ops, case):
    """dynamic_shapes name the forward's argument x, as for the reference module."""
    f, r = fused_and_reference(case, train=False)
    batch = torch.export.Dim("batch")
    program = torch.export.export(f, (torch.randn(SHAPE),), dynamic_shapes={"x": {0: batch}})
    assert fused_op_targets(program)
    x = torch.randn(3, *SHAPE[1:])
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), r(x), **FP32)


def test_decompositions_turn_exported_fused_ops_into_standard_ops(compiled_ops):
    """HAM, GAM gc and CSM in one program: under no_grad it holds HAM's inference op and
    GAM's folded epilogue, which only this route meets, and CSM's two hot paths."""
    pairs = [fused_and_reference(case, train=False) for case in ("ham", "gam-gc", "csm")]
    f, r = (nn.Sequential(*modules) for modules in zip(*pairs))
    with torch.no_grad():
        program = torch.export.export(f, (torch.randn(SHAPE),))
    only_here = {"attnkernels.ham_attention.default", "attnkernels.shuffle_conv_epilogue.default"}
    assert only_here <= fused_op_targets(program)
    program = program.run_decompositions(decompositions())
    assert not fused_op_targets(program)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), r(x), **FP32)
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(onnx_program.model_proto, x), r(x), **FP32)


def test_decompositions_cover_every_forward_op(compiled_ops):
    table = decompositions()
    for hot_path in HOT_PATHS:
        for name in schemas(hot_path):
            if not name.endswith("_backward"):
                assert getattr(compiled_ops, name).default in table, name
