"""Connecting to Ray: an existing cluster when one is named, else a small local one.

:func:`init_ray` is the only way campar joins Ray: the CLI (and so the jobs), the demo,
training, a search and prediction all call it, and it does nothing in a process that has
joined already, so the library runs on whatever cluster its caller chose. A named cluster
is checked for token authentication before it is joined. A local cluster gets more logical
CPUs than physical cores so that fractional-CPU training workers and Ray Data decode tasks
can run side by side on a laptop (the documented way around the Data/Train resource
deadlock), and starts Ray's dashboard on 127.0.0.1 only (its URL is printed once; Ray
Train's state API needs it too). Its token authentication is Ray's own default for local
clusters since 2.59 (``RAY_AUTH_MODE`` is read once per process, before this code runs, so
setting it here would split the driver and the cluster it starts).

Quiet output (:func:`set_output`, the CLI's default): Ray's own output stays off the
terminal, with official switches rather than text filters. Workers' stdout/stderr are not
forwarded to the driver (``log_to_driver=False``; they stay in Ray's session logs), Ray Data
shows no progress bars (``DataContext.enable_progress_bars``), and the driver's ``ray``,
``ray.data`` and ``optuna`` loggers and Python warnings go to one log file, which names the
session log folder, and Ray Tune runs its legacy console output (``RAY_AIR_NEW_OUTPUT=0``),
silent at ``verbose=0``. campar then prints its own progress (:func:`is_quiet` tells it to);
``--verbose`` keeps Ray's output on the terminal instead.

A Ray cluster that accepts clients without a token runs any code anyone who can reach it
sends. :func:`require_authentication` refuses such a cluster unless the user says
``--insecure``: it connects once *without* credentials in a separate process (the
authentication mode is fixed per process) and only an "unauthenticated" refusal passes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass

HOST_PORT = re.compile(r"^[\w.\-]+:\d+$")
PROBE = """
import sys
from ray._raylet import GcsClient
from ray.exceptions import AuthenticationError
try:
    GcsClient(address=sys.argv[1]).internal_kv_keys(b"", None, timeout=10)
except AuthenticationError:
    sys.exit(0)
sys.exit(3)
"""
PROBE_REFUSED, PROBE_OPEN = 0, 3
QUIET_LOGGERS = ("ray", "ray.data", "optuna", "py.warnings")
"""Driver-side loggers whose terminal handlers a quiet process replaces by its log file."""
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
"""Python warnings raised from here still reach the terminal of a quiet process."""


@dataclass(frozen=True)
class Output:
    """Where this process shows Ray's output: the terminal (``verbose``), or the log file
    ``<log_dir>/ray-<command>.log`` (a temporary folder when ``log_dir`` is None or a URI)."""

    verbose: bool = True
    log_dir: str | None = None
    command: str = "campar"

    def log_file(self) -> str:
        local = self.log_dir and "://" not in self.log_dir
        folder = self.log_dir if local else tempfile.mkdtemp(prefix="campar-logs-")
        return os.path.join(folder, f"ray-{self.command}.log")


_output = Output()
_routed: str | None = None
"""The log file Ray's output goes to since the last :func:`set_output`, once routed."""


class InsecureClusterError(ValueError):
    """The cluster named would accept anyone's code; the message says how to secure it."""


def local_logical_cpus() -> int:
    """Logical CPUs for a local cluster: at least 4, so 2 workers + decoding fit on 2 cores."""
    return max(4, os.cpu_count() or 1)


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join: ``address``, else ``RAY_ADDRESS``, else None (start a local one)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def require_authentication(address: str, insecure: bool = False) -> None:
    """Raise :class:`InsecureClusterError` unless the cluster at ``address`` demands a token.

    ``insecure=True`` skips the check (a trusted, isolated network). Addresses that are not
    a GCS ``host:port`` (``ray://`` clients) cannot be probed and need ``--insecure``.
    """
    if insecure:
        return
    why = "its authentication cannot be checked there; use its GCS address host:port, or --insecure"
    if HOST_PORT.match(address):
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
        probe = subprocess.run(
            [sys.executable, "-c", PROBE, address],
            env={**env, "RAY_AUTH_MODE": "disabled"},
            capture_output=True,
            timeout=120,
            check=False,
        )
        if probe.returncode == PROBE_REFUSED:
            return
        if probe.returncode != PROBE_OPEN:
            tail = probe.stderr.decode(errors="replace").strip().splitlines()[-1:]
            raise ConnectionError(f"cannot reach the Ray cluster at {address}: {''.join(tail)}")
        why = (
            "it accepts clients without a token, so anyone who can reach it can run code on "
            "it; start its nodes with RAY_AUTH_MODE=token (README, Operating), or pass "
            "--insecure on a trusted network"
        )
    raise InsecureClusterError(f"refusing to use the Ray cluster at {address}: {why}")


def set_output(output: Output) -> None:
    """How Ray's output is shown from now on in this process (the CLI sets it per command)."""
    global _output, _routed
    _output, _routed = output, None


def is_quiet() -> bool:
    """True when Ray's output goes to the log file, so campar prints its own progress."""
    return not _output.verbose


def init_ray(address: str | None = None, insecure: bool = False) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``) when given, else start a local cluster.

    A named cluster must demand a token (:func:`require_authentication`; ``insecure`` skips
    that). Nothing is joined or checked when this process has joined Ray already. A quiet
    process (:func:`set_output`) sends Ray's output to its log file, also when Ray
    was already joined, and on joining prints one line: where that file is, and the
    dashboard's URL.
    """
    import ray

    if ray.is_initialized():
        if is_quiet():
            _route_output()
        return
    address = cluster_address(address)
    if address:
        require_authentication(address, insecure=insecure)
    quiet = is_quiet()
    log_file = _route_output() if quiet else None
    if address:
        context = ray.init(address=address, log_to_driver=not quiet)
    else:
        cpus = local_logical_cpus()
        _private_token_file()
        context = ray.init(
            num_cpus=cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=not quiet,
            # Ray starts at most min(cores, CPUs) workers at once and warns past 4x that; a
            # 2-core laptop given 4 logical CPUs then warns on every training run.
            # No Prometheus exporter: the dashboard agent would serve it unauthenticated on
            # every interface (Ray binds 127.0.0.1 only when the node's address is loopback,
            # and ray.init turns a loopback _node_ip_address into the machine's address).
            _system_config={
                "worker_maximum_startup_concurrency": cpus,
                "enable_metrics_collection": False,
            },
        )
    terminate_as_interrupt()  # ray.init replaced it
    if not address:
        _private_token_file()  # created by this ray.init when there was none
    if quiet:
        session = context.address_info.get("session_dir") or "Ray's session folder"
        logging.getLogger("ray").info("campar: Ray's worker and actor logs: %s/logs", session)
        where = f"cluster {address}" if address else "local cluster"
        dashboard = f", dashboard http://{context.dashboard_url}" if context.dashboard_url else ""
        print(f"[ray] {where}{dashboard}; Ray's logs: {log_file}", file=sys.stderr, flush=True)


def _private_token_file() -> None:
    """Make the local cluster's token file readable by its owner only (0600).

    Ray writes ``~/.ray/auth_token`` (or ``RAY_AUTH_TOKEN_PATH``) with the process umask,
    usually 0644: anyone on the machine could read the token and run code on the cluster.
    Called before ``ray.init`` (an existing file) and after it (one Ray just wrote).
    """
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(
        os.path.expanduser("~"), ".ray", "auth_token"
    )
    if os.path.isfile(path) and not os.path.islink(path):
        os.chmod(path, 0o600)


def terminate_as_interrupt() -> Callable | int | None:
    """Make SIGTERM raise as SIGINT (Ctrl-C) does, in the main thread; return the handler it
    replaced (None off the main thread, where no handler can be set). :func:`terminated`
    then tells the two apart.

    ``ray.init`` sets its own (``sys.exit``), under which a stopped search died with Ray's C++
    stack dump and exit 134; :func:`init_ray` sets this one again after joining. Raising
    SIGINT (rather than KeyboardInterrupt) lets whoever handles Ctrl-C at that moment act: Ray
    Tune ends its search gracefully, saving the finished trials.
    """
    global _terminated
    if threading.current_thread() is not threading.main_thread():
        return None
    _terminated = False
    return signal.signal(signal.SIGTERM, _terminate)


_terminated = False


def _terminate(*_: object) -> None:
    global _terminated
    _terminated = True
    signal.raise_signal(signal.SIGINT)


def terminated() -> bool:
    """True when SIGTERM stopped this process's command (since the CLI set the handler),
    False for Ctrl-C."""
    return _terminated


class _LogFile(logging.FileHandler):
    """The quiet process's log file, appended to. It is opened, and its folder made, at the
    first record: a command refused before Ray says anything leaves its run directory as it
    was."""

    def __init__(self, path: str) -> None:
        super().__init__(path, mode="a", delay=True)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def _open(self):  # logging.FileHandler opens the file here
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()

    def handleError(self, record: logging.LogRecord) -> None:
        """Drop a record the file cannot take (a full disk) instead of printing logging's
        traceback on the terminal: the command's own one line says what failed."""

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the last lines' flush, on a full disk
            super().close()


def _route_output() -> str:
    """Route the driver's Ray, Ray Data and Optuna logs and Python warnings to the log file
    instead of the terminal, and turn Ray Data's progress bars off; returns the file.

    Once per :func:`set_output`: a command joins Ray from several places.
    """
    import optuna  # noqa: F401  (its logger gets its terminal handler when imported)
    import ray.data

    global _routed
    if _routed is not None:
        return _routed
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Tune's new console engine prints an experiment header even at verbose=0; its legacy
    # one, chosen by Ray's own switch, prints nothing there.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    log_file = _output.log_file()
    handler = _LogFile(log_file)
    logging.captureWarnings(True)
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            terminal = isinstance(old, logging.StreamHandler) and not isinstance(
                old, logging.FileHandler
            )
            if terminal or isinstance(old, _LogFile):
                logger.removeHandler(old)
                if isinstance(old, _LogFile):  # an earlier command's file (same process)
                    old.close()
        logger.addHandler(handler)
        logger.propagate = False
    own = logging.StreamHandler(sys.stderr)  # campar's own warnings stay on the terminal
    own.addFilter(lambda record: PACKAGE_DIR in record.getMessage())
    logging.getLogger("py.warnings").addHandler(own)
    _routed = log_file
    return log_file
