"""`ray job submit` entrypoint for `campar fit-cfar` (same parser, same library call).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/fit_cfar.py --config configs/pa100k.yaml --set run.dir=s3://bucket/campar/runs/pa100k
"""

import sys

from campar_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["fit-cfar", *sys.argv[1:]]))
