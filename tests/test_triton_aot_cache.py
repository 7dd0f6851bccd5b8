"""scripts/triton_aot/check.py's cache key: the device code of attnkernels/triton/ only, so an
edit to host code (block-size rules, launches) recompiles nothing, and an edit to a kernel,
a jit helper or a module constant recompiles everything."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "triton_aot"))
import check  # noqa: E402

SOURCE = '''
import triton
_BLOCK = 64


@triton.jit
def _kernel(x_ptr, N, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)


def launch(x):
    _kernel[(1,)](x, x.numel(), BLOCK=_BLOCK)
'''


def test_device_code_holds_kernels_and_constants_only() -> None:
    parts = check.device_code(SOURCE)
    assert parts[0] == "_BLOCK = 64"
    assert parts[1].startswith("@triton.jit\ndef _kernel(")
    assert len(parts) == 2
    host_edit = SOURCE.replace("_kernel[(1,)](x, x.numel(), BLOCK=_BLOCK)", "_kernel[(2,)](x, 7, BLOCK=32)")
    assert check.device_code(host_edit) == parts
    for device_edit in (SOURCE.replace("1.0)", "2.0)"), SOURCE.replace("_BLOCK = 64", "_BLOCK = 128")):
        assert check.device_code(device_edit) != parts
