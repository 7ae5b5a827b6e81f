"""`ray job submit` entrypoint for `campar train` (same parser, same library call).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/train.py --config configs/pa100k.yaml --set run.dir=s3://bucket/runs/pa100k
"""

import sys

from campar_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
