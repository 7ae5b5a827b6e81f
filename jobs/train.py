"""`ray job submit` entrypoint for `campar train` (same parser, same library call).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/train.py --config configs/pa100k.yaml \
        --set data.manifest=s3://bucket/campar/pa100k/manifest \
        --set run.dir=s3://bucket/campar/runs/pa100k
"""

import sys

from campar_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
