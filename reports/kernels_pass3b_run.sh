#!/bin/bash
# one device call: gemm section (shipped config table) -> GemLite autotune small M -> GemLite bundled M>=256
# device call (H100): GIT_SHA=10439d0f6767-dirty BUDGET=485 bash <this script> 2>&1 | tee $OUT/log.txt  (carry .whl: the GemLite wheel)
set -u
T0=$(date +%s); END=$((T0 + ${BUDGET:-485}))
left() { echo $((END - $(date +%s) - $1)); }
step() { local cap=$1; shift; if [ "$cap" -lt 15 ]; then echo "[skip: ${cap}s left] $*"; return; fi
         echo "[t=$(( $(date +%s) - T0 ))s start, cap ${cap}s]"; timeout $cap "$@"; echo "[t=$(( $(date +%s) - T0 ))s rc=$?]"; }
python3 -m pip install -q --no-index --no-deps --no-compile .whl/gemlite*.whl 2>&1 | tail -2
mkdir -p /tmp/nx/natix; for d in quant kernels engines scaling bench; do ln -sfn $PWD/$d /tmp/nx/natix/$d; done
export PYTHONPATH=/tmp/nx PYTHONUNBUFFERED=1 NATIX_BENCH_RUN=h100-pass3b GIT_SHA=${GIT_SHA:-unknown}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
J=$OUT/kernels.jsonl
B="python3 scripts/bench_kernels.py --out $J"
S1="4096,14336:1,16,64;28672,4096:1,16,64;6144,4096:64;4096,4096:1,16,64;6144,4096:1,16"
S2="6144,4096:256,1024,4096;4096,4096:256,1024,4096;28672,4096:256,1024,4096;4096,14336:256,1024,4096"
step $(left 300) $B --sections gemm
step $(left 95) $B --sections gemlite --gemlite-modes autotune-fast-graph --gemlite-shapes "$S1" --deadline $(left 135)
step $(left 35) $B --sections gemlite --gemlite-modes bundled-config --gemlite-kinds A16W4 --gemlite-shapes "$S2" --deadline $(left 40)
step $(left 3) $B --sections gemlite --gemlite-modes bundled-config --gemlite-kinds A8W4-fp8 --gemlite-shapes "$S2" --deadline $(left 25)
echo "[t=$(( $(date +%s) - T0 ))s end]"; wc -l $J
