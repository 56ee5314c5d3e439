"""Which cluster a CLI command joins, and the watch that notices it going away (real sockets, no Ray cluster)."""

import socket
import threading

import pytest

from spin_ray.cli.cluster import ClusterWatch, choose_cluster
from spin_ray.config import SpinConfig


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No RAY_ADDRESS, and Ray's temp dir (where `ray start` leaves its address file) under tmp_path."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    return tmp_path / "ray" / "ray_current_cluster"


def listening() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server


def test_named_clusters_win_in_order(clean_env, monkeypatch):
    assert choose_cluster(SpinConfig.load(None, ["ray.address=10.0.0.2:6379"])).named_by == "ray.address"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    chosen = choose_cluster(SpinConfig())
    assert (chosen.address, chosen.named_by) == ("10.0.0.1:6379", "RAY_ADDRESS")
    assert choose_cluster(SpinConfig.load(None, ["ray.address=10.0.0.2:6379"])).address == "10.0.0.2:6379"
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert choose_cluster(SpinConfig.load(None, ["ray.num_cpus=3"])).num_cpus == 3


def test_a_live_ray_start_cluster_is_joined_and_a_stale_one_is_not(clean_env):
    assert choose_cluster(SpinConfig()).address is None  # nothing named: a local cluster of its own
    server = listening()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    clean_env.write_text(address)
    chosen = choose_cluster(SpinConfig())
    assert chosen.address == address and "`ray start`" in chosen.named_by and address in chosen.describe()
    server.close()  # the cluster is gone, its address file left behind
    chosen = choose_cluster(SpinConfig())
    assert chosen.address is None and chosen.num_cpus >= 4 and "of its own" in chosen.describe()


def test_the_watch_reports_a_cluster_that_goes_away_and_not_one_that_stays():
    server = listening()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    lost = threading.Event()
    watch = ClusterWatch(address, lambda a: lost.set(), every_s=0.1, misses=3)
    assert not lost.wait(1.0) and not watch.gone()
    server.close()
    assert lost.wait(10) and watch.gone()

    # Stopped before the cluster goes: nothing reported (a command ending shuts its own local cluster down).
    server = listening()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    lost.clear()
    watch = ClusterWatch(address, lambda a: lost.set(), every_s=0.1, misses=3)
    watch.stop()
    server.close()
    assert not lost.wait(1.0)
