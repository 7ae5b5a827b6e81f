"""The import rule of docs/ARCHITECTURE.md, checked on the package's real import graph.

Every import between the package's parts must point down the layers below: a part imports only
parts of lower layers (and its own modules). Read statically from the source, so an import
inside a function counts as much as one at the top. A second check imports the maths and the
inference products in a fresh interpreter and requires that Ray was never loaded. A third
checks that the names inside a run directory are spelled in ``run`` only.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "campar_ray"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("storage", "metrics"),
    ("config", "artifacts"),
    ("runtime", "tracking"),
    ("data",),
    ("model", "preflight"),
    ("run",),
    ("decision",),
    ("train",),
    ("cfar",),
    ("tune", "bundle"),
    ("evaluate", "export", "predict"),
    ("demo",),
    ("cli",),
)
"""Lowest first; the same list as the table of docs/ARCHITECTURE.md."""

LAYER = {part: index for index, parts in enumerate(LAYERS) for part in parts}

RAY_FREE = (
    "campar_ray.metrics",
    "campar_ray.model",
    "campar_ray.data.concurrency",
    "campar_ray.data.images",
    "campar_ray.data.manifest",
    "campar_ray.data.transforms",
    "campar_ray.cfar.als",
    "campar_ray.cfar.model",
    "campar_ray.cfar.solver",
    "campar_ray.run.layout",
    "campar_ray.run.logits",
    "campar_ray.run.checkpoints",
    "campar_ray.decision",
    "campar_ray.evaluate.diagnostics",
    "campar_ray.bundle",
    "campar_ray.export",
)
"""The maths and what serves a trained model: usable (and testable) without Ray."""

RUN_NAMES = frozenset(
    {
        "config.yaml",
        "logits",
        "skipped.json",
        "best.yaml",
        "tensorboard",
        "data_stats",
        "logs",
        "model.pt",
        "train_state.pt",
        "meta.json",
        "checkpoint_manager_snapshot.json",
        "calibration.json",
    }
)
"""Names inside a run directory that only ``run`` may spell. ``cfar``, ``tune``, ``report``,
``ray`` and ``stage1`` are run-directory names too, but also a config section, a search
scope, a solver or a stage's tracking name, so a string alone cannot tell them apart."""


def _part(path: Path, package: Path = PACKAGE) -> str:
    return path.relative_to(package).with_suffix("").parts[0]


def _imported_parts(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "campar_ray":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("campar_ray."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {
                alias.name.split(".")[1]
                for alias in node.names
                if alias.name.startswith("campar_ray.")
            }
    return found


def import_edges(package: Path = PACKAGE) -> set[tuple[str, str, str]]:
    """``(importing part, imported part, file)`` for every import between two parts."""
    edges = set()
    for path in package.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == package:
            continue  # the public API re-exports from every layer, lazily
        part = _part(path, package)
        for target in _imported_parts(ast.parse(path.read_text())):
            if target != part:
                edges.add((part, target, str(path.relative_to(package.parent))))
    return edges


def upward_imports(package: Path = PACKAGE) -> list[str]:
    return sorted(
        f"{file}: {part} (layer {LAYER[part]}) imports {target} (layer {LAYER[target]})"
        for part, target, file in import_edges(package)
        if LAYER[target] >= LAYER[part]
    )


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(path) for path in PACKAGE.rglob("*.py")} - {"__init__"}
    assert parts == set(LAYER), "add the new part to LAYERS and to docs/ARCHITECTURE.md"


def test_imports_point_down_the_layers():
    upward = upward_imports()
    assert not upward, "imports against docs/ARCHITECTURE.md:\n" + "\n".join(upward)


def spelled_outside(names: frozenset[str], owner: str, package: Path = PACKAGE) -> list[str]:
    """``file:line: 'name'`` for every string constant equal to one of ``names`` (a docstring
    or message that mentions a name is longer, so it never equals one) outside ``owner``."""
    return sorted(
        f"{path.relative_to(package.parent)}:{node.lineno}: {node.value!r}"
        for path in package.rglob("*.py")
        if _part(path, package) != owner
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
    )


def test_only_run_spells_the_names_inside_a_run_directory():
    outside = spelled_outside(RUN_NAMES, "run")
    assert not outside, "use campar_ray.run.layout (RunDir) instead:\n" + "\n".join(outside)
    spelled = {
        node.value
        for path in (PACKAGE / "run").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    assert not RUN_NAMES - spelled, f"no longer spelled in run: {sorted(RUN_NAMES - spelled)}"


def test_the_rule_catches_upward_and_sideways_imports(tmp_path):
    """The check itself, on a package holding one import of each kind (one inside a function)."""
    package = tmp_path / "campar_ray"
    (package / "data").mkdir(parents=True)
    (package / "data" / "pipeline.py").write_text(
        "from campar_ray import storage\ndef late():\n    from campar_ray.train.loop import step\n"
    )
    (package / "tune.py").write_text("import campar_ray.bundle\nfrom campar_ray.cfar import fit\n")
    assert upward_imports(package) == [
        "campar_ray/data/pipeline.py: data (layer 3) imports train (layer 7)",
        "campar_ray/tune.py: tune (layer 9) imports bundle (layer 9)",
    ]


def test_maths_and_serving_load_without_ray():
    code = (
        "import sys\n"
        + "".join(f"import {module}\n" for module in RAY_FREE)
        + "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"Ray was loaded: {done.stdout.strip()[:500]}"
