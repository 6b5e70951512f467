"""GGUF files the quantized benchmarks need, written once under ~/.cache/edgeweave/models/.

- SmolLM2-135M-Instruct as Q8_0 and as F32, made from the shipped Q4_1 file: every tensor is
  dequantized with `gguf.quants.dequantize` and written back as Q8_0 (2-D tensors; the 1-D norms
  stay F32) or as F32. All metadata (tokenizer, chat template, hyper-parameters) and tensor names
  are copied, `general.file_type` is set to the new type, so llama.cpp loads the copies as it
  loads the original. The three files therefore hold (up to Q8_0's rounding) the same weights:
  the Q4_1 values. Also a Q4_0 one (projections Q4_0, token_embd Q8_0: SmolLM2 ties its LM head
  to it, and llama.cpp's Q4_0 recipe keeps that tensor above 4 bits), made the same way: an
  independent 4-bit requantization of the same values, the yardstick for `--quantize q4`.
- A random-weight Llama of TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads,
  MLP 5632) with SmolLM2's tokenizer (vocab 49152, so llama.cpp can load it), as F32 and Q4_0.
  Weights are normal(0, 0.02), norms 1.0, seeded per tensor name, so both files hold the same
  values (Q4_0 is the F32 file quantized). q/k rows are permuted the way llama.cpp's converter
  does for arch llama (the inverse of `splitting.gguf_reader.reverse_permute`). In the Q4_0 file
  the projections and token_embd are Q4_0 and the LM head (output.weight) Q8_0: llama.cpp's own
  Q4_0 recipe keeps the output tensor at higher precision (Q6_K, which gguf-py cannot write).

Files are streamed tensor by tensor (tensor infos first, then one tensor's bytes at a time), so
writing needs the memory of one tensor, and written to a temporary name then renamed, so an
interrupted run never leaves a half file that looks finished.

    python benchmarks/gguf_models.py [--skip-1b]
"""

from __future__ import annotations

import argparse
import os
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np

from edgeweave.splitting.checkpoints import default_model_path

MODELS = Path.home() / ".cache" / "edgeweave" / "models"
QT = gguf.GGMLQuantizationType
#: general.file_type values (llama.cpp's LLAMA_FTYPE_*)
FILE_TYPES = {QT.F32: gguf.LlamaFileType.ALL_F32, QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
              QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1}
#: TinyLlama-1.1B's shape with SmolLM2's vocabulary
SHAPE_1B = {"hidden": 2048, "layers": 22, "heads": 32, "kv_heads": 4, "intermediate": 5632, "context": 2048}
INIT_STD = 0.02
SEED = 0

#: one tensor to write: (name, element shape in numpy order [rows, cols], GGML type, producer of its bytes)
TensorJob = tuple[str, tuple[int, ...], QT, Callable[[], np.ndarray]]


def smollm2_path(kind: str) -> Path:
    """The SmolLM2 GGUF at `kind` ("Q4_1": the shipped file, "Q8_0", "F32", "Q4_0": made here)."""
    if kind == "Q4_1":
        return default_model_path()
    return MODELS / f"SmolLM2-135M-Instruct.{kind}.gguf"


def random_1b_path(kind: str) -> Path:
    """The random 1B-shape Llama GGUF at `kind` ("F32" or "Q4_0")."""
    return MODELS / f"random-1b-smollm2-vocab.{kind}.gguf"


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation for arch llama (HF rotate-half -> interleaved RoPE).

    convert_hf_to_gguf.py: reshape(n_head, 2, dim, ...).swapaxes(1, 2); the inverse of
    `splitting.gguf_reader.reverse_permute`."""
    dim = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, 2, dim, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _byte_count(shape: tuple[int, ...], qtype: QT) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * type_size


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, skip: Callable[[str], bool]) -> None:
    """Every key/value of `reader` except the header's, the architecture (the writer adds it) and `skip`."""
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or skip(field.name):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)


def _stream(writer: gguf.GGUFWriter, path: Path, jobs: list[TensorJob]) -> None:
    """Declare every tensor, write the header, then produce and write one tensor at a time."""
    for name, shape, qtype, _ in jobs:
        # element shape + raw type: the writer stores the dims reversed (GGUF order) as it does for its own tensors
        writer.add_tensor_info(name, shape, np.dtype(np.float32), _byte_count(shape, qtype), raw_dtype=qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape, qtype, produce in jobs:
        data = produce()
        expected = _byte_count(shape, qtype)
        if data.nbytes != expected:
            raise RuntimeError(f"{name}: produced {data.nbytes} bytes, the header says {expected}")
        writer.write_tensor_data(data)
        del data
    writer.close()


def _encode(values: np.ndarray, qtype: QT) -> np.ndarray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    return values if qtype == QT.F32 else gguf.quants.quantize(values, qtype)


def _finish(tmp: Path, path: Path, started: float) -> Path:
    os.replace(tmp, path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB, {time.perf_counter() - started:.0f} s)")
    return path


# -- SmolLM2 at Q8_0 / F32 ----------------------------------------------------------------------


def write_smollm2(kind: str) -> Path:
    """The shipped SmolLM2 file re-encoded as `kind` ("Q8_0", "F32" or "Q4_0"); reused when present."""
    path = smollm2_path(kind)
    if kind == "Q4_1" or path.exists():
        return path
    qtype = QT[kind]
    started = time.perf_counter()
    reader = gguf.GGUFReader(str(default_model_path()))
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    _copy_metadata(reader, writer, skip=lambda key: key == gguf.Keys.General.FILE_TYPE)
    writer.add_file_type(FILE_TYPES[qtype])

    def job(tensor) -> TensorJob:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # numpy order
        # 1-D tensors (norms) stay F32, as llama.cpp's quantizer keeps them
        target = qtype if len(shape) == 2 and shape[-1] % 32 == 0 else QT.F32
        if tensor.name == "token_embd.weight" and qtype == QT.Q4_0:
            target = QT.Q8_0  # the tied LM head stays above 4 bits (llama.cpp gives it Q6_K)
        if len(shape) == 1 and tensor.tensor_type != QT.F32:
            raise RuntimeError(f"{tensor.name}: unexpected {tensor.tensor_type.name} 1-D tensor")

        def produce() -> np.ndarray:
            values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(shape)
            return _encode(values, target)

        return tensor.name, shape, target, produce

    _stream(writer, tmp, [job(t) for t in reader.tensors])
    return _finish(tmp, path, started)


# -- the random 1B ------------------------------------------------------------------------------


def _random(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """normal(0, INIT_STD) float32, seeded by the tensor's name: the same values in every file."""
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(INIT_STD)


def _tensors_1b(vocab: int) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, numpy shape, role) in llama.cpp's order; role: embd/output/norm/q/k/proj."""
    s = SHAPE_1B
    h, head_dim = s["hidden"], s["hidden"] // s["heads"]
    kv = s["kv_heads"] * head_dim
    yield "token_embd.weight", (vocab, h), "embd"
    for i in range(s["layers"]):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (h,), "norm"
        yield p + "ffn_down.weight", (h, s["intermediate"]), "proj"
        yield p + "ffn_gate.weight", (s["intermediate"], h), "proj"
        yield p + "ffn_up.weight", (s["intermediate"], h), "proj"
        yield p + "ffn_norm.weight", (h,), "norm"
        yield p + "attn_k.weight", (kv, h), "k"
        yield p + "attn_output.weight", (h, h), "proj"
        yield p + "attn_q.weight", (h, h), "q"
        yield p + "attn_v.weight", (kv, h), "proj"
    yield "output_norm.weight", (h,), "norm"
    yield "output.weight", (vocab, h), "output"


def write_random_1b(kind: str) -> Path:
    """The random 1B-shape Llama as `kind` ("F32" or "Q4_0"); reused when present."""
    path = random_1b_path(kind)
    if path.exists():
        return path
    qtype = QT[kind]
    started = time.perf_counter()
    tokenizer_source = gguf.GGUFReader(str(default_model_path()))
    vocab = len(tokenizer_source.fields[gguf.Keys.Tokenizer.LIST].data)
    s = SHAPE_1B
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_type("model")
    writer.add_name(f"random Llama, TinyLlama-1.1B shape, SmolLM2 tokenizer ({kind})")
    writer.add_block_count(s["layers"])
    writer.add_context_length(s["context"])
    writer.add_embedding_length(s["hidden"])
    writer.add_feed_forward_length(s["intermediate"])
    writer.add_head_count(s["heads"])
    writer.add_head_count_kv(s["kv_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(s["hidden"] // s["heads"])
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _copy_metadata(tokenizer_source, writer, skip=lambda key: not key.startswith("tokenizer."))

    def job(name: str, shape: tuple[int, ...], role: str) -> TensorJob:
        if role == "norm":
            target = QT.F32
        elif role == "output" and qtype != QT.F32:
            target = QT.Q8_0  # the LM head at 8 bits, as llama.cpp keeps it above the projections' precision
        else:
            target = qtype

        def produce() -> np.ndarray:
            if role == "norm":
                return np.ones(shape, dtype=np.float32)
            values = _random(name, shape)
            if role == "q":
                values = permute(values, s["heads"])
            elif role == "k":
                values = permute(values, s["kv_heads"])
            return _encode(values, target)

        return name, shape, target, produce

    _stream(writer, tmp, [job(*t) for t in _tensors_1b(vocab)])
    return _finish(tmp, path, started)


def ensure(include_1b: bool = True) -> dict[str, Path]:
    """Every file the benchmarks use (written when missing), by label."""
    files = {f"smollm2-{k}": write_smollm2(k) for k in ("Q4_1", "Q8_0", "F32", "Q4_0")}
    if include_1b:
        files.update({f"1b-{k}": write_random_1b(k) for k in ("F32", "Q4_0")})
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-1b", action="store_true", help="only the SmolLM2 files")
    args = parser.parse_args()
    for label, path in ensure(not args.skip_1b).items():
        print(f"{label:<14} {path}")


if __name__ == "__main__":
    main()
