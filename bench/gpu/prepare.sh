#!/usr/bin/env bash
# Run HERE, on a machine that reaches PyPI: download the wheels that the GPU machine lacks, for its
# Python 3.12 (it has torch 2.11, triton 3.6, e3nn, numpy, scipy, h5py, pandas, matplotlib, tqdm,
# pyyaml, pytest and reaches no registry), into .whl/ at the repository root (ignored by git).
# bench/gpu/run.sh installs them there. Listed: what `import mace.modules, mace.data, mace.tools` and
# `import ase` need, and nothing that is already on that machine; e3nn 0.4.4 (mace-torch 0.3.16's pin) although
# the machine has a newer e3nn: the shipped models were saved with 0.4.4, and the newer one cannot unpickle
# them (ValueError in e3nn/util/codegen/_mixin.py __setstate__, bench/results/gpu/steps.log, 2026-12-04).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.whl/" >> .git/info/exclude; }
mkdir -p .whl
PLATFORMS=()
for n in 17 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# the versions this repository's .venv runs with mace-torch 0.3.16
WHEELS=(
  mace-torch==0.3.16 ase==3.29.0 matscipy==1.3.1 torch-ema==0.3 prettytable==3.18.0 wcwidth==0.9.4
  ConfigArgParse==1.9.0 GitPython==3.2.1 gitdb==4.0.12 smmap==5.0.3 lmdb==3.0.0 orjson==3.13.0 e3nn==0.4.4
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
# python-hostlist has no wheel on PyPI: build its pure-Python wheel here
python3 -m pip wheel -q --no-deps -w .whl python-hostlist==2.3.0
ls -la .whl
du -sh .whl
