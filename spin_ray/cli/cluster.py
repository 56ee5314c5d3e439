"""Which Ray cluster a command joins (`choose_cluster`: only one the user named, else a local one of its own), and the
watch that ends the command in one paragraph when that cluster goes away."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from spin_ray.cli.output import complain, say
from spin_ray.config import SpinConfig

log = logging.getLogger("spin_ray")


@dataclass(frozen=True)
class Cluster:
    """The Ray cluster a command uses: `address` to join, or None for a local cluster of its own."""

    address: str | None
    named_by: str
    num_cpus: int | None = None

    def describe(self) -> str:
        if self.address is None:
            return (f"a local Ray cluster of its own with {self.num_cpus} CPUs (set RAY_ADDRESS or ray.address, or "
                    "`ray start` one, to use another)")
        return f"joining the Ray cluster at {self.address} (named by {self.named_by})"


def _reachable(address: str, timeout: float = 2.0) -> bool:
    """Whether something listens at `host:port` (a GCS); False for what is not such an address."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def choose_cluster(cfg: SpinConfig) -> Cluster:
    """Join only what the user named: `ray.address`, RAY_ADDRESS (also what `ray job submit` sets), or a live cluster
    started with `ray start` (Ray's address file, which only `ray start` writes). Never another program's private
    `ray.init()` cluster, which ends with its owner: otherwise the command starts a local cluster of its own."""
    from ray._common.utils import get_ray_address_file  # deferred (Ray): bad input is refused first

    if cfg.ray.address is not None:
        return Cluster(cfg.ray.address, "ray.address")
    env = os.environ.get("RAY_ADDRESS", "")
    if env and env != "local":
        return Cluster(env, "RAY_ADDRESS")
    address_file = Path(get_ray_address_file(None))
    if not env and address_file.exists():
        started = address_file.read_text().strip()
        if _reachable(started):
            return Cluster(started, f"`ray start`, {address_file}")
        log.info("ignoring %s: no Ray cluster answers at %s", address_file, started)
    # More logical CPUs than cores lets Train workers and actor pools coexist on a laptop (they mostly wait).
    return Cluster(None, "default", num_cpus=cfg.ray.num_cpus or max(4, os.cpu_count() or 1))


def init_ray(cluster: Cluster) -> None:
    """Join or start `cluster`. The environment spin_ray's engines and workers need travels with them (generate.
    engine_env, the Train run's worker env), as for a library caller's own ray.init()."""
    # Deferred (Ray): bad input is refused first.
    import ray
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    if cluster.address is None:
        # The dashboard process serves Ray's state API, which Ray Train's placement-group cleaner polls; without it
        # the cleaner cannot see a dead controller (and logs a warning every second). Loopback only.
        ray.init(address="local", num_cpus=cluster.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
        return
    # `ray start` turns on token auth when a token exists (~/.ray/auth_token); a joining driver must send it too.
    # Sending it to a cluster without auth is harmless.
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    ray.init(address=cluster.address)


class ClusterWatch:
    """Ends the command with one paragraph when its Ray cluster goes away (its owner exited, `ray stop`, the head
    lost). Ray itself would block on the dead GCS for up to a minute and then end the process with nothing said."""

    def __init__(self, address: str, on_lost: Callable[[str], None], every_s: float = 1.0, misses: int = 3):
        self.address, self.on_lost, self.every_s, self.misses = address, on_lost, every_s, misses
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="spin-ray-cluster-watch")
        self.thread.start()

    def gone(self) -> bool:
        """Whether the cluster's GCS stays unreachable for `misses` checks."""
        for i in range(self.misses):
            if _reachable(self.address):
                return False
            if i + 1 < self.misses:
                time.sleep(self.every_s)
        return True

    def _watch(self) -> None:
        missed = 0
        while not self._stop.wait(self.every_s):
            missed = 0 if _reachable(self.address) else missed + 1
            if missed >= self.misses:
                with self._lock:
                    if not self._stop.is_set():
                        self.on_lost(self.address)
                return

    def stop(self) -> None:
        """No paragraph after this: the command is ending on its own (and may shut its local cluster down)."""
        with self._lock:
            self._stop.set()


class _LastProgress(logging.Handler):
    """Remembers spin_ray's last progress line: what the command was doing when its cluster went away."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.line = "starting"

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.INFO:  # progress, not warnings or the command's own failure
            self.line = record.getMessage()


class CommandCluster:
    """The Ray cluster of one CLI command: says which it is (the command's first line), joins or starts it, and
    ends the command with one paragraph, exit code 1, if it goes away."""

    def __init__(self, command: str):
        self.command = command
        self.progress = _LastProgress()
        logging.getLogger("spin_ray").addHandler(self.progress)
        self.cluster: Cluster | None = None
        self.watch: ClusterWatch | None = None
        self.storage: str | None = None
        self.log_path: Path | None = None

    def start(self, cfg: SpinConfig, storage: str | None, log_path: Path | None) -> None:
        import ray  # deferred (Ray): bad input is refused first

        self.cluster, self.storage, self.log_path = choose_cluster(cfg), storage, log_path
        say(f"spin-ray {self.command}: {self.cluster.describe()}")
        init_ray(self.cluster)
        self.watch = ClusterWatch(ray.get_runtime_context().gcs_address, self._lost)

    def lost_text(self) -> str:
        assert self.cluster is not None and self.watch is not None
        if self.cluster.address is None:
            whose = f"This command's own local Ray cluster ({self.watch.address})"
        else:
            whose = f"The Ray cluster at {self.watch.address} (named by {self.cluster.named_by})"
        if self.storage is None:
            rerun = "Rerun the same command once a cluster is up."
        else:
            rerun = (f"Finished stages are kept under {self.storage}; rerun the same command to resume (start the "
                     "cluster again, or leave RAY_ADDRESS and ray.address unset for a local one).")
        details = f" Details in {self.log_path}." if self.log_path else ""
        return (f"spin-ray {self.command}: failed: {whose} went away while: {self.progress.line}. "
                f"{rerun}{details}")

    def _lost(self, address: str) -> None:
        complain(self.lost_text(), also_log=True)
        os._exit(1)  # from the watch thread: the main thread may be blocked on the dead cluster

    def stop_watching(self) -> bool:
        """Stop the watch (the command is ending on its own); whether one was running."""
        if self.watch is None:
            return False
        self.watch.stop()
        return True

    def gone(self) -> bool:
        return self.watch is not None and self.watch.gone()
