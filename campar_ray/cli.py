"""The ``campar`` command line: one sub-command per pipeline step.

``prepare -> train -> fit-cfar -> evaluate``, plus ``demo`` (all of them on built-in data)
and ``config`` (show the resolved configuration). Every sub-command takes ``--config FILE``
and repeated ``--set dotted.key=value``; explicit flags such as ``--run-dir`` are shorthands
for the matching ``--set``. Handlers only translate arguments into library calls.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import Callable

import campar_ray
from campar_ray.config import (
    EXPORT_FORMATS,
    LOOKUPS,
    SOLVERS,
    TUNE_SCOPES,
    Config,
    ConfigError,
    describe_keys,
    load_config,
)
from campar_ray.progress import set_interval

Handler = Callable[[argparse.Namespace, Config], int]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones that only mean "not given"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default in ("", []):
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure a user can cause ends in one line on stderr: bad input
    (exit 2), a Ray Train / Ray Data failure as its root cause with the full trace in a log
    file (exit 1), Ctrl-C (exit 130) or SIGTERM (exit 143) with what was saved. Anything else
    is a bug and keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = None
    previous = _terminate_as_interrupt()
    try:
        config = load_config(args.config, _overrides(args))
        set_interval(config.tracking.progress_seconds)
        _set_output(args, config)
        with _writer_lock(args, config):
            return args.handler(args, config)
    except _ray_failures() as error:  # first: Ray's errors may also be ValueErrors
        log, cause = _write_log(args, config, error), _root_cause(error)
        if _is_write_error(error):  # a full disk: what a re-run, once there is room, resumes
            cause += f"; {_saved(args, config)}"
        print(f"campar {args.command}: failed: {cause} (full trace: {log})", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, ConnectionError, ValueError) as error:
        print(f"campar {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from campar_ray.runtime import terminated

        stopped = "stopped by SIGTERM" if terminated() else "interrupted"
        print(f"campar {args.command}: {stopped}; {_saved(args, config)}", file=sys.stderr)
        return 143 if terminated() else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="campar",
        description="Pedestrian attribute recognition with CAM-PAR + CFAR on Ray.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"campar {campar_ray.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_parser()
    for name, help_text, add_arguments, handler in _COMMANDS:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            parents=[common],
            formatter_class=_HelpFormatter,
        )
        add_arguments(sub)
        sub.set_defaults(handler=handler)
    return parser


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE.yaml", help="YAML config (see `campar config`)")
    common.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.lr=3e-4 (repeatable)",
    )
    common.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own logs and progress bars on the terminal (default: they go to "
        "RUN/logs/ray-COMMAND.log)",
    )
    return common


def _set_output(args: argparse.Namespace, config: Config) -> None:
    """Ray's output to ``<run dir>/logs/ray-COMMAND.log`` (a temporary folder for commands
    without a run directory) unless ``--verbose``."""
    from campar_ray.demo import demo_run_dir
    from campar_ray.run.layout import RunDir
    from campar_ray.runtime import Output, set_output

    if args.command == "demo":
        log_dir: str | None = RunDir(demo_run_dir(args.out)).logs
    else:
        log_dir = RunDir(config.run.dir).logs if _writes_run_dir(args) else None
    set_output(Output(verbose=args.verbose, log_dir=log_dir, command=args.command))


def _writes_run_dir(args: argparse.Namespace) -> bool:
    """Whether the command works in a run directory (its logs go there); ``doctor`` only
    checks one and creates nothing."""
    return "run_dir" in vars(args) and args.command != "doctor"


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` values plus the shorthand flags a sub-command maps onto config keys."""
    shorthands = [
        f"{key}={json.dumps(getattr(args, attr))}"
        for attr, key in getattr(args, "config_flags", {}).items()
        if getattr(args, attr, None) is not None
    ]
    return shorthands + args.overrides


def _shorthand(parser: argparse.ArgumentParser, flag: str, key: str, **kwargs) -> None:
    """A flag that is another spelling of ``--set key=value``."""
    attr = flag.lstrip("-").replace("-", "_")
    parser.add_argument(
        flag, dest=attr, default=None, help=f"shorthand for --set {key}=...", **kwargs
    )
    flags = parser.get_default("config_flags") or {}
    parser.set_defaults(config_flags={**flags, attr: key})


# --- config -------------------------------------------------------------------------------


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keys",
        action="store_true",
        help="list every valid key instead, with its type, default, choices and meaning",
    )


def _key_lines() -> list[str]:
    """``key: type = default (choices)`` then the key's docstring, indented."""
    import textwrap

    lines = []
    for key in describe_keys():
        choices = f"  one of: {', '.join(key.choices)}" if key.choices else ""
        lines.append(f"{key.key}: {key.type} = {json.dumps(key.default)}{choices}")
        lines += textwrap.wrap(key.doc.replace("``", "`"), 96, initial_indent="    ",
                               subsequent_indent="    ")  # fmt: skip
    return lines


def _config(args: argparse.Namespace, config: Config) -> int:
    import yaml

    if args.keys:
        print("\n".join(_key_lines()))
    else:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


# --- prepare ------------------------------------------------------------------------------


def _prepare_arguments(parser: argparse.ArgumentParser) -> None:
    from campar_ray.data.converters import FORMATS

    formats = "; ".join(
        f"{spec.name}: {', '.join(o.name for o in spec.options) or 'no options'}"
        for spec in FORMATS.values()
    )
    parser.add_argument("format", choices=list(FORMATS), help=f"dataset layout ({formats})")
    parser.add_argument(
        "--root", default="", help="dataset folder (default: the manifest's folder)"
    )
    parser.add_argument(
        "--out", required=True, help="manifest to write: a .parquet file, else a folder of shards"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of generated splits and data")
    parser.add_argument(
        "--verify", action="store_true", help="decode every image and report bad ones"
    )
    parser.add_argument("--pack", action="store_true", help="store encoded images in the manifest")
    _shard_size_argument(parser)
    _allow_outside_root_argument(parser)
    seen: set[str] = set()
    for spec in FORMATS.values():
        for option in spec.options:
            if option.name in seen:
                continue
            seen.add(option.name)
            parser.add_argument(
                f"--{option.name.replace('_', '-')}",
                dest=f"option_{option.name}",
                metavar=option.name.upper(),
                default=None,
                help=f"{option.help} (format default: {option.default})",
            )


def _prepare(args: argparse.Namespace, config: Config) -> int:
    from campar_ray.data.converters import prepare
    from campar_ray.data.images import ImageLimits

    options = {
        name.removeprefix("option_"): value
        for name, value in vars(args).items()
        if name.startswith("option_") and value is not None
    }
    report = prepare(
        args.format,
        args.root,
        args.out,
        seed=args.seed,
        pack=args.pack,
        shard_mb=args.shard_size_mb,
        verify=args.verify,
        limits=ImageLimits.of(config.data),
        progress=_counter("verified"),
        **options,
    )
    print(report.summary())
    return 1 if report.verify is not None and report.verify.bad else 0


# --- pack ----------------------------------------------------------------------------------


def _pack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="path manifest (file, folder or URI)")
    parser.add_argument(
        "--out", required=True, help="folder or URI for the packed shards (or one .parquet file)"
    )
    _shard_size_argument(parser)
    parser.add_argument("--threads", type=int, default=16, help="images read at once")
    parser.add_argument(
        "--decode",
        action="store_true",
        help="store each image decoded and resized to data.image_size (raw RGB: training "
        "copies pixels instead of decoding; that size is then the only one it trains at)",
    )
    _allow_outside_root_argument(parser)


def _pack(args: argparse.Namespace, config: Config) -> int:
    from campar_ray.data.images import ImageLimits
    from campar_ray.data.pack import pack_manifest
    from campar_ray.model import resolve_inputs

    report = pack_manifest(
        args.manifest,
        args.out,
        shard_mb=args.shard_size_mb,
        threads=args.threads,
        limits=ImageLimits.of(config.data),
        decode=tuple(config.data.image_size) if args.decode else None,
        progress=_counter("packed"),
        interpolation=resolve_inputs(config).data.interpolation,
    )
    print(report.summary())
    return 1 if report.skipped else 0


def _allow_outside_root_argument(parser: argparse.ArgumentParser) -> None:
    """The opt-in to images a manifest (or a ``folder`` CSV) names outside its own folder."""
    _shorthand(
        parser, "--allow-outside-root", "data.allow_outside_root", action="store_const", const=True
    )


def _subset_argument(parser: argparse.ArgumentParser) -> None:
    """A quick check on the first N images of each split (``data.subset``)."""
    _shorthand(parser, "--subset", "data.subset", type=int, metavar="N")


def _shard_size_argument(parser: argparse.ArgumentParser) -> None:
    from campar_ray.data.pack import SHARD_MB

    parser.add_argument(
        "--shard-size-mb", type=float, default=SHARD_MB, metavar="N", help="size of each shard"
    )


# --- train ---------------------------------------------------------------------------------


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    _shorthand(parser, "--manifest", "data.manifest", metavar="M")
    _shorthand(parser, "--run-dir", "run.dir", metavar="D")
    _shorthand(parser, "--num-workers", "train.num_workers", type=_workers, metavar="N|MIN..MAX")
    _shorthand(parser, "--epochs", "train.epochs", type=int, metavar="E")
    _subset_argument(parser)
    _allow_outside_root_argument(parser)
    parser.add_argument("--gpu", action="store_true", help="train on GPUs (train.use_gpu=true)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument(
        "--fresh",
        action="store_const",
        const="fresh",
        dest="existing_run",
        help="start over in place: delete the run dir's checkpoints, logits, cfar and tune",
    )
    existing.add_argument(
        "--resume",
        action="store_const",
        const="resume",
        dest="existing_run",
        help="resume the run in the run dir with its stored model and data keys",
    )
    parser.set_defaults(existing_run=None)
    _address_argument(parser)


def _train(args: argparse.Namespace, config: Config) -> int:
    from campar_ray.train.monitor import epoch_lines
    from campar_ray.train.stage1 import train_stage1

    if args.gpu:
        config = config.override({"train.use_gpu": True})
    with epoch_lines(config.train.epochs, config.data) as callbacks:
        result = train_stage1(
            config,
            callbacks=callbacks,
            address=args.address,
            existing_run=args.existing_run or "match",
            insecure=args.insecure,
        )
    print(f"best checkpoint: {result.checkpoint}")
    return 0


# --- fit-cfar ------------------------------------------------------------------------------


def _fit_cfar_arguments(parser: argparse.ArgumentParser) -> None:
    _shorthand(parser, "--run-dir", "run.dir", metavar="D")
    _shorthand(parser, "--alpha", "cfar.alpha", type=float)
    _shorthand(parser, "--lam", "cfar.lam", type=float)
    _shorthand(parser, "--factors", "cfar.factors", type=int, metavar="D")
    _shorthand(parser, "--keys", "cfar.keys", type=int, metavar="K")
    _shorthand(parser, "--threshold", "cfar.threshold", type=float, metavar="P_T")
    _shorthand(parser, "--lookup", "cfar.lookup", choices=LOOKUPS)
    _shorthand(parser, "--actors", "cfar.actors", type=int, metavar="N")
    _shorthand(parser, "--solver", "cfar.solver", choices=SOLVERS)
    _address_argument(parser)


def _fit_cfar(args: argparse.Namespace, config: Config) -> int:
    from campar_ray.cfar.fit import SPLITS, cfar_figures_text, fit_cfar
    from campar_ray.run.logits import require_logits
    from campar_ray.runtime import cluster_address, init_ray

    require_logits(config.run.dir, SPLITS)
    address = cluster_address(args.address)  # auto then solves on that cluster: join it first
    if config.cfar.solver == "ray" or (config.cfar.solver == "auto" and address):
        init_ray(args.address, insecure=args.insecure)
    result = fit_cfar(
        config.run.dir,
        config.cfar,
        seed=config.seed,
        progress=_log_progress,
        tracking=config.tracking,
        address=address,
    )
    print(cfar_figures_text(result.metrics))
    print(f"artefacts: {result.output_dir}")
    return 0


# --- tune ----------------------------------------------------------------------------------


def _tune_arguments(parser: argparse.ArgumentParser) -> None:
    _shorthand(parser, "--manifest", "data.manifest", metavar="M")
    _shorthand(parser, "--run-dir", "run.dir", metavar="D")
    _allow_outside_root_argument(parser)
    parser.add_argument("--scope", choices=TUNE_SCOPES, default="cfar")
    parser.add_argument("--num-samples", type=int, default=16, help="trials to run")
    parser.add_argument("--search-space", default=None, help="YAML space (default: built-in)")
    parser.add_argument("--metric", default="val_mA", help="validation metric to maximise")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted search from its tune/trials.json (checked; Ray's pickles "
        "in the run directory are never read)",
    )
    _address_argument(parser)


def _tune(args: argparse.Namespace, config: Config) -> int:
    from campar_ray.runtime import init_ray
    from campar_ray.tune import run_search

    init_ray(args.address, insecure=args.insecure)
    result = run_search(
        config,
        run_dir=config.run.dir,
        scope=args.scope,
        num_samples=args.num_samples,
        search_space=args.search_space,
        metric=args.metric,
        resume=args.resume,
    )  # prints its progress and summary
    if not result.complete:  # Tune ends a search on Ctrl-C or SIGTERM instead of raising
        raise KeyboardInterrupt
    return 0


# --- evaluate / compare ---------------------------------------------------------------------


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    _shorthand(parser, "--run-dir", "run.dir", metavar="D")
    parser.add_argument("--split", choices=["val", "test"], default="test")
    parser.add_argument("--out", default=None, help="report folder (default: RUN/report/SPLIT)")
    parser.add_argument("--baseline-run", default=None, help="baseline run for the angle plot")
    _threshold_argument(parser)
    parser.add_argument("--angle-images", type=int, default=256, help="images for Fig. 7")
    parser.add_argument("--cam-images", type=int, default=4, help="images in the CAM grid")


def _threshold_argument(parser: argparse.ArgumentParser, calibrated: bool = False) -> None:
    """``--threshold PROTOCOL`` of evaluate, compare and predict (0.5, as PAR papers report);
    predict also takes ``calibrated`` (evaluate always shows it next to raw 0.5)."""
    from campar_ray.metrics import DECISION_PROTOCOLS, THRESHOLD_PROTOCOLS

    parser.add_argument(
        "--threshold",
        choices=DECISION_PROTOCOLS if calibrated else THRESHOLD_PROTOCOLS,
        default="0.5",
        help="threshold protocol: 0.5 (what PAR papers report), or chosen on the validation "
        "split (never test): one for all attributes (val) or one per attribute"
        + (", or the model's calibration read at 0.5 (calibrated)" if calibrated else ""),
    )


def _evaluate(args: argparse.Namespace, config: Config) -> int:
    from campar_ray.evaluate import evaluate, figures_text

    result = evaluate(
        config.run.dir,
        args.split,
        args.out,
        baseline_run=args.baseline_run,
        threshold=args.threshold,
        angle_images=args.angle_images,
        cam_images=args.cam_images,
    )
    print(figures_text(result))
    print(f"report: {result['files']['markdown']} (threshold protocol {args.threshold})")
    return 0


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="runs to put side by side")
    parser.add_argument("--out", required=True, help="folder for compare.md/.csv and the plot")
    parser.add_argument("--split", choices=["val", "test"], default="test")
    _threshold_argument(parser)
    parser.add_argument("--angle-images", type=int, default=256, help="images for Fig. 7")


def _compare(args: argparse.Namespace, config: Config) -> int:
    from campar_ray.evaluate import compare_runs, markdown_table
    from campar_ray.metrics import protocol_statement

    rows = compare_runs(
        args.runs, args.out, args.split, threshold=args.threshold, angle_images=args.angle_images
    )
    print(protocol_statement(args.threshold))
    print(markdown_table(rows))
    return 0


# --- bundle / predict / export --------------------------------------------------------------


def _bundle_arguments(parser: argparse.ArgumentParser) -> None:
    _shorthand(parser, "--run-dir", "run.dir", metavar="D")
    parser.add_argument("--out", required=True, help="bundle directory to write")


def _bundle(args: argparse.Namespace, config: Config) -> int:
    from campar_ray.bundle import save_bundle

    print(f"bundle: {save_bundle(config.run.dir, args.out)}")
    return 0


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="bundle (or run) directory")
    parser.add_argument("--input", required=True, help="folder, glob or manifest of images")
    parser.add_argument("--out", required=True, help="predictions .parquet or .csv")
    parser.add_argument("--gpu", action="store_true", help="run the model on GPUs")
    parser.add_argument("--actors", type=int, default=1, help="model replicas (actor pool)")
    parser.add_argument("--batch-size", type=int, default=64)
    _threshold_argument(parser, calibrated=True)
    _allow_outside_root_argument(parser)
    _address_argument(parser)


def _predict(args: argparse.Namespace, config: Config) -> int:
    from campar_ray.data.images import ImageLimits
    from campar_ray.predict import predict

    result = predict(
        args.model,
        args.input,
        args.out,
        threshold=args.threshold,
        gpu=args.gpu,
        actors=args.actors,
        batch_size=args.batch_size,
        data=config.data,
        limits=ImageLimits.of(config.data),
        address=args.address,
        insecure=args.insecure,
    )
    print(result.summary())
    return 0


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="bundle (or run) directory")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="torchscript")
    parser.add_argument("--out", required=True, help="file to write")
    parser.add_argument(
        "--check-images", default=None, metavar="GLOB", help="real images for parity"
    )


def _export(args: argparse.Namespace, config: Config) -> int:
    import glob

    from campar_ray.export import export_model

    images = sorted(glob.glob(args.check_images)) if args.check_images else None
    print(export_model(args.model, args.format, args.out, images=images).summary())
    return 0


# --- demo ---------------------------------------------------------------------------------


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default="synthetic",
        help="synthetic, peta (../shared/datasets/peta) or a manifest",
    )
    parser.add_argument("--out", default="runs/demo", help="folder for data, run and report")
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    parser.add_argument("--trials", type=int, default=8, help="CFAR-scope search trials")
    parser.add_argument("--images", type=int, default=2000, help="synthetic images to generate")
    _subset_argument(parser)
    _allow_outside_root_argument(parser)
    _address_argument(parser)


def _demo(args: argparse.Namespace, config: Config) -> int:
    from campar_ray.demo import run_demo

    result = run_demo(
        args.data,
        args.out,
        fresh=args.fresh,
        overrides=_overrides(args),
        trials=args.trials,
        images=args.images,
        address=args.address,
        insecure=args.insecure,
    )
    print(result.summary())
    return 0


# --- doctor -------------------------------------------------------------------------------


def _doctor_arguments(parser: argparse.ArgumentParser) -> None:
    _shorthand(parser, "--manifest", "data.manifest", metavar="M")
    _shorthand(parser, "--run-dir", "run.dir", metavar="D")
    _shorthand(parser, "--num-workers", "train.num_workers", type=_workers, metavar="N|MIN..MAX")
    parser.add_argument("--gpu", action="store_true", help="check a GPU run (train.use_gpu=true)")
    _allow_outside_root_argument(parser)
    _address_argument(parser)


def _doctor(args: argparse.Namespace, config: Config) -> int:
    from campar_ray import storage
    from campar_ray.data.manifest import read_info
    from campar_ray.preflight import ClusterShape, Finding, RunSections, doctor_report
    from campar_ray.runtime import init_ray

    if args.gpu:
        config = config.override({"train.use_gpu": True})
    problems = []
    checks = [("run.dir", lambda: storage.check_writable(config.run.dir, create=False))]
    if config.data.manifest:
        checks.insert(0, ("manifest", lambda: read_info(config.data.manifest)))
    else:
        problems.append(Finding("error", "data.manifest is not set (pass --manifest or --config)"))
    for what, check in checks:
        try:
            check()
        except (OSError, ValueError) as error:
            problems.append(Finding("error", f"{what}: {error}"))
    init_ray(args.address, insecure=args.insecure)
    report, fits = doctor_report(RunSections.of(config), ClusterShape.from_ray(), problems)
    print(report)
    return 0 if fits else 1


# --- failures -----------------------------------------------------------------------------


def _terminate_as_interrupt() -> Callable | int | None:
    """SIGTERM (a scheduler's stop, ``kill``) handled as Ctrl-C: Ray Tune then ends its
    search gracefully and every command ends with :func:`_saved`'s line, instead of dying with
    Ray's C++ stack dump. Returns the handler it replaced (None off the main thread)."""
    from campar_ray.runtime import terminate_as_interrupt

    return terminate_as_interrupt()


def _saved(args: argparse.Namespace, config: Config | None) -> str:
    """What an interrupted command leaves behind and how to go on from it."""
    from campar_ray import storage
    from campar_ray.run.checkpoints import resume_checkpoint
    from campar_ray.run.layout import RunDir

    if config is None or args.command not in ("train", "tune"):
        return "re-run the same command to resume"
    run = RunDir(config.run.dir)
    if args.command == "tune":
        record = run.search.record
        if storage.exists(record):
            return f"finished trials are kept in {record}; add --resume to run the rest"
        return "no trial had finished; re-run the same command to start the search"
    try:
        checkpoint = resume_checkpoint(run.path)
    except (OSError, ValueError):
        checkpoint = None
    if checkpoint is None:
        return "no checkpoint was saved yet; re-run the same command to start again"
    return f"the last checkpoint saved is {checkpoint}; re-run the same command to resume from it"


WRITERS = ("train", "fit-cfar", "tune", "bundle")
"""Commands that hold their run directory's lock: one of them writes (or reads whole) a run at
a time."""


def _writer_lock(args: argparse.Namespace, config: Config) -> contextlib.AbstractContextManager:
    from campar_ray.run.lock import run_lock

    if args.command not in WRITERS:
        return contextlib.nullcontext()
    return run_lock(config.run.dir, args.command)


def _ray_failures() -> tuple[type[BaseException], ...]:
    """The exception types of failed Ray tasks, actors, datasets and training runs (none when
    this process never imported Ray, so a command without Ray does not import it here)."""
    if "ray" not in sys.modules:
        return ()
    from ray.exceptions import RayError

    failures: list[type[BaseException]] = [RayError]
    if "ray.train" in sys.modules:
        from ray.train.base_trainer import TrainingFailedError as TrainingFailedV1
        from ray.train.v2._internal.exceptions import RayTrainError

        failures += [TrainingFailedV1, RayTrainError]
    if "ray.data" in sys.modules:
        from ray.data.exceptions import ExecutionTimeoutError

        failures.append(ExecutionTimeoutError)
    return tuple(failures)


def _root_cause(error: BaseException) -> str:
    """``Type: message`` of the innermost exception behind a Ray failure, on one line.

    A Ray Data function's error reaches the driver as a ``UserCodeException`` whose cause
    survives only in the remote traceback's text; its first exception line is that cause.
    """
    from ray.exceptions import UserCodeException

    chain = _chain(error)
    if isinstance(chain[-1], UserCodeException):
        for wrapper in reversed(chain):
            raised = _RAISED.search(str(wrapper))
            if raised:
                return f"{raised[1].rsplit('.', 1)[-1]}: {raised[2].strip()}"
    lines = [line.strip() for line in str(chain[-1]).splitlines() if line.strip()]
    name = type(chain[-1]).__name__
    return f"{name}: {lines[0]}" if lines else name


_RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", re.MULTILINE)
"""The ``Type: message`` line of a traceback's text (the first one is the innermost)."""


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions behind it (:func:`_inner`), the innermost last."""
    chain = [error]
    while (inner := _inner(chain[-1])) is not None and inner not in chain:
        chain.append(inner)
    return chain


def _is_write_error(error: BaseException) -> bool:
    """True when a Ray failure comes from a write to the run's storage that failed (a full
    disk in a training worker): the run itself can go on once there is room."""
    from campar_ray.storage import WriteError

    return isinstance(_chain(error)[-1], WriteError)


def _inner(error: BaseException) -> BaseException | None:
    """The exception that caused ``error``: a training worker's (lowest rank), the Train
    controller's, a Ray task's or the chained one; None when ``error`` is the innermost."""
    failures = getattr(error, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return failures[min(failures)]
    for name in ("controller_failure", "health_check_failure", "cause", "__cause__"):
        inner = getattr(error, name, None)
        if isinstance(inner, BaseException) and str(inner).strip():
            return inner
    return None


def _write_log(args: argparse.Namespace, config: Config | None, error: BaseException) -> str:
    """Write ``error``'s full traceback to ``<run.dir>/logs/campar-<command>.log`` (a temporary
    folder for commands without a run directory, or when that one cannot be written)."""
    import tempfile
    import time
    import traceback

    from campar_ray import storage
    from campar_ray.run.layout import RunDir

    name = f"campar-{args.command}.log"
    text = f"{time.strftime('%Y-%m-%d %H:%M:%S')} campar {args.command}\n"
    text += "".join(traceback.format_exception(error))
    if config is not None and _writes_run_dir(args):
        path = storage.join(RunDir(config.run.dir).logs, name)
        try:
            storage.write_bytes(path, text.encode())
            return path
        except OSError:
            pass
    path = os.path.join(tempfile.mkdtemp(prefix="campar-logs-"), name)
    with open(path, "w") as log:
        log.write(text)
    return path


# --- helpers ------------------------------------------------------------------------------


def _workers(value: str) -> int | str:
    """``4`` or an elastic range ``2..4`` (checked with the rest of the config)."""
    return int(value) if value.isdigit() else value


def _address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else local)"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a cluster that accepts clients without a token (trusted networks only)",
    )


def _log_progress(stage: str, values: dict) -> None:
    details = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )
    print(f"[{stage}] {details}", file=sys.stderr)


def _counter(label: str) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        if done == total or done % 1000 == 0:
            print(f"{label} {done}/{total}", file=sys.stderr)

    return report


_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Handler]] = [
    ("prepare", "convert a dataset into a Parquet manifest", _prepare_arguments, _prepare),
    ("pack", "re-write a manifest with the images inside (Parquet shards)", _pack_arguments, _pack),
    ("demo", "the whole pipeline on built-in data, with a report", _demo_arguments, _demo),
    ("train", "train stage 1 (CAM-PAR) on Ray Train", _train_arguments, _train),
    ("fit-cfar", "fit stage 2 (CFAR) on a run's logits", _fit_cfar_arguments, _fit_cfar),
    ("tune", "search hyperparameters with Ray Tune + Optuna", _tune_arguments, _tune),
    ("evaluate", "metrics and report of a run", _evaluate_arguments, _evaluate),
    ("compare", "ablation table of several runs", _compare_arguments, _compare),
    ("bundle", "package a run as a model bundle", _bundle_arguments, _bundle),
    ("predict", "batch prediction over images", _predict_arguments, _predict),
    ("export", "export a bundle to TorchScript or ONNX", _export_arguments, _export),
    ("doctor", "check a run against the cluster without starting it", _doctor_arguments, _doctor),
    ("config", "print the resolved configuration", _config_arguments, _config),
]


if __name__ == "__main__":
    sys.exit(main())
