#!/usr/bin/env bash
# One command for a GPU machine with torch preinstalled and no network (DESIGN.md):
#   scripts/gpu_check.sh [--quick] [--full-ops] [--out DIR] [--deadline S] [--no-compile]   (or OUT=DIR ...)
# A lease is short (minutes), so the steps run in order of risk, and each answers a question
# even if a later one never runs:
#   1. build: the JIT build of csrc/ for this GPU (a compile or link error stops the rest);
#      then whether C++ errors reach Python or crash the process (scripts/gpu_error_paths.py);
#   2. tensor_core: nonlocal_attn's fp16/bf16 tensor-core path (CUDA mma and Triton tl.dot),
#      forward and every gradient at 100 and 137 keys, NCHW and channels_last, against fp64;
#      then scripts/low_precision_report.py: CSM and PAM's fp16 errors against eager's over 8 seeds
#      (a bias of a kernel or one unlucky draw; the first two leases failed one CSM fp16 case);
#   3. ops: every other CUDA and Triton op and fused module against the reference (CUDA
#      autocast included); --quick: the op-level comparisons of each hot path only, unless
#      --full-ops; pytest names every failure (-rfE);
#   4. memcheck: compute-sanitizer over every CUDA op on a small case (full run only);
#   5. the benchmark tables (fp32 and bf16), PAM/CSM vs SDPA, GAM's conv algorithms and the
#      whole-model rows; --quick: the bf16 table alone, fewer repeats, right after step 2.
# Measured on the H200 runs (benchmarks/NOTES.md, Sessions 16-18): build 67-76 s, error_paths
# 90 s, tensor_core 24-29 s, low_precision 15 s, ops 122 s on 12 xdist workers (--full-ops
# under --quick: 193 s), memcheck 138 s, the bf16 table 68 s; the full run does not fit 8 minutes
# (give it --deadline), --quick about 5 with its table.
# --deadline S: no step starts after S seconds, and the running one is stopped at S (its row
# says so), so the summary is complete when a lease's time is short. --no-compile drops the
# torch.compile variant from the tables (each compiled module costs tens of seconds).
# pytest runs its tests on several processes when pytest-xdist is installed (the Triton JIT
# compiles are the slow part), each test bounded by pytest-timeout when that is installed.
# Logs and CSVs go to the output folder; $out/SUMMARY.md holds one line per step (exit code,
# seconds, pytest's count line) and the benchmark tables, ready to paste into a closing note.
# The exit code is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
quick=0
full_ops=0
deadline=0  # seconds after the start; 0: none
bench_extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    --full-ops) full_ops=1; shift ;;
    --deadline) deadline="$2"; shift 2 ;;
    --no-compile) bench_extra+=(--no-compile); shift ;;
    *) echo "usage: $0 [--quick] [--full-ops] [--out DIR] [--deadline SECONDS] [--no-compile]" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0  # real Triton on the GPU, not the interpreter
python=${PYTHON:-python3}
summary="$out/SUMMARY.md"
status=0
started=$SECONDS
{
  echo "# gpu_check $([ $quick -eq 1 ] && echo --quick) ($(date -u '+%Y-%m-%d %H:%M UTC'), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
  echo
  echo "| step | exit | seconds | result |"
  echo "|---|---|---|---|"
} > "$summary"

step() {  # step NAME COMMAND...: run, log to $out/NAME.log, add a summary row, remember failure
  local name="$1"; shift
  local limit=()
  if [ "$deadline" -gt 0 ]; then
    local left=$((deadline - (SECONDS - started)))
    if [ "$left" -le 0 ]; then
      echo "== $name: skipped, past the deadline of $deadline s"
      echo "| $name | skipped | 0 | past the --deadline of $deadline s |" >> "$summary"
      status=1
      return 1
    fi
    limit=(timeout --kill-after=10 "$left")  # exit 124: stopped at the deadline
  fi
  echo "== $name: $*" | tee "$out/$name.log"
  local start=$SECONDS
  "${limit[@]}" "$@" 2>&1 | tee -a "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  local took=$((SECONDS - start))
  echo "== $name: exit $rc after $took s" | tee -a "$out/$name.log"
  # pytest's last "N passed, M skipped ..." line, else the log's last line.
  local result
  result=$(grep -E '^=*.*[0-9]+ (passed|failed|error)' "$out/$name.log" | tail -1 | tr -d '=' | sed 's/^ *//')
  [ -n "$result" ] || result=$(grep -v '^== ' "$out/$name.log" | tail -1 | cut -c1-160)
  echo "| $name | $rc | $took | ${result//|/\\|} |" >> "$summary"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

have_pytest() {
  "$python" -c "import pytest" 2>/dev/null && return 0
  echo "pytest is not installed here: carry its wheel (see the device tool's README)" | tee -a "$out/tests.log"
  echo "| pytest | missing | 0 | carry its wheel |" >> "$summary"
  status=1
  return 1
}

# pytest, on several processes when pytest-xdist is there (each compiles its own Triton
# specialisations; the GPU is shared), each test bounded when pytest-timeout is there.
pytest_gpu=("$python" -m pytest -q -rfEs -p no:cacheprovider -m "not slow")
if "$python" -c "import xdist" 2>/dev/null; then
  cores=$(nproc 2>/dev/null || echo 1)
  pytest_gpu+=(-n "${GPU_CHECK_WORKERS:-$((cores < 12 ? cores : 12))}")
fi
if "$python" -c "import pytest_timeout" 2>/dev/null; then
  pytest_gpu+=(--timeout "${GPU_CHECK_TEST_TIMEOUT:-300}")
fi

# 1. Build: nothing else can run without it.
step environment "$python" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
if ! step build "$python" -c "import attnkernels._ext as e, attnkernels.backend as b; e.load(); assert e.cuda_compiled(), 'the CUDA kernels were not compiled'; print(b.explain())"; then
  echo "gpu_check: the build failed; nothing else can run (logs in $out)" | tee -a "$summary"
  exit 1
fi

# 1b. A bad argument must raise, not kill the process: in the first GPU run an op's argument
# check, thrown from CUDA host code, crashed pytest workers (scripts/gpu_error_paths.py says
# which throws crash there, with a native backtrace of the first).
step error_paths "$python" scripts/gpu_error_paths.py --gdb

bench() {  # bench NAME ARGS...: a throughput table; its text goes into the summary too
  local name="$1"; shift
  step "$name" "$python" benchmarks/throughput.py --device cuda --out "$out/$name" "${bench_extra[@]}" "$@"
  { echo; echo "### $name"; echo '```'; sed -n '/^module /,/^[0-9]* rows in/p' "$out/$name.log"; echo '```'; } >> "$out/tables.md"
}

if have_pytest; then
  # 2. The tensor-core attention: the code most likely to be wrong that no CPU can run.
  step tensor_core "${pytest_gpu[@]}" tests/test_nonlocal_attn.py -k "tensor_core or half_precision"
fi
step low_precision "$python" scripts/low_precision_report.py --device cuda --backends cuda,triton \
  --dtype float16 --modules csm,pam --seeds 8
if [ $quick -eq 1 ]; then
  # --quick: the numbers before the long ops step (two leases ran out inside ops and brought no
  # table back): host time per call, then the bf16 table, which also lists the Triton tile
  # configurations measured per shape (choose.explain()).
  step host_overhead "$python" benchmarks/host_overhead.py --device cuda
  bench throughput_bfloat16 --dtype bfloat16 --modules eca,se,cbam,triplet,bam,cam,criss_cross,ham,pam,gam,softmax_spatial,bridge --models none \
    --variants memcpy,eager,fused-cuda,fused-triton --repeats 5
fi

if have_pytest; then
  # 3. Every other GPU op and module against the reference.
  ops_tests=(tests/test_channel_gate.py tests/test_channel_gate_triton.py tests/test_ham_spatial.py
    tests/test_ham_spatial_triton.py tests/test_nonlocal_attn.py tests/test_nonlocal_attn_triton.py
    tests/test_gam_channel.py tests/test_gam_channel_triton.py tests/test_shuffle_conv.py
    tests/test_shuffle_conv_triton.py tests/test_softmax_spatial.py tests/test_softmax_spatial_triton.py
    tests/test_cbam_spatial.py tests/test_cbam_spatial_triton.py tests/test_cbam.py
    tests/test_triplet_ops.py tests/test_triplet_triton.py tests/test_triplet.py
    tests/test_bam_ops.py tests/test_bam_triton.py tests/test_bam.py
    tests/test_cam_ops.py tests/test_cam_triton.py tests/test_cam.py
    tests/test_criss_cross_ops.py tests/test_criss_cross_triton.py tests/test_criss_cross.py
    tests/test_block_tail_ops.py tests/test_block_tail_triton.py tests/test_block_tail.py
    tests/test_spatial_tail_cuda.py)
  if [ $quick -eq 1 ] && [ $full_ops -eq 0 ]; then
    # Each hot path's comparisons with the reference: the CUDA ops and modules (ids carry
    # "cuda"), the Triton files' fp32 and half-precision cases.
    step ops "${pytest_gpu[@]}" "${ops_tests[@]}" -k "(cuda and matches_reference and not tensor_core) or \
matches_reference_f32 or half_gpu or low_precision or chain_matches_autograd or epilogue_matches_reference"
  else
    # The GPU cases only: the Triton files run on CUDA tensors, the others' ids carry "cuda"
    # or "triton" (the CPU cases, "triton-cpu" under the interpreter included, are CI's).
    step ops "${pytest_gpu[@]}" "${ops_tests[@]}" tests/test_gam.py tests/test_bridge.py tests/test_special_values.py \
      tests/test_autocast.py tests/test_backend.py tests/test_build.py -k "(triton or cuda) and not tensor_core and not triton-cpu"
  fi
fi

# 4. Out-of-bounds and uninitialised reads the comparisons can miss.
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ $quick -eq 1 ]; then
  # 138 s on the first H200 run (0 errors): more than --quick's whole budget.
  echo "| memcheck | skipped | 0 | --quick (the full run has it) |" >> "$summary"
elif [ -n "$sanitizer" ]; then
  step memcheck "$sanitizer" --tool memcheck --error-exitcode 1 "$python" scripts/gpu_sanitizer_case.py
else
  echo "compute-sanitizer not found" | tee "$out/memcheck.log"
  echo "| memcheck | missing | 0 | compute-sanitizer not found |" >> "$summary"
  status=1
fi

# 5. The numbers (--quick had its table after step 2). First the host time per module call
# (tiny inputs, seconds): on the first GPU run, host time decided most module rows.
if [ $quick -eq 0 ]; then
  step host_overhead "$python" benchmarks/host_overhead.py --device cuda
  # bf16 first (the dtype GPU users train in), then the whole-model rows: the numbers a short
  # lease should bring back before fp32 and the per-path tables.
  bench throughput_bfloat16 --dtype bfloat16 --modules eca,se,cbam,triplet,bam,cam,criss_cross,ham,gam,gam-gc,softmax_spatial,bridge --models none
  # Whole-model ResNet-50 training steps (bf16 autocast, channels_last); no compile: a compiled
  # ResNet-50 per attention module would take minutes of the budget.
  bench throughput_models --modules none --models ham,se,eca,cbam,triplet,bam,cam,criss_cross,gam,softmax_spatial,bridge --variants eager,fused-cuda,fused-triton
  bench throughput_float32 --dtype float32 --modules eca,se,cbam,triplet,bam,cam,criss_cross,ham,gam,gam-gc,softmax_spatial,bridge --models none
  # Position attention against projections + SDPA (memory-efficient kernel), bf16, the issue's
  # shapes: 32x32 and 64x64 maps, C = 256..1024; TFLOP/s in the table (bf16 tensor-core peak:
  # 989 dense on H100 SXM / H200). No compile variant: the eager reference holds N x HW^2.
  bench throughput_pam --dtype bfloat16 --modules pam,csm \
    --shapes 8x256x64x64,8x512x32x32,8x1024x32x32,4x1024x64x64 --variants eager,sdpa,fused-cuda,fused-triton \
    --repeats 20 --models none
  # GAM's conv algorithms side by side and the share of time outside the convs.
  step gam_breakdown "$python" benchmarks/gam_breakdown.py --device cuda --dtype bfloat16 --shape 32x256x56x56 --out "$out/gam_breakdown"
fi

{
  echo
  echo "Total: $((SECONDS - started)) s; $([ $status -eq 0 ] && echo 'every step passed' || echo 'some step FAILED')."
  [ -f "$out/tables.md" ] && cat "$out/tables.md"
} >> "$summary"
echo "gpu_check: $([ $status -eq 0 ] && echo all steps passed || echo some step FAILED) (summary: $summary)"
exit $status
