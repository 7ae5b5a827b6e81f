#!/usr/bin/env bash
# On the device: wait up to $1 seconds for the ablation started by launch.sh, then return its
# results (peta_ablation.json/.md, the angle plot, the evidence logits) as one archive, and its
# log, through $OUT (which returns at most 8 files), and print the gist.
end=$((SECONDS + $1))
while [ $SECONDS -lt $end ] && kill -0 "$(cat /tmp/abl/pid)" 2>/dev/null; do sleep 5; done
kill -0 "$(cat /tmp/abl/pid)" 2>/dev/null && echo "STILL RUNNING" || echo "FINISHED"
tar czf "$OUT"/ablation-out.tgz -C /tmp/abl/out .
grep -v PlacementGroupCleaner /tmp/abl/log > "$OUT"/ablation.log
grep -E '^===|^\{"name|epoch [0-9]+/|Error|Traceback' "$OUT"/ablation.log | cut -c1-200 | tail -40
