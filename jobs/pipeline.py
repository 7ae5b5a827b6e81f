"""`ray job submit` entrypoint for the whole pipeline: [prepare ->] train -> fit-cfar -> evaluate.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/pipeline.py --config configs/pa100k.yaml \
        --set data.manifest=s3://bucket/campar/pa100k/manifest \
        --set run.dir=s3://bucket/campar/runs/pa100k \
        --prepare pa100k --root s3://bucket/datasets/PA100K --prepare-args "--pack"

Every step is the matching `campar` sub-command with the same `--config`/`--set`
arguments, so a job and a shell session produce identical runs. `--prepare FORMAT` first
converts the raw dataset at `--root` into the configured `data.manifest` (skipped when that
manifest exists); further `campar prepare` options go in `--prepare-args "..."` (one
option alone, such as `"--pack"`, included). Each step resumes or reuses what an earlier,
interrupted submission left in `run.dir`.
"""

import argparse
import shlex
import sys

from campar_ray import storage
from campar_ray.cli import main
from campar_ray.config import ConfigError, load_config

STEPS = (["train"], ["fit-cfar"], ["evaluate", "--split", "test"])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (see `campar config`)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--prepare", metavar="FORMAT", help="convert a raw dataset first")
    parser.add_argument("--root", default="", help="raw dataset folder or URI for --prepare")
    parser.add_argument("--prepare-args", default="", help="more `campar prepare` options")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parser's reading of ``argv``, where ``--prepare-args --pack`` passes ``--pack`` on
    (argparse alone takes a lone option-like value for a missing one)."""
    joined, rest = [], list(argv)
    while rest:
        item = rest.pop(0)
        if item == "--prepare-args" and rest:
            item = f"{item}={rest.pop(0)}"
        joined.append(item)
    return get_args_parser().parse_args(joined)


def prepare_step(args: argparse.Namespace) -> list[str] | None:
    """The `campar prepare` arguments, or None when nothing is to be prepared."""
    if not args.prepare:
        return None
    manifest = load_config(args.config, args.overrides).data.manifest
    if not manifest:
        raise ConfigError("--prepare writes data.manifest, which the config leaves empty")
    if storage.exists(manifest):
        print(f"[pipeline] {manifest} exists; skipping prepare", flush=True)
        return None
    return [
        "prepare",
        args.prepare,
        "--root",
        args.root,
        "--out",
        manifest,
        *shlex.split(args.prepare_args),
    ]


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    common = ["--config", args.config] if args.config else []
    common += [item for value in args.overrides for item in ("--set", value)]
    try:
        prepare = prepare_step(args)
    except ConfigError as error:
        print(f"pipeline: error: {error}", file=sys.stderr)
        return 2
    steps = ([prepare] if prepare else []) + [[*step, *common] for step in STEPS]
    for step in steps:
        print(f"[pipeline] campar {shlex.join(step)}", flush=True)
        code = main(step)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
