"""Shared by the tests/test_split_*.py files: the small trained split model, cached on disk after first use."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from edgeweave.splitting.datasets import load_dataset
from edgeweave.splitting.split_artifacts import DEMO_SETTINGS, cached_artifacts


@functools.cache
def demo_artifacts() -> Path:
    """The demo's artifacts (trains in well under a minute the first time, then read from the cache)."""
    return cached_artifacts(DEMO_SETTINGS)


def sample_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, test = load_dataset(DEMO_SETTINGS.dataset, limit=n)
    return test.tensors
