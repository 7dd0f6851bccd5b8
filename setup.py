"""attnkernels: fused kernels for the attention modules of convolutional networks.

A pure-Python install by default; compiled kernels (later issues) JIT-build on first use.
"""
from setuptools import find_packages, setup

setup(
    name="attnkernels",
    version="0.1.0",
    description="Fused kernels for CNN attention modules (SE, ECA, CBAM, HAM, GAM, PAM, ...)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["attnkernels", "attnkernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.6"],
    extras_require={"test": ["pytest", "pytest-benchmark", "timm", "numpy"]},
)
