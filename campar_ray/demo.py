"""``campar demo``: the whole pipeline on built-in data, in minutes, on a laptop.

data -> stage 1 (CAM-PAR + fusion on Ray Train) -> stage 2 (CFAR on Ray actors) -> a small
CFAR-scope Optuna search whose best settings are refitted -> evaluation on the test split
with the report. Each step leaves its artefacts in the output folder and is skipped when they are
already there, so an interrupted demo continues where it stopped (``fresh=True`` starts
over). Wall time per step goes to ``timings.json`` (the end-to-end benchmark reads it).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from campar_ray import storage
from campar_ray.config import Config, load_config
from campar_ray.metrics import protocol_statement
from campar_ray.run.layout import RunDir
from campar_ray.runtime import init_ray

PETA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "peta"
DEMO_CONFIG = "demo.yaml"


@dataclass
class DemoResult:
    """Where the demo left its outputs, how long each step took, and the headline numbers."""

    out: str
    manifest: str
    report: str
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """The evaluation's table as ``campar evaluate`` prints it (the search's test figure is
        its ``val`` row), the report's protocol, the time of each step and the report."""
        from campar_ray.evaluate import figures_text

        steps = ", ".join(f"{step} {seconds:.0f}s" for step, seconds in self.timings.items())
        protocol = protocol_statement(self.metrics["threshold_protocol"])
        table = figures_text(self.metrics)
        return "\n".join([table, protocol, f"time: {steps}", f"report: {self.report}"])


def demo_config(out: str, manifest: str, overrides: list[str] | None = None) -> Config:
    """The packaged demo recipe, pointed at ``manifest`` and ``out``."""
    config = load_config(Path(__file__).with_name(DEMO_CONFIG), overrides)
    return config.override({"data.manifest": manifest, "run.dir": demo_run_dir(out)})


def demo_run_dir(out: str) -> str:
    """The run directory inside the demo's folder ``out`` (next to its data)."""
    return storage.join(out, "run")


def run_demo(
    data: str = "synthetic",
    out: str = "runs/demo",
    *,
    fresh: bool = False,
    overrides: list[str] | None = None,
    trials: int = 8,
    images: int = 2000,
    address: str | None = None,
    insecure: bool = False,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run every step on ``data`` (``synthetic``, ``peta`` or a manifest path) into ``out``.

    ``images`` sizes the synthetic data set; ``overrides`` (``key=value``) adjust the
    packaged recipe (``campar_ray/demo.yaml``); ``trials`` is the search's budget. Ray is
    joined at ``address`` (see :func:`init_ray`, which ``insecure`` is passed to; a local
    cluster when None) once ``out`` is ready, so a quiet run's log file in it survives
    ``fresh``.
    """
    out = str(Path(out).resolve())
    if fresh and Path(out).exists():
        shutil.rmtree(out)
    init_ray(address, insecure=insecure)
    timings: dict[str, float] = {}

    def step(name: str, done: bool, work: Callable[[], Any]) -> None:
        if done:
            log(f"== {name}: already done, reusing it")
            return
        log(f"== {name}")
        start = time.perf_counter()
        work()
        timings[name] = time.perf_counter() - start

    manifest = _manifest_for(data, out)
    step("data", storage.exists(manifest), lambda: _prepare(data, manifest, images, log))
    # The built-in PETA stays where it ships, outside the demo's folder: trusted by choice.
    trusted = ["data.allow_outside_root=true"] if data == "peta" else []
    config = demo_config(out, manifest, [*trusted, *(overrides or [])])
    run = RunDir(config.run.dir)
    step("stage 1", storage.exists(run.logits("test")), lambda: _train(config))
    step("stage 2", storage.exists(run.cfar_metrics), lambda: _fit(config))
    step("search", storage.exists(run.best_config), lambda: _search(config, trials))
    metrics: dict[str, Any] = {}
    step("evaluate", False, lambda: metrics.update(_evaluate(run.path)))
    result = DemoResult(
        out=out,
        manifest=manifest,
        report=metrics["files"]["html"],
        timings=timings,
        metrics=metrics,
    )
    _record_timings(out, timings)
    return result


def _manifest_for(data: str, out: str) -> str:
    if data in ("synthetic", "peta"):
        return storage.join(out, "data", "manifest.parquet")
    if not storage.exists(data):
        raise FileNotFoundError(f"--data {data!r} is neither synthetic, peta nor a manifest")
    return data


def _prepare(data: str, manifest: str, images: int, log: Callable[[str], None]) -> None:
    from campar_ray.data.converters import prepare

    if data == "synthetic":
        report = prepare("synthetic", "", manifest, seed=0, n=images, size=(128, 64))
    else:
        if not (PETA_ROOT / "PETA dataset").is_dir():
            raise FileNotFoundError(f"PETA images not found at {PETA_ROOT}")
        report = prepare("peta", str(PETA_ROOT), manifest, seed=0)
    log(report.summary())


def _train(config: Config) -> None:
    from campar_ray.train.monitor import epoch_lines
    from campar_ray.train.stage1 import train_stage1

    with epoch_lines(config.train.epochs, config.data) as callbacks:
        train_stage1(config, callbacks=callbacks)


def _fit(config: Config) -> None:
    from campar_ray.cfar.fit import fit_cfar

    fit_cfar(config.run.dir, config.cfar, seed=config.seed)


def _search(config: Config, trials: int) -> None:
    """CFAR-scope search; its best settings (chosen on val) are refitted into the run.

    Trials use the in-process NumPy solver: at demo size an ALS fit takes well under a
    second, less than starting the actors of the Ray solver.
    """
    from campar_ray.tune import run_search

    base = config.override({"cfar.solver": "local"})
    run_search(base, run_dir=config.run.dir, scope="cfar", num_samples=trials)


def _evaluate(run: str) -> dict[str, Any]:
    from campar_ray.evaluate import evaluate

    return evaluate(run, "test")


def _record_timings(out: str, timings: dict[str, float]) -> None:
    path = Path(out, "timings.json")
    previous = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**previous, **timings}, indent=2))
