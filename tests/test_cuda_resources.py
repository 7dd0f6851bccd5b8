"""scripts/cuda_resources.py: the ptxas -v parser and the spill regression rule, on a made-up log
(the real one comes from CI's verbose CUDA build, `make cuda-resources`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import cuda_resources  # noqa: E402

# ninja's shape: each command line, then that command's ptxas output. The second kernel lives in
# an anonymous namespace (a per-file hash in its mangled name) and spills.
LOG = """\
[1/4] c++ -MMD -c /src/csrc/cpu/a.cpp -o a.o
[2/4] /usr/local/cuda/bin/nvcc -MD -c /src/csrc/cuda/gate.cu -o gate.cuda.o -Xptxas=-v
ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '_Z11gate_kernelPfl' for 'sm_90'
ptxas info    : Function properties for _Z11gate_kernelPfl
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 26 registers, used 0 barriers
ptxas info    : Compile time = 74.309 ms
ptxas info    : Compiling entry function '_ZN2ak12_GLOBAL__N_19tc_kernelIfEEvPT_' for 'sm_90'
ptxas info    : Function properties for _ZN2ak12_GLOBAL__N_19tc_kernelIfEEvPT_
    24 bytes stack frame, 16 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 243 registers, used 1 barriers, 33792 bytes smem
[3/4] /usr/local/cuda/bin/nvcc -MD -c /src/csrc/cuda/pool.cu -o pool.cuda.o -Xptxas=-v
ptxas info    : Compiling entry function '_Z11pool_kernelPKfPf' for 'sm_90'
ptxas info    : Function properties for _Z11pool_kernelPKfPf
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 32 bytes smem
[4/4] c++ a.o gate.cuda.o pool.cuda.o -shared -o ext.so
"""


def _kernels():
    return cuda_resources.parse_log(LOG.splitlines())


def test_parse_reads_every_kernel_with_its_source_and_numbers():
    gate, tc, pool = _kernels()
    assert (gate.source, gate.registers, gate.spill_stores, gate.smem) == ("gate.cu", 26, 0, 0)
    assert (tc.source, tc.registers, tc.stack, tc.spill_stores, tc.spill_loads, tc.smem) == (
        "gate.cu", 243, 24, 16, 20, 33792)
    assert (pool.source, pool.registers, pool.stack, pool.smem) == ("pool.cu", 40, 8, 32)
    assert all(k.arch == "sm_90" for k in (gate, tc, pool))
    assert tc.spills and not gate.spills and not pool.spills  # a stack frame alone is no spill


def test_names_are_demangled_without_the_anonymous_namespace_hash():
    tc = _kernels()[1]
    if tc.name == tc.mangled:  # no c++filt here: the mangled name is the key, still stable per build
        return
    assert tc.name == "void ak::tc_kernel<float>(float*)"
    assert tc.key == "void ak::tc_kernel<float>(float*) [sm_90]"


def _baseline(**spills):
    return {k.key: {"spill_stores": spills.get(k.mangled, 0), "spill_loads": spills.get(k.mangled, 0)}
            for k in _kernels()}


def test_a_kernel_that_starts_spilling_fails():
    problems = cuda_resources.compare(_kernels(), _baseline())
    assert len(problems) == 1 and "now spills" in problems[0] and "tc_kernel" in problems[0]


def test_a_kernel_that_spilled_in_the_baseline_passes():
    tc = _kernels()[1]
    assert cuda_resources.compare(_kernels(), _baseline(**{tc.mangled: 8})) == []


def test_a_new_kernel_that_spills_fails_and_a_new_one_that_does_not_passes():
    kernels = _kernels()
    baseline = {k.key: {"spill_stores": 0, "spill_loads": 0} for k in kernels if k.source != "gate.cu"}
    problems = cuda_resources.compare(kernels, baseline)
    assert len(problems) == 1 and problems[0].startswith("new kernel spills") and "tc_kernel" in problems[0]


def test_table_has_a_row_per_kernel():
    text = cuda_resources.table(_kernels())
    assert len(text.splitlines()) == 2 + 3
    assert "| gate.cu |" in text and "| 243 | 24 | 16 | 20 | 33792 |" in text


def test_the_committed_baseline_is_a_real_build_report():
    import json

    baseline = json.loads(cuda_resources.BASELINE.read_text())
    assert len(baseline) > 100  # every kernel of every hot path, one per template instance
    assert all({"source", "registers", "spill_stores", "spill_loads"} <= set(v) for v in baseline.values())
