"""BottleFit bottleneck: uint8 fidelity, accuracy kept, checkpoints and ONNX graphs that match torch."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from split_helpers import demo_artifacts, sample_images

from edgeweave.runtime.codec import quantize_uint8
from edgeweave.runtime.ort_sessions import session_options
from edgeweave.splitting.bottleneck import fake_quantize_uint8, load_student, load_teacher
from edgeweave.splitting.onnx_export import OnnxMismatchError, check_onnx, export_onnx
from edgeweave.splitting.training import accuracy


def test_fake_quantization_matches_the_wire_codec():
    torch.manual_seed(1)
    z = torch.randn(2, 8, 7, 7) * 3 + 1
    wire = quantize_uint8(z)
    simulated = fake_quantize_uint8(z)
    restored = wire.dequantize()
    assert (restored - z).abs().max() <= wire.scale / 2 + 1e-6  # within half a step
    assert torch.allclose(simulated, restored, atol=1e-5)
    z.requires_grad_(True)
    fake_quantize_uint8(z).sum().backward()  # straight-through: gradient of identity
    assert torch.equal(z.grad, torch.ones_like(z))


@pytest.mark.slow
def test_trained_bottleneck_keeps_teacher_accuracy_and_shrinks_the_data():
    directory = demo_artifacts()
    manifest = json.loads((directory / "manifest.json").read_text())
    teacher, _ = load_teacher(directory)
    student, cfg, _ = load_student(directory)
    images, labels = sample_images(1000)
    batches = [(images[i : i + 500], labels[i : i + 500]) for i in range(0, len(labels), 500)]  # as in training
    teacher_acc, student_acc = accuracy(teacher, batches), accuracy(student, batches)
    assert teacher_acc > 0.5  # it learned something
    assert student_acc >= teacher_acc - 0.05
    # the safetensors checkpoint reloads the trained model (same accuracy up to a borderline image)
    assert student_acc == pytest.approx(manifest["accuracy"]["student"], abs=2e-3)
    with torch.no_grad():
        z = student.head()(images[:1])
    assert z.shape[1] == cfg.channels == manifest["bottleneck_shape"][1]
    assert z.numel() == manifest["bottleneck_bytes"] <= 0.25 * images[:1].numel() * 4  # >= 75% less than float32


@pytest.mark.slow
def test_onnx_graphs_match_torch():
    directory = demo_artifacts()
    teacher, _ = load_teacher(directory)
    student, _, _ = load_student(directory)
    images, _ = sample_images(8)
    head, tail = student.head(), student.tail()
    with torch.no_grad():
        z = head(images)
    for name, module, sample in (("full", teacher, images), ("head", head, images), ("tail", tail, z)):
        session = ort.InferenceSession(str(directory / f"{name}.onnx"), session_options(), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: sample.numpy()})
        with torch.no_grad():
            want = module(sample).numpy()
        assert np.abs(got - want).max() < 1e-4, name


def test_onnx_check_catches_a_wrong_graph():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    graph = export_onnx(model, torch.zeros(1, 4))
    assert check_onnx(graph, model, torch.rand(5, 4)) < 1e-5  # dynamic batch works
    with torch.no_grad():
        model[0].bias += 1.0
    with pytest.raises(OnnxMismatchError):
        check_onnx(graph, model, torch.rand(2, 4))
