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

_SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_ROPE_TYPES = ("default", "linear", "llama3")


def _sliding_window(data: dict[str, Any], model_type: str) -> int | None:
    """The sliding window all layers attend with, as transformers builds it; None = full attention.

    Mistral slides every layer (4096 when the key is absent); Qwen2/Qwen3 only with
    `use_sliding_window`, and then only the layers `layer_types` (or `max_window_layers`) name.
    """
    if model_type == "mistral":
        window = data.get("sliding_window", 4096)
        return None if window is None else int(window)
    if model_type not in ("qwen2", "qwen3") or not data.get("use_sliding_window"):
        return None
    window = data.get("sliding_window", 4096)
    if window is None:
        return None
    layers = int(data["num_hidden_layers"])
    first = int(data.get("max_window_layers", 28))
    types = data.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    sliding = {t == "sliding_attention" for t in types}
    if sliding == {True, False}:
        raise CheckpointError(
            "checkpoints that mix sliding-window and full-attention layers (use_sliding_window with "
            "max_window_layers/layer_types) are not supported"
        )
    return int(window) if sliding == {True} else None


def _refuse_unsupported(data: dict[str, Any], rope: dict[str, Any], scaling: dict[str, Any] | None) -> None:
    """CheckpointError for configuration features that change the math and that the kernels lack."""
    if data.get("mlp_bias"):
        raise CheckpointError("checkpoints with mlp_bias are not supported")
    if data.get("quantization_config"):
        method = (data["quantization_config"] or {}).get("quant_method", "quantized")
        raise CheckpointError(
            f"pre-quantized ({method}) Hugging Face checkpoints are not supported; use the float checkpoint or a GGUF file"
        )
    if data.get("hidden_act", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"hidden_act {data['hidden_act']!r} is not supported; only SwiGLU (silu) MLPs are")
    if any(isinstance(v, dict) for v in rope.values()):
        raise CheckpointError("per-layer-type rope_parameters are not supported")
    if scaling is not None and scaling["rope_type"] not in _ROPE_TYPES:
        raise CheckpointError(
            f"rope scaling {scaling['rope_type']!r} is not supported; supported: {', '.join(_ROPE_TYPES)}"
        )
    partial = (scaling or {}).get("partial_rotary_factor", data.get("partial_rotary_factor", 1.0))
    if float(partial) != 1.0:
        raise CheckpointError(f"partial rotary embeddings (partial_rotary_factor {partial}) are not supported")


def config_from_hf(data: dict[str, Any]) -> LlamaConfig:
    """Our LlamaConfig from a HF config.json dict (old `rope_scaling` or new `rope_parameters` style)."""
    model_type = data.get("model_type", "llama")
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"model_type {model_type!r} is not supported; supported: {', '.join(_SUPPORTED_MODEL_TYPES)}")
    rope = dict(data.get("rope_parameters") or {})
    theta = float(data.get("rope_theta", rope.get("rope_theta", 10000.0)))
    scaling = data.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} or None)
    if scaling is not None:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.pop("type", "default"))
    _refuse_unsupported(data, rope, scaling)
    if scaling is not None and scaling["rope_type"] == "default":
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
        head_dim=int(data.get("head_dim") or (128 if model_type == "qwen3" else data["hidden_size"] // heads)),
        rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        attention_bias=bool(data.get("attention_bias", model_type == "qwen2")),
        max_position_embeddings=int(data.get("max_position_embeddings", 2048)),
        bos_token_id=data.get("bos_token_id"),
        eos_token_ids=eos_ids,
        model_type="llama" if model_type == "mistral" else model_type,
        sliding_window=_sliding_window(data, model_type),
        qk_norm=model_type == "qwen3",
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
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (KeyError, TypeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{index} is not a safetensors index with a weight_map: {exc}") from None
            self._where = {name: self.path / file for name, file in weight_map.items()}
            missing = sorted({file.name for file in self._where.values() if not file.is_file()})
            if missing:
                raise CheckpointError(f"{self.path} lacks {', '.join(missing)}, which its index lists; "
                                      "download the missing file(s) again")
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

    def source_type(self, name: str) -> str:
        with safe_open(str(self._where[name]), framework="pt") as handle:
            return handle.get_slice(name).get_dtype()

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(str(self._where[name]), framework="pt") as handle:
            return tuple(handle.get_slice(name).get_shape())

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
