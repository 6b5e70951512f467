"""Shared pytest fixtures: fresh data dirs, root detection for namespace tests."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
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
