"""`ray job submit` entrypoint for `campar evaluate` (same parser, same library call).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/evaluate.py --config configs/pa100k.yaml --set run.dir=s3://bucket/campar/runs/pa100k
"""

import sys

from campar_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
