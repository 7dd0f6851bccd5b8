"""attnkernels: fused kernels for the attention modules of convolutional networks.

A pure-Python install by default: the compiled ops JIT-build on first use from the C++/CUDA
sources, which every install carries (a checkout's csrc/, installed as attnkernels/_csrc/).

`ATTNKERNELS_BUILD_EXT=1 pip install --no-build-isolation .` builds the same ops ahead of
time as the extension module `attnkernels._C` (loaded by `attnkernels._ext` in preference
to a JIT build). Its sources, flags and CUDA toolchain fixes come from
attnkernels/_build.py, the one description of the build, which is loaded here by file path
because the package itself is not importable yet; it needs torch, hence
--no-build-isolation (the build must see the torch the extension will run with).
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# csrc/ is installed as this package, so a non-editable install can JIT-build too
# (attnkernels._build.source_root() looks there when there is no checkout).
CSRC_PACKAGE = "attnkernels._csrc"
CSRC_PATTERNS = ["*.cpp", "*.cu", "*.h", "*.cuh", "**/*.cpp", "**/*.cu", "**/*.h", "**/*.cuh"]


def _want_extension() -> bool:
    return os.environ.get("ATTNKERNELS_BUILD_EXT", "").strip() not in ("", "0")


def _load_build_module():
    """attnkernels/_build.py by file path (it imports only torch and the standard library)."""
    try:
        import torch  # noqa: F401
    except ImportError as err:
        raise SystemExit(
            "attnkernels: ATTNKERNELS_BUILD_EXT=1 needs torch importable while building; "
            "install torch first and build with `pip install --no-build-isolation .` "
            f"({err})"
        ) from err
    name = "attnkernels_setup_build"
    spec = importlib.util.spec_from_file_location(name, HERE / "attnkernels" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # @dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _extension_args() -> dict:
    """ext_modules and cmdclass for the ahead-of-time `attnkernels._C`, exactly as _build says."""
    _build = _load_build_module()
    config = _build.build_config()
    _build.prepare_cuda_toolchain(config)  # before cpp_extension picks CUDA_HOME's lib64
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # setuptools wants sources relative to setup.py; the module init lives only in this build.
    def rel(path) -> str:
        return os.path.relpath(path, HERE)

    sources = [rel(s) for s in config.sources] + [rel(HERE / "csrc" / "python_module.cpp")]
    extension = CUDAExtension if config.with_cuda else CppExtension
    compile_args = {"cxx": list(config.cflags)}
    if config.with_cuda:
        compile_args["nvcc"] = list(config.cuda_cflags)
    what = "C++ and CUDA" if config.with_cuda else f"C++ only: {config.why_no_cuda}"
    print(f"attnkernels: building attnkernels._C ahead of time ({what})", flush=True)
    ext = extension(
        name="attnkernels._C",
        sources=sources,
        include_dirs=list(config.include_dirs),
        extra_compile_args=compile_args,
        extra_link_args=list(config.ldflags),
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="attnkernels",
    version="0.1.0",
    description="Fused kernels for CNN attention modules (SE, ECA, CBAM, HAM, GAM, PAM, ...)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=[*find_packages(include=["attnkernels", "attnkernels.*"]), CSRC_PACKAGE],
    package_dir={CSRC_PACKAGE: "csrc"},
    package_data={CSRC_PACKAGE: CSRC_PATTERNS},
    python_requires=">=3.9",
    # torch 2.11 (with Triton 3.6) is the oldest supported, tested by `make test-torch2.11`.
    install_requires=["torch>=2.11", "ninja"],  # ninja: the JIT build of csrc/
    extras_require={
        "test": [
            "pytest", "pytest-benchmark", "timm", "numpy", "matplotlib",
            "pytest-xdist",  # `make test` runs a worker per core
            "hypothesis",  # property-based tests (tests/test_properties.py)
            "onnx", "onnxscript", "onnxruntime",  # ONNX export tests (tests/test_export.py)
        ]
    },
    zip_safe=False,
    **(_extension_args() if _want_extension() else {}),
)
