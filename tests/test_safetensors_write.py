"""The shard writer: a valid safetensors file (read back by the safetensors library itself and by our
reader, byte for byte), its data laid out so that fused groups are contiguous file ranges."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open

from edgeweave.runtime.safetensors_read import read_safetensors
from edgeweave.runtime.safetensors_write import save_safetensors


def _layer() -> dict[str, torch.Tensor]:
    """A quantized layer's tensors in a scrambled order, plus floats of every kind a shard holds."""
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for name, rows in (("w_down", 64), ("wv", 32), ("w_up", 96), ("wq", 64), ("wo", 64), ("wk", 32), ("w_gate", 96)):
        tensors[f"{name}.zero"] = torch.randint(0, 16, (rows, 2), dtype=torch.uint8, generator=g)
        tensors[f"{name}.q"] = torch.randint(0, 256, (rows, 2, 16), dtype=torch.uint8, generator=g)
        tensors[f"{name}.layout"] = torch.tensor([4, 32, 64], dtype=torch.int32)
        tensors[f"{name}.scale"] = torch.rand(rows, 2, generator=g)
        tensors[f"{name}.offset"] = torch.rand(rows, 2, generator=g)
    tensors["bq"] = torch.rand(64, generator=g)
    tensors["norm.bf16"] = torch.rand(7, generator=g).to(torch.bfloat16)
    tensors["mask"] = torch.tensor([True, False, True])
    tensors["empty"] = torch.empty(0, 64)
    tensors["q_norm"] = torch.rand(1, generator=g).to(torch.float64)
    return tensors


def test_written_file_reads_back_exactly_with_both_readers(tmp_path):
    tensors = _layer()
    path = tmp_path / "layer.safetensors"
    save_safetensors(tensors, path, metadata={"format": "pt"})
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(tensors) and f.metadata() == {"format": "pt"}
        for name, want in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == want.dtype and torch.equal(got, want), name
    ours, _ = read_safetensors(path)
    for name, want in tensors.items():
        assert torch.equal(ours[name], want), name
        assert ours[name].data_ptr() % want.element_size() == 0, f"{name} is not aligned to its element size"


def test_fused_groups_are_contiguous_file_ranges(tmp_path):
    path = tmp_path / "layer.safetensors"
    save_safetensors(_layer(), path)
    ours, _ = read_safetensors(path)
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert (8 + header_len) % 8 == 0
    assert set(json.loads(path.read_bytes()[8 : 8 + header_len])) - {"__metadata__"} == set(ours)
    for suffix in ("q", "scale", "offset"):
        for group in (("wq", "wk", "wv"), ("w_gate", "w_up")):
            ranges = [ours.ranges[f"{name}.{suffix}"] for name in group]
            for a, b in zip(ranges, ranges[1:], strict=False):
                assert b.offset == a.offset + a.nbytes, (group, suffix)
    raw = path.read_bytes()
    for name, r in ours.ranges.items():  # every range holds exactly that tensor's bytes
        assert raw[r.offset : r.offset + r.nbytes] == ours[name].contiguous().view(torch.uint8).numpy().tobytes()


def test_unsupported_dtype_is_refused_before_writing(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="cannot hold"):
        save_safetensors({"c": torch.zeros(2, dtype=torch.complex64)}, path)
    assert not path.exists()
