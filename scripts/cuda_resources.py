"""Registers, spills and shared memory of every CUDA kernel, from ptxas -v in a verbose build.

    python scripts/cuda_resources.py --build          # rebuild the CUDA objects verbosely, then report
    python scripts/cuda_resources.py LOG              # report from a saved verbose build log
    python scripts/cuda_resources.py LOG --update-baseline

The extension's CUDA flags include -Xptxas=-v (attnkernels/_build.py), so a build with
ATTNKERNELS_VERBOSE_BUILD=1 prints one ptxas block per kernel. This script turns the log into a
table (build/cuda_resources/table.md and .json: source file, kernel, registers, stack frame,
spill stores and loads, static shared memory) and compares it with the committed baseline
(cuda_resources_baseline.json). It fails (exit 1) when a kernel that did not spill in the
baseline spills now, or when a kernel new since the baseline spills: spills in the tensor-core
attention kernels are chosen (their register budget is by design), new ones are regressions.
A kernel that stops spilling, or spills less, passes; --update-baseline records the new state.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

ROOT = Path(__file__).resolve().parent.parent
BASELINE = Path(__file__).resolve().parent / "cuda_resources_baseline.json"
OUT = ROOT / "build" / "cuda_resources"

_COMPILE = re.compile(r"^\[\d+/\d+\] .*nvcc .* -c (\S+\.cu) ")
_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '(\S+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers(?:.*?(\d+) bytes smem)?")


@dataclass
class Kernel:
    """ptxas's report for one kernel (one template instantiation) on one architecture."""

    source: str
    mangled: str
    arch: str
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    name: str = ""

    @property
    def key(self) -> str:
        """Stable across builds: the demangled name (anonymous namespaces carry a per-file hash
        in the mangled name) and the architecture."""
        return f"{self.name} [{self.arch}]"

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def parse_log(lines: Iterable[str]) -> List[Kernel]:
    """The kernels in a verbose build log. ninja prints each command's output after its
    `[k/n] nvcc ... -c file.cu` line, so the last such line names the source of what follows."""
    kernels: List[Kernel] = []
    source = "?"
    current: Optional[Kernel] = None
    for line in lines:
        if m := _COMPILE.match(line):
            source, current = Path(m.group(1)).name, None
        elif m := _ENTRY.search(line):
            current = Kernel(source=source, mangled=m.group(1), arch=m.group(2))
            kernels.append(current)
        elif current is not None and (m := _FRAME.search(line)):
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif current is not None and (m := _USED.search(line)):
            current.registers = int(m.group(1))
            current.smem = int(m.group(2) or 0)
            current = None  # "Used ..." closes the kernel's block
    _demangle(kernels)
    return kernels


def _demangle(kernels: List[Kernel]) -> None:
    names = [k.mangled for k in kernels]
    if names and shutil.which("c++filt"):
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout.splitlines()
        names = out if len(out) == len(names) else names
    for k, name in zip(kernels, names):
        k.name = name.replace("(anonymous namespace)::", "")


def compare(kernels: List[Kernel], baseline: Dict[str, dict]) -> List[str]:
    """The regressions: spills in a kernel that had none in the baseline, or in a new kernel."""
    problems = []
    for k in kernels:
        if not k.spills:
            continue
        before = baseline.get(k.key)
        if before is None:
            problems.append(f"new kernel spills: {k.key} in {k.source}: {k.spill_stores} B stores, "
                            f"{k.spill_loads} B loads, {k.registers} registers")
        elif before["spill_stores"] == 0 and before["spill_loads"] == 0:
            problems.append(f"now spills (did not in the baseline): {k.key} in {k.source}: "
                            f"{k.spill_stores} B stores, {k.spill_loads} B loads, {k.registers} registers")
    return problems


def table(kernels: List[Kernel]) -> str:
    lines = ["| source | kernel | arch | registers | stack B | spill st B | spill ld B | smem B |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for k in sorted(kernels, key=lambda k: (k.source, k.name)):
        name = k.name if len(k.name) <= 110 else k.name[:107] + "..."
        lines.append(f"| {k.source} | `{name}` | {k.arch} | {k.registers} | {k.stack} | "
                     f"{k.spill_stores} | {k.spill_loads} | {k.smem} |")
    return "\n".join(lines)


def build_verbose(log: Path) -> None:
    """Rebuild the extension's CUDA objects with ATTNKERNELS_VERBOSE_BUILD=1, log to `log`.
    Only the CUDA objects are removed, so the C++ objects are reused and the result is the
    library the tests then load. The log is kept in the build folder, whose name is the digest
    of every build input: a built library with its log there is reused, not rebuilt."""
    sys.path.insert(0, str(ROOT))
    from attnkernels import _build, _ext

    config = _build.build_config()
    if not config.with_cuda:
        raise SystemExit(f"cuda_resources: no CUDA build on this machine ({config.why_no_cuda})")
    folder = _ext._build_directory(f"attnkernels_ext_{config.digest()}")
    kept = folder / "ptxas_build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if kept.is_file() and any(folder.glob("*.so")):
        print(f"cuda_resources: reusing the verbose build of {folder.name} ({kept})")
        shutil.copyfile(kept, log)
        return
    for obj in [*folder.glob("*.cuda.o"), *folder.glob("*.so")]:
        obj.unlink()
    env = dict(os.environ, ATTNKERNELS_VERBOSE_BUILD="1")
    code = "import attnkernels._ext as e; e._jit_build()"  # the JIT build even if a wheel's _C exists
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for line in proc.stdout:  # tee: the build's progress stays visible in CI
            f.write(line)
            if not line.startswith("ptxas"):
                sys.stdout.write(line[:200] + ("\n" if len(line) > 200 else ""))
        if proc.wait() != 0:
            raise SystemExit(f"cuda_resources: the verbose build failed (log: {log})")
    shutil.copyfile(log, kept)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", nargs="?", type=Path, default=OUT / "build.log",
                        help="a verbose build log (default: the one --build writes)")
    parser.add_argument("--build", action="store_true", help="rebuild the CUDA objects verbosely first")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--update-baseline", action="store_true",
                        help="record this log's kernels as the baseline")
    args = parser.parse_args()
    if args.build:
        build_verbose(args.log)
    kernels = parse_log(args.log.read_text().splitlines())
    if not kernels:
        print(f"cuda_resources: no ptxas report in {args.log}: was it a verbose CUDA build "
              "(ATTNKERNELS_VERBOSE_BUILD=1, flags with -Xptxas=-v)?", file=sys.stderr)
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    text = table(kernels)
    spilling = [k for k in kernels if k.spills]
    (OUT / "table.md").write_text(f"ptxas -v, {len(kernels)} kernels, {len(spilling)} spill\n\n{text}\n")
    (OUT / "table.json").write_text(json.dumps([asdict(k) for k in kernels], indent=0))
    print(f"{len(kernels)} kernels; max registers {max(k.registers for k in kernels)}; "
          f"{len(spilling)} spill; table: {OUT / 'table.md'}")
    for k in spilling:
        print(f"  spills: {k.source} {k.key}: {k.spill_stores} B st / {k.spill_loads} B ld, "
              f"{k.registers} registers")
    if args.update_baseline:
        baseline = {k.key: {"source": k.source, "registers": k.registers, "spill_stores": k.spill_stores,
                            "spill_loads": k.spill_loads} for k in kernels}
        args.baseline.write_text(json.dumps(baseline, indent=1, sort_keys=True) + "\n")
        print(f"baseline written: {args.baseline}")
        return 0
    problems = compare(kernels, json.loads(args.baseline.read_text()))
    if problems:
        print(f"\nFAILED: {len(problems)} kernels spill that did not before:")
        for p in problems:
            print("  " + p)
        return 1
    print("OK: no kernel spills that did not spill in the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
