"""What every benchmark records next to its figures: machine, library versions, date.

A number without the machine and versions that produced it cannot be compared or repeated,
so every script writes its figures through :func:`write_results`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "torchvision", "ray", "numpy")


def subset_argument(parser: Any) -> None:
    """``--subset N`` of the scripts that train: a quick check of the script on the first N
    images of each split (``data.subset``; 0: all). Not for figures that are kept."""
    parser.add_argument(
        "--subset", type=int, default=0, metavar="N", help="quick check: N images per split"
    )


def machine_info() -> dict[str, Any]:
    """CPU count and model, OS, and the GPU when torch sees one."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "gpu": None,
    }
    import torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str | None]:
    """Python and the installed versions of the libraries the figures depend on."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def write_results(script_name: str, figures: dict[str, Any], variant: str | None = None) -> Path:
    """Write ``bench/results/<script_name>.json`` with machine, versions, date and figures.

    ``variant`` (e.g. ``"gpu"``) names a second record of the same script,
    ``<script_name>-<variant>.json``, so a GPU run does not overwrite the CPU figures.
    """
    name = Path(script_name).stem
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / (f"{name}-{variant}.json" if variant else f"{name}.json")
    _write_record(path, name, figures, Path(sys.argv[0]).name)
    return path


def _write_record(path: Path, name: str, figures: dict[str, Any], program: str) -> None:
    record = {
        "script": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([program, *sys.argv[1:]]),
        "machine": machine_info(),
        "versions": versions(),
        "figures": figures,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


README = RESULTS_DIR.parents[1] / "README.md"
RESULTS_MD = RESULTS_DIR.parent / "RESULTS.md"


def update_marked_block(name: str, text: str, document: Path = RESULTS_MD) -> None:
    """Replace what sits between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in
    ``document`` (bench/RESULTS.md) with ``text``, so a table there is always the one the
    script last wrote, never a hand copy of it. A file without the two markers is refused: a
    silent no-op would leave a stale table in place."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    content = document.read_text()
    if (
        content.count(begin) != 1
        or content.count(end) != 1
        or content.index(begin) > content.index(end)
    ):
        raise ValueError(f"{document} needs one {begin} ... {end} block")
    head, rest = content.split(begin)
    _, tail = rest.split(end)
    document.write_text(f"{head}{begin}\n{text.strip()}\n{end}{tail}")


def publish_figures(
    name: str, figures: dict[str, Any], table: str, out: Path, program: str | None = None
) -> None:
    """A study's figures and Markdown ``table`` into ``out``: into bench/results (JSON
    through :func:`write_results`, the table also into the marked ``name`` block of
    bench/RESULTS.md; the README summarises it), or, for a trial, only into ``out``
    (no document touched). ``program`` is the command recorded (default
    ``python -m bench.<name>``)."""
    if out.resolve() == RESULTS_DIR.resolve():
        write_results(name, figures)
        update_marked_block(name, table)
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_record(out / f"{name}.json", name, figures, program or f"python -m bench.{name}")
    (out / f"{name}.md").write_text(table)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
