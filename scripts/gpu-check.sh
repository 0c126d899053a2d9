#!/usr/bin/env bash
# The prepared GPU check: on a machine with a GPU, one command measures what the CPU-only
# machines cannot and writes it to one Markdown report (its path is printed first and last):
#
#   scripts/gpu-check.sh              # on the GPU machine, from the repository root
#   scripts/gpu-check.sh --quick      # a dry run of the script itself on any device (lavapipe)
#
# It builds once, then runs (each step under its own time limit, 8 minutes in all, not counting
# the build and a first pip install; a step that fails or runs out of time is recorded and the
# next one runs):
#   1. `wgtrain devices` and `wgtrain selftest` (every kernel against its f64 reference);
#   2. the kernel benches (`cargo bench --bench kernels`) with % of the FP32 peak, taken from
#      WGTRAIN_PEAK_GFLOPS or, for the GPUs in the table below, from the name nvidia-smi reports;
#   3. the train-step bench at T 1024 and 4096 for LoRA at the 0.5B and 1.5B shapes (random
#      weights, nothing downloaded);
#   4. scripts/bench/peft_train_step.py on the same GPU at the same shapes (PyTorch + PEFT,
#      installed from scripts/bench/requirements.txt when missing).
#
# --quick sizes everything down for a CPU adapter: T = 16, one repetition, two small kernel
# families, the train bench as a dry run (allocation only), the PEFT step on the CPU if torch is
# already installed, four times the time limits. PYTHON picks the interpreter (default python3); --out DIR the report's folder
# (default runs/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."

quick=false
out_dir=runs/gpu-check
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=true ;;
    --out) out_dir="${2:?--out needs a folder}"; shift ;;
    *) echo "gpu-check.sh: unknown argument '$1' (expected --quick, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
PYTHON="${PYTHON:-python3}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
mkdir -p "$out_dir"
report="$out_dir/gpu-check-$(date -u +%Y%m%dT%H%M%SZ).md"
echo "gpu-check: writing $report"

# FP32 (non-tensor-core) peak GFLOP/s from NVIDIA's data sheets, by the name nvidia-smi reports.
fp32_peak() {
  case "$1" in
    *H100*PCIe*) echo 51000 ;;
    *H100*NVL* | *H200*NVL*) echo 60000 ;;
    *H100* | *H200*) echo 67000 ;;
    *A100*) echo 19500 ;;
    *L40S*) echo 91600 ;;
    *"NVIDIA L4") echo 30300 ;;
    *A10G* | *"NVIDIA A10") echo 31200 ;;
    *"RTX 4090"*) echo 82600 ;;
    *T4) echo 8100 ;;
    *) echo "" ;;
  esac
}

gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
if [ -z "${WGTRAIN_PEAK_GFLOPS:-}" ] && [ -n "$gpu_name" ]; then
  peak="$(fp32_peak "$gpu_name")"
  [ -n "$peak" ] && export WGTRAIN_PEAK_GFLOPS="$peak"
fi

# The step limits are a GPU's; a CPU adapter (--quick) gets four times as long.
limit_scale=1
if $quick; then
  limit_scale=4
  export WGTRAIN_BENCH_T=16 WGTRAIN_BENCH_REPS=1
  kernel_families=(rmsnorm swiglu)
  train_env=(WGTRAIN_BENCH_DRY=1)
  train_filter=(lora 0.5B)
  peft_runs=("--model 0.5B --method lora --t 16 --reps 1 --device cpu")
else
  kernel_families=()
  train_env=(WGTRAIN_BENCH_T=1024,4096)
  train_filter=(lora)
  peft_runs=("--model 0.5B --method lora --t 1024,4096" "--model 1.5B --method lora --t 1024,4096")
fi

start=$(date +%s)
{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$($quick && echo ' (--quick)')"
  echo "- nvidia-smi: ${gpu_name:-none}"
  echo "- FP32 peak: ${WGTRAIN_PEAK_GFLOPS:-unknown (set WGTRAIN_PEAK_GFLOPS for a % column)} GFLOP/s"
} >"$report"

# step FORMAT TITLE LIMIT_S COMMAND...: runs COMMAND under `timeout`, appends its output, time
# and exit status to the report: as it is for FORMAT md (the benches print Markdown tables, cargo's
# progress lines left out), in a text block for FORMAT text.
step() {
  local format="$1" title="$2" limit=$(($3 * limit_scale))
  shift 3
  echo "gpu-check: $title (limit ${limit}s)"
  local t0 rc output
  t0=$(date +%s)
  output="$(timeout "$limit" "$@" 2>&1)"
  rc=$?
  local status="ok"
  [ $rc -eq 124 ] && status="TIMED OUT after ${limit}s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAILED (exit $rc)"
  {
    echo
    echo "## $title"
    echo
    echo "\`$*\` — $status, $(($(date +%s) - t0)) s"
    echo
    if [ "$format" = md ]; then
      echo "$output" | grep -v '^ *\(Compiling\|Finished\|Running\|Blocking\)'
    else
      echo '```text'
      echo "$output"
      echo '```'
    fi
  } >>"$report"
  return 0
}

# `cargo bench` builds with the bench profile: built here, so the timed steps compile nothing.
step text "build" 600 cargo build --release --bin wgtrain
step text "build benches" 600 cargo bench --no-run
step text "devices" 20 target/release/wgtrain devices
step text "selftest" 60 target/release/wgtrain selftest
step md "kernel benches" 120 cargo bench --bench kernels -- "${kernel_families[@]}"
step md "train-step bench" 120 env "${train_env[@]}" cargo bench --bench train -- "${train_filter[@]}"

if ! "$PYTHON" -c 'import torch, transformers, peft' 2>/dev/null; then
  if $quick; then
    echo -e "\n## PEFT train step\n\nskipped: torch, transformers or peft not installed for $PYTHON" >>"$report"
    peft_runs=()
  else
    step text "pip install (PEFT baseline)" 600 "$PYTHON" -m pip install -q -r scripts/bench/requirements.txt
  fi
fi
for args in "${peft_runs[@]}"; do
  # shellcheck disable=SC2086 # the arguments are words
  step md "PEFT train step $args" 80 "$PYTHON" scripts/bench/peft_train_step.py $args
done

echo -e "\ntotal: $(($(date +%s) - start)) s" >>"$report"
echo "gpu-check: report in $report"
