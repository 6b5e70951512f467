"""BottleFit bottlenecks: a narrow encoder at the end of the head, a decoder at the start of the tail.

The teacher is cut at two split points: `keep` (the head layers the device keeps as they
are) and `cut` (the activation the tail expects). The teacher's layers between them (its
head's last block) are replaced by an encoder that shrinks space and channels down to
`channels` maps; a decoder on the server restores the activation at `cut`.

Training follows the paper in two stages:
1. head distillation: encoder + decoder learn to reproduce the teacher's activation at
   `cut` (MSE), everything else frozen;
2. fine-tuning: the encoder is frozen, decoder + tail learn from labels (cross-entropy) and
   from the teacher's temperature-softened outputs (KL), while the bottleneck passes through
   a simulated uint8 quantization (straight-through) so that training sees what the wire carries.

Checkpoints are safetensors plus a JSON architecture file; nothing is pickled.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from edgeweave.splitting.split_points import SplitPoint, split_model, split_points
from edgeweave.splitting.training import Batches, run_epochs
from edgeweave.splitting.vision_models import VisionModelConfig, build_model, conv_bn_relu


@dataclass
class BottleneckConfig:
    """Where the bottleneck sits and how narrow it is (node names are torch.fx names of the teacher)."""

    cut: str  # the tail starts after this teacher node
    keep: str  # the head keeps the teacher's layers up to this node, the encoder follows
    channels: int = 8  # maps in the bottleneck (the tensor that travels)
    downsample: int = 2  # stride-2 convolutions in the encoder
    hidden: int = 16  # width of the encoder's and decoder's inner convolutions


def fake_quantize_uint8(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor min/max uint8 round trip in the forward pass, identity gradient (straight-through).

    Mirrors runtime.codec.quantize_uint8 (range widened to include 0) so training and the wire agree.
    """
    lo = torch.clamp(x.detach().min(), max=0.0)
    hi = torch.clamp(x.detach().max(), min=0.0)
    scale = torch.clamp((hi - lo) / 255.0, min=1e-12)
    zero_point = torch.round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    return x + ((q - zero_point) * scale - x).detach()


class Encoder(nn.Module):
    """stride-2 conv/BN/ReLU steps, then a narrow 3x3 conv: the bottleneck the device sends."""

    def __init__(self, in_channels: int, cfg: BottleneckConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(cfg.downsample):
            layers.append(conv_bn_relu(c, cfg.hidden, 3, stride=2))
            c = cfg.hidden
        layers.append(nn.Conv2d(c, cfg.channels, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


class Decoder(nn.Module):
    """conv/BN/ReLU, then upsample + conv steps back to the exact (C, H, W) the tail expects."""

    def __init__(self, cfg: BottleneckConfig, sizes: list[tuple[int, int]], out_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_relu(cfg.channels, cfg.hidden)]
        for size in sizes:  # spatial sizes to restore, smallest first
            layers += [nn.Upsample(size=size, mode="nearest"), conv_bn_relu(cfg.hidden, cfg.hidden)]
        layers.append(nn.Conv2d(cfg.hidden, out_channels, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


class BottleneckedModel(nn.Module):
    """kept head -> encoder -> (uint8 on the wire) -> decoder -> tail; `head()` and `tail()` are the two halves."""

    def __init__(self, kept: nn.Module, encoder: Encoder, decoder: Decoder, tail: nn.Module) -> None:
        super().__init__()
        self.kept = kept
        self.encoder = encoder
        self.decoder = decoder
        self.tail_layers = tail
        self.simulate_quantization = True

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.kept(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.tail_layers(self.decoder(z))

    def forward(self, x):
        z = self.encode(x)
        if self.simulate_quantization:
            z = fake_quantize_uint8(z)
        return self.decode(z)

    def head(self) -> nn.Module:
        """What the device runs: input -> bottleneck (float; the executor quantizes it)."""
        return _Half(self.encode)

    def tail(self) -> nn.Module:
        """What the server runs: bottleneck -> logits."""
        return _Half(self.decode)


class _Half(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.owner = fn.__self__
        self.fn_name = fn.__name__

    def forward(self, x):
        return getattr(self.owner, self.fn_name)(x)


def _point(points: list[SplitPoint], name: str) -> SplitPoint:
    for p in points:
        if p.node == name or (name == "input" and p.is_input):
            return p
    valid = ", ".join(p.node for p in points)
    raise ValueError(f"{name!r} is not a split point of this model; valid: {valid}")


def default_bottleneck(points: list[SplitPoint], channels: int = 8) -> BottleneckConfig:
    """BottleFit's early cut: after the first block costing >= 25% of the FLOPs; replace that block."""
    total = points[-1].head_flops or 1
    inner = [p for p in points if not p.is_output]
    targets = [p for p in inner if p.head_flops >= 0.25 * total]
    cut_flops = targets[0].head_flops
    cut = [p for p in inner if p.head_flops == cut_flops][-1]  # the last node of that block (after its ReLU)
    keep = [p for p in inner if p.head_flops < cut_flops][-1]
    return BottleneckConfig(cut=cut.node, keep=keep.node, channels=channels)


def build_bottlenecked(
    teacher: nn.Module, cfg: BottleneckConfig, example: torch.Tensor
) -> tuple[BottleneckedModel, nn.Module]:
    """(student initialised from the teacher, teacher head up to `cut` for distillation targets)."""
    points = split_points(teacher, example)
    keep, cut = _point(points, cfg.keep), _point(points, cfg.cut)
    if keep.index >= cut.index:
        raise ValueError(f"keep ({cfg.keep}) must come before cut ({cfg.cut})")
    if len(cut.shape) != 4 or len(keep.shape) != 4:
        raise ValueError("a bottleneck needs image-shaped (N, C, H, W) activations at keep and cut")
    kept, _ = split_model(teacher, keep)
    teacher_head, tail = split_model(teacher, cut)
    encoder = Encoder(keep.shape[1], cfg)
    sizes, h, w = [], cut.shape[2], cut.shape[3]
    for _ in range(cfg.downsample):
        sizes.append((h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    # the encoder sees keep's spatial size; the decoder must land on cut's size
    enc_h, enc_w = keep.shape[2], keep.shape[3]
    for _ in range(cfg.downsample):
        enc_h, enc_w = math.ceil(enc_h / 2), math.ceil(enc_w / 2)
    sizes = list(reversed(sizes)) if (enc_h, enc_w) == (h, w) else [(cut.shape[2], cut.shape[3])]
    decoder = Decoder(cfg, sizes, cut.shape[1])
    student = BottleneckedModel(copy.deepcopy(kept), encoder, decoder, copy.deepcopy(tail))
    return student, teacher_head


def _freeze(module: nn.Module, frozen: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(not frozen)


def bottleneck_bytes(student: BottleneckedModel, example: torch.Tensor) -> int:
    """uint8 bytes one image's bottleneck takes on the wire (excluding scale/zero point)."""
    with torch.no_grad():
        student.eval()
        return int(student.encode(example[:1]).numel())


def train_bottleneck(
    teacher: nn.Module,
    cfg: BottleneckConfig,
    data: Batches,
    example: torch.Tensor,
    distill_epochs: int = 3,
    finetune_epochs: int = 2,
    lr: float = 2e-3,
    temperature: float = 4.0,
    kd_weight: float = 0.5,
    progress: bool = True,
) -> BottleneckedModel:
    """Two-stage BottleFit training; the teacher stays frozen in eval mode throughout."""
    teacher.eval()
    _freeze(teacher, True)
    student, teacher_head = build_bottlenecked(teacher, cfg, example)
    teacher_head.eval()

    # Stage 1: head distillation. Only encoder + decoder learn; kept head and tail are frozen.
    _freeze(student, True)
    _freeze(student.encoder, False)
    _freeze(student.decoder, False)
    student.simulate_quantization = False

    def stage1_modes() -> None:
        student.eval()
        student.encoder.train()
        student.decoder.train()

    def distill_loss(x: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher_head(x)
        return F.mse_loss(student.decoder(student.encode(x)), target)

    params = [*student.encoder.parameters(), *student.decoder.parameters()]
    run_epochs(params, data, distill_epochs, lr, distill_loss, "stage 1: head distillation", progress, stage1_modes)

    # Stage 2: encoder frozen, decoder + tail fine-tuned on labels + teacher outputs, uint8 simulated.
    _freeze(student.encoder, True)
    _freeze(student.tail_layers, False)
    student.simulate_quantization = True

    def stage2_modes() -> None:
        student.eval()
        student.decoder.train()
        student.tail_layers.train()

    def finetune_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft_targets = F.softmax(teacher(x) / temperature, dim=1)
        logits = student(x)
        kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft_targets, reduction="batchmean")
        return (1 - kd_weight) * F.cross_entropy(logits, y) + kd_weight * temperature**2 * kd

    params = [*student.decoder.parameters(), *student.tail_layers.parameters()]
    run_epochs(params, data, finetune_epochs, lr / 2, finetune_loss, "stage 2: fine-tune tail", progress, stage2_modes)
    _freeze(student, False)
    student.eval()
    return student


# ---------------------------------------------------------------- checkpoints (safetensors + JSON)


def save_teacher(model: nn.Module, cfg: VisionModelConfig, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / "teacher.safetensors"))
    (directory / "teacher.json").write_text(json.dumps(cfg.to_dict(), indent=2))


def load_teacher(directory: Path) -> tuple[nn.Module, VisionModelConfig]:
    cfg = VisionModelConfig.from_dict(json.loads((directory / "teacher.json").read_text()))
    model = build_model(cfg)
    load_model(model, str(directory / "teacher.safetensors"))
    return model.eval(), cfg


def save_student(student: BottleneckedModel, cfg: BottleneckConfig, example_shape: list[int], directory: Path,
                 extra: dict[str, Any] | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_model(student, str(directory / "student.safetensors"))
    meta = {"bottleneck": asdict(cfg), "example_shape": list(example_shape), **(extra or {})}
    (directory / "student.json").write_text(json.dumps(meta, indent=2))


def load_student(directory: Path) -> tuple[BottleneckedModel, BottleneckConfig, dict[str, Any]]:
    """Rebuild the architecture from JSON (teacher layout + bottleneck), then load the safetensors weights."""
    teacher, _ = load_teacher(directory)
    meta = json.loads((directory / "student.json").read_text())
    cfg = BottleneckConfig(**meta["bottleneck"])
    student, _ = build_bottlenecked(teacher, cfg, torch.zeros(meta["example_shape"]))
    load_model(student, str(directory / "student.safetensors"))
    return student.eval(), cfg, meta
