"""The import rule of docs/ARCHITECTURE.md, checked on the package's real import graph.

Every import between the package's parts must point down the layers below: a part imports only
parts of lower layers (and its own modules). Read statically from the source, so an import
inside a function counts as much as one at the top. A second check imports the maths and the
inference products in a fresh interpreter and requires that Ray was never loaded. A third
checks that the names inside a run directory are spelled in ``run`` only (in the package, the
bench scripts and the jobs). The last ones find import cycles between modules (imports inside
functions count), a second copy of the decision (``campar_ray.decision``) where the code
shows it, and names the bench scripts and jobs import from the package that no longer exist.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "campar_ray"
SCRIPTS = (ROOT / "bench", ROOT / "jobs")
"""Code outside the package that uses it: held to the same spelling and decision rules."""

LAYERS: tuple[tuple[str, ...], ...] = (
    ("storage", "metrics", "progress", "bounded"),
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
    "campar_ray.progress",
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
        "trials.json",
        "search.json",
        "summary.json",
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


def _sources(package: Path, scripts: tuple[Path, ...]) -> list[tuple[Path, str]]:
    """Every Python file of the package (with its part) and of ``scripts`` (part ``""``)."""
    found = [(path, _part(path, package)) for path in package.rglob("*.py")]
    return found + [(path, "") for folder in scripts for path in folder.rglob("*.py")]


def spelled_outside(
    names: frozenset[str], owner: str, package: Path = PACKAGE, scripts: tuple[Path, ...] = ()
) -> list[str]:
    """``file:line: 'name'`` for every string constant equal to one of ``names`` (a docstring
    or message that mentions a name is longer, so it never equals one) outside ``owner``."""
    return sorted(
        f"{path.relative_to(package.parent)}:{node.lineno}: {node.value!r}"
        for path, part in _sources(package, scripts)
        if part != owner
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
    )


def test_only_run_spells_the_names_inside_a_run_directory():
    outside = spelled_outside(RUN_NAMES, "run", scripts=SCRIPTS)
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


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (inside functions too); ``from a import b``
    counts as importing ``a.b`` when that is a module, else ``a``. The public API's lazy
    re-exports (``campar_ray/__init__.py``) are left out, as in the layer rule."""
    files = {_module_name(path, package): path for path in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        if path == package / "__init__.py":
            continue
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in files:
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    targets.add(child if child in files else node.module)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name in files}
        graph[name] = targets - {name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``a -> b -> ... -> a``) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(_cycle_through(sorted(group), graph))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _cycle_through(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A path from the group's first module back to itself, inside the group."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for target in sorted(graph[node] & members):
            if target == start:
                return [*paths[node], start]
            if target not in paths:
                paths[target] = [*paths[node], target]
                frontier.append(target)
    raise AssertionError(f"no cycle through {start}")


def test_no_import_cycle_between_modules():
    cycles = import_cycles(module_imports())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle_through_a_function_import(tmp_path):
    package = tmp_path / "campar_ray"
    (package / "train").mkdir(parents=True)
    (package / "train" / "__init__.py").write_text("")
    (package / "train" / "worker.py").write_text("from campar_ray.train import monitor\n")
    (package / "train" / "monitor.py").write_text(
        "def line():\n    from campar_ray.train.worker import KEY\n"
    )
    assert import_cycles(module_imports(package)) == [
        ["campar_ray.train.monitor", "campar_ray.train.worker", "campar_ray.train.monitor"]
    ]


DECISION_OWNERS = {"decision", "export"}
"""Where logits become probabilities: the decision, and its torch mirror in the export
(checked against it to 1e-5 by tests/test_export.py)."""
GATES = {"campar_ray/model/fusion.py"}
"""A sigmoid that is no prediction: fusion's channel-attention gate."""


def _is_sigmoid_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name in {"sigmoid", "expit"}


def _logit_choice(node: ast.expr) -> bool:
    """``x.shared`` / ``x.specific`` or the strings ``"shared"`` / ``"specific"``."""
    if isinstance(node, ast.Attribute):
        return node.attr in {"shared", "specific"}
    return isinstance(node, ast.Constant) and node.value in {"shared", "specific"}


def _is_specific_else_shared(node: ast.AST) -> bool:
    """``a if x.specific is (not) None else b`` with a and b naming shared / specific logits."""
    if not (isinstance(node, ast.IfExp) and isinstance(node.test, ast.Compare)):
        return False
    test = node.test
    return (
        isinstance(test.left, ast.Attribute)
        and test.left.attr == "specific"
        and isinstance(test.ops[0], ast.Is | ast.IsNot)
        and _logit_choice(node.body)
        and _logit_choice(node.orelse)
    )


def second_decisions(package: Path = PACKAGE, scripts: tuple[Path, ...] = ()) -> list[str]:
    """``file:line: what`` for each sigmoid of logits and each "specific, else shared" choice
    outside the decision (and the export's checked mirror of it, for the sigmoid)."""
    found = []
    for path, part in _sources(package, scripts):
        file = str(path.relative_to(package.parent))
        for node in ast.walk(ast.parse(path.read_text())):
            if _is_sigmoid_call(node) and part not in DECISION_OWNERS and file not in GATES:
                found.append(f"{file}:{node.lineno}: logits -> probabilities")
            if _is_specific_else_shared(node) and part != "decision":
                found.append(f"{file}:{node.lineno}: specific, else shared")
    return sorted(found)


def test_the_decision_is_written_once():
    found = second_decisions(scripts=SCRIPTS)
    assert not found, "use campar_ray.decision instead:\n" + "\n".join(found)


def test_the_decision_check_catches_copies(tmp_path):
    package = tmp_path / "campar_ray"
    (package / "bundle").mkdir(parents=True)
    (package / "bundle" / "load.py").write_text(
        "import torch\n"
        "def f(out):\n"
        "    l = out.shared if out.specific is None else out.specific\n"
        "    name = 'shared' if out.specific is None else 'specific'\n"
        "    return torch.sigmoid(l), name\n"
    )
    assert second_decisions(package) == [
        "campar_ray/bundle/load.py:3: specific, else shared",
        "campar_ray/bundle/load.py:4: specific, else shared",
        "campar_ray/bundle/load.py:5: logits -> probabilities",
    ]


def missing_names(paths: list[Path], root: Path = ROOT) -> list[str]:
    """``file: module.name`` for every ``from campar_ray... import name`` that does not resolve.

    The bench scripts import inside their functions, so a renamed function only fails when
    the script next runs (hours into a benchmark); read statically, it fails here.
    """
    import importlib

    missing = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            package = (node.module or "").split(".")[0] if isinstance(node, ast.ImportFrom) else ""
            if package != "campar_ray":
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{path.relative_to(root)}: {node.module}.{alias.name}")
    return missing


def test_every_name_the_scripts_import_exists():
    assert missing_names([path for folder in SCRIPTS for path in folder.rglob("*.py")]) == []


def test_the_name_check_finds_a_stale_import(tmp_path):
    script = tmp_path / "stale.py"
    script.write_text("def main():\n    from campar_ray.data.images import ANY_PATH\n")
    assert missing_names([script], tmp_path) == ["stale.py: campar_ray.data.images.ANY_PATH"]
