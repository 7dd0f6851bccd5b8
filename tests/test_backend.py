"""The backend chooser: explicit choices, auto order, reports, and the fallback when the
compiled ops cannot be had."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from attnkernels import backend

CPU = torch.device("cpu")


def test_auto_picks_the_cpp_kernels_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.select("channel_gate", CPU) == "cpu"


def test_context_manager_wins_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert backend.select("channel_gate", CPU) == "reference"
    with backend.use_backend("cpu"):
        assert backend.select("channel_gate", CPU) == "cpu"
        with backend.use_backend("triton"):
            assert backend.select("channel_gate", CPU) == "triton"
        assert backend.select("channel_gate", CPU) == "cpu"
    assert backend.select("channel_gate", CPU) == "reference"
    with backend.use_backend("auto"):
        assert backend.select("channel_gate", CPU) == "cpu"


def test_unavailable_explicit_choice_raises() -> None:
    with backend.use_backend("cuda"), pytest.raises(RuntimeError, match=r"backend 'cuda' was requested .* runs CUDA tensors only"):
        backend.select("channel_gate", CPU)


def test_bad_names(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"use_backend\(name\) must be one of auto, cpu, cuda, triton, reference"):
        with backend.use_backend("tpu"):
            pass
    monkeypatch.setenv(backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"ATTNKERNELS_BACKEND must be one of"):
        backend.select("channel_gate", CPU)
    with pytest.raises(ValueError, match=r"unknown hot path 'nope'"):
        backend.why_unavailable("cpu", "nope", CPU)


def test_explain_names_every_backend_and_reason() -> None:
    report = backend.explain("cpu")
    assert "channel_gate on cpu: runs cpu" in report
    assert "ham_spatial on cpu: runs cpu" in report
    assert "cuda      unavailable: runs CUDA tensors only" in report
    assert "reference available" in report
    assert "triton" in report


def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "interpreter" in backend.why_unavailable("triton", "channel_gate", CPU)


def _run_isolated(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_missing_extension_warns_once_and_falls_back_to_reference() -> None:
    """With the compiled ops unavailable, auto says why once and the numbers stay right."""
    result = _run_isolated(
        """
        import warnings, torch
        from attnkernels import backend, nn, reference
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = nn.ECA(16); r = reference.ECA(16); r.load_state_dict(m.state_dict())
            x = torch.randn(2, 16, 5, 5)
            same = torch.allclose(m(x), r(x)) and torch.allclose(m(x), r(x))
        msgs = [str(w.message) for w in caught if "attnkernels" in str(w.message)]
        print(backend.select("channel_gate", torch.device("cpu")), same, len(msgs))
        print(msgs[0])
        """,
        ATTNKERNELS_NO_EXTENSION="1",
    )
    assert result.returncode == 0, result.stderr
    first, reason = result.stdout.strip().splitlines()[:2]
    assert first == "reference True 1"
    assert "cpu backend is unavailable" in reason and "ATTNKERNELS_NO_EXTENSION" in reason


def test_build_failure_message_names_the_fix() -> None:
    from attnkernels import _ext

    message = _ext._explain_build_failure(RuntimeError("Ninja is required to load C++ extensions"), "/tmp/x")
    assert "pip install ninja" in message
    message = _ext._explain_build_failure(RuntimeError("[1/2] c++ ...\nfoo.cpp:3:1: error: expected ';'\n"), "/tmp/x")
    assert "foo.cpp:3:1: error: expected ';'" in message
