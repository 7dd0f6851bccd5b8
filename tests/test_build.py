"""The builds of csrc/: what the loaded library holds, the one build description
(attnkernels/_build.py), the packaging of the sources, and the CMake library for libtorch.

The CUDA check is how CPU-only CI proves the CUDA sources compile and link: with a CUDA
build of torch and nvcc present, the library `attnkernels._ext.load()` returns must hold a
CUDA kernel for every op. Where they cannot be compiled the test is skipped, saying why,
except under CI (the CI environment variable), where that is a failure.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from attnkernels import _build, _ext, backend
from attnkernels.ops._schemas import schemas

ROOT = Path(__file__).resolve().parent.parent
# Every op of every hot path, as csrc/<hot_path>_ops.cpp defines them; each has a CPU kernel.
OPS = tuple(op for hot_path in backend.HOT_PATHS for op in schemas(hot_path))
# Ops with no CUDA kernel. HAM's small-map conv runs on cuDNN on GPUs
# (attnkernels.functional.ham_spatial_conv); ham_attention, HAM's inference in one per-sample op,
# is CPU-only too.
CPU_ONLY_OPS = ("ham_spatial_conv", "ham_spatial_conv_backward", "ham_attention")
# The per-sample composites: a CPU kernel; on CUDA the Python composite of their ops serves them.
PER_SAMPLE_COMPOSITE_OPS = ("channel_attention", "channel_mlp_attention")


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"attnkernels::{op}", key)


def _load() -> str:
    """The compiled ops, loaded (or JIT-built) as the package does; where they came from."""
    if os.environ.get("ATTNKERNELS_NO_EXTENSION", "") not in ("", "0"):
        pytest.skip("ATTNKERNELS_NO_EXTENSION disables the compiled ops")
    try:
        return _ext.load()
    except _ext.ExtensionUnavailable as err:
        pytest.fail(str(err))


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 600) -> str:
    result = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{output[-6000:]}"
    return output


# --- the loaded library ---


def test_cuda_kernels_are_compiled_for_every_op() -> None:
    config = _build.build_config()  # raises if ATTNKERNELS_WITH_CUDA=1 cannot be honoured
    if not config.with_cuda:
        reason = f"the CUDA sources are not compiled on this machine: {config.why_no_cuda}"
        if os.environ.get("CI"):
            pytest.fail(
                f"{reason}. CI must prove the CUDA build: use a CUDA build of torch, install "
                "the CUDA toolkit (nvcc; CUDA_HOME = its root) and leave ATTNKERNELS_WITH_CUDA unset."
            )
        pytest.skip(reason)
    loaded_from = _load()
    no_cuda_kernel = CPU_ONLY_OPS + PER_SAMPLE_COMPOSITE_OPS
    missing = [op for op in OPS if op not in no_cuda_kernel and not _has_kernel(op, "CUDA")]
    assert not missing, f"no CUDA kernel for {missing} in the library loaded from {loaded_from}"
    assert _ext.cuda_compiled()


def test_cpu_kernels_are_registered_for_every_op() -> None:
    loaded_from = _load()
    missing = [op for op in OPS if not _has_kernel(op, "CPU")]
    assert not missing, f"no CPU kernel for {missing} in the library loaded from {loaded_from}"


# --- the build description (cheap) ---


def test_build_config_lists_the_sources_that_exist() -> None:
    root = _build.source_root()
    config = _build.build_config(with_cuda=False)
    assert config.sources, "no sources"
    assert all(Path(s).is_file() for s in config.sources), config.sources
    assert all(Path(d).is_dir() for d in config.include_dirs), config.include_dirs
    # csrc/*.cpp (the library and each hot path's schemas) and cpu/*.cpp; python_module.cpp is
    # the module init of the ahead-of-time build only (setup.py adds it).
    top = {p for p in root.glob("*.cpp") if p.name != "python_module.cpp"}
    assert {root / "attnkernels.cpp", *(root / f"{hp}_ops.cpp" for hp in backend.HOT_PATHS)} <= top
    expected = top | set((root / "cpu").glob("*.cpp"))
    assert {Path(s) for s in config.sources} == expected
    assert not config.with_cuda and not config.cuda_cflags


def test_build_config_with_cuda_adds_every_cuda_source() -> None:
    try:
        config = _build.build_config(with_cuda=True)
    except RuntimeError as err:
        pytest.skip(str(err))
    root = _build.source_root()
    cuda_sources = {Path(s) for s in config.sources if s.endswith(".cu")}
    assert cuda_sources == set((root / "cuda").glob("*.cu"))
    assert all(p.is_file() for p in cuda_sources)
    assert config.cuda_home and (Path(config.cuda_home) / "bin" / "nvcc").is_file()


def test_digest_follows_every_flag() -> None:
    config = _build.build_config(with_cuda=False)
    digest = config.digest()
    assert digest == _build.build_config(with_cuda=False).digest()
    changed = {
        "cflags": dataclasses.replace(config, cflags=[*config.cflags, "-DATTNKERNELS_TEST_FLAG"]),
        "cuda_cflags": dataclasses.replace(config, cuda_cflags=["-O2"]),
        "with_cuda": dataclasses.replace(config, with_cuda=True),
    }
    for what, other in changed.items():
        assert other.digest() != digest, f"the digest ignores {what}"


def test_digest_follows_where_the_sources_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two checkouts of the same sources build in two folders: the build commands name the
    sources by absolute path, so a shared folder would rebuild on every load from the other."""
    config = _build.build_config(with_cuda=False)
    digest = config.digest()
    copy = shutil.copytree(_build.source_root(), tmp_path / "csrc")
    monkeypatch.setattr(_build, "source_root", lambda: copy)
    assert config.digest() != digest


# --- packaging: a pure-Python wheel carries csrc/ for the JIT build (a few seconds) ---


def test_wheel_carries_the_sources(tmp_path: Path) -> None:
    pytest.importorskip("pip")
    pytest.importorskip("setuptools")
    # Build from a copy, so the checkout gets no build/ or egg-info.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in ("attnkernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k != "ATTNKERNELS_BUILD_EXT"}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("attnkernels-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = [
        p.relative_to(ROOT / "csrc").as_posix()
        for p in (ROOT / "csrc").rglob("*")
        if p.suffix in {".cpp", ".cu", ".h", ".cuh"}
    ]
    missing = [s for s in sources if f"attnkernels/_csrc/{s}" not in names]
    assert not missing, f"the wheel lacks {missing}"
    assert not any("/_C." in n for n in names), "a pure-Python wheel holds a compiled module"
    # Installed without a checkout, the build finds the carried sources.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = subprocess.run(
        [sys.executable, "-c",
         "from attnkernels import _build; print(_build.source_root()); "
         "print(len(_build.build_config(with_cuda=False).sources))"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert probe.returncode == 0, probe.stderr
    root, count = probe.stdout.split()
    assert Path(root) == site / "attnkernels" / "_csrc"
    assert int(count) == len(_build.build_config(with_cuda=False).sources)


# --- the CMake library for libtorch programs, and its ctest (minutes on 2 cores) ---


@pytest.fixture(scope="session")
def cmake_build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cmake_build")


@pytest.mark.slow
def test_cmake_library_passes_ctest(cmake_build_dir: Path) -> None:
    cmake, ctest = shutil.which("cmake"), shutil.which("ctest")
    if not (cmake and ctest):
        pytest.skip("cmake/ctest are not installed")
    if torch.version.cuda and _build.find_cuda_home() is None:
        pytest.skip(
            f"torch {torch.__version__} is a CUDA build, whose CMake config needs the CUDA "
            "toolkit (nvcc), and none was found"
        )
    ninja = shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    # CPU-only, to bound the time; the CUDA sources are proven by the JIT build above.
    _run([cmake, "-S", ROOT, "-B", cmake_build_dir, *generator,
          f"-DPython_EXECUTABLE={sys.executable}", "-DATTNKERNELS_WITH_CUDA=OFF"], timeout=300)
    _run([cmake, "--build", cmake_build_dir, "--parallel", str(os.cpu_count() or 2)], timeout=900)
    output = _run([ctest, "--output-on-failure"], cwd=cmake_build_dir, timeout=300)
    assert "100% tests passed" in output, output
    assert list(cmake_build_dir.glob("libattnkernels_ops.*")), "no libattnkernels_ops library"
