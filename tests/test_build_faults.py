"""Faults of the compiled extension's build and load: a damaged cached library, a build folder
that is not writable, a missing compiler, the extension disabled on purpose.

Each case runs in a child process with ATTNKERNELS_BUILD_DIR pointing at a temporary folder
holding a copy of the library already built from the current sources (objects, ninja files
and all, with their times), so a rebuild only relinks and no test compiles the extension.
The child runs every fused module against its reference module and reports, as JSON, the
backends chosen, the largest difference and the warnings; a child killed by a signal (SIGBUS
from a truncated library) is a test failure, not a crash of pytest.

A lock left by a killed build: torch 2.11's builder (the GPU machine's) is a FileBaton, whose
lock file blocks by existing; a child of a newer torch gets the same builder from
AS_FILE_BATON.

Read-only folders: `chmod` where the tests run unprivileged; as root (who writes regardless
of modes) the child runs in a private mount namespace where the folder is bind-mounted
read-only (`unshare`, `mount`; nothing changes outside the child). As root without that, the
read-only tests are skipped, saying why.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

from attnkernels import _build_lock, _ext, _integrity
from attnkernels.nn import FUSED

ROOT = Path(__file__).resolve().parent.parent
ALL_MODULES = tuple(FUSED)  # one fused module or more per hot path
TOLERANCE = 1e-10  # float64, fused against reference

# The child: every fused module in `argv[1]` against its reference, with every warning kept.
CHILD = """
import json, sys, warnings
import torch
import helpers
from attnkernels import _ext, backend, nn

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    worst = 0.0
    for name in sys.argv[1].split(","):
        fused, ref = helpers.fused_pair(
            nn.FUSED[name], nn.reference_class(nn.FUSED[name]), 16,
            dtype=torch.float64, device="cpu", **helpers.module_kwargs(name, 16),
        )
        x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
        worst = max(worst, (fused(x) - ref(x)).abs().max().item())
print(json.dumps({
    "backends": sorted({backend.select(hp, "cpu") for hp in backend.HOT_PATHS}),
    "max_error": worst,
    "loaded_from": _ext._loaded_from,
    "warnings": [str(w.message) for w in caught if "attnkernels" in str(w.message)],
}))
"""


# ----------------------------------------------------------------------------------------
# The built library and its copies
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built_folder() -> Path:
    """The build folder of the current sources' library, built here if it is not yet."""
    if os.environ.get("ATTNKERNELS_NO_EXTENSION", "") not in ("", "0"):
        pytest.skip("ATTNKERNELS_NO_EXTENSION disables the compiled ops")
    if importlib.util.find_spec("attnkernels._C") is not None:
        pytest.skip("an installed attnkernels._C is loaded instead of a JIT build")
    try:
        return Path(_ext.load()).parent
    except _ext.ExtensionUnavailable as err:
        pytest.fail(str(err))


def copy_build(folder: Path, root: Path) -> Path:
    """A copy of build folder `folder` under `root`, where ATTNKERNELS_BUILD_DIR=root finds
    it, times kept so ninja sees the objects up to date; returns the library's path. The
    lock file and any checksum record stay behind."""
    shutil.copytree(folder, root / folder.name, ignore=shutil.ignore_patterns("lock", "*.lock", "*.sha256"))
    return root / folder.name / f"{folder.name}{cpp_extension.LIB_EXT}"


def truncate(path: Path, fraction: float) -> None:
    """Cut `path` to `fraction` of its size, as a killed write or a partial copy leaves it."""
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * fraction))


# ----------------------------------------------------------------------------------------
# Read-only folders
# ----------------------------------------------------------------------------------------
_BIND_READ_ONLY = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0"'


def _can_bind_read_only(folder: str) -> bool:
    if not (shutil.which("unshare") and shutil.which("mount")):
        return False
    probe = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _BIND_READ_ONLY, folder]
    return subprocess.run(probe, capture_output=True, timeout=60).returncode == 0


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[list[str]]:
    """`folder` read-only for a child process; yields the command prefix to start it with."""
    if os.geteuid() != 0:
        modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (folder, *folder.rglob("*")) if p.is_dir()}
        for path in modes:
            path.chmod(0o555)
        try:
            yield []
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
        return
    if not _can_bind_read_only(str(folder)):
        pytest.skip("running as root, where chmod does not stop writes, and a private read-only bind "
                    "mount (unshare --mount) is not possible here")
    bind_then_run = f'{_BIND_READ_ONLY} && exec "$@"'
    yield ["unshare", "--mount", "--propagation", "private", "sh", "-c", bind_then_run, str(folder)]


# ----------------------------------------------------------------------------------------
# The child
# ----------------------------------------------------------------------------------------
def start_child(
    build_root: Path, *, prefix: Sequence[str] = (), env: dict[str, str | None] | None = None, prelude: str = ""
) -> subprocess.Popen:
    """Start the child with ATTNKERNELS_BUILD_DIR=build_root and this environment changed by
    `env` (None unsets a variable), running `prelude` first."""
    child_env = {**os.environ, **(env or {})}
    child_env["ATTNKERNELS_BUILD_DIR"] = str(build_root)
    child_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    child_env = {k: v for k, v in child_env.items() if v is not None}
    cmd = [*prefix, sys.executable, "-c", prelude + CHILD, ",".join(ALL_MODULES)]
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_child(child: subprocess.Popen, timeout: float = 600) -> tuple[dict, str]:
    """The child's (report, stderr), once it ends; a hang or a signal fails the test."""
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        _, stderr = child.communicate()
        pytest.fail(f"the child still ran after {timeout} s (waiting on a lock?):\n{stderr[-4000:]}")
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        pytest.fail(f"the child was killed by {name} (loading the library?):\n{stderr[-4000:]}")
    assert child.returncode == 0, f"the child failed ({child.returncode}):\n{stderr[-4000:]}"
    return json.loads(stdout.strip().splitlines()[-1]), stderr


def run_child(build_root: Path, *, timeout: float = 600, **kwargs) -> tuple[dict, str]:
    """Run every fused module in a child (`start_child`'s arguments); (report, stderr)."""
    return finish_child(start_child(build_root, **kwargs), timeout)


def assert_right_numbers(report: dict, backend: str) -> None:
    assert report["backends"] == [backend], report
    assert report["max_error"] < TOLERANCE, report


def the_one_warning(report: dict) -> str:
    assert len(report["warnings"]) == 1, report["warnings"]
    return report["warnings"][0]


# ----------------------------------------------------------------------------------------
# Case 1: a damaged cached library
# ----------------------------------------------------------------------------------------
def test_structure_check_catches_every_truncation(built_folder: Path, tmp_path: Path) -> None:
    library = built_folder / f"{built_folder.name}{cpp_extension.LIB_EXT}"
    data = library.read_bytes()
    assert _integrity.problem(library) is None
    cut = tmp_path / library.name
    for length in range(0, len(data), max(len(data) // 97, 1)):
        cut.write_bytes(data[:length])
        assert _integrity.problem(cut) is not None, f"a library cut to {length} of {len(data)} bytes passes"


def test_truncated_library_is_rebuilt_instead_of_loaded(built_folder: Path, tmp_path: Path) -> None:
    library = copy_build(built_folder, tmp_path)
    whole_size = library.stat().st_size
    truncate(library, 0.45)
    report, stderr = run_child(tmp_path)
    assert_right_numbers(report, "cpu")
    assert report["warnings"] == []
    assert f"{library} is damaged" in stderr and "truncated" in stderr
    assert library.stat().st_size == whole_size and _integrity.problem(library) is None
    assert _integrity.record_is_current(library), "no checksum recorded for the rebuilt library"


def test_library_damaged_in_place_is_caught_by_its_checksum(built_folder: Path, tmp_path: Path) -> None:
    library = copy_build(built_folder, tmp_path)
    run_child(tmp_path)  # loads it, recording its checksum
    assert _integrity.record_is_current(library)
    data = bytearray(library.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = b"\xcc" * 4096  # same size, headers intact
    library.write_bytes(bytes(data))
    assert "SHA-256" in (_integrity.problem(library) or "")
    report, stderr = run_child(tmp_path)
    assert_right_numbers(report, "cpu")
    assert f"{library} is damaged" in stderr
    assert library.read_bytes() != bytes(data) and _integrity.problem(library) is None


def test_damaged_library_in_read_only_folder_falls_back_with_one_warning(
    built_folder: Path, tmp_path: Path
) -> None:
    library = copy_build(built_folder, tmp_path)
    truncate(library, 0.45)
    with read_only(tmp_path) as prefix:
        report, _ = run_child(tmp_path, prefix=prefix)
    assert_right_numbers(report, "reference")
    warning = the_one_warning(report)
    assert str(library) in warning and "truncated" in warning and "ATTNKERNELS_BUILD_DIR" in warning


# ----------------------------------------------------------------------------------------
# Case 2: a build folder that is not writable
# ----------------------------------------------------------------------------------------
def test_empty_read_only_folder_falls_back_with_one_warning(built_folder: Path, tmp_path: Path) -> None:
    with read_only(tmp_path) as prefix:
        report, _ = run_child(tmp_path, prefix=prefix)
    assert_right_numbers(report, "reference")
    warning = the_one_warning(report)
    assert f"{tmp_path} is not writable" in warning
    assert "set ATTNKERNELS_BUILD_DIR to a writable folder" in warning


def test_read_only_folder_with_a_whole_library_loads_it_without_building(
    built_folder: Path, tmp_path: Path
) -> None:
    library = copy_build(built_folder, tmp_path)
    with read_only(tmp_path) as prefix:
        report, stderr = run_child(tmp_path, prefix=prefix)
    assert_right_numbers(report, "cpu")
    assert report["warnings"] == [] and report["loaded_from"] == str(library)
    assert "building" not in stderr and not (library.parent / "lock").exists()
    assert not (library.parent / _build_lock.LOCK_NAME).exists()


# ----------------------------------------------------------------------------------------
# Case 3: no compiler
# ----------------------------------------------------------------------------------------
def test_missing_compiler_warning_carries_the_cause_and_the_fix(built_folder: Path, tmp_path: Path) -> None:
    ninja = shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))
    if ninja is None:
        pytest.skip("ninja is not installed, so the build stops before it needs a compiler")
    tools = tmp_path / "bin"  # PATH: ninja, and no compiler
    tools.mkdir()
    (tools / "ninja").symlink_to(ninja)
    report, _ = run_child(tmp_path / "build", env={"PATH": str(tools), "CXX": None})
    assert_right_numbers(report, "reference")
    warning = the_one_warning(report)
    assert "c++: not found" in warning and "install a C++ compiler" in warning


def test_build_failure_keeps_the_shell_cause_not_the_command() -> None:
    ninja_output = (
        "Error building extension 'attnkernels_ext_0': [1/2] c++ -MMD -c a.cpp -o a.o\n"
        "FAILED: a.o\nc++ -MMD -c a.cpp -o a.o\n/bin/sh: 1: c++: not found\n"
        "ninja: build stopped: subcommand failed.\n"
    )
    message = _ext._explain_build_failure(RuntimeError(ninja_output), "/tmp/x")
    assert "/bin/sh: 1: c++: not found" in message and "install a C++ compiler" in message
    assert "-MMD" not in message


# ----------------------------------------------------------------------------------------
# Case 4: the extension disabled on purpose
# ----------------------------------------------------------------------------------------
def test_disabled_extension_warns_once_per_process(tmp_path: Path) -> None:
    report, _ = run_child(tmp_path, env={"ATTNKERNELS_NO_EXTENSION": "1"})
    assert_right_numbers(report, "reference")
    warning = the_one_warning(report)
    assert "disabled on purpose by ATTNKERNELS_NO_EXTENSION=1" in warning


# ----------------------------------------------------------------------------------------
# Case 5: a lock left behind by a killed build
# ----------------------------------------------------------------------------------------
# torch 2.11's builder in a child of a torch whose builder takes an OS lock instead:
# cpp_extension.load behind a FileBaton on the folder's `lock`, as 2.11's _jit_compile is.
AS_FILE_BATON = """
import os
import torch.utils.cpp_extension as cpp_extension
if not hasattr(cpp_extension, "FileBaton"):
    from torch.utils.file_baton import FileBaton
    _load = cpp_extension.load

    def load(*args, build_directory, **kwargs):
        baton = FileBaton(os.path.join(build_directory, "lock"))
        if baton.try_acquire():
            try:
                return _load(*args, build_directory=build_directory, **kwargs)
            finally:
                baton.release()
        baton.wait()
        return _load(*args, build_directory=build_directory, **kwargs)

    cpp_extension.load, cpp_extension.FileBaton = load, FileBaton
"""


def test_lock_left_by_a_killed_file_baton_build_is_removed(built_folder: Path, tmp_path: Path) -> None:
    """Before, every later load waited on the file forever."""
    library = copy_build(built_folder, tmp_path)
    (library.parent / "lock").touch()  # what a FileBaton build killed midway leaves
    report, stderr = run_child(tmp_path, prelude=AS_FILE_BATON, timeout=300)
    assert_right_numbers(report, "cpu")
    assert report["warnings"] == [] and report["loaded_from"] == str(library)
    assert "left by a build that was killed" in stderr
    assert not (library.parent / "lock").exists()


def test_a_build_in_progress_is_waited_for_not_broken(built_folder: Path, tmp_path: Path) -> None:
    """While another process holds the folder's lock (building), a FileBaton `lock` is its own:
    the child waits, and goes on once the lock is released."""
    from filelock import FileLock

    library = copy_build(built_folder, tmp_path)
    folder = library.parent
    (folder / "lock").touch()
    with FileLock(str(folder / _build_lock.LOCK_NAME)):
        child = start_child(tmp_path, prelude=AS_FILE_BATON)
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        assert child.poll() is None, "the child went on while another process held the build folder"
        assert (folder / "lock").exists(), "a live build's lock was removed"
        (folder / "lock").unlink()  # the other process's build ends, releasing its baton
    report, stderr = finish_child(child, timeout=300)
    assert_right_numbers(report, "cpu")
    assert "left by a build that was killed" not in stderr
