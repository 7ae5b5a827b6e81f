"""Will this run fit the cluster? Answered in a second, before any work starts.

The failures this catches otherwise show up late and quietly: Ray Data waiting forever
for CPUs the training workers hold (``backpressured ... ResourceBudget``), a worker bundle
no node can host (the run waits for resources that never come), ``--gpu`` on a cluster
without GPUs, and prefetched batches that do not fit the object store (spilling, then a
crawl). Node shapes come from the live nodes plus the node types the autoscaler may add,
so an autoscaling GPU cluster that is scaled to zero is not refused.

:func:`check_cluster` raises :class:`PreflightError` on the first error (what training
calls); :func:`doctor_report` renders everything for ``campar doctor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from campar_ray.config import Config

GIB = 1024**3
IMAGE_BYTES_PER_PIXEL = 3  # decoded uint8 RGB blocks travel through the object store
OBJECT_STORE_WARN_FRACTION = 0.5


class PreflightError(ValueError):
    """The configured run cannot work on this cluster; the message says why and what to change."""


@dataclass(frozen=True)
class ClusterShape:
    """What the cluster has, or can grow to."""

    nodes: tuple[dict[str, float], ...]
    """Total resources of each live node."""
    node_types: tuple[dict[str, float], ...] = ()
    """Resources of each node type the autoscaler may start (none on a fixed cluster)."""

    @property
    def totals(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for node in self.nodes:
            for name, value in node.items():
                totals[name] = totals.get(name, 0.0) + value
        return totals

    @classmethod
    def from_ray(cls) -> ClusterShape:
        """The shape of the cluster this process is connected to."""
        import ray
        from ray._private.state import state

        nodes = tuple(
            {k: float(v) for k, v in node["Resources"].items()}
            for node in ray.nodes()
            if node["Alive"]
        )
        config = state.get_cluster_config()
        types = tuple(
            {k: float(v) for k, v in group.resources.items()}
            for group in (config.node_group_configs if config else ())
            if group.max_count != 0
        )
        return cls(nodes, types)


@dataclass(frozen=True)
class Finding:
    level: str
    """``error`` (the run cannot work) or ``warning`` (it will, badly)."""
    message: str


@dataclass(frozen=True)
class Reservation:
    """What a stage-1 run asks of the cluster."""

    workers: int
    worker_bundle: dict[str, float]
    data_cpus: float
    """CPUs left for Ray Data decoding once the workers hold theirs."""
    prefetch_bytes: float
    """Decoded images held in the object store: prefetched batches plus blocks in flight."""

    @classmethod
    def of(cls, config: Config, shape: ClusterShape) -> Reservation:
        from campar_ray.data.ray_pipeline import BLOCK_ROWS

        train, data = config.train, config.data
        bundle = {"CPU": train.cpus_per_worker, **({"GPU": 1.0} if train.use_gpu else {})}
        image = data.image_size[0] * data.image_size[1] * IMAGE_BYTES_PER_PIXEL
        batches = (data.prefetch_batches + 1) * train.batch_size * train.max_workers
        blocks = max(data.decode_concurrency, 1) * BLOCK_ROWS * 2  # one in flight, one queued
        return cls(
            workers=train.max_workers,
            worker_bundle=bundle,
            data_cpus=shape.totals.get("CPU", 0.0) - train.max_workers * train.cpus_per_worker,
            prefetch_bytes=float((batches + blocks) * image),
        )


def findings(config: Config, shape: ClusterShape) -> list[Finding]:
    """Every problem of running ``config``'s stage 1 on ``shape``, errors first."""
    need = Reservation.of(config, shape)
    found: list[Finding] = []
    shapes = shape.nodes + shape.node_types
    if config.train.use_gpu and not any(s.get("GPU", 0) > 0 for s in shapes):
        found.append(
            Finding(
                "error",
                "train.use_gpu (--gpu) is set but no node has a GPU and the autoscaler can "
                "add none; drop --gpu or add GPU nodes",
            )
        )
    elif not any(_fits(need.worker_bundle, s) for s in shapes):
        found.append(
            Finding(
                "error",
                f"one training worker needs {_format(need.worker_bundle)} but the largest node "
                f"offers {_format(_largest(shapes))}; lower train.cpus_per_worker",
            )
        )
    if need.data_cpus <= 0 and not shape.node_types:
        found.append(
            Finding(
                "error",
                f"{need.workers} training worker(s) x {config.train.cpus_per_worker:g} CPU take "
                f"all {shape.totals.get('CPU', 0):g} CPUs, leaving none for Ray Data decoding "
                "(it would wait forever); lower train.num_workers or train.cpus_per_worker",
            )
        )
    store = shape.totals.get("object_store_memory", 0.0)
    if store and need.prefetch_bytes > store:
        found.append(
            Finding(
                "error",
                f"prefetched batches and decode blocks need about {need.prefetch_bytes / GIB:.2f} "
                f"GiB of object store, the cluster has {store / GIB:.2f} GiB; lower "
                "data.prefetch_batches, train.batch_size or data.decode_concurrency",
            )
        )
    elif store and need.prefetch_bytes > OBJECT_STORE_WARN_FRACTION * store:
        found.append(
            Finding(
                "warning",
                f"prefetching takes {need.prefetch_bytes / store:.0%} of the object store; "
                "expect spilling to disk",
            )
        )
    return sorted(found, key=lambda finding: finding.level != "error")


def check_cluster(config: Config) -> None:
    """Raise :class:`PreflightError` for the first error of ``config`` on the connected cluster."""
    errors = [f for f in findings(config, ClusterShape.from_ray()) if f.level == "error"]
    if errors:
        raise PreflightError(errors[0].message)


def doctor_report(
    config: Config, shape: ClusterShape, checked: Sequence[Finding] = ()
) -> tuple[str, bool]:
    """The ``campar doctor`` text and whether the run would start.

    ``checked`` are the caller's own findings (the manifest, the run directory), listed with
    the cluster's so that "ok: nothing found" means nothing was found anywhere.
    """
    need = Reservation.of(config, shape)
    totals = shape.totals
    lines = [
        f"cluster: {len(shape.nodes)} node(s), {totals.get('CPU', 0):g} CPU, "
        f"{totals.get('GPU', 0):g} GPU, {totals.get('object_store_memory', 0) / GIB:.2f} GiB "
        "object store",
        *(f"  node {index}: {_format(node)}" for index, node in enumerate(shape.nodes)),
        *(f"  autoscaler node type: {_format(kind)}" for kind in shape.node_types),
        f"run: {need.workers} worker(s) x {_format(need.worker_bundle)}; "
        f"Ray Data keeps {max(need.data_cpus, 0):g} CPU; prefetch needs about "
        f"{need.prefetch_bytes / GIB:.2f} GiB of object store",
    ]
    problems = sorted([*checked, *findings(config, shape)], key=lambda f: f.level != "error")
    lines += [f"{f.level}: {f.message}" for f in problems] or ["ok: nothing found"]
    return "\n".join(lines), not any(f.level == "error" for f in problems)


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(name, 0.0) >= amount for name, amount in bundle.items())


def _largest(shapes: tuple[dict[str, float], ...]) -> dict[str, float]:
    return max(shapes, key=lambda s: (s.get("GPU", 0.0), s.get("CPU", 0.0)), default={})


def _format(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU")}
    return ", ".join(f"{v:g} {k}" for k, v in shown.items()) or "nothing"
