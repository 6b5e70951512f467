"""Split points: every candidate cut of both architectures reproduces the unsplit model exactly."""

from __future__ import annotations

import pytest
import torch

from edgeweave.splitting.split_points import split_model, split_points, trace
from edgeweave.splitting.vision_models import VisionModelConfig, build_model


@pytest.mark.parametrize("arch", ["resnet", "mobilenetv2"])
def test_every_cut_is_exact(arch):
    torch.manual_seed(0)
    model = build_model(VisionModelConfig(arch=arch, widths=[8, 16, 32])).eval()
    x = torch.rand(3, 1, 28, 28)
    points = split_points(model, x)
    assert points[0].is_input and points[0].shape == (1, 1, 28, 28)
    assert points[-1].is_output and points[-1].shape == (1, 10)
    assert len(points) > 5
    total_params = sum(p.numel() for p in model.parameters())
    traced = trace(model)
    with torch.no_grad():
        want = model(x)
        for point in points:
            head, tail = split_model(model, point, traced)
            activation = head(x)
            assert tuple(activation.shape[1:]) == point.shape[1:]
            assert torch.equal(tail(activation), want), point.label
            assert point.head_params + point.tail_params == total_params
    flops = [p.head_flops for p in points]
    assert flops == sorted(flops) and flops[0] == 0 and points[-1].tail_flops == 0


def test_cut_inside_a_residual_block_is_refused():
    model = build_model(VisionModelConfig(widths=[8, 16, 32])).eval()
    valid = {p.index for p in split_points(model, torch.zeros(1, 1, 28, 28))}
    inside = next(k for k in range(1, 30) if k not in valid)
    with pytest.raises(ValueError, match="tensors cross it"):
        split_model(model, inside)


def test_flops_of_a_known_conv():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 2))
    points = split_points(model, torch.zeros(1, 1, 5, 5))
    conv_flops = 2 * 4 * 5 * 5 * 1 * 9
    linear_flops = 2 * 2 * 100
    assert points[-1].head_flops == conv_flops + linear_flops
    assert points[1].head_flops == conv_flops and points[1].nbytes == 4 * 100
