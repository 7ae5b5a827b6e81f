"""`ray job submit` entrypoint for the whole pipeline: train -> fit-cfar -> evaluate (test).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/pipeline.py --config configs/pa100k.yaml --set run.dir=s3://bucket/runs/pa100k

Every step is the matching `campar` sub-command with the same `--config`/`--set`
arguments, so a job and a shell session produce identical runs. Each step resumes or reuses
what an earlier, interrupted submission left in `run.dir`.
"""

import sys

from campar_ray.cli import main

STEPS = (["train"], ["fit-cfar"], ["evaluate", "--split", "test"])

if __name__ == "__main__":
    for step in STEPS:
        code = main([*step, *sys.argv[1:]])
        if code:
            sys.exit(code)
