"""Small image classifiers in plain torch: a ResNet (BasicBlock stages) and a MobileNetV2.

Sized for 28x28 grey images so that they train on two CPU cores in about a minute, yet
they keep the structure split computing cares about: a stem, residual stages whose
activations shrink in space and grow in channels, a pooled classifier. Every module is
torch.fx traceable (no data-dependent control flow), so splitting/split_points.py can cut them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn


@dataclass
class VisionModelConfig:
    """Architecture of a classifier; saved as JSON next to its safetensors weights."""

    arch: str = "resnet"  # resnet | mobilenetv2
    in_channels: int = 1
    num_classes: int = 10
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    blocks_per_stage: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionModelConfig:
        return cls(**data)


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=False))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut, as in ResNet-18/34."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(cin, cout, 3, stride), conv_bn_relu(cout, cout, 3, 1, relu=False))
        self.shortcut = (
            nn.Identity() if stride == 1 and cin == cout else conv_bn_relu(cin, cout, 1, stride, relu=False)
        )
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            conv_bn_relu(cin, hidden, 1),
            conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            conv_bn_relu(hidden, cout, 1, relu=False),
        )

    def forward(self, x):
        out = self.body(x)
        return x + out if self.use_residual else out


class Classifier(nn.Module):
    """stem -> stages -> global average pool -> linear; the shared skeleton of both architectures."""

    def __init__(self, stem: nn.Module, stages: nn.Sequential, features: int, num_classes: int) -> None:
        super().__init__()
        self.stem = stem
        self.stages = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))


def build_resnet(cfg: VisionModelConfig) -> Classifier:
    stages, cin = [], cfg.widths[0]
    for i, width in enumerate(cfg.widths):
        for b in range(cfg.blocks_per_stage):
            stages.append(BasicBlock(cin, width, stride=2 if (i > 0 and b == 0) else 1))
            cin = width
    return Classifier(conv_bn_relu(cfg.in_channels, cfg.widths[0]), nn.Sequential(*stages), cin, cfg.num_classes)


def build_mobilenetv2(cfg: VisionModelConfig) -> Classifier:
    stages, cin = [], cfg.widths[0]
    for i, width in enumerate(cfg.widths):
        for b in range(cfg.blocks_per_stage + 1):  # two blocks per stage: the second one is residual
            stages.append(InvertedResidual(cin, width, stride=2 if (i > 0 and b == 0) else 1))
            cin = width
    head = conv_bn_relu(cin, cin * 2, 1)
    # a stride-2 stem, as in MobileNetV2 itself: the expanded blocks are too costly at full resolution
    stem = conv_bn_relu(cfg.in_channels, cfg.widths[0], stride=2)
    return Classifier(stem, nn.Sequential(*stages, head), cin * 2, cfg.num_classes)


ARCHITECTURES = {"resnet": build_resnet, "mobilenetv2": build_mobilenetv2}


def build_model(cfg: VisionModelConfig) -> Classifier:
    """A freshly initialised classifier for `cfg` (weights come from training or a safetensors file)."""
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {cfg.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[cfg.arch](cfg)
