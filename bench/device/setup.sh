#!/usr/bin/env bash
# On the device, after the three stage.sh calls: unpack PETA to /tmp/peta and install the staged
# wheels into /tmp/site, once per machine (later calls find them there).
# Usage: source bench/device/setup.sh   (exports PYTHONPATH/PATH for what follows)
stage=/tmp/stage
if [ ! -d /tmp/peta ]; then
  cat "$stage"/peta.tar.1 "$stage"/peta.tar.2 "$stage"/peta.tar.3 | tar x -C /tmp
fi
if [ ! -d /tmp/site/ray ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "$stage"/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 \
  RAY_DATA_DISABLE_PROGRESS_BARS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
