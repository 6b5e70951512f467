"""Shared pytest fixtures: fresh data dirs, root detection for namespace tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_SECRET_DIR: Path | None = None


def pytest_configure(config):
    """Every test cluster speaks mutual TLS with one throw-away secret (as in production);
    subprocesses (nodes, CLI calls) inherit it through EDGEWEAVE_CLUSTER_SECRET_FILE.

    Under pytest-xdist each worker runs this and makes its own secret: its nodes announce their own
    cluster fingerprint on 127.0.0.1, so the other worker's discovery (which keeps only nodes of its
    fingerprint, coordinator/discovery.py) sees them as another cluster, never as its own."""
    global _SECRET_DIR
    from edgeweave.security import create_secret

    _SECRET_DIR = Path(tempfile.mkdtemp(prefix="edgeweave-test-secret-"))
    os.environ["EDGEWEAVE_CLUSTER_SECRET_FILE"] = str(create_secret(_SECRET_DIR / "cluster.secret"))
    os.environ.pop("EDGEWEAVE_CLUSTER_INSECURE", None)


def pytest_unconfigure(config):
    if _SECRET_DIR is not None:
        shutil.rmtree(_SECRET_DIR, ignore_errors=True)


def _slow_files_first(items: list[pytest.Item]) -> None:
    """Reorder (stably) whole files: those with the most `slow` tests first, the fast ones last.

    `make test` hands whole files to its two xdist workers in this order (--dist loadfile
    --no-loadscope-reorder), so the long files start at once and the many quick ones fill in
    whichever worker frees up first, instead of one long file running alone at the end."""
    slow: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for index, item in enumerate(items):
        path = item.nodeid.split("::", 1)[0]
        first_seen.setdefault(path, index)
        slow[path] = slow.get(path, 0) + ("slow" in item.keywords)
    items.sort(key=lambda item: (-slow[p := item.nodeid.split("::", 1)[0]], first_seen[p]))


def pytest_collection_modifyitems(config, items):
    _slow_files_first(items)
    if os.geteuid() == 0:
        return
    skip_root = pytest.mark.skip(reason="needs root (network namespaces / tc); CI runs as root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip_root)


@pytest.fixture
def netns_testbed():
    """A factory for network-namespace LANs (root only); every bed is torn down after the test."""
    from netns import Testbed  # tests/ is on sys.path (rootdir conftest)

    beds: list[Testbed] = []

    def make(n_hosts: int) -> Testbed:
        bed = Testbed(n_hosts).__enter__()
        beds.append(bed)
        return bed

    yield make
    for bed in beds:
        bed.close()


@pytest.fixture(scope="session")
def local_node():
    """One real node daemon subprocess on 127.0.0.1 (no mDNS), shared by the whole session."""
    from edgeweave.coordinator.local_cluster import LocalCluster

    with LocalCluster(1, advertise=False) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def two_nodes():
    """Two real node daemon subprocesses on 127.0.0.1, one torch thread each, shared by every test
    module that needs a 2-node cluster (a test that kills one restarts it before it ends)."""
    from llm_reference import ONE_THREAD

    from edgeweave.coordinator.local_cluster import LocalCluster

    with LocalCluster(2, advertise=False, env=ONE_THREAD) as cluster:
        yield cluster
