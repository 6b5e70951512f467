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
