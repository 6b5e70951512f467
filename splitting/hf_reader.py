"""Read a Hugging Face Llama-family folder: config.json + *.safetensors (sharded or not).

Tensors come from `safetensors.safe_open(framework="pt")`, one at a time; nothing is unpickled.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from edgeweave.splitting.checkpoints import Checkpoint, CheckpointError
from edgeweave.splitting.llama_config import LlamaConfig

_SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def config_from_hf(data: dict[str, Any]) -> LlamaConfig:
    """Our LlamaConfig from a HF config.json dict (old `rope_scaling` or new `rope_parameters` style)."""
    model_type = data.get("model_type", "llama")
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"model_type {model_type!r} is not supported; supported: {', '.join(_SUPPORTED_MODEL_TYPES)}")
    if data.get("mlp_bias"):
        raise CheckpointError("checkpoints with mlp_bias are not supported")
    rope = dict(data.get("rope_parameters") or {})
    theta = float(data.get("rope_theta", rope.get("rope_theta", 10000.0)))
    scaling = data.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} or None)
    if scaling is not None:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.pop("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    heads = int(data["num_attention_heads"])
    eos = data.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return LlamaConfig(
        vocab_size=int(data["vocab_size"]),
        hidden_size=int(data["hidden_size"]),
        intermediate_size=int(data["intermediate_size"]),
        num_layers=int(data["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(data.get("num_key_value_heads") or heads),
        head_dim=int(data.get("head_dim") or data["hidden_size"] // heads),
        rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        attention_bias=bool(data.get("attention_bias", model_type == "qwen2")),
        max_position_embeddings=int(data.get("max_position_embeddings", 2048)),
        bos_token_id=data.get("bos_token_id"),
        eos_token_ids=eos_ids,
        model_type="llama" if model_type == "mistral" else model_type,
    )


class HFCheckpoint(Checkpoint):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.config = config_from_hf(json.loads((self.path / "config.json").read_text()))
        except (KeyError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.path / 'config.json'} is not a usable Llama config: {exc}") from exc
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._where = {name: self.path / file for name, file in weight_map.items()}
        else:
            self._where = {}
            for file in sorted(self.path.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as handle:
                    self._where.update({name: file for name in handle.keys()})  # noqa: SIM118 (not a dict)
        if not self._where:
            raise CheckpointError(f"{self.path} has no *.safetensors weights")
        if self.config.tie_word_embeddings:
            self._where.pop("lm_head.weight", None)

    def names(self) -> list[str]:
        return list(self._where)

    def files(self) -> list[Path]:
        return sorted(set(self._where.values()))

    def _read(self, name: str) -> torch.Tensor:
        with safe_open(str(self._where[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    @property
    def tokenizer_source(self) -> Path:
        return self.path / "tokenizer.json"

    @cached_property
    def chat_template(self) -> str | None:
        config_file = self.path / "tokenizer_config.json"
        if config_file.exists():
            template = json.loads(config_file.read_text()).get("chat_template")
            if isinstance(template, str):
                return template
        jinja = self.path / "chat_template.jinja"
        return jinja.read_text() if jinja.exists() else None
