#!/usr/bin/env bash
# On the device, after the three stage.sh calls: the head study's whole-network rows (#32),
# EfficientNet-Lite0 from its ImageNet weights with every layer learning (224x112, all of PETA
# decoded once and held on the GPU), for the baseline, CAM-PAR (own statistics) and CAM-PAR +
# CFAR on split 0 x SEEDS (default 0-4). Runs are kept in /tmp/hs and skipped when done, so a
# second call on the warm machine continues; the figures, the log and the run files (logits,
# labels, person ids) come back through $OUT.
# Usage: bash bench/device/head_study.sh SECONDS [SEED ...]
source bench/device/setup.sh
limit=$1; shift
seeds=${*:-0 1 2 3 4}
log="$OUT"/head_study.log
python3 -m bench.head_features --cache /tmp/hs --peta-root /tmp/peta --index-only > "$log" 2>&1
# shellcheck disable=SC2086
timeout "$limit" python3 -m bench.head_study --encoder whole --device cuda --threads 8 \
  --cache /tmp/hs --splits 1 --seeds $seeds --out "$OUT" >> "$log" 2>&1
echo "exit $?"
python3 -m bench.head_study --encoder whole --cache /tmp/hs --splits 1 --aggregate \
  --out "$OUT" >> "$log" 2>&1
tar czf "$OUT"/whole_network_runs.tgz -C /tmp/hs whole_network_runs
grep -E 'split [0-9]+ seed|Error|Traceback' "$log" | cut -c1-200 | tail -20
