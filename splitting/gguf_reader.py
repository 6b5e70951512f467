"""Read a Llama-family GGUF file under HF names and orientations.

The header is parsed by `splitting.gguf_file` (fast; tensor bytes stay mapped); quantized
blocks are dequantized with the `gguf` package, one tensor at a time. llama.cpp's
converter permutes the rows of q/k for its interleaved RoPE; we undo that exactly as
transformers' GGUF loader does (`reverse_permute`), so the weights equal HF's (arch "llama" only:
qwen2/qwen3 files keep HF's layout). llama3 RoPE scaling is stored by the converter as the
`rope_freqs` tensor of per-frequency divisors: it becomes `LlamaConfig.rope_freq_factors`, not a
layer tensor.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from edgeweave.runtime.quantized import BlockQuantized, QuantizationError
from edgeweave.splitting.checkpoints import Checkpoint, CheckpointError
from edgeweave.splitting.gguf_file import GGUFError, GGUFFile
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
    "attn_q_norm": "self_attn.q_norm",  # Qwen3's per-head RMSNorms of q and k
    "attn_k_norm": "self_attn.k_norm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
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
            self.file = GGUFFile(self.path)
        except (GGUFError, OSError) as exc:
            raise CheckpointError(f"{self.path} is not a readable GGUF file: {exc}") from None
        self.architecture = str(self._field("general.architecture"))
        if self.architecture not in _SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{self.path} holds a {self.architecture!r} model; supported: {', '.join(_SUPPORTED_ARCHITECTURES)}"
            )
        self._tensors = {}
        for t in self.file.tensors:
            name = hf_name(t.name)
            if name is not None:
                self._tensors[name] = t
        self.config = self._read_config()

    def _field(self, key: str, default: Any = None) -> Any:
        return self.file.fields.get(key, default)

    def _read_config(self) -> LlamaConfig:
        arch = self.architecture
        hidden = int(self._field(f"{arch}.embedding_length"))
        heads = int(self._field(f"{arch}.attention.head_count"))
        kv_heads = int(self._field(f"{arch}.attention.head_count_kv", heads))
        tokens = self.file.fields.get("tokenizer.ggml.tokens")
        embed = self._tensors.get("model.embed_tokens.weight")
        rows = len(tokens) if tokens is not None else int(embed.shape[-1]) if embed is not None else 0
        vocab = int(self._field(f"{arch}.vocab_size", rows))
        q = self._tensors.get("model.layers.0.self_attn.q_proj.weight")  # GGUF shapes are [in, out]
        q_rows = int(q.shape[-1]) if q is not None else hidden
        head_dim = int(self._field(f"{arch}.attention.key_length", q_rows // heads))
        scaling = None
        scaling_type = self._field(f"{arch}.rope.scaling.type")
        if scaling_type not in (None, "none"):
            if scaling_type != "linear":
                raise CheckpointError(
                    f"{self.path} uses {scaling_type!r} RoPE scaling, which is not supported; "
                    "supported: none, linear, and llama3 (stored as the rope_freqs tensor)"
                )
            scaling = {"rope_type": "linear", "factor": float(self._field(f"{arch}.rope.scaling.factor"))}
        if int(self._field(f"{arch}.expert_count", 0) or 0) > 0:
            raise CheckpointError(f"{self.path} is a mixture-of-experts model, which is not supported")
        rotated = int(self._field(f"{arch}.rope.dimension_count", head_dim))
        if rotated != head_dim:
            raise CheckpointError(
                f"{self.path} rotates {rotated} of {head_dim} dimensions per head (partial RoPE), which is not supported"
            )
        window = self._field(f"{arch}.attention.sliding_window") or None  # 0: none
        pattern = self._field(f"{arch}.attention.sliding_window_pattern")  # per layer: slides?
        if window is not None and pattern is not None:
            flags = {bool(p) for p in pattern} if isinstance(pattern, list) else {True, False}
            if flags == {True, False}:
                raise CheckpointError(f"{self.path} mixes sliding-window and full-attention layers, which is not supported")
            window = window if flags == {True} else None
        eos = [self._field(key) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(self._field(f"{arch}.feed_forward_length")),
            num_layers=int(self._field(f"{arch}.block_count")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(self._field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self._field(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            tie_word_embeddings="lm_head.weight" not in self._tensors,
            attention_bias="model.layers.0.self_attn.q_proj.bias" in self._tensors,
            max_position_embeddings=int(self._field(f"{arch}.context_length", 2048)),
            bos_token_id=self._field("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
            model_type="llama" if arch == "mistral" else arch,
            rope_freq_factors=self._rope_freq_factors(head_dim),
            sliding_window=int(window) if window else None,
            qk_norm="model.layers.0.self_attn.q_norm.weight" in self._tensors,
        )

    def _rope_freq_factors(self, head_dim: int) -> tuple[float, ...] | None:
        """llama.cpp's `rope_freqs` (llama3 scaling): head_dim/2 factors that divide the RoPE frequencies."""
        t = next((t for t in self.file.tensors if t.name == "rope_freqs.weight"), None)
        if t is None:
            return None
        factors = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1)
        if factors.size != head_dim // 2 or not np.all(np.isfinite(factors)) or np.any(factors <= 0):
            raise CheckpointError(
                f"{self.path} has a rope_freqs tensor of {factors.size} values; "
                f"llama3 RoPE factors need {head_dim // 2} positive numbers (head_dim / 2)"
            )
        return tuple(float(f) for f in factors)

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

    def source_type(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

    def block_quantized(self, name: str) -> BlockQuantized:
        """The file's blocks mapped exactly onto our layout, q/k rows un-permuted like `_read` does."""
        from edgeweave.splitting.gguf_quants import decode

        t = self._tensors[name]
        if t.tensor_type.name in ("F32", "F16", "BF16"):
            return super().block_quantized(name)
        try:
            weight = decode(np.asarray(t.data), t.tensor_type, self.shape(name))
        except QuantizationError as exc:
            raise CheckpointError(f"{self.path}: tensor {t.name}: {exc}") from None
        n_head = self._permuted_heads(name)
        if n_head:
            order = reverse_permute(np.arange(weight.q.shape[0]), n_head)
            weight = BlockQuantized(weight.q[order], weight.scale[order], weight.zero[order],
                                    None if weight.offset is None else weight.offset[order], weight.bits, weight.block)
        return weight

    def _permuted_heads(self, name: str) -> int:
        """Heads of a q/k projection whose rows llama.cpp permuted (0 for every other tensor)."""
        if self.architecture != "llama":
            return 0
        if ".self_attn.q_proj." in name:
            return self.config.num_heads
        if ".self_attn.k_proj." in name:
            return self.config.num_kv_heads
        return 0

    @property
    def tokenizer_source(self) -> Path:
        return self.path

    @cached_property
    def chat_template(self) -> str | None:
        return self._field("tokenizer.chat_template")

    def metadata(self, key: str, default: Any = None) -> Any:
        """A raw GGUF metadata value (used by the tokenizer builder)."""
        return self._field(key, default)
