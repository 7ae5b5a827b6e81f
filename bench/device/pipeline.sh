#!/usr/bin/env bash
# On the device, after the three stage.sh calls: the input-pipeline figures of a GPU node.
# bench.input_pipeline (decoder loop vs the pipeline a Ray Train worker receives, all 16 CPUs),
# then bench.stage1_scaling training ResNet-50 + CAM-PAR + fusion at 256x192 with AMP on the
# same repeated PETA (22,871 training images an epoch) beside the step alone. The JSON files
# and the log come back through $OUT; a failure of one bench does not stop the other.
# Usage: bash bench/device/pipeline.sh
source bench/device/setup.sh
log="$OUT"/pipeline.log
python3 -m bench.input_pipeline --peta-root /tmp/peta --work /tmp/ipw --decode-cpus 0.5 1 \
  > "$log" 2>&1
python3 -m bench.stage1_scaling --gpu --workers 1 --decode-tasks 0 --step-only \
  --manifest /tmp/ipw/repeated.parquet >> "$log" 2>&1
cp bench/results/input_pipeline-gpu.json bench/results/stage1_scaling-gpu.json "$OUT"/
grep -E '^\(a\)|^\(b\)|efficiency|^step only|^1 worker|^full pipeline|Error' "$log" | cut -c1-400
