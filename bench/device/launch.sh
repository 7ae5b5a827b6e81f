#!/usr/bin/env bash
# On the device, after the three stage.sh calls (and setup.sh, run here), start
# bench.peta_ablation in its own session (it outlives this call and is polled by poll.sh) from
# bench/results/peta_ablation.json, so rows already recorded are skipped.
# Usage: bash bench/device/launch.sh SECONDS_TO_POLL [peta_ablation args...]
set -euo pipefail
poll=$1; shift
source bench/device/setup.sh
rm -rf /tmp/code /tmp/abl && cp -r "$PWD" /tmp/code && mkdir -p /tmp/abl/out
cp bench/results/peta_ablation.json /tmp/abl/out/
cd /tmp/code
export PYTHONPATH=/tmp/site:/tmp/code
setsid nohup python3 -m bench.peta_ablation --device gpu --peta-root /tmp/peta \
  --runs /tmp/abl/runs --out /tmp/abl/out "$@" > /tmp/abl/log 2>&1 < /dev/null &
echo $! > /tmp/abl/pid
bash bench/device/poll.sh "$poll"
