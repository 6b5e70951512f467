"""The architecture description shared by every Llama-family reader, shard and kernel.

Weights everywhere use Hugging Face Llama names (`model.layers.3.self_attn.q_proj.weight`,
`model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight`), in the orientation
HF uses (q/k in HF's rotate-half RoPE layout, Linear weights as [out, in]), so a reader's only
job is to produce those names, and a run can be compared against transformers directly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    model_type: str = "llama"
    #: llama.cpp's per-frequency RoPE factors (GGUF `rope_freqs`, head_dim/2 values) that divide the inverse
    #: frequencies: how llama3 scaling is stored in GGUF files
    rope_freq_factors: tuple[float, ...] | None = None
    #: each query attends to at most this many newest keys, itself included (Mistral, Qwen2 with use_sliding_window)
    sliding_window: int | None = None
    #: Qwen3: RMSNorm over each head's q and k (weights [head_dim]) after the projection, before RoPE
    qk_norm: bool = False

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlamaConfig:
        data = dict(data)
        data["eos_token_ids"] = tuple(data.get("eos_token_ids") or ())
        if data.get("rope_freq_factors") is not None:
            data["rope_freq_factors"] = tuple(float(f) for f in data["rope_freq_factors"])
        return cls(**data)

    def layer_parameter_count(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2
        mlp = 3 * h * self.intermediate_size
        return attn + mlp + 2 * h + (2 * d if self.qk_norm else 0)
