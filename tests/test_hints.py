"""Every hint a refusal prints names a flag that the refusing command accepts, and following it
gets past the refusal.

The main path of the README meets one such refusal: ``campar prepare peta --root ROOT --out
data/peta.parquet --verify`` writes a manifest away from its images, which ``train`` reads only
with the opt-in that ``prepare``'s note and ``train``'s refusal both name. Each test runs the
refusal, checks every ``--flag`` of its line against the command's own parser, then runs the
command again with the hint and checks that the refusal is gone.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from pathlib import Path

import pyarrow as pa
import pytest
from cli_checks import TINY_TRAIN, one_line, run_campar

from campar_ray.cli import build_parser
from campar_ray.config import Config
from campar_ray.data import generate_synthetic, read_manifest
from campar_ray.data.manifest import write_manifest

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def accepted_flags(command: str) -> set[str]:
    """Every option string of ``campar COMMAND``."""
    (commands,) = (
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    return set(commands.choices[command]._option_string_actions)


def hinted_flags(line: str) -> list[str]:
    return FLAG.findall(line)


@pytest.fixture
def away(tmp_path) -> str:
    """A manifest written away from its images: absolute paths into another folder, as
    ``prepare --root ROOT --out data/x.parquet`` writes them."""
    manifest = generate_synthetic(str(tmp_path / "dataset"), n=24, size=(32, 16))
    table, info = read_manifest(manifest)
    images = [f"{info.root}/{image}" for image in table.column("image").to_pylist()]
    out = str(tmp_path / "data" / "away.parquet")
    write_manifest(out, table.set_column(0, "image", pa.array(images)), info)
    return out


def test_train_on_a_manifest_away_from_its_images_follows_its_hints(away, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    Config().override({"seed": 7}).save(run_dir / "config.yaml")  # a run with another config
    argv = ["train", "--manifest", away, "--run-dir", str(run_dir), *TINY_TRAIN]
    code, _, err = run_campar(capsys, *argv)
    line = one_line(err)
    assert code == 2 and "is outside" in line
    flags = hinted_flags(line)
    assert "--allow-outside-root" in flags and set(flags) <= accepted_flags("train")
    code, _, err = run_campar(capsys, *argv, "--allow-outside-root")
    line = one_line(err)  # past the manifest: the next refusal, about the run directory
    assert code == 2 and "is outside" not in line and "holds a run with another config" in line
    assert {"--fresh", "--resume"} <= set(hinted_flags(line)) <= accepted_flags("train")


def test_pack_follows_its_hint(away, tmp_path, capsys):
    argv = ["pack", "--manifest", away, "--out", str(tmp_path / "packed")]
    code, _, err = run_campar(capsys, *argv)
    line = one_line(err)
    assert code == 2 and set(hinted_flags(line)) <= accepted_flags("pack")
    code, out, _ = run_campar(capsys, *argv, "--allow-outside-root")
    assert code == 0 and "24 images packed" in out


def test_prepares_note_names_a_train_command_that_parses(tmp_path, capsys):
    dataset = generate_synthetic(str(tmp_path / "dataset"), n=24, size=(32, 16))
    table, _ = read_manifest(dataset)
    csv = tmp_path / "dataset" / "labels.csv"
    attributes = [f"a{i}" for i in range(len(table.column("labels")[0]))]
    rows = [
        ",".join([image, *map(str, labels)])
        for image, labels in zip(
            table.column("image").to_pylist(), table.column("labels").to_pylist(), strict=True
        )
    ]
    csv.write_text("\n".join([",".join(["image", *attributes]), *rows]) + "\n")
    out = str(tmp_path / "data" / "mine.parquet")
    argv = ["prepare", "folder", "--root", str(csv.parent), "--csv", "labels.csv", "--out", out]
    code, printed, _ = run_campar(capsys, *argv)
    assert code == 0
    (note,) = [line for line in printed.splitlines() if "outside the manifest's folder" in line]
    (command,) = re.findall(r"\((campar train [^)]*?) \.\.\.\)", note)
    parsed = build_parser().parse_args([*shlex.split(command)[1:], "--run-dir", "r"])
    assert parsed.allow_outside_root and parsed.manifest == out
    assert set(hinted_flags(note)) <= accepted_flags("train") | accepted_flags("prepare")


@pytest.mark.parametrize("command", ["train", "tune", "demo", "doctor", "pack", "prepare"])
def test_every_command_that_reads_a_manifest_takes_the_opt_in(command):
    assert "--allow-outside-root" in accepted_flags(command)


def test_quoted_commands_in_the_package_name_flags_they_accept():
    """Messages that quote a command (``campar pack ... --decode``) quote real flags."""
    package = Path(__file__).resolve().parents[1] / "campar_ray"
    quoted = re.compile(r"campar ([a-z-]+)((?: [^ `'\")]+)*)")
    found = 0
    for path in package.rglob("*.py"):
        for command, rest in quoted.findall(path.read_text()):
            try:
                flags = accepted_flags(command)
            except KeyError:
                continue  # "campar ray" and other prose
            found += 1
            assert set(hinted_flags(rest)) <= flags, (path.name, command, rest)
    assert found > 5


def commands() -> list[str]:
    (subparsers,) = (
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    return list(subparsers.choices)


def message_texts(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string a module may print: string constants and f-strings (placeholders as
    ``{}``), less docstrings and the flags and help texts of argument definitions."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                skipped.add(id(body[0].value))
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in ("add_argument", "_shorthand", "add_parser"):
                skipped |= {id(sub) for arg in node.args for sub in ast.walk(arg)}
                skipped |= {id(sub) for kw in node.keywords for sub in ast.walk(kw.value)}
    texts = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.JoinedStr):
            parts = [v.value if isinstance(v, ast.Constant) else "{}" for v in node.values]
            texts.append((node.lineno, "".join(map(str, parts))))
            skipped |= {id(value) for value in node.values}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.append((node.lineno, node.value))
    return texts


QUOTED = re.compile(r"campar ([a-z-]+)((?: [^ `'\")]+)*)")
"""A quoted command line (``campar pack ... --decode``): its flags are the quoted command's,
checked by :func:`test_quoted_commands_in_the_package_name_flags_they_accept`."""


HINTS: tuple[tuple[str, str, tuple[str, ...] | str], ...] = (
    ("data/manifest.py", "is outside", "--allow-outside-root"),
    ("data/manifest.py", "no manifest given", ("train", "tune", "doctor")),
    ("data/ray_pipeline.py", "", ("train", "tune", "demo")),
    ("data/converters/", "", ("prepare",)),
    ("train/", "", ("train",)),
    ("run/checkpoints.py", "", ("train",)),
    ("tune/", "", ("tune",)),
    ("preflight.py", "", ("train", "doctor")),
    ("predict.py", "", ("predict",)),
    ("runtime.py", "", "--address"),
)
"""Which commands can print a message: (module or package folder, a regex the message
matches, the commands, or a flag: every command that accepts it). A hint there must name
flags that every one of them accepts. Other messages are shared by many commands; each flag
they name must be one that some command accepts."""


def printers(module: str, text: str) -> tuple[str, ...]:
    for prefix, pattern, who in HINTS:
        if module.startswith(prefix) and re.search(pattern, text):
            if isinstance(who, str):
                return tuple(c for c in commands() if who in accepted_flags(c))
            return who
    return ()


def test_every_hint_in_the_package_names_flags_its_commands_accept():
    """Each ``--flag`` a message of the package names (outside a quoted ``campar CMD ...``)
    is accepted by every command that can print that message."""
    package = Path(__file__).resolve().parents[1] / "campar_ray"
    known = set().union(*map(accepted_flags, commands())) | {"--version", "--help"}
    checked, wrong = 0, []
    for path in sorted(package.rglob("*.py")):
        module = path.relative_to(package).as_posix()
        for line, text in message_texts(ast.parse(path.read_text())):
            for flag in hinted_flags(QUOTED.sub("", text)):
                checked += 1
                if flag not in known:
                    wrong.append(f"{module}:{line}: {flag} is no campar flag: {text!r}")
                wrong += [
                    f"{module}:{line}: campar {command} does not accept {flag}: {text!r}"
                    for command in printers(module, text)
                    if flag not in accepted_flags(command)
                ]
    assert not wrong, "\n".join(wrong)
    assert checked > 20
