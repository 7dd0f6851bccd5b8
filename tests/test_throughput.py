"""Smoke tests of the benchmark harness: attnkernels.profiling, benchmarks/throughput.py and
benchmarks/harness/.

Timings themselves are never asserted (they belong to benchmarks/); these tests check that
peak memory is measured as a high-water mark, that the malloc re-exec works, that a tiny
throughput run writes complete CSV/JSON rows and a PNG chart, prints progress lines and
survives failing modules and variants, that the last-level cache is read and inputs rotate
past it, and that the fused backends of a module come from its hot paths.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnkernels.profiling import BENCHMARK_MALLOC_ENV, benchmark_env_ready, peak_memory

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
# Allocations besides the tensors under test (none expected on CPU) may add a little.
TOLERANCE = 64 * 1024


def _load_throughput():
    """Import benchmarks/throughput.py as a module (benchmarks/ is not a package)."""
    path = REPO / "benchmarks" / "throughput.py"
    spec = importlib.util.spec_from_file_location("throughput_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def throughput():
    return _load_throughput()


@pytest.fixture(scope="module")
def harness(throughput):
    """The harness package (benchmarks/ is on sys.path once throughput.py is loaded)."""
    import harness.backends
    import harness.cache
    import harness.output
    import harness.variants

    return harness


# --------------------------------------------------------------------------- peak_memory


def _alloc(nbytes: int) -> torch.Tensor:
    t = torch.empty(nbytes, dtype=torch.uint8)
    t.fill_(1)
    return t


def test_peak_memory_is_high_water_mark_not_total():
    def fn():
        big = _alloc(4 * MIB)
        del big
        return _alloc(1 * MIB)

    peak = peak_memory(fn, "cpu")
    assert 4 * MIB <= peak <= 4 * MIB + TOLERANCE  # not 5 MiB: the 4 MiB were freed first


def test_peak_memory_counts_live_tensors_together_and_outputs():
    def fn():
        a = _alloc(4 * MIB)
        b = _alloc(1 * MIB)
        return a, b

    peak = peak_memory(fn, torch.device("cpu"))
    assert 5 * MIB <= peak <= 5 * MIB + TOLERANCE


def test_peak_memory_ignores_memory_held_before_the_call():
    held = _alloc(8 * MIB)
    peak = peak_memory(lambda: _alloc(2 * MIB), "cpu")
    assert 2 * MIB <= peak <= 2 * MIB + TOLERANCE
    del held


def test_peak_memory_of_autograd_step():
    x = torch.randn(256, 1024, requires_grad=True)  # 1 MiB
    def fn():
        y = x * 2.0  # 1 MiB, freed once backward has run
        y.backward(torch.ones_like(y))  # grad_output 1 MiB, x.grad 1 MiB (kept)
        return x.grad

    peak = peak_memory(fn, "cpu")
    assert 2 * MIB <= peak <= 3 * MIB + TOLERANCE


def test_peak_memory_rejects_unknown_device():
    with pytest.raises(RuntimeError, match="cpu and cuda"):
        peak_memory(lambda: None, "meta")


# --------------------------------------------------------------------------- malloc environment


def test_benchmark_env_ready_reads_the_environment():
    if not sys.platform.startswith("linux"):
        pytest.skip("the glibc settings only matter on Linux")
    assert benchmark_env_ready(dict(BENCHMARK_MALLOC_ENV))
    assert not benchmark_env_ready({"MALLOC_MMAP_THRESHOLD_": "1"})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the re-exec only happens on Linux")
def test_ensure_benchmark_env_reexecutes_once_with_the_settings(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(
        "import os\n"
        "from attnkernels.profiling import ensure_benchmark_env\n"
        "ensure_benchmark_env()\n"
        "print('child', os.environ['MALLOC_MMAP_THRESHOLD_'], os.environ['MALLOC_TRIM_THRESHOLD_'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in BENCHMARK_MALLOC_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["child 33554432 1073741824"]
    announced = [ln for ln in done.stderr.splitlines() if ln.startswith("re-executing with")]
    assert len(announced) == 1 and "MALLOC_MMAP_THRESHOLD_=33554432" in announced[0]


# --------------------------------------------------------------------------- throughput.py


def _run(throughput, tmp_path, *args: str):
    """Run throughput.main in-process; return (rc, CSV rows as dicts, JSON document)."""
    rc = throughput.main([*args, "--repeats", "2", "--out", str(tmp_path)])
    with open(tmp_path / "throughput.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header, rows = reader.fieldnames, list(reader)
    doc = json.loads((tmp_path / "throughput.json").read_text(encoding="utf-8"))
    return rc, header, rows, doc


def test_throughput_writes_complete_rows(throughput, tmp_path, capsys):
    rc, header, rows, doc = _run(
        throughput, tmp_path, "--modules", "se,bridge", "--shapes", "2x16x8x8", "--no-compile", "--device",
        "cpu",
    )
    assert rc == 0
    assert header == [
        "module", "shape", "dtype", "device", "variant", "fwd_ms", "fwd_bwd_ms", "fwd_vs_memcpy",
        "fwd_bwd_vs_memcpy", "gbps", "peak_fwd_mb", "peak_fwd_bwd_mb", "fwd_speedup",
        "fwd_bwd_speedup", "fwd_vs_compile", "fwd_bwd_vs_compile", "tflops_fwd", "tflops_fwd_bwd",
        "first_call_s", "error",
    ]
    # SE and Bridge have fused versions (the C++ backend runs them on CPU); Bridge gets its maps.
    assert [(r["module"], r["variant"]) for r in rows] == [
        ("se", "memcpy"), ("se", "eager"), ("se", "fused-cpu"),
        ("bridge", "memcpy"), ("bridge", "eager"), ("bridge", "fused-cpu"),
    ]
    for r in rows:
        assert (r["shape"], r["dtype"], r["device"], r["error"]) == ("2x16x8x8", "float32", "cpu", "")
        for col in ("fwd_ms", "fwd_bwd_ms", "gbps", "peak_fwd_mb", "peak_fwd_bwd_mb"):
            assert float(r[col]) > 0, (r["module"], r["variant"], col)
        # x is 2*16*8*8 fp32 = 8 KiB; memcpy writes one copy forward, x.grad one more backward.
        if r["variant"] == "memcpy":
            assert float(r["fwd_vs_memcpy"]) == 1.0
            assert float(r["peak_fwd_mb"]) * MIB == 8192
        elif r["variant"] == "eager":
            assert float(r["fwd_speedup"]) == 1.0 and float(r["fwd_bwd_speedup"]) == 1.0
    assert doc["meta"]["dtype"] == "float32" and doc["meta"]["repeats"] == 2
    assert len(doc["rows"]) == 6 and doc["rows"][1]["fwd_ms"] > 0
    printed = capsys.readouterr().out
    assert "threads" in printed and "bridge" in printed and "eager" in printed
    assert doc["meta"]["last_level_cache"]["bytes"] > 0
    assert set(doc["meta"]["input_sets"]) == {"se 2x16x8x8", "bridge 2x16x8x8"}


def test_throughput_records_failures_and_goes_on(throughput, tmp_path, monkeypatch):
    def broken_compile(module, **kwargs):
        def call(*args):
            raise RuntimeError("inductor exploded\nlong traceback")
        return call

    monkeypatch.setattr(throughput.torch, "compile", broken_compile)
    # GAM needs C % 16 == 0: building it at C = 8 fails; ECA then still runs.
    rc, _, rows, _ = _run(
        throughput, tmp_path, "--modules", "gam,eca", "--shapes", "2x8x4x4", "--device", "cpu"
    )
    assert rc == 0
    by_key = {(r["module"], r["variant"]): r for r in rows}
    assert set(by_key) == {
        ("gam", "eager"), ("gam", "compile"), ("gam", "fused-cpu"),
        ("eca", "memcpy"), ("eca", "eager"), ("eca", "compile"), ("eca", "fused-cpu"),
    }
    assert float(by_key["eca", "fused-cpu"]["fwd_ms"]) > 0 and by_key["eca", "fused-cpu"]["error"] == ""
    for variant in ("eager", "fused-cpu"):  # one error row per variant GAM has
        assert "ValueError" in by_key["gam", variant]["error"] and by_key["gam", variant]["fwd_ms"] == ""
    failed = by_key["eca", "compile"]
    assert "RuntimeError: inductor exploded" in failed["error"] and "long traceback" not in failed["error"]
    assert failed["fwd_ms"] == "" and failed["fwd_bwd_ms"] == ""
    assert float(by_key["eca", "eager"]["fwd_ms"]) > 0 and by_key["eca", "eager"]["error"] == ""


def test_throughput_pam_rows_have_sdpa_and_tflops(throughput, tmp_path):
    """PAM gets the sdpa baseline and the fused row, each with the attention's TFLOP/s:
    2*N*HW^2*(C/8 + C) forward, three times that forward+backward; memcpy has none."""
    rc, _, rows, _ = _run(throughput, tmp_path, "--modules", "pam", "--shapes", "2x16x4x4", "--no-compile", "--device", "cpu")
    assert rc == 0
    by_variant = {r["variant"]: r for r in rows}
    assert list(by_variant) == ["memcpy", "eager", "sdpa", "fused-cpu"]
    assert by_variant["memcpy"]["tflops_fwd"] == ""
    flops = 2 * 2 * 16**2 * (2 + 16)
    for v in ("eager", "sdpa", "fused-cpu"):
        r = by_variant[v]
        assert r["error"] == ""
        assert float(r["tflops_fwd"]) == pytest.approx(flops / 1e12 / (float(r["fwd_ms"]) / 1e3), rel=1e-3)
        assert float(r["tflops_fwd_bwd"]) == pytest.approx(3 * flops / 1e12 / (float(r["fwd_bwd_ms"]) / 1e3), rel=1e-3)


def test_parse_shape(throughput):
    assert throughput.parse_shape("32x256x56X56") == (32, 256, 56, 56)
    for bad in ("32x256x56", "2x0x4x4", "axbxcxd"):
        with pytest.raises(ValueError, match="N x C x H x W"):
            throughput.parse_shape(bad)


def test_bad_arguments_exit_with_a_message(throughput, capsys):
    with pytest.raises(SystemExit):
        throughput.main(["--modules", "nonesuch", "--out", ""])
    assert "unknown module" in capsys.readouterr().err


def test_rounds_go_on_past_repeats_while_a_phase_is_under_min_time(harness):
    """run_phase: `repeats` rounds, then more while the phase is under min_time_s, capped at
    max_repeats; a slow step stops at `repeats`; without min_time_s exactly `repeats`."""
    import harness.timing as T

    cpu = torch.device("cpu")
    timer = T.make_timer(cpu)
    fast = {"a": lambda: None, "b": lambda: None}
    runs = T.run_phase(fast, timer, repeats=3, warmup=0, device=cpu, min_time_s=60.0, max_repeats=30)
    assert [len(r.times_ms) for r in runs.values()] == [30, 30]
    runs = T.run_phase(fast, timer, repeats=3, warmup=0, device=cpu)
    assert [len(r.times_ms) for r in runs.values()] == [3, 3]
    slow = {"a": lambda: time.sleep(0.02)}
    runs = T.run_phase(slow, timer, repeats=3, warmup=0, device=cpu, min_time_s=0.03, max_repeats=30)
    assert len(runs["a"].times_ms) == 3


def test_min_time_defaults_on_and_an_explicit_repeats_turns_it_off(throughput):
    """The default CPU run extends cheap phases (and says so in the header); an explicit
    --repeats runs exactly that many rounds unless --min-time is given too; bad values are named."""
    from harness.rows import rounds_text

    def config(*args):
        return throughput.resolve_config(throughput.build_parser().parse_args(["--device", "cpu", "--out", "", *args]))

    default = config()
    assert (default.repeats, default.min_time_s, default.max_repeats) == (21, 1.0, 210)
    assert config("--repeats", "5").min_time_s == 0.0
    assert config("--repeats", "5", "--min-time", "0.5").min_time_s == 0.5
    with pytest.raises(ValueError, match="--min-time"):
        config("--min-time", "-1")
    assert rounds_text({"repeats": 21, "min_time_s": 1.0, "max_repeats": 210}) == \
        "21 to 210 (more while a phase is under 1 s)"
    assert rounds_text({"repeats": 5, "min_time_s": 0.0, "max_repeats": 50}) == "5"


def test_throughput_writes_png_chart(throughput, tmp_path):
    pytest.importorskip("matplotlib")
    rc, _, rows, _ = _run(
        throughput, tmp_path, "--modules", "eca,se", "--shapes", "2x16x4x4", "--no-compile", "--device", "cpu"
    )
    assert rc == 0 and rows
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_skipped_with_a_note_without_matplotlib(throughput, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    (tmp_path / "throughput.png").write_bytes(b"an older run's chart")
    rc, _, rows, _ = _run(
        throughput, tmp_path, "--modules", "eca", "--shapes", "2x16x4x4", "--no-compile", "--device", "cpu"
    )
    assert rc == 0 and rows  # the CSV and JSON are still written
    assert not (tmp_path / "throughput.png").exists()
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "no chart" in ln]
    assert notes == ["note: no chart: matplotlib is not installed (pip install matplotlib, or make install)"]


def test_throughput_prints_progress_lines(throughput, tmp_path, capsys):
    rc, _, rows, _ = _run(
        throughput, tmp_path, "--modules", "eca,se", "--shapes", "2x16x4x4,2x16x8x8", "--no-compile",
        "--device", "cpu", "--json",
    )
    assert rc == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)["rows"]) == len(rows)  # progress never reaches stdout
    lines = err.splitlines()
    cases = ["eca 2x16x4x4", "eca 2x16x8x8", "se 2x16x4x4", "se 2x16x8x8"]
    for i, case in enumerate(cases, 1):
        start = lines.index(f"[{i}/4] {case}: timing...")
        done = [j for j, ln in enumerate(lines) if re.fullmatch(rf"\[{i}/4\] {case}: done in \d+\.\d s \(.+\)", ln)]
        assert len(done) == 1 and done[0] > start, (case, err)


# --------------------------------------------------------------------------- last-level cache and rotation


def _fake_sysfs(root: Path, caches) -> Path:
    """A /sys/devices/system/cpu/cpu0/cache look-alike: one index<i>/ per (level, type, size)."""
    for i, (level, kind, size) in enumerate(caches):
        index = root / f"index{i}"
        index.mkdir(parents=True)
        (index / "level").write_text(f"{level}\n")
        (index / "type").write_text(f"{kind}\n")
        (index / "size").write_text(f"{size}\n")
    return root


def test_llc_is_read_from_sysfs(harness, tmp_path):
    C = harness.cache
    caches = [(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "1024K"), (3, "Unified", "32768K")]
    root = _fake_sysfs(tmp_path / "a", caches)
    info = C.last_level_cache("cpu", sysfs_root=root, lscpu=lambda: pytest.fail("lscpu run although sysfs answered"))
    assert info == C.CacheInfo(32 * MIB, "L3", "sysfs")
    assert "32 MiB L3 (sysfs)" == info.describe()
    # No L3: the L2 is the last level; an instruction cache never counts, however large.
    root = _fake_sysfs(tmp_path / "b", [(1, "Data", "48K"), (2, "Unified", "2048K"), (3, "Instruction", "64M")])
    assert C.last_level_cache("cpu", sysfs_root=root) == C.CacheInfo(2 * MIB, "L2", "sysfs")


def test_llc_falls_back_to_lscpu_then_a_default(harness, tmp_path):
    C = harness.cache
    missing = tmp_path / "no-sysfs"
    lscpu = (
        "L1d cache:  64 KiB (2 instances)\nL1i cache:  64 KiB (2 instances)\n"
        "L2 cache:  2 MiB (2 instances)\nL3 cache:  64 MiB (2 instances)\n"
    )
    # Newer lscpu prints the total over instances: one instance is 32 MiB.
    assert C.last_level_cache("cpu", sysfs_root=missing, lscpu=lambda: lscpu) == C.CacheInfo(32 * MIB, "L3", "lscpu")
    # Older lscpu prints one instance's size.
    older = "L2 cache:            256K\nL3 cache:            16384K\n"
    assert C.parse_lscpu(older) == C.CacheInfo(16 * MIB, "L3", "lscpu")
    assert C.last_level_cache("cpu", sysfs_root=missing, lscpu=lambda: "") == C.CacheInfo(32 * MIB, "LLC", "default")
    assert C.last_level_cache("cpu").bytes > 0  # this machine, whichever source answers


def test_rotation_rule(harness):
    C = harness.cache
    default_cpu_x = 4 * 512 * 28 * 28 * 4  # 4x512x28x28 fp32: 6.1 MiB
    assert C.rotation_count(default_cpu_x, 32 * MIB) == 11  # 11 copies: 67 MiB >= 2 x 32 MiB; 10: 61 MiB
    assert C.rotation_count(default_cpu_x, 3 * MIB) == 1  # one input is already twice the cache
    assert C.rotation_count(default_cpu_x, 0) == 1
    assert C.rotation_count(8192, 1 << 30) == C.MAX_INPUT_SETS  # tiny inputs: capped


def test_inputs_rotate_past_the_cache(harness):
    V = harness.variants
    cache = 64 * 1024
    copy_bytes = 2 * 16 * 8 * 8 * 4 + 2 * 3 * 8 * 8 * 4  # x (8 KiB) and one 3-channel bridge map
    inputs = V.make_inputs((2, 16, 8, 8), [3], torch.float32, torch.device("cpu"), cache)
    n = inputs.count
    assert inputs.rotation_bytes == n * copy_bytes >= 2 * cache > (n - 1) * copy_bytes  # enough copies, no more
    seen = [inputs.next() for _ in range(2 * n)]
    assert len({s.x.data_ptr() for s in seen[:n]}) == n and seen[n] is seen[0]  # round-robin over distinct copies
    for s in seen[:n]:  # the same values in every copy
        assert torch.equal(s.x, inputs.x) and torch.equal(s.grad_out, seen[0].grad_out)
        assert torch.equal(s.bridges[0], seen[0].bridges[0])
        assert s.x_leaf.is_leaf and s.x_leaf.requires_grad and not s.x.requires_grad
    # One rotation for all variants: consecutive calls, whichever variant makes them, read different copies.
    read = []
    first = V.forward_step(lambda x, *b: read.append(x.data_ptr()) or x, inputs)
    second = V.forward_step(lambda x, *b: read.append(x.data_ptr()) or x, inputs)
    first(), second(), first()
    assert len(set(read)) == 3
    assert V.make_inputs((2, 16, 8, 8), [], torch.float32, torch.device("cpu")).count == 1  # no cache size: no rotation


def test_throughput_records_the_cache_and_rotation(throughput, harness, tmp_path, monkeypatch, capsys):
    sysfs = _fake_sysfs(tmp_path / "sys", [(2, "Unified", "64K"), (3, "Unified", "96K")])
    monkeypatch.setattr(harness.cache, "SYSFS_CACHE_DIR", sysfs)  # what last_level_cache reads by default
    rc, _, rows, doc = _run(
        throughput, tmp_path / "out", "--modules", "eca", "--shapes", "2x16x8x8", "--no-compile", "--device", "cpu"
    )
    assert rc == 0 and {r["shape"] for r in rows} == {"2x16x8x8"}  # explicit shapes are measured as given
    cache = doc["meta"]["last_level_cache"]
    assert (cache["bytes"], cache["level"], cache["source"], cache["rotation_factor"]) == (96 * 1024, "L3", "sysfs", 2)
    assert doc["meta"]["input_sets"] == {"eca 2x16x8x8": 24}  # ceil(2 x 96 KiB / 8 KiB)
    header = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("last-level cache")]
    assert len(header) == 1 and "L3 (sysfs)" in header[0]


# --------------------------------------------------------------------------- fused backends from hot paths


@pytest.fixture
def no_nonlocal_attn_on_cpu(monkeypatch):
    """The C++ backend reports nonlocal_attn (PAM's hot path) unavailable; the rest is real."""
    from attnkernels import backend

    real = backend.why_unavailable

    def why_unavailable(name, hot_path, device):
        if name == "cpu" and hot_path == "nonlocal_attn":
            return "switched off by the test"
        return real(name, hot_path, device)

    monkeypatch.setattr(backend, "why_unavailable", why_unavailable)
    yield
    monkeypatch.undo()
    if hasattr(getattr(backend, "_select", None), "cache_clear"):
        backend._select.cache_clear()  # no choice made under the fake outlives the test


def test_backend_choice_comes_from_hot_paths(harness, monkeypatch, no_nonlocal_attn_on_cpu):
    from attnkernels.nn import FUSED

    B = harness.backends
    off = "nonlocal_attn: switched off by the test"
    assert B.backend_problems(FUSED["pam"].hot_paths, "cpu", ["cpu"]) == {"cpu": off}
    assert B.fused_backends(FUSED["csm"].hot_paths, "cpu", ["cpu"]) == []  # CSM runs SE's and PAM's hot paths
    assert B.module_backends("eca", "cpu", ["cpu"]) == {"cpu": None}
    assert B.module_backends("bridge", "cpu", ["cpu"]) == {"cpu": None}  # channel_gate only
    monkeypatch.delitem(FUSED, "cam")
    assert B.module_backends("cam", "cpu", ["cpu"]) == {}  # no fused class
    monkeypatch.setattr(FUSED["eca"], "hot_paths", ("channel_gate", "nonlocal_attn"))  # the class attribute decides
    assert B.module_backends("eca", "cpu", ["cpu"]) == {"cpu": off}


def test_no_row_for_a_backend_missing_a_hot_path(throughput, tmp_path, capsys, no_nonlocal_attn_on_cpu):
    rc, _, rows, doc = _run(
        throughput, tmp_path, "--modules", "eca,pam", "--shapes", "2x16x4x4", "--no-compile", "--device", "cpu"
    )
    assert rc == 0 and "fused-cpu" in doc["meta"]["variants"]
    assert [(r["module"], r["variant"]) for r in rows] == [
        ("eca", "memcpy"), ("eca", "eager"), ("eca", "fused-cpu"), ("pam", "memcpy"), ("pam", "eager"), ("pam", "sdpa"),
    ]
    assert all(r["error"] == "" for r in rows)
    assert "note: no fused-cpu row for pam: nonlocal_attn: switched off by the test" in capsys.readouterr().err
    # The model rows ask the same place.
    settings = throughput.model_rows.ModelSettings(
        attentions=["pam", "eca"], variants=["eager", "fused-cpu"], batch=2, size=32, repeats=1,
        device=torch.device("cpu"),
    )
    assert throughput.model_rows.variants_of("pam", settings) == ["eager"]
    assert throughput.model_rows.variants_of("eca", settings) == ["eager", "fused-cpu", "tail-cpu"]


# --------------------------------------------------------------------------- model rows


@pytest.fixture
def one_thread():
    """Let a test run the benchmark on one thread (``--threads 1``) and restore the count after.

    A ResNet-50 step on 2 threads slows 10-60x when another process holds one of 2 cores
    (each op's threads wait for each other); on one thread it takes ~0.1 s here.
    """
    threads = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(threads)


def test_throughput_model_rows(throughput, tmp_path, capsys, one_thread):
    # The smallest run that still goes through ResNet-50 end to end: batch 2 at 32x32 (the
    # last stage is 1x1, so train-mode BatchNorm still sees 2 values per channel).
    rc, _, rows, doc = _run(
        throughput, tmp_path, "--modules", "se", "--shapes", "2x16x8x8", "--no-compile", "--device", "cpu",
        "--models", "ham", "--model-batch", "2", "--model-size", "32", "--model-repeats", "1", *one_thread,
    )
    assert rc == 0 and len(rows) == 3  # the module table is still there
    with open(tmp_path / "throughput_models.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header, models = reader.fieldnames, list(reader)
    assert header == list(throughput.model_rows.MODEL_COLUMNS)
    # The bare network and HAM's, each with its blocks' tails fused too.
    assert [(r["model"], r["attention"], r["variant"]) for r in models] == [
        ("resnet50", "none", "eager"), ("resnet50", "none", "tail-cpu"), ("resnet50", "ham", "eager"),
        ("resnet50", "ham", "fused-cpu"), ("resnet50", "ham", "tail-cpu"),
    ]
    for r in models:
        assert r["error"] == "", r
        assert (r["batch"], r["image_size"], r["precision"], r["memory_format"], r["device"]) == (
            "2", "32", "float32", "contiguous", "cpu",
        )
        for col in ("step_ms", "images_per_s", "speedup_vs_eager", "peak_step_mb", "first_call_s"):
            assert float(r[col]) > 0, (r["attention"], r["variant"], col)
        assert float(r["images_per_s"]) == pytest.approx(2 / (float(r["step_ms"]) / 1e3), rel=1e-4)
    # Overheads are relative to the bare network's row (its own is 0); timings are not asserted.
    assert float(models[0]["overhead_vs_bare_pct"]) == 0.0
    bare = float(models[0]["step_ms"])
    for r in models[1:]:
        expected = (float(r["step_ms"]) / bare - 1) * 100
        assert float(r["overhead_vs_bare_pct"]) == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert [(r["attention"], r["variant"]) for r in doc["model_rows"]] == [
        ("none", "eager"), ("none", "tail-cpu"), ("ham", "eager"), ("ham", "fused-cpu"), ("ham", "tail-cpu"),
    ]
    assert doc["meta"]["models"]["attentions"] == ["ham"] and doc["meta"]["models"]["repeats"] == 1
    printed = capsys.readouterr().out
    assert "whole model: resnet50 training step" in printed and "fused-cpu" in printed


def test_throughput_models_default_off_on_cpu(throughput, tmp_path):
    rc, _, rows, doc = _run(
        throughput, tmp_path, "--modules", "eca", "--shapes", "2x16x4x4", "--no-compile", "--device", "cpu"
    )
    assert rc == 0 and rows and "model_rows" not in doc and doc["meta"]["models"] is None
    assert not (tmp_path / "throughput_models.csv").exists()


def test_throughput_model_arguments(throughput, capsys):
    with pytest.raises(SystemExit):
        throughput.main(["--models", "nonesuch", "--device", "cpu", "--out", ""])
    assert "unknown --models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        throughput.main(["--modules", "none", "--device", "cpu", "--out", ""])
    assert "needs --models" in capsys.readouterr().err
    args = throughput.build_parser().parse_args(["--models", "se,ham", "--device", "cpu"])
    cfg = throughput.resolve_config(args)
    assert cfg.models.attentions == ["se", "ham"] and cfg.models.batch == 8 and cfg.models.size == 224
    assert cfg.models.variants == ["eager", "fused-cpu"]  # no compile of ResNet-50 on CPU by default
    args = throughput.build_parser().parse_args(
        ["--models", "se", "--device", "cpu", "--variants", "eager,compile", "--model-batch", "4"]
    )
    cfg = throughput.resolve_config(args)
    assert cfg.models.variants == ["eager", "compile"] and cfg.models.batch == 4
