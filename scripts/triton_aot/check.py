"""Compile every recorded Triton launch ahead of time for sm_90 and sm_80; fail on compile
errors, shared memory over the device limit and spills over the limit (limits.py).

    python scripts/triton_aot/check.py build/triton_aot/test_launches.json \
        build/triton_aot/bench_launches.json [--full] [--arch 90,80] [--jobs N]

The specs come from `launches.py` (the test suite run under the interpreter with
ATTNKERNELS_TRITON_LAUNCHES set) and `bench_launches.py` (the benchmark's modules at its CPU
and GPU default shapes). By default a representative subset is compiled: specs that differ only
in the alignment of their pointers or the divisibility of their ints (which change
vectorisation, not tiles or stages) are compiled once, all aligned, the variant that vectorises
most. `--full` compiles every spec. Results are cached per Triton version, spec and the
device code of the kernel's file and the attnkernels/triton/ files it imports (`--cache`;
`source_digest`), so an unchanged kernel is not compiled again, also when host code around it or
another hot path's kernels changed. Writes
build/triton_aot/<triton version>/table.md (one row per kernel: its worst case) and
results.json (every spec), prints the table, exits 1 if any spec fails a limit.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import launches  # noqa: E402
from limits import SHARED_LIMIT_BYTES, SPILL_LIMIT_BYTES  # noqa: E402


def representative(spec: Dict[str, Any]) -> Dict[str, Any]:
    """spec with every pointer aligned and every int (other than 1) divisible by 16."""
    args = []
    for a in spec["args"]:
        if "tensor" in a:
            a = {**a, "aligned": True}
        elif "int" in a and a["int"] != 1:
            a = {"int": a["int"] - a["int"] % 16}
        args.append(a)
    return {**spec, "args": args}


def select(specs: List[Dict[str, Any]], full: bool) -> List[Dict[str, Any]]:
    chosen = specs if full else [representative(s) for s in specs]
    unique = {launches.spec_key(s): s for s in chosen}
    return [unique[k] for k in sorted(unique)]


def source_digest(kernels: List[str]) -> Dict[str, str]:
    """Per kernel, a hash of the device code it may use: every `triton.jit` function and every
    module-level constant of its own file and of the attnkernels/triton/ files that file imports,
    transitively (a kernel calls helpers from _common and other hot paths' files and reads
    tl.constexpr globals). Host code (block-size rules, launches, op registration) is left out:
    it changes which specs are recorded, which the spec keys already say, not what a spec
    compiles to. So a change to host code alone recompiles nothing, and a change to one hot
    path's kernels recompiles only that path and the paths importing it."""
    folder = ROOT / "attnkernels" / "triton"
    digests: Dict[str, str] = {}
    for kernel in kernels:
        module = kernel.split(":")[0].rsplit(".", 1)[-1]
        device = hashlib.sha256()
        for name in sorted(triton_file_closure(folder, module)):
            device.update(name.encode())
            for part in device_code((folder / f"{name}.py").read_text()):
                device.update(part.encode())
        digests[kernel] = device.hexdigest()[:16]
    return digests


def triton_file_closure(folder: Path, module: str) -> set:
    """`module` and every module of `folder` it imports relatively (`from .x import`), transitively."""
    import ast

    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = folder / f"{name}.py"
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                todo += [node.module] if node.module else [a.name for a in node.names]
    return seen


def device_code(source: str) -> List[str]:
    """The source of each function decorated with a `jit` (triton.jit, _compat's) and of each
    module-level assignment, in file order."""
    import ast

    parts = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
            parts.append(ast.unparse(node))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            parts.append(ast.unparse(node))
    return parts


def _work(item: Tuple[Dict[str, Any], int]) -> Dict[str, Any]:
    import compile_spec  # in the worker: sets TRITON_INTERPRET=0 before triton is imported

    spec, arch = item
    start = time.perf_counter()
    result = compile_spec.compile_spec(spec, arch)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def problems(result: Dict[str, Any], arch: int) -> List[str]:
    if "error" in result:
        return [f"compile error: {result['error'].splitlines()[0] if result['error'] else '?'}"]
    found = []
    if result["shared"] > SHARED_LIMIT_BYTES[arch]:
        found.append(f"shared memory {result['shared']} B > {SHARED_LIMIT_BYTES[arch]} B")
    if result["spill_stores"] > SPILL_LIMIT_BYTES:
        found.append(f"spill stores {result['spill_stores']} B/thread > {SPILL_LIMIT_BYTES} B")
    return found


def constexprs_of(spec: Dict[str, Any]) -> str:
    """The spec's dtypes, constexprs and options in a short form for the table."""
    import importlib

    module, name = spec["kernel"].split(":")
    os.environ.setdefault("TRITON_INTERPRET", "0")
    fn = getattr(importlib.import_module(module), name)
    params = list(inspect.signature(fn.fn).parameters)
    dtypes = sorted({a["tensor"] for a in spec["args"] if "tensor" in a})
    consts = [f"{p}={a['constexpr']}" for p, a in zip(params, spec["args"]) if "constexpr" in a]
    opts = [f"{k}={v}" for k, v in sorted(spec["options"].items())]
    return " ".join(["/".join(dtypes), *consts, *opts])


def table(rows: List[Dict[str, Any]]) -> str:
    """One line per (kernel, arch): specialisations, worst registers, spills, shared memory."""
    by_kernel: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
    for r in rows:
        by_kernel.setdefault((r["kernel"], r["arch"]), []).append(r)
    lines = [
        "| kernel | sm | specs | max regs | specs spilling | max spill st/ld B | max shared KB | errors | worst spill at |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, arch), rs in sorted(by_kernel.items()):
        ok = [r for r in rs if "error" not in r["result"]]
        errors = len(rs) - len(ok)
        spilling = [r for r in ok if r["result"]["spill_stores"] > 0]
        worst = max(ok, key=lambda r: r["result"]["spill_stores"], default=None)
        regs = max((r["result"]["registers"] for r in ok), default=0)
        shared = max((r["result"]["shared"] for r in ok), default=0)
        spill = f"{worst['result']['spill_stores']}/{worst['result']['spill_loads']}" if worst else "-"
        where = worst["where"] if spilling else ""
        name = kernel.replace("attnkernels.triton.", "")
        lines.append(f"| {name} | {arch} | {len(rs)} | {regs} | {len(spilling)} | {spill} | "
                     f"{shared / 1024:.1f} | {errors} | {where} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+", type=Path, help="launch records (JSON) to compile")
    parser.add_argument("--full", action="store_true", help="every spec, not the representative subset")
    parser.add_argument("--arch", default="90,80", help="compute capabilities (default 90,80)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "triton_aot")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "attnkernels" / "triton_aot"),
                        help="results cache folder ('' for none)")
    args = parser.parse_args()

    import triton

    specs: List[Dict[str, Any]] = []
    for path in args.records:
        if not path.is_file():
            parser.error(f"{path}: no launch record (make triton-aot-record writes it)")
        specs += launches.load(path)
    if not specs:
        parser.error("the launch records hold no launches: nothing would be checked")
    chosen = select(specs, args.full)
    arches = [int(a) for a in args.arch.split(",")]
    digests = source_digest(sorted({s["kernel"] for s in chosen}))
    # A str, not a Path: Path("") is ".", which would write the cache into the working folder.
    cache_path = Path(args.cache) / f"triton-{triton.__version__}.json" if args.cache else None
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.is_file() else {}

    items = [(s, a) for s in chosen for a in arches]
    keys = [f"{digests[s['kernel']]}|{a}|{launches.spec_key(s)}" for s, a in items]
    todo = [(i, item) for i, (item, k) in enumerate(zip(items, keys)) if k not in cache]
    print(f"triton {triton.__version__}: {len(specs)} recorded launches, {len(chosen)} "
          f"{'specs' if args.full else 'representative specs'} x sm {args.arch}: "
          f"{len(todo)} to compile, {len(items) - len(todo)} cached", flush=True)
    start = time.perf_counter()
    with cf.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for n, ((i, _), result) in enumerate(zip(todo, pool.map(_work, [t for _, t in todo], chunksize=4)), 1):
            cache[keys[i]] = result
            if n % 200 == 0:
                print(f"  {n}/{len(todo)} compiled ({time.perf_counter() - start:.0f} s)", flush=True)
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache))

    rows, failures = [], []
    for (spec, arch), key in zip(items, keys):
        result = cache[key]
        row = {"kernel": spec["kernel"], "arch": arch, "spec": spec, "result": result,
               "where": constexprs_of(spec)}
        rows.append(row)
        failures += [f"{spec['kernel']} sm_{arch} [{row['where']}]: {p}" for p in problems(result, arch)]

    out = args.out / triton.__version__
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    (out / "table.md").write_text(
        f"Triton {triton.__version__}, {len(chosen)} specs x sm {args.arch} "
        f"({'full' if args.full else 'representative subset'}); limits: shared memory "
        f"{SHARED_LIMIT_BYTES}, spill stores {SPILL_LIMIT_BYTES} B/thread\n\n{text}\n")
    (out / "results.json").write_text(json.dumps(rows, indent=0))
    print(text)
    print(f"compiled {len(todo)} in {time.perf_counter() - start:.0f} s; table: {out / 'table.md'}")
    if failures:
        print(f"\nFAILED: {len(failures)} specialisations over a limit or not compiling:")
        for f in failures[:60]:
            print("  " + f)
        return 1
    print("OK: every specialisation compiles within the limits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
