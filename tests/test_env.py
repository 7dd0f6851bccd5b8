"""attnkernels._env.setting: the per-call environment read answers as os.environ.get does,
through every way a program or a test changes the environment."""
from __future__ import annotations

import os

import pytest

from attnkernels import _env, backend, budget, choose

NAME = "ATTNKERNELS_TEST_ENV_SETTING"


@pytest.fixture(autouse=True)
def unset(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)


def test_setting_follows_os_environ(monkeypatch):
    assert _env.setting(NAME) is None
    monkeypatch.setenv(NAME, "static")
    assert _env.setting(NAME) == "static"
    os.environ[NAME] = "mesure \u00e9t\u00e9"  # a non-ASCII value decodes as os.environ does
    assert _env.setting(NAME) == os.environ.get(NAME) == "mesure \u00e9t\u00e9"
    os.environ[NAME] = ""
    assert _env.setting(NAME) == ""
    del os.environ[NAME]
    assert _env.setting(NAME) is None
    os.environ.update({NAME: "again"})
    assert _env.setting(NAME) == "again"
    monkeypatch.delenv(NAME)
    assert _env.setting(NAME) is None


@pytest.mark.parametrize("name", ["PATH", "HOME", "ATTNKERNELS_NOT_SET_ANYWHERE", "LANG"])
def test_setting_matches_os_environ_get(name):
    assert _env.setting(name) == os.environ.get(name)


def test_the_per_call_readers_see_changes(monkeypatch):
    """The backend, the choice mode and the memory budget read the environment per call."""
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    monkeypatch.setenv(choose.ENV_MODE, "static")
    monkeypatch.setenv(budget.ENV_VAR, "1M")
    assert (backend.requested(), choose.current_mode(), budget.extra_memory_limit()) == ("reference", "static", 1 << 20)
    monkeypatch.delenv(backend.ENV_VAR)
    monkeypatch.setenv(choose.ENV_MODE, "measure")
    monkeypatch.delenv(budget.ENV_VAR)
    assert (backend.requested(), choose.current_mode(), budget.extra_memory_limit()) == (None, "measure", None)
    monkeypatch.setenv(choose.ENV_MODE, "fast")
    with pytest.raises(ValueError, match="ATTNKERNELS_CHOOSE must be one of measure, static; got 'fast'"):
        choose.current_mode()
