"""How csrc/ is compiled: sources, flags and toolchain fixes.

One place for the JIT build (`attnkernels._ext`) and the ahead-of-time build (`setup.py`),
so both produce the same library. Imports only torch and the standard library, so setup.py
can load this file before the package is installed.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import site
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
# A checkout keeps the sources at the top level; an installed package carries a copy.
_SOURCE_ROOTS = (PACKAGE_DIR.parent / "csrc", PACKAGE_DIR / "_csrc")


def source_root() -> Path:
    """The csrc/ directory: the checkout's, else the copy installed inside the package."""
    for root in _SOURCE_ROOTS:
        if (root / "attnkernels.cpp").is_file():
            return root
    raise FileNotFoundError(
        "attnkernels: the C++ sources (csrc/) are missing from this installation; "
        f"looked in {', '.join(str(r) for r in _SOURCE_ROOTS)}"
    )


def find_cuda_home() -> str | None:
    """The CUDA toolkit root holding bin/nvcc, lib64/libcudart and include/cuda_runtime.h.

    CUDA_HOME / CUDA_PATH win; then the directory above the nvcc on PATH; then
    /usr/local/cuda and /usr/local/cuda-*. A candidate must hold the runtime too: an
    nvcc on PATH may be a wrapper script in /usr/local/bin, and /usr/local is no toolkit.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in candidates:
        if home and _is_cuda_toolkit(Path(home)):
            return home
    return None


def _is_cuda_toolkit(home: Path) -> bool:
    return (
        (home / "bin" / "nvcc").is_file()
        and (home / "include" / "cuda_runtime.h").is_file()
        and any((home / lib).glob("libcudart.so*") for lib in ("lib64", "lib"))
    )


def pip_cuda_include_dirs() -> list[str]:
    """Headers of pip's CUDA packages (e.g. site-packages/nvidia/cu13/include: cusparse.h),
    which torch's CUDA headers include but a system toolkit may lack."""
    dirs = []
    for base in {*site.getsitepackages(), site.getusersitepackages(), *sys.path}:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
    return sorted(set(dirs))


def cpu_flags() -> list[str]:
    """Optimisation flags for the CPU kernels.

    -fopenmp makes at::parallel_for (an inline OpenMP region) parallel; it links the
    libgomp.so.1 torch has already loaded. at::vec::Vectorized uses AVX2 when the build
    machine has it (the JIT build runs where the library runs; set
    ATTNKERNELS_CPU_CAPABILITY=DEFAULT for a portable ahead-of-time build).
    """
    flags = ["-O3", "-fopenmp"]  # the C++ standard is torch's choice (C++20 in 2.14)
    capability = os.environ.get("ATTNKERNELS_CPU_CAPABILITY", "AUTO").upper()
    if capability == "AUTO":
        capability = "AVX2" if _cpu_has("avx2") and _cpu_has("fma") else "DEFAULT"
    if capability == "AVX2":
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("flags") and f" {flag}" in line for line in f)
    except OSError:
        return False


@dataclass
class BuildConfig:
    """Everything one build of the extension needs."""

    sources: list[str]
    include_dirs: list[str]
    cflags: list[str]
    cuda_cflags: list[str] = field(default_factory=list)
    ldflags: list[str] = field(default_factory=lambda: ["-fopenmp"])
    with_cuda: bool = False
    cuda_home: str | None = None
    why_no_cuda: str = ""

    def digest(self) -> str:
        """A hash of every input of the build: sources, headers, flags, torch version, and
        where the sources are.

        The build commands name the sources by absolute path, so two checkouts with the same
        sources (two worktrees, two virtualenvs) sharing one folder would each find the other's
        commands there and rebuild the library on every load; with the path, each has its own.
        """
        h = hashlib.sha256()
        root = source_root()
        h.update(str(root.resolve()).encode() + b"\0")
        for path in sorted(root.rglob("*")):
            if path.suffix in {".cpp", ".cu", ".h", ".cuh"}:
                h.update(str(path.relative_to(root)).encode())
                h.update(path.read_bytes())
        toolchain = [str(self.with_cuda), str(self.cuda_home), torch.__version__]
        for part in (self.cflags, self.cuda_cflags, toolchain):
            h.update("\0".join(part).encode())
        return h.hexdigest()[:12]


def build_config(with_cuda: bool | None = None) -> BuildConfig:
    """The sources and flags for this machine.

    CUDA sources are compiled whenever torch is a CUDA build and nvcc is found, GPU or
    not (`with_cuda=None`), so CPU-only CI proves they compile and link.
    """
    root = source_root()
    # csrc/*.cpp: the library and each hot path's schemas (<path>_ops.cpp); python_module.cpp is
    # the ahead-of-time build's module init only (setup.py adds it).
    top = [p for p in sorted(root.glob("*.cpp")) if p.name != "python_module.cpp"]
    cpu_sources = [str(p) for p in top] + sorted(str(p) for p in (root / "cpu").glob("*.cpp"))
    cuda_sources = sorted(str(p) for p in (root / "cuda").glob("*.cu"))
    cuda_home = find_cuda_home()
    why_no_cuda = ""
    if torch.version.cuda is None:
        why_no_cuda = "torch is a CPU-only build"
    elif cuda_home is None:
        why_no_cuda = "nvcc was not found (set CUDA_HOME to the CUDA toolkit root)"
    elif not cuda_sources:
        why_no_cuda = "there are no CUDA sources"
    if with_cuda is None:
        # ATTNKERNELS_WITH_CUDA=0 skips the (slow) CUDA compile; =1 insists on it.
        forced = os.environ.get("ATTNKERNELS_WITH_CUDA", "").strip()
        with_cuda = {"0": False, "1": True}.get(forced, not why_no_cuda)
        if forced == "0":
            why_no_cuda = "ATTNKERNELS_WITH_CUDA=0"
    if with_cuda and why_no_cuda:
        raise RuntimeError(f"attnkernels: cannot build CUDA sources: {why_no_cuda}")
    include_dirs = [str(root / "include")]
    if with_cuda:
        include_dirs += pip_cuda_include_dirs()
    return BuildConfig(
        sources=cpu_sources + (cuda_sources if with_cuda else []),
        include_dirs=include_dirs,
        cflags=cpu_flags(),
        # -Xptxas=-v: ptxas reports registers, spills and shared memory per kernel; a verbose
        # build (ATTNKERNELS_VERBOSE_BUILD=1) prints it, and scripts/cuda_resources.py tabulates it.
        cuda_cflags=["-O3", "-lineinfo", "-Xptxas=-v"] if with_cuda else [],
        with_cuda=with_cuda,
        cuda_home=cuda_home if with_cuda else None,
        why_no_cuda=why_no_cuda,
    )


def prepare_cuda_toolchain(config: BuildConfig) -> None:
    """Point torch's extension builder at the toolkit, and pick an arch without a GPU.

    torch guesses CUDA_HOME once, at import, and may settle on /usr/local; with no GPU
    visible it cannot infer the arch list, so 9.0 (H100/H200) is the default then.
    """
    if not config.with_cuda:
        return
    import torch.utils.cpp_extension as cpp_extension

    os.environ["CUDA_HOME"] = config.cuda_home
    cpp_extension.CUDA_HOME = config.cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
