#!/usr/bin/env bash
# The GPU run in ONE call, under one deadline (DEADLINE seconds, default 470: every step has its own timeout,
# cut to what is left, and a step with under 10 s left is skipped), most wanted first: install the wheels that
# bench/gpu/prepare.sh carried in .whl/, the GPU kernel tests and fast = reference on CUDA,
# `bench.calculator_cost --device cuda` (an MD step with the error against a plain MACECalculator step: si
# at 64 and 512 atoms; the mp0-medium architecture at ~64 atoms in float64 and float32), `bench kernels`
# (Triton vs reference vs cuBLAS), `bench select --device cuda` at 200k, `bench features` (energy NTK at ~80
# atoms for the 200k extrapolation; fast vs reference on mp0-medium), and write JSON records, logs and
# summary.md under $OUT (default: a new bench/results/gpu/run-<UTC time>/).
#
#   on the GPU machine:  bash bench/gpu/run.sh
#   dry run, here:       DRY=1 bash bench/gpu/run.sh   (no CUDA: checks the wheels resolve for Python 3.12
#                        and runs every step on the CPU with small sizes; only the CUDA parts are skipped)
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=${DRY:-0}
OUT=${OUT:-bench/results/gpu/run-$(date -u +%Y%m%dT%H%M%SZ)}  # a new folder each run: earlier records stay
DEADLINE=${DEADLINE:-470}
mkdir -p "$OUT"
: > "$OUT/steps.log"
if [ "$DRY" = 1 ]; then
  PY=${PY:-.venv/bin/python}; DEV=cpu
  ARCH=tiny; ATOMS=10; NSTRUCT=2; NSTRUCT80=2; POOL=20000; NTRAIN="--n-train 1000"; REPEAT="--repeat 1"
  CELLS64=1,1,1; CELLS512=1,1,1; CSTEPS=3; FARCH=tiny; FATOMS=20
else
  PY=${PY:-python3}; DEV=cuda
  ARCH=mp0-medium; ATOMS=38; NSTRUCT=2; NSTRUCT80=64; POOL=200000; NTRAIN=""; REPEAT=""
  CELLS64=2,2,1; CELLS512=4,4,2; CSTEPS=10; FARCH=mp0-medium; FATOMS=64
fi
export NTKAL_CACHE=${NTKAL_CACHE:-/tmp/ntkal-cache} OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1

step() {  # step NAME TIMEOUT_S CMD...: run under min(TIMEOUT_S, what the deadline leaves), time, log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((DEADLINE - SECONDS - 10))
  if [ "$left" -lt 10 ]; then echo "== $name: skipped, deadline" | tee -a "$OUT/steps.log"; return 0; fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (${limit} s): $*" | tee -a "$OUT/steps.log"
  timeout "$limit" "$@" >> "$OUT/steps.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$OUT/steps.log"
  return 0
}

# 0. the machine
step machine 60 bash -c "nvidia-smi -L || true; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"cuda\", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"-\")'"

# 1. the carried wheels
if [ "$DRY" = 1 ]; then
  step wheels 120 $PY -m pip install -q --dry-run --ignore-installed --no-index --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --target /tmp/ntkal-dry-site .whl/*.whl
else
  step wheels 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# 2. GPU tests: every kernel test (the Triton kernels on the card, realistic sizes), fast = reference on CUDA.
# addopts emptied: pyproject's -n (pytest-xdist) and --benchmark-disable (pytest-benchmark) need plugins that
# the GPU machine does not have.
step tests 120 $PY -m pytest tests/test_kernels.py -q -x -p no:cacheprovider -o addopts=
step check_fast 60 $PY bench/gpu/check_fast.py --device $DEV --names mp0-medium,off-small

# 3. the MD calculator: ntkal.Calculator's step (energy kernel; joint with 8 probes) over a MACECalculator step
step calculator64 60 $PY -m bench.calculator_cost --device $DEV --repeat $CELLS64 --steps $CSTEPS --json "$OUT/calculator64.json"
step calculator512 60 $PY -m bench.calculator_cost --device $DEV --repeat $CELLS512 --steps $CSTEPS --json "$OUT/calculator512.json"
step calculator_mp0 90 $PY -m bench.calculator_cost --device $DEV --arch $FARCH --n-atoms $FATOMS --steps $CSTEPS \
  --profile 3 --json "$OUT/calculator_mp0.json"
step calculator_mp0_f32 60 $PY -m bench.calculator_cost --device $DEV --arch $FARCH --n-atoms $FATOMS --steps $CSTEPS \
  --dtype float32 --json "$OUT/calculator_mp0_f32.json"

# 4. kernels: Triton vs reference vs cuBLAS at the 200k chunk sizes, and the variants of the two that lost (compiles)
step kernels 120 $PY -m bench kernels --pool-size $POOL --json "$OUT/kernels.json"

# 5. selection at 200k on the card
step select 90 $PY -m bench select --device $DEV --pool-size $POOL --skip-bmdal $NTRAIN $REPEAT --json "$OUT/select.json"

# 6. featurizer: energy NTK at 80 atoms for the 200k OC20-size extrapolation; fast vs reference on mp0-medium
step features80 60 $PY -m bench features --arch $ARCH --atoms 80 --n-structures $NSTRUCT80 --batch $NSTRUCT80 --device $DEV \
  --cases "floor,energy fast" --pool-target 200000 --json "$OUT/features80.json"
step features 150 $PY -m bench features --arch $ARCH --atoms $ATOMS --n-structures $NSTRUCT --exact-structures 1 \
  --device $DEV --json "$OUT/features.json"

# 7. one table
DEADLINE=$((SECONDS + 40)) step summary 30 $PY bench/gpu/summarize.py "$OUT"
cat "$OUT/summary.md" 2>/dev/null
