#!/usr/bin/env bash
# One command for a GPU machine with torch preinstalled and no network (DESIGN.md):
#   scripts/gpu_check.sh [--out DIR]       (or OUT=DIR scripts/gpu_check.sh)
# 1. the CUDA and Triton tests of the fused ops, the fused modules under CUDA autocast (fp16,
#    bf16) included (the JIT build compiles csrc/ for this GPU),
# 2. compute-sanitizer memcheck over every CUDA op on a small case,
# 3. the benchmark tables (fp32 and bf16) of the modules with fused kernels, PAM/CSM vs SDPA,
#    GAM's conv algorithms and time breakdown.
# Logs and CSVs go to the output folder; the exit code is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    *) echo "usage: $0 [--out DIR]" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0  # real Triton on the GPU, not the interpreter
python=${PYTHON:-python3}
status=0
step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember failure
  local name="$1"; shift
  echo "== $name: $*" | tee "$out/$name.log"
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

step environment "$python" -c "import torch, attnkernels.backend as b; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name()); print(b.explain())"
if "$python" -c "import pytest" 2>/dev/null; then
  step tests "$python" -m pytest -q -rs -m "not slow" tests/test_channel_gate.py tests/test_channel_gate_triton.py tests/test_ham_spatial.py tests/test_ham_spatial_triton.py tests/test_nonlocal_attn.py tests/test_nonlocal_attn_triton.py tests/test_gam_channel.py tests/test_gam_channel_triton.py tests/test_shuffle_conv.py tests/test_shuffle_conv_triton.py tests/test_gam.py tests/test_softmax_spatial.py tests/test_softmax_spatial_triton.py tests/test_bridge.py tests/test_special_values.py tests/test_autocast.py tests/test_backend.py tests/test_build.py
else
  echo "pytest is not installed here: carry its wheel (see the device tool's README)" | tee "$out/tests.log"
  status=1
fi
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -n "$sanitizer" ]; then
  step memcheck "$sanitizer" --tool memcheck --error-exitcode 1 "$python" scripts/gpu_sanitizer_case.py
else
  echo "compute-sanitizer not found" | tee "$out/memcheck.log"; status=1
fi
for dtype in float32 bfloat16; do
  step "throughput_$dtype" "$python" benchmarks/throughput.py --device cuda --dtype "$dtype" \
    --modules eca,se,ham,cbam --models none --out "$out/throughput_$dtype"
done
# Position attention against projections + SDPA (memory-efficient kernel), bf16, the issue's
# shapes: 32x32 and 64x64 maps, C = 256..1024; TFLOP/s in the table (bf16 tensor-core peak:
# 989 dense on H100 SXM / H200). No compile variant: the eager reference holds N x HW^2.
step throughput_pam "$python" benchmarks/throughput.py --device cuda --dtype bfloat16 --modules pam,csm \
  --shapes 8x256x64x64,8x512x32x32,8x1024x32x32,4x1024x64x64 --variants eager,sdpa,fused-cuda,fused-triton \
  --repeats 20 --models none --out "$out/throughput_pam"
# GAM (plain and gc), bf16: eager vs compile vs fused; then the conv algorithms side by side
# and the share of time outside the convs (benchmarks/gam_breakdown.py).
step throughput_gam "$python" benchmarks/throughput.py --device cuda --dtype bfloat16 --modules gam,gam-gc \
  --shapes 32x256x56x56,32x512x28x28 --repeats 20 --models none --out "$out/throughput_gam"
step gam_breakdown "$python" benchmarks/gam_breakdown.py --device cuda --dtype bfloat16 --shape 32x256x56x56 --out "$out/gam_breakdown"
# Whole-model ResNet-50 training steps (bf16 autocast, channels_last); no compile: a compiled
# ResNet-50 per attention module would take minutes of the 10-minute budget.
step throughput_models "$python" benchmarks/throughput.py --device cuda --modules none \
  --models ham,se,eca,gam --variants eager,fused-cuda,fused-triton --out "$out/throughput_models"
echo "gpu_check: $([ $status -eq 0 ] && echo all steps passed || echo some step FAILED) (logs in $out)"
exit $status
