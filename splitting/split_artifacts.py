"""Train a teacher and its BottleFit student, export the deployable ONNX graphs, describe them in JSON.

An artifacts directory holds everything a split deployment needs, none of it pickled:
teacher.safetensors/.json, student.safetensors/.json, full.onnx (the whole teacher, for
all-local and full-offload), head.onnx (kept layers + encoder, device side), tail.onnx
(decoder + tail, server side) and manifest.json (shapes, bytes, accuracies).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from edgeweave.splitting.bottleneck import (
    BottleneckConfig,
    default_bottleneck,
    save_student,
    save_teacher,
    train_bottleneck,
)
from edgeweave.splitting.datasets import cache_dir, dataset_info, load_dataset
from edgeweave.splitting.onnx_export import check_onnx, export_onnx
from edgeweave.splitting.split_points import split_points
from edgeweave.splitting.training import Batches, accuracy, train_classifier
from edgeweave.splitting.vision_models import VisionModelConfig, build_model

GRAPHS = ("full", "head", "tail")


@dataclass
class TrainSettings:
    """Everything `edgeweave split train` can set."""

    arch: str = "resnet"
    dataset: str = "mnist5k"
    bottleneck_channels: int = 8
    widths: tuple[int, ...] = (16, 32, 64)  # channels per stage
    teacher_epochs: int = 3
    distill_epochs: int = 2
    finetune_epochs: int = 2
    lr: float = 3e-3
    batch_size: int = 64
    limit: int | None = None  # keep the first N train/test images (tests, quick demos)
    seed: int = 0

    def cache_key(self) -> str:
        limit = f"-n{self.limit}" if self.limit else ""
        widths = "x".join(str(w) for w in self.widths)
        return (f"{self.arch}{widths}-{self.dataset}-c{self.bottleneck_channels}-e{self.teacher_epochs}"
                f"{self.distill_epochs}{self.finetune_epochs}-b{self.batch_size}{limit}-s{self.seed}")


def load_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} holds no split artifacts (manifest.json); run `edgeweave split train` first")
    return json.loads(path.read_text())


def build_artifacts(
    settings: TrainSettings,
    out_dir: Path,
    progress: bool = True,
    train_data: Batches | None = None,
    test_data: Batches | None = None,
) -> dict[str, Any]:
    """Train, export, check; returns the manifest. `train_data`/`test_data` replace the named data set."""
    torch.manual_seed(settings.seed)
    info = dataset_info(settings.dataset)
    if train_data is None or test_data is None:
        train_set, test_set = load_dataset(settings.dataset, settings.limit)
        generator = torch.Generator().manual_seed(settings.seed)
        train_data = train_data or DataLoader(train_set, batch_size=settings.batch_size, shuffle=True, generator=generator)
        test_data = test_data or DataLoader(test_set, batch_size=500)
    example = torch.zeros(1, info.channels, info.image_size, info.image_size)
    started = time.perf_counter()

    model_cfg = VisionModelConfig(arch=settings.arch, in_channels=info.channels, num_classes=info.num_classes,
                                  widths=list(settings.widths))
    teacher = build_model(model_cfg)
    train_classifier(teacher, train_data, settings.teacher_epochs, settings.lr, progress)
    teacher.eval()
    bottleneck = default_bottleneck(split_points(teacher, example), settings.bottleneck_channels)
    student = train_bottleneck(
        teacher, bottleneck, train_data, example, settings.distill_epochs, settings.finetune_epochs,
        settings.lr, progress=progress,
    )
    out_dir = Path(out_dir)
    save_teacher(teacher, model_cfg, out_dir)
    save_student(student, bottleneck, list(example.shape), out_dir)
    manifest = export_graphs(teacher, student, bottleneck, example, out_dir)
    manifest.update(
        settings=asdict(settings),
        model=model_cfg.to_dict(),
        accuracy={"teacher": accuracy(teacher, test_data), "student": accuracy(student, test_data)},
        train_s=round(time.perf_counter() - started, 2),
    )
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def export_graphs(teacher, student, bottleneck: BottleneckConfig, example: torch.Tensor, out_dir: Path) -> dict[str, Any]:
    """full/head/tail ONNX graphs, each checked against torch on a batch of 4 (1e-4)."""
    batch = torch.rand(4, *example.shape[1:])
    head, tail = student.head(), student.tail()
    with torch.no_grad():
        z = head(batch)
    for name, module, sample in (("full", teacher, batch), ("head", head, batch), ("tail", tail, z)):
        check_onnx(export_onnx(module, sample[:1], out_dir / f"{name}.onnx"), module, sample)
    return {
        "graphs": {name: f"{name}.onnx" for name in GRAPHS},
        "input_shape": list(example.shape),
        "bottleneck_shape": [1, *z.shape[1:]],
        "bottleneck_bytes": int(z[:1].numel()),  # uint8 on the wire
        "input_bytes_float32": int(example.numel() * 4),
        "bottleneck": asdict(bottleneck),
    }


def cached_artifacts(settings: TrainSettings, progress: bool = False) -> Path:
    """The artifacts for `settings` under ~/.cache/edgeweave/split, trained on first use (atomic rename)."""
    target = cache_dir().parent / "split" / settings.cache_key()
    if (target / "manifest.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build_artifacts(settings, scratch, progress=progress)
        try:
            os.rename(scratch, target)
        except OSError:  # another process finished first; theirs is as good as ours
            shutil.rmtree(scratch, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return target


#: small and quick: trains in well under a minute on two cores (the demo and the tests use it).
DEMO_SETTINGS = TrainSettings(widths=(8, 16, 32), teacher_epochs=2, distill_epochs=1, finetune_epochs=1, batch_size=32,
                              limit=2000)
