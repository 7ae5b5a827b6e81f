"""Will this run fit the cluster? Answered in a second, before any work starts.

The failures this catches otherwise show up late and quietly: Ray Data waiting forever
for CPUs the training workers hold (``backpressured ... ResourceBudget``), a worker bundle
no node can host (the run waits for resources that never come), ``--gpu`` on a cluster
without GPUs, prefetched batches that do not fit the object store (spilling, then a
crawl), and a local path that the other machines of a cluster cannot read (every decode
task and checkpoint upload fails there).

A run is planned the way Ray's autoscaler places it: the training workers' bundles, then
the decode tasks', packed onto the live nodes first and then onto nodes of the types the
autoscaler may add (up to each type's maximum). Automatic decoding (``data.decode_concurrency
= 0``) is first made concrete for the cluster the workers get (:func:`resolve_decoding`,
through :mod:`campar_ray.data.concurrency`), so the plan counts the decode tasks training
will run. :func:`plan` says which nodes are missing, or why the run can never fit;
:func:`check_cluster` (what training calls) refuses only the latter, otherwise asks the
autoscaler for the missing nodes and waits for them up to ``train.node_wait_minutes``, and
hands back the one thing it decides: the number of decode tasks the run gets. Everything here
reads a :class:`RunSections`, the four sections of a config a plan depends on.
:func:`doctor_report` renders everything for ``campar doctor``. The shapes of the shipped
clusters come from their files (:func:`launcher_shape`, :func:`kuberay_shape`), so the recipes
can be planned against them without a cloud.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from campar_ray import storage
from campar_ray.config import Config, DataConfig, RunSettings, StorageConfig, TrainConfig
from campar_ray.data.concurrency import cluster_decode_tasks, least_decode_tasks

GIB = 1024**3
IMAGE_BYTES_PER_PIXEL = 3  # decoded uint8 RGB blocks travel through the object store
OBJECT_STORE_WARN_FRACTION = 0.5
POLL_SECONDS = 10.0
"""How often :func:`check_cluster` looks for the nodes it waits for."""


class PreflightError(ValueError):
    """The configured run cannot work on this cluster; the message says why and what to change."""


@dataclass(frozen=True)
class RunSections:
    """What a plan reads of a run's config: how it decodes and prefetches (``data``), its
    workers (``train``), where it writes (``run``) and which mounts every node shares
    (``storage``). The model, CFAR and tracking sections never change whether a run fits."""

    data: DataConfig
    train: TrainConfig
    run: RunSettings
    storage: StorageConfig

    @classmethod
    def of(cls, config: Config) -> RunSections:
        return cls(config.data, config.train, config.run, config.storage)


@dataclass(frozen=True)
class NodeType:
    """A kind of node the autoscaler may start."""

    name: str
    resources: dict[str, float]
    max_count: int = -1
    """The most nodes of this type the cluster may hold (-1: no limit)."""


@dataclass(frozen=True)
class ClusterShape:
    """What the cluster has, or can grow to."""

    nodes: tuple[dict[str, float], ...]
    """Total resources of each live node."""
    node_types: tuple[NodeType, ...] = ()
    """The node types the autoscaler may start (none on a fixed cluster)."""
    hosts: tuple[str, ...] = ()
    """The machine (IP address) of each live node, in the order of ``nodes``; () if unknown."""

    @property
    def totals(self) -> dict[str, float]:
        return _sum(self.nodes)

    @property
    def can_grow(self) -> bool:
        return any(t.max_count != 0 and _hosts_work(t.resources) for t in self.node_types)

    @property
    def one_machine(self) -> bool:
        """Whether every node, now and later, reads this process's local disk: all live nodes
        run on one machine (a driver always runs on a node, so on that one) and none can be
        added."""
        if self.can_grow:
            return False
        return len(set(self.hosts) if self.hosts else self.nodes) <= 1

    @classmethod
    def from_ray(cls) -> ClusterShape:
        """The shape of the cluster this process is connected to."""
        import ray
        from ray._private.state import state

        alive = [node for node in ray.nodes() if node["Alive"]]
        config = state.get_cluster_config()
        types = tuple(
            NodeType(group.name, _numbers(group.resources), group.max_count)
            for group in (config.node_group_configs if config else ())
            if group.max_count != 0
        )
        return cls(
            nodes=tuple({k: float(v) for k, v in node["Resources"].items()} for node in alive),
            node_types=types,
            hosts=tuple(node["NodeManagerAddress"] for node in alive),
        )


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
    decode_bundle: dict[str, float]
    decode_tasks: int
    """Decode tasks wanted at once: ``data.decode_concurrency`` made concrete by
    :func:`resolve_decoding`."""
    prefetch_bytes: float
    """Decoded images held in the object store: prefetched batches plus blocks in flight."""

    @classmethod
    def of(cls, sections: RunSections, decode_tasks: int) -> Reservation:
        """What the run of ``sections`` asks for with ``decode_tasks`` decode tasks (its
        ``data.decode_concurrency`` made concrete: :func:`resolve_decoding`, which
        :func:`plan` applies)."""
        from campar_ray.data.ray_pipeline import BLOCK_ROWS

        train, data = sections.train, sections.data
        image = data.image_size[0] * data.image_size[1] * IMAGE_BYTES_PER_PIXEL
        batches = (data.prefetch_batches + 1) * train.batch_size * train.max_workers
        blocks = decode_tasks * BLOCK_ROWS * 2  # one in flight, one queued
        return cls(
            workers=train.max_workers,
            worker_bundle=_worker_bundle(train),
            decode_bundle={"CPU": data.decode_cpus},
            decode_tasks=decode_tasks,
            prefetch_bytes=float((batches + blocks) * image),
        )

    @property
    def bundles(self) -> list[dict[str, float]]:
        """Every bundle of the run, workers first (the largest, as the autoscaler packs)."""
        return [self.worker_bundle] * self.workers + [self.decode_bundle] * self.decode_tasks


@dataclass(frozen=True)
class Plan:
    """Where a run goes: the live nodes, plus the nodes the autoscaler must add."""

    need: Reservation
    add: dict[str, int] = field(default_factory=dict)
    """Node type name -> nodes to add; empty when the live nodes hold the run."""
    nodes: tuple[dict[str, float], ...] = ()
    """Total resources of the planned cluster's nodes (live and added)."""
    decode_fit: int = 0
    """Decode tasks that fit next to the workers (at least 1 unless ``problem``)."""
    problem: str = ""
    """Why the run can never fit this cluster; empty when it can."""

    @property
    def data_cpus(self) -> float:
        """CPUs Ray Data plans with: the planned cluster's, less the workers' (its limit)."""
        used = self.need.workers * self.need.worker_bundle["CPU"]
        return _sum(self.nodes).get("CPU", 0.0) - used


def resolve_decoding(sections: RunSections, shape: ClusterShape) -> int:
    """``data.decode_concurrency`` made concrete (a number set is kept) for the cluster
    ``shape`` gives the run: its live nodes plus those the autoscaler adds for the training
    workers and the decode tasks the run cannot start without (see
    :mod:`campar_ray.data.concurrency`)."""
    data, train = sections.data, sections.train
    workers = [_worker_bundle(train)] * train.max_workers
    decoding = [{"CPU": data.decode_cpus}] * least_decode_tasks(data)
    placed = _grow([*workers, *decoding], shape)
    added = [_type(shape, name).resources for name in _each(placed[1])] if placed else []
    return cluster_decode_tasks(data, train, _sum([*shape.nodes, *added]).get("CPU", 0.0))


def _worker_bundle(train: TrainConfig) -> dict[str, float]:
    """One training worker's bundle: its CPUs, and a GPU with ``train.use_gpu``."""
    return {"CPU": train.cpus_per_worker, **({"GPU": 1.0} if train.use_gpu else {})}


def plan(sections: RunSections, shape: ClusterShape) -> Plan:
    """Place the run of ``sections`` on ``shape``: every worker and every decode task it wants,
    else every worker and one decode task; :attr:`Plan.problem` says why not even that fits.
    Automatic decoding (:func:`resolve_decoding`) takes what the workers leave and adds no node."""
    need = Reservation.of(sections, resolve_decoding(sections, shape))
    least = need.bundles[: need.workers + least_decode_tasks(sections.data)]
    first = need.bundles[: need.workers + 1]
    for wanted in (least, first):
        placed = _grow(wanted, shape)
        if placed is not None:
            bins, add = placed
            fit = len(wanted) - need.workers
            fit += sum(_place(need.decode_bundle, bins) for _ in range(need.decode_tasks - fit))
            nodes = (*shape.nodes, *(_type(shape, name).resources for name in _each(add)))
            return Plan(need, add, nodes, fit)
    return Plan(need, nodes=shape.nodes, problem=_why_not(sections, need, shape))


def findings(
    sections: RunSections, shape: ClusterShape, image_folders: Iterable[str] = ()
) -> list[Finding]:
    """Every problem of running the stage 1 of ``sections`` on ``shape``, errors first.

    ``image_folders`` are the local folders a path manifest's images are read from (checked
    like the manifest itself on a cluster of several machines).
    """
    placed = plan(sections, shape)
    found: list[Finding] = []
    if placed.problem:
        found.append(Finding("error", placed.problem))
    elif placed.decode_fit < least_decode_tasks(sections.data):
        found.append(
            Finding(
                "warning",
                f"only {placed.decode_fit} of data.decode_concurrency="
                f"{placed.need.decode_tasks} decode tasks fit next to the training workers; "
                "expect training to wait for data",
            )
        )
    store = _sum(placed.nodes or shape.nodes).get("object_store_memory", 0.0)
    prefetch = placed.need.prefetch_bytes
    if store and prefetch > store:
        found.append(
            Finding(
                "error",
                f"prefetched batches and decode blocks need about {prefetch / GIB:.2f} "
                f"GiB of object store, the cluster has {store / GIB:.2f} GiB; lower "
                "data.prefetch_batches, train.batch_size or data.decode_concurrency",
            )
        )
    elif store and prefetch > OBJECT_STORE_WARN_FRACTION * store:
        found.append(
            Finding(
                "warning",
                f"prefetching takes {prefetch / store:.0%} of the object store; "
                "expect spilling to disk",
            )
        )
    found += path_findings(sections, shape, image_folders)
    return sorted(found, key=lambda finding: finding.level != "error")


def path_findings(
    sections: RunSections, shape: ClusterShape, image_folders: Iterable[str] = ()
) -> list[Finding]:
    """A local path every node must read but only this machine has, on a cluster of several
    machines. Relative paths are resolved here, on the driver, as training resolves them."""
    if shape.one_machine:
        return []
    mounts = sections.storage.shared_mounts
    paths = [("data.manifest", sections.data.manifest), ("run.dir", sections.run.dir)]
    paths += [("the manifest's images in", folder) for folder in image_folders]
    return [
        Finding(
            "error",
            f"{what} {os.path.abspath(path.removeprefix('file://'))} is on this machine's "
            "disk, which the cluster's other nodes cannot read; use an s3:// or gs:// URI, "
            "or declare the mount it is on, shared by every node, in storage.shared_mounts",
        )
        for what, path in paths
        if path and not storage.is_shared(path, mounts)
    ]


def image_folders(manifest: str) -> list[str]:
    """The local folders a path manifest's images are read from ([] for a packed one: its
    images travel inside it). Reads the ``image`` column only."""
    import pyarrow.parquet as pq

    from campar_ray.data.manifest import is_packed, manifest_files, read_info

    if not manifest or is_packed(manifest):
        return []
    root = read_info(manifest).root
    filesystem, files = manifest_files(manifest)
    folders: set[str] = set()
    for file in files:
        table = pq.read_table(file, columns=["image"], filesystem=filesystem)
        for image in table.column("image").to_pylist():
            if storage.is_uri(image):
                continue
            folders.add(os.path.dirname(image) if os.path.isabs(image) else root)
    return sorted(folders)


def check_cluster(
    sections: RunSections,
    observe: Callable[[], ClusterShape] = ClusterShape.from_ray,
    request: Callable[[list[dict[str, float]]], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Raise :class:`PreflightError` for the first error of the run of ``sections`` on the
    connected cluster; when it only lacks nodes the autoscaler can add, ask for them
    (``request``, by default Ray's ``request_resources``) and wait up to
    ``train.node_wait_minutes``.

    Returns the ``data.decode_concurrency`` planned for the cluster the run gets
    (:func:`resolve_decoding`): what training builds its datasets with."""
    shape = observe()
    data = sections.data
    # Images inside the manifest's folder are where the manifest is (checked as such); only
    # data.allow_outside_root lets a manifest name local images elsewhere.
    outside = data.allow_outside_root and not shape.one_machine
    folders = image_folders(data.manifest) if outside else []
    errors = [f for f in findings(sections, shape, folders) if f.level == "error"]
    if errors:
        raise PreflightError(errors[0].message)
    placed = plan(sections, shape)
    if placed.add:
        shape = _wait_for_nodes(
            sections, placed, observe, request or _request_resources, sleep, clock
        )
    return resolve_decoding(sections, shape)


def _wait_for_nodes(
    sections: RunSections,
    placed: Plan,
    observe: Callable[[], ClusterShape],
    request: Callable[[list[dict[str, float]]], None],
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> ClusterShape:
    """The cluster once the autoscaler added what ``placed`` lacks, asking it for the bundles
    the run cannot start without (automatic decoding takes what the workers leave)."""
    need = placed.need
    minutes = sections.train.node_wait_minutes
    deadline = clock() + 60 * minutes
    print(
        f"[preflight] waiting up to {minutes:g} min (train.node_wait_minutes) for the "
        f"autoscaler to add {_describe(placed.add)} for {need.workers} training "
        f"worker(s) x {_format(need.worker_bundle)} and Ray Data decoding",
        file=sys.stderr,
        flush=True,
    )
    try:
        while True:
            # Asked again at every look: a request replaces any earlier one, such as another
            # trial's of the same search.
            request(need.bundles[: need.workers + least_decode_tasks(sections.data)])
            shape = observe()
            now = plan(sections, shape)
            if not now.problem and not now.add:
                return shape
            if clock() >= deadline:
                missing = _describe(now.add) if now.add else "the nodes it needs"
                raise PreflightError(
                    f"waited {minutes:g} min for the autoscaler to add {missing}; the cluster "
                    f"has {len(shape.nodes)} node(s), {_format(shape.totals)}; see `ray status` "
                    "for failed launches, or raise train.node_wait_minutes"
                )
            sleep(POLL_SECONDS)
    finally:
        request([])  # the request is sticky: drop it, or the cluster never scales down


def _request_resources(bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def doctor_report(
    sections: RunSections, shape: ClusterShape, checked: Sequence[Finding] = ()
) -> tuple[str, bool]:
    """The ``campar doctor`` text and whether the run would start.

    ``checked`` are the caller's own findings (the manifest, the run directory), listed with
    the cluster's so that "ok: nothing found" means nothing was found anywhere.
    """
    placed = plan(sections, shape)
    need, totals = placed.need, shape.totals
    lines = [
        f"cluster: {len(shape.nodes)} node(s), {totals.get('CPU', 0):g} CPU, "
        f"{totals.get('GPU', 0):g} GPU, {totals.get('object_store_memory', 0) / GIB:.2f} GiB "
        "object store",
        *(f"  node {index}: {_format(node)}" for index, node in enumerate(shape.nodes)),
        *(
            f"  autoscaler node type {kind.name or '?'}: {_format(kind.resources)}, "
            + ("no limit" if kind.max_count < 0 else f"up to {kind.max_count}")
            for kind in shape.node_types
        ),
        f"run: {need.workers} worker(s) x {_format(need.worker_bundle)}; "
        f"Ray Data keeps {max(placed.data_cpus, 0):g} CPU; prefetch needs about "
        f"{need.prefetch_bytes / GIB:.2f} GiB of object store",
    ]
    if placed.add:
        lines.append(
            f"plan: the autoscaler adds {_describe(placed.add)}; training asks for them and "
            f"waits up to {sections.train.node_wait_minutes:g} min (train.node_wait_minutes)"
        )
    problems = sorted([*checked, *findings(sections, shape)], key=lambda f: f.level != "error")
    lines += [f"{f.level}: {f.message}" for f in problems] or ["ok: nothing found"]
    return "\n".join(lines), not any(f.level == "error" for f in problems)


# --- the shipped clusters' files ------------------------------------------------------------


def launcher_shape(config: dict) -> ClusterShape:
    """The cluster ``ray up`` starts from a launcher YAML (parsed): the head and each type's
    ``min_workers`` nodes live, every worker type available to the autoscaler. Node types
    must declare ``resources`` (the launcher's detection from instance types is not known here)."""
    types = config["available_node_types"]
    head = config["head_node_type"]
    cluster_max = config.get("max_workers", -1)
    nodes, kinds = [_numbers(types[head].get("resources", {}))], []
    for name, kind in types.items():
        if name == head:
            continue
        resources = _numbers(kind.get("resources", {}))
        nodes += [resources] * kind.get("min_workers", 0)
        most = kind.get("max_workers", cluster_max)
        kinds.append(
            NodeType(name, resources, min(most, cluster_max) if cluster_max >= 0 else most)
        )
    return ClusterShape(tuple(nodes), tuple(kinds))


def kuberay_shape(spec: dict) -> ClusterShape:
    """The cluster KubeRay starts from a RayCluster ``spec`` (or a RayJob's
    ``rayClusterSpec``): the head and each group's ``replicas`` live, each group a node type
    up to ``maxReplicas`` when in-tree autoscaling is on."""
    nodes = [_pod_resources(spec["headGroupSpec"])]
    kinds = []
    for group in spec.get("workerGroupSpecs", []):
        resources = _pod_resources(group)
        nodes += [resources] * group.get("replicas", 0)
        if spec.get("enableInTreeAutoscaling"):
            kinds.append(NodeType(group["groupName"], resources, group.get("maxReplicas", -1)))
    return ClusterShape(tuple(nodes), tuple(kinds))


def _pod_resources(group: dict) -> dict[str, float]:
    """A Ray pod's resources: its container's limits, overridden by ``rayStartParams``."""
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    resources = {"CPU": _quantity(limits.get("cpu", "0"))}
    if "nvidia.com/gpu" in limits:
        resources["GPU"] = _quantity(limits["nvidia.com/gpu"])
    params = group.get("rayStartParams", {})
    for key, name in (("num-cpus", "CPU"), ("num-gpus", "GPU")):
        if key in params:
            resources[name] = _quantity(params[key])
    return resources


def _quantity(value: str | float) -> float:
    """A Kubernetes quantity of CPUs or devices: ``"8"``, ``"500m"``."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _numbers(resources: dict) -> dict[str, float]:
    return {name: float(value) for name, value in resources.items()}


# --- packing ------------------------------------------------------------------------------


def _grow(
    bundles: list[dict[str, float]], shape: ClusterShape
) -> tuple[list[dict[str, float]], dict[str, int]] | None:
    """First-fit ``bundles`` onto the live nodes, adding the smallest node type that holds a
    bundle nothing else does; the nodes' free resources and the nodes added, or None."""
    free = [dict(node) for node in shape.nodes]
    room = {kind.name: _room(kind, shape, len(bundles)) for kind in shape.node_types}
    add: dict[str, int] = {}
    for bundle in bundles:
        if _place(bundle, free):
            continue
        kind = next(
            (
                kind
                for kind in sorted(shape.node_types, key=lambda k: _size(k.resources))
                if room[kind.name] > 0 and _fits(bundle, kind.resources)
            ),
            None,
        )
        if kind is None:
            return None
        room[kind.name] -= 1
        add[kind.name] = add.get(kind.name, 0) + 1
        free.append(dict(kind.resources))
        _place(bundle, free[-1:])
    return free, add


def _room(kind: NodeType, shape: ClusterShape, most: int) -> int:
    """Nodes of ``kind`` the autoscaler may still add (live nodes of its shape count)."""
    if kind.max_count < 0:
        return most
    live = sum(_size(node) == _size(kind.resources) for node in shape.nodes)
    return max(kind.max_count - live, 0)


def _place(bundle: dict[str, float], free: list[dict[str, float]]) -> bool:
    for node in free:
        if _fits(bundle, node):
            for name, amount in bundle.items():
                node[name] = node.get(name, 0.0) - amount
            return True
    return False


def _why_not(sections: RunSections, need: Reservation, shape: ClusterShape) -> str:
    """The one-line reason ``need`` never fits ``shape``, naming what to change."""
    train, data = sections.train, sections.data
    shapes = [*shape.nodes, *(kind.resources for kind in shape.node_types if kind.max_count)]
    if train.use_gpu and not any(s.get("GPU", 0) > 0 for s in shapes):
        return (
            "train.use_gpu (--gpu) is set but no node has a GPU and the autoscaler can "
            "add none; drop --gpu or add GPU nodes"
        )
    if not any(_fits(need.worker_bundle, s) for s in shapes):
        return (
            f"one training worker needs {_format(need.worker_bundle)} but the largest node "
            f"offers {_format(max(shapes, key=_size, default={}))}; lower train.cpus_per_worker"
        )
    where = "can grow to" if shape.can_grow else "has"
    if _grow([need.worker_bundle] * need.workers, shape) is None:
        return (
            f"{need.workers} training worker(s) x {_format(need.worker_bundle)} need more "
            f"nodes than the cluster {where} ({_capacity(shape)}); lower train.num_workers "
            "or train.cpus_per_worker"
        )
    return (
        f"{need.workers} training worker(s) x {train.cpus_per_worker:g} CPU take the "
        f"CPUs the cluster {where} ({_capacity(shape)}), leaving none for Ray Data decoding "
        f"(a task of data.decode_cpus={data.decode_cpus:g}; it would wait forever); "
        "lower train.num_workers, train.cpus_per_worker or data.decode_cpus"
    )


def _capacity(shape: ClusterShape) -> str:
    parts = [f"{len(shape.nodes)} node(s) of {_format(shape.totals)}"]
    parts += [
        f"{'any number' if k.max_count < 0 else k.max_count} x {_format(k.resources)}"
        for k in shape.node_types
        if k.max_count
    ]
    return " + ".join(parts)


def _describe(add: dict[str, int]) -> str:
    return ", ".join(f"{count} x {name or 'node'}" for name, count in add.items())


def _each(add: dict[str, int]) -> list[str]:
    return [name for name, count in add.items() for _ in range(count)]


def _type(shape: ClusterShape, name: str) -> NodeType:
    return next(kind for kind in shape.node_types if kind.name == name)


def _hosts_work(resources: dict[str, float]) -> bool:
    return resources.get("CPU", 0.0) > 0 or resources.get("GPU", 0.0) > 0


def _sum(nodes: Iterable[dict[str, float]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for node in nodes:
        for name, value in node.items():
            totals[name] = totals.get(name, 0.0) + value
    return totals


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(name, 0.0) >= amount - 1e-9 for name, amount in bundle.items())


def _size(resources: dict[str, float]) -> tuple[float, float]:
    return resources.get("GPU", 0.0), resources.get("CPU", 0.0)


def _format(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU")}
    return ", ".join(f"{v:g} {k}" for k, v in shown.items()) or "nothing"
