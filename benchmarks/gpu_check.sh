#!/usr/bin/env bash
# Every GPU check and measurement that docs/performance.md's GPU section asks for, in one command,
# on a machine with a CUDA GPU (under 10 minutes: each step has its own time limit, the last one
# what is left of GPU_CHECK_SECONDS, default 570; a step that hangs costs only its own share, and
# what a step measured is kept):
#
#     bash benchmarks/gpu_check.sh [OUT]        # OUT: a folder for what it writes (default gpu-check)
#
#   1. the machine: GPU, driver, torch, CUDA                               -> OUT/gpu_check.log
#   2. tests/test_gpu.py on the device: no training step waits for the host (CUDA's sync debug
#      mode), data and models on the device, seeded runs identical, batched = one at a time,
#      every method in bf16, the non-finite-loss error                     -> OUT/gpu_check.log
#   3. benchmarks/paper_cost.py: s/round and GPU utilisation of Standalone and pFedLoRA, fp32 and
#      bf16, one client at a time and batched, in the quick suite's N10 setting (quick.json);
#      every method of the paper's CIFAR-10 N10 setting in fp32, one at a time and batched
#      (cifar10_n10.json: batching's default on a GPU), and Standalone and pFedLoRA there in bf16
#      (cifar10_n10_bf16.json)
#   4. benchmarks/test_compile.py: one CIFAR-shaped SGD step and evaluation pass of CNN-1 and CNN-5,
#      eager vs torch.compile, with CUDA graphs (reduce-overhead) and without: whether compiling
#      cuts a launch-bound step (compile time included)                    -> OUT/compile.json
#   5. the paper suite's other settings as its protocol runs them (fp32, one client at a time),
#      Standalone first in every setting, then the other methods, as far as the time left goes
#                                                                           -> OUT/paper_suite.json
#   6. benchmarks/suite_hours.py: with step 3's N10 rows, the paper suite's device-hours, measured
#      and projected apart                                                  -> OUT/suite_hours.json
#
# GPU_CHECK_DEVICE=cpu runs the same steps on CPU (to check the script; the limits then cut the
# measurements short).
# Python: .venv/bin/python where `make install` ran, else python3 (an image that has PyTorch,
# torchvision, peft, pandas, matplotlib, tqdm, scipy and pytest). WHEELHOUSE=DIR first installs
# the wheels in DIR into a temporary folder on PYTHONPATH, for what such an image lacks; build
# them where PyPI can be reached: pip wheel --no-deps -w DIR fvcore iopath yacs termcolor threadpoolctl
set -u
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
DEVICE=${GPU_CHECK_DEVICE:-cuda}
export MHPFL_GPU_TEST_DEVICE=$DEVICE PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELHOUSE:-}" ]; then
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELHOUSE"/*.whl >> "$LOG" 2>&1 \
        || { echo "error: could not install the wheels in $WHEELHOUSE (see $LOG)"; exit 1; }
    export PYTHONPATH="$PYTHONPATH:$site"
fi

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, its output into the log
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ' (time limit)')" | tee -a "$LOG"
}

step gpu 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
step torch 30 "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'CUDA', \
torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
XDIST=""  # the tests in 4 processes where pytest-xdist is there (each line says which test passed)
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 4"
step tests 180 "$PY" -m pytest -v -p no:cacheprovider $XDIST tests/test_gpu.py
step quick 60 "$PY" benchmarks/paper_cost.py --device "$DEVICE" --suite quick --methods standalone pfedlora \
    --precision fp32 bf16 --batch-clients off on --rounds 3 --out "$OUT/quick.json"
step cifar10_n10 200 "$PY" benchmarks/paper_cost.py --device "$DEVICE" --suite paper --settings cifar10-N10-C100 \
    --methods all --precision fp32 --batch-clients off on --rounds 3 --out "$OUT/cifar10_n10.json"
step cifar10_n10_bf16 45 "$PY" benchmarks/paper_cost.py --device "$DEVICE" --suite paper --settings cifar10-N10-C100 \
    --methods standalone pfedlora --precision bf16 --batch-clients off on --rounds 3 --out "$OUT/cifar10_n10_bf16.json"
step compile 120 "$PY" benchmarks/test_compile.py --device "$DEVICE" --shape 3 32 32 --archs cnn1 cnn5 \
    --modes reduce-overhead default --out "$OUT/compile.json"
LEFT=$(( ${GPU_CHECK_SECONDS:-570} - SECONDS - 15 ))  # 15 s kept for the projection
step paper_suite $(( LEFT > 30 ? LEFT : 30 )) \
    "$PY" benchmarks/paper_cost.py --device "$DEVICE" --suite paper --settings all --skip-settings cifar10-N10-C100 \
    --methods all --standalone-first --out "$OUT/paper_suite.json"
step suite_hours 15 "$PY" benchmarks/suite_hours.py "$OUT/cifar10_n10.json" "$OUT/paper_suite.json" \
    --as-standalone fedavg --out "$OUT/suite_hours.json"
grep "^=== .*: exit" "$LOG"
