"""Training and evaluation loops shared by teacher training and bottleneck fine-tuning.

Any iterable of (images, labels) batches works as data (a torch DataLoader, a user's own
loader, a list); rich draws the progress bars unless `progress=False` (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@contextlib.contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}"))
    with Progress(*columns, transient=False) as bar:
        yield bar


def run_epochs(
    trainable: list[nn.Parameter],
    data: Batches,
    epochs: int,
    lr: float,
    step_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    description: str,
    progress: bool = True,
    set_modes: Callable[[], Any] | None = None,
) -> float:
    """Adam with a cosine schedule over `epochs`; returns the last epoch's mean loss."""
    if epochs <= 0:
        return float("nan")
    optimizer = torch.optim.Adam(trainable, lr=lr)
    steps_per_epoch = max(1, len(data)) if hasattr(data, "__len__") else 1
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
    mean_loss = float("nan")
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=epochs, status="") if bar else None
        for _epoch in range(epochs):
            if set_modes:
                set_modes()
            total, count = 0.0, 0
            for images, labels in data:
                loss = step_loss(images, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(labels)
                count += len(labels)
            mean_loss = total / max(1, count)
            if bar is not None:
                bar.update(task, advance=1, status=f"loss {mean_loss:.4f}")
    return mean_loss


def train_classifier(model: nn.Module, data: Batches, epochs: int = 3, lr: float = 3e-3, progress: bool = True) -> float:
    """Plain cross-entropy training of a teacher; returns the final epoch's loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    return run_epochs(
        params, data, epochs, lr, lambda x, y: F.cross_entropy(model(x), y), "train teacher", progress, model.train
    )


@torch.no_grad()
def predict(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], data: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, labels) over all batches, in eval mode."""
    if isinstance(model, nn.Module):
        model.eval()
    preds, labels = [], []
    for images, y in data:
        preds.append(model(images).argmax(dim=1))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def accuracy(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], data: Batches) -> float:
    preds, labels = predict(model, data)
    return float((preds == labels).float().mean())
