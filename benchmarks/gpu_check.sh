#!/usr/bin/env bash
# The GPU checks as one prepared run for a lent GPU machine (the device tool), from the repository root:
#   1. capture overhead on CUDA, tiny and pythia-70m (capture_overhead.py --device cuda), ~2 min;
#   2. experiments/large.yaml's time on this GPU from 44-run slices run end to end by `gradtrace sweep` (its 4
#      captured base runs, 4 captured reference runs, 36 sweep runs): on a pool of 4 workers, and in vmap ensembles
#      of 8 on 2 workers (sweep_time.py), ~1-2 min each (not measured: no GPU was lent when this was written).
# Results in $OUT (default benchmarks/out/gpu): one JSON file per check and log.txt. The machine's image has torch,
# transformers and most of what gradtrace needs, not zarr: before the device run, fetch its wheels here with
#   benchmarks/gpu_wheels.sh        # into .whl/ (git-ignored); then run with carry [".whl"]:
#   bash benchmarks/gpu_check.sh
set -euo pipefail
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import sys, torch, transformers, zarr; print(sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__, 'zarr', zarr.__version__, 'cuda', torch.cuda.is_available())"
python3 benchmarks/capture_overhead.py --device cuda --no-wandb --out "$OUT/capture_overhead_cuda.json"
for setting in "pool4:--set sweep.workers=4" "ensemble8:--set sweep.workers=2 --set sweep.ensemble=8"; do
  # shellcheck disable=SC2086  # the settings are word lists
  python3 benchmarks/sweep_time.py experiments/large.yaml --runs 36 --set train.device=cuda ${setting#*:} \
    --out-json "$OUT/sweep_time_${setting%%:*}.json"
done
