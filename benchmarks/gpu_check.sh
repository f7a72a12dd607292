#!/usr/bin/env bash
# The GPU checks as one prepared run for a lent GPU machine (the device tool), from the repository root; each step
# has its own time limit, and a step that fails or runs out is reported and the next one runs:
#   1. the tests' CUDA cases (tests/test_cuda.py, test_capture's `cuda` cases), ~40 s;
#   2. capture overhead on CUDA, tiny and pythia-70m (capture_overhead.py --device cuda), ~35 s;
#   3. CountSketch off the CPU: the banded products against fewer, larger ones and a gather (gpu_sketch.py);
#   4. experiments/large.yaml's time on this GPU from 48-run slices run end to end by `gradtrace sweep` (its 4
#      captured base runs, 8 captured reference runs, 36 sweep runs; 44 with 4 reference runs when measured) in fp32,
#      for each of $SWEEPS: pool8 (a pool of 8 workers, ~2 min, the default), pool4, ensemble8 (vmap ensembles of
#      8 on 2 workers, ~3 min; fp32 only); SWEEPS= (empty) runs none.
# On an H200 (2026-12-04) steps 1, 2 and 4 took ~40, ~35 and ~120 s (pool8), the machine's start ~1 min; all three
# sweeps were measured then (benchmarks/README.md), so the default runs one to check it.
# Results in $OUT (default benchmarks/out/gpu): one JSON file per check, pytest's report and log.txt. The machine's
# image has torch, transformers and most of what gradtrace needs, not zarr: before the device run, fetch its wheels
# here with
#   benchmarks/gpu_wheels.sh        # into .whl/ (git-ignored); then run with carry [".whl"]:
#   bash benchmarks/gpu_check.sh
# A rehearsal on a CPU: DEVICE=cpu RUNS=4 SLICE_SET="--set sweep.pretrain_steps=20 ..." bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-benchmarks/out/gpu}
DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-36}
SWEEPS=${SWEEPS-pool8}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, say how it ended
  local name=$1 limit=$2 began=$SECONDS
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@"
  echo "== $name: exit $? after $((SECONDS - began)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import sys, torch, transformers, zarr; print(sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__, 'zarr', zarr.__version__, 'cuda', torch.cuda.is_available())"
step tests 100 python3 -m pytest -q -p no:cacheprovider -rs --junitxml="$OUT/tests.xml" tests/test_cuda.py \
  tests/test_capture.py -k cuda
step capture_overhead 120 python3 benchmarks/capture_overhead.py --device "$DEVICE" --ks 4096,16384 --no-wandb \
  --no-breakdown --out "$OUT/capture_overhead_$DEVICE.json"
step gpu_sketch 90 python3 benchmarks/gpu_sketch.py --device "$DEVICE" --out "$OUT/gpu_sketch_$DEVICE.json"
for name in $SWEEPS; do
  case $name in
    pool8) setting="--set sweep.workers=8" ;;
    pool4) setting="--set sweep.workers=4" ;;
    ensemble8) setting="--set sweep.workers=2 --set sweep.ensemble=8" ;;
    *) echo "unknown sweep setting $name (pool8, pool4, ensemble8)"; continue ;;
  esac
  # shellcheck disable=SC2086  # the settings are word lists
  step "sweep_time $name" 200 python3 benchmarks/sweep_time.py experiments/large.yaml --runs "$RUNS" \
    --set train.device="$DEVICE" --set train.precision=fp32 $setting ${SLICE_SET:-} \
    --out-json "$OUT/sweep_time_$name.json"
done
