"""The ``campar`` command line: one sub-command per pipeline step.

``prepare -> train -> fit-cfar -> evaluate``, plus ``demo`` (all of them on built-in data)
and ``config`` (show the resolved configuration). Every sub-command takes ``--config FILE``
and repeated ``--set dotted.key=value``; explicit flags such as ``--run-dir`` are shorthands
for the matching ``--set``. Handlers only translate arguments into library calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from campar_ray.config import Config, ConfigError, config_keys, load_config

Handler = Callable[[argparse.Namespace, Config], int]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones that only mean "not given"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default in ("", []):
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, _overrides(args))
        return args.handler(args, config)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"campar {args.command}: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="campar",
        description="Pedestrian attribute recognition with CAM-PAR + CFAR on Ray.",
        formatter_class=_HelpFormatter,
    )
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
    return common


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
    parser.add_argument("--keys", action="store_true", help="list every valid key instead")


def _config(args: argparse.Namespace, config: Config) -> int:
    import yaml

    if args.keys:
        print("\n".join(config_keys()))
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
    parser.add_argument("--out", required=True, help="manifest to write (.parquet or URI)")
    parser.add_argument("--seed", type=int, default=0, help="seed of generated splits and data")
    parser.add_argument(
        "--verify", action="store_true", help="decode every image and report bad ones"
    )
    parser.add_argument("--pack", action="store_true", help="store encoded images in the manifest")
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
        verify=args.verify,
        progress=_counter("verified"),
        **options,
    )
    print(report.summary())
    return 1 if report.verify is not None and report.verify.bad else 0


# --- helpers ------------------------------------------------------------------------------


def _counter(label: str) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        if done == total or done % 1000 == 0:
            print(f"{label} {done}/{total}", file=sys.stderr)

    return report


_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Handler]] = [
    ("prepare", "convert a dataset into a Parquet manifest", _prepare_arguments, _prepare),
    ("config", "print the resolved configuration", _config_arguments, _config),
]


if __name__ == "__main__":
    sys.exit(main())
