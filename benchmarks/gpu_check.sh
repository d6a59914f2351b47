#!/usr/bin/env bash
# Every GPU check and measurement that docs/performance.md's GPU section asks for, in one command,
# on a machine with a CUDA GPU, within GPU_CHECK_SECONDS (default 570: one device call): each step
# has its own time limit, cut to what is left, and the steps run in order of what is least known,
# so a short budget cuts the re-measurements, not the new ones. A step that hangs costs only its
# share, and what a step measured is kept.
#
#     bash benchmarks/gpu_check.sh [OUT]        # OUT: a folder for what it writes (default gpu-check)
#
#   1. the machine: GPU, driver, torch, CUDA                               -> OUT/gpu_check.log
#   2. tests/test_gpu.py on the device: no training step waits for the host (CUDA's sync debug
#      mode), data and models on the device, seeded runs identical, batched = one at a time,
#      every method in bf16, the non-finite-loss error                     -> OUT/gpu_check.log
#   3. benchmarks/test_round.py: a CIFAR-10 N10 round of Standalone and pFedLoRA through the
#      engine against its floor (the same passes in a bare PyTorch loop), on the GPU: session AB
#      measured 1.33-1.42x there, CIFAR's augmentation (work the floor does not do) then ~60 of a
#      step's kernels; since then an epoch chunk's augmentation is one gather
#                                                                           -> OUT/round_floor.json
#   4. benchmarks/paper_cost.py --copies: runs sharing the GPU (Ray's default --run-gpus 0.25; the
#      local executor's default of one run per core): FedKD (the costliest step) 1 and 4 at once,
#      Standalone 16 at once (session AB measured Standalone 1, 4 and 8: a round cost the GPU 1,
#      0.30 and 0.27 of a run alone)                      -> OUT/copies.json, OUT/copies16.json
#   5. benchmarks/paper_cost.py: every method of the paper's CIFAR-10 N10 setting in fp32, one
#      client at a time                                                     -> OUT/cifar10_n10.json
#   6. the paper suite's other settings as its protocol runs them (fp32, one client at a time),
#      Standalone first in every setting, then the other methods, as far as the time left goes
#                                                                           -> OUT/paper_suite.json
#   7. benchmarks/suite_hours.py: with step 5's N10 rows, the paper suite's device-hours, measured
#      and projected apart                                                  -> OUT/suite_hours.json
# Measured before and no longer repeated here (docs/performance.md, "GPU"): batching and bf16
# (slower on the GPU, session Z), torch.compile of a CIFAR step (benchmarks/test_compile.py,
# session AB: 1.43-1.46x with CUDA graphs, 0.83x without).
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

TOTAL=${GPU_CHECK_SECONDS:-570}
step() {  # step NAME SECONDS COMMAND...: run it, its output into the log, under SECONDS or what is
    # left of TOTAL less RESERVE (default 15 s, kept for the last step), whichever is less
    local name=$1 limit=$2 t0=$SECONDS rc left=$(( TOTAL - SECONDS - ${RESERVE:-15} ))
    shift 2
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then
        echo "=== $name: skipped, ${left} s left" | tee -a "$LOG"
        return
    fi
    echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ' (time limit)')" | tee -a "$LOG"
}

# in order of what is least known: the steps that the time left cuts come last
step gpu 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
step torch 30 "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'CUDA', \
torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
XDIST=""  # the tests in 4 processes where pytest-xdist is there (each line says which test passed)
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 4"
step tests 180 "$PY" -m pytest -v -p no:cacheprovider $XDIST tests/test_gpu.py
step floor 170 "$PY" -m benchmarks.test_round --device "$DEVICE" --suite paper --setting cifar10-N10-C100 \
    --methods standalone pfedlora --rounds 5 --out "$OUT/round_floor.json"  # 5: the rounds its 170 s were sized for
step copies 100 "$PY" benchmarks/paper_cost.py --device "$DEVICE" --suite paper --settings cifar10-N10-C100 \
    --methods fedkd --copies 1 4 --rounds 3 --out "$OUT/copies.json"
step copies16 90 "$PY" benchmarks/paper_cost.py --device "$DEVICE" --suite paper --settings cifar10-N10-C100 \
    --methods standalone --copies 16 --rounds 3 --out "$OUT/copies16.json"
step cifar10_n10 200 "$PY" benchmarks/paper_cost.py --device "$DEVICE" --suite paper --settings cifar10-N10-C100 \
    --methods all --precision fp32 --rounds 3 --out "$OUT/cifar10_n10.json"
step paper_suite 600 "$PY" benchmarks/paper_cost.py --device "$DEVICE" --suite paper --settings all \
    --skip-settings cifar10-N10-C100 --methods all --standalone-first --out "$OUT/paper_suite.json"
HOURS=()
for f in cifar10_n10 paper_suite; do [ -f "$OUT/$f.json" ] && HOURS+=("$OUT/$f.json"); done
if [ ${#HOURS[@]} -gt 0 ]; then
    RESERVE=0 step suite_hours 15 "$PY" benchmarks/suite_hours.py "${HOURS[@]}" --as-standalone fedavg \
        --out "$OUT/suite_hours.json"
else
    echo "=== suite_hours: skipped, nothing measured to price" | tee -a "$LOG"
fi
grep "^=== .*: exit" "$LOG"
