#!/usr/bin/env bash
# Fetch, here, the wheels gradtrace needs on the lent GPU machine beyond what its image holds (Python 3.12 there;
# zarr and its codecs are missing) into .whl/, which git ignores; benchmarks/gpu_check.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
ls .whl
