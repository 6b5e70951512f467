"""Read a Llama-family GGUF file under HF names and orientations.

Quantized blocks are dequantized with the `gguf` package, one tensor at a time. llama.cpp's
converter permutes the rows of q/k for its interleaved RoPE; we undo that exactly as
transformers' GGUF loader does (`reverse_permute`), so the weights equal HF's.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from edgeweave.splitting.checkpoints import Checkpoint, CheckpointError
from edgeweave.splitting.llama_config import LlamaConfig

#: GGUF per-layer tensor name -> HF name (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None for tensors we do not use (e.g. rope_freqs)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"


def reverse_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> HF rotate-half), as transformers does."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


class GGUFCheckpoint(Checkpoint):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as exc:  # the gguf package raises plain ValueError/struct errors
            raise CheckpointError(f"{self.path} is not a readable GGUF file: {exc}") from exc
        self.architecture = str(self._field("general.architecture"))
        if self.architecture not in _SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{self.path} holds a {self.architecture!r} model; supported: {', '.join(_SUPPORTED_ARCHITECTURES)}"
            )
        self._tensors = {}
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is not None:
                self._tensors[name] = t
        if any(t.name == "rope_freqs.weight" for t in self.reader.tensors):
            raise CheckpointError(
                f"{self.path} stores llama3 RoPE factors as a tensor (rope_freqs), which is not supported yet; "
                "use the Hugging Face safetensors folder of this model instead"
            )
        self.config = self._read_config()

    def _field(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def _read_config(self) -> LlamaConfig:
        arch = self.architecture
        hidden = int(self._field(f"{arch}.embedding_length"))
        heads = int(self._field(f"{arch}.attention.head_count"))
        kv_heads = int(self._field(f"{arch}.attention.head_count_kv", heads))
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        vocab = int(self._field(f"{arch}.vocab_size", len(tokens.data) if tokens is not None else 0))
        scaling = None
        scaling_type = self._field(f"{arch}.rope.scaling.type")
        if scaling_type not in (None, "none"):
            if scaling_type != "linear":
                raise CheckpointError(f"{self.path}: GGUF rope scaling {scaling_type!r} is not supported")
            scaling = {"rope_type": "linear", "factor": float(self._field(f"{arch}.rope.scaling.factor"))}
        eos = [self._field(key) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(self._field(f"{arch}.feed_forward_length")),
            num_layers=int(self._field(f"{arch}.block_count")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(self._field(f"{arch}.attention.key_length", hidden // heads)),
            rms_norm_eps=float(self._field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self._field(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            tie_word_embeddings="lm_head.weight" not in self._tensors,
            attention_bias="model.layers.0.self_attn.q_proj.bias" in self._tensors,
            max_position_embeddings=int(self._field(f"{arch}.context_length", 2048)),
            bos_token_id=self._field("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
            model_type="llama" if arch == "mistral" else arch,
        )

    def names(self) -> list[str]:
        return list(self._tensors)

    def files(self) -> list[Path]:
        return [self.path]

    def _read(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        array = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if self.architecture == "llama":
            if ".self_attn.q_proj." in name:
                array = reverse_permute(array, self.config.num_heads)
            elif ".self_attn.k_proj." in name:
                array = reverse_permute(array, self.config.num_kv_heads)
        # the F32 path returns a read-only view of the memory-mapped file: copy it into our own memory
        return torch.from_numpy(np.array(array, dtype=np.float32, copy=True, order="C"))

    @property
    def tokenizer_source(self) -> Path:
        return self.path

    @cached_property
    def chat_template(self) -> str | None:
        return self._field("tokenizer.chat_template")

    def metadata(self, key: str, default: Any = None) -> Any:
        """A raw GGUF metadata value (used by the tokenizer builder)."""
        return self._field(key, default)
