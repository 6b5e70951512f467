"""Write a (tiny) transformers model as an F32 GGUF file the way llama.cpp's convert_hf_to_gguf.py does.

Only what the Llama-family readers need: the hyperparameters under `{arch}.*`, the tensors under
llama.cpp's names, q/k rows (weights and biases) permuted for arch "llama" (llama.cpp's
`LlamaModel.permute`; qwen2/qwen3 keep HF's layout), and llama3 RoPE scaling as the
`rope_freqs` tensor of per-frequency factors (`LlamaModel.generate_extra_tensors`). No tokenizer:
the tests drive token ids directly. A test helper, not part of the package.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

#: HF name after "model.layers.N." -> llama.cpp's name after "blk.N."
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF rotate-half -> interleaved RoPE); `reverse_permute` undoes it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def _rope(config: Any) -> tuple[float, dict[str, Any]]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    return theta, params


def llama3_rope_factors(config: Any) -> np.ndarray:
    """The `rope_freqs` values: per frequency, the factor llama3 scaling divides it by.

    As llama.cpp's converter, except that `original_max_position_embeddings` is taken from the
    scaling parameters (the converter reads it from the top level of config.json, where real Llama 3
    configs do not have it, and falls back to 8192, which is what those configs hold).
    """
    theta, params = _rope(config)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = params.get("factor", 8.0)
    low_freq_factor, high_freq_factor = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_context_len = params.get("original_max_position_embeddings", 8192)
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def write_gguf(model: torch.nn.Module, path: str | Path, arch: str) -> Path:
    """`model` (a transformers *ForCausalLM) as an F32 GGUF of architecture `arch` at `path`."""
    config = model.config
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta, params = _rope(config)
    writer.add_rope_freq_base(theta)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim != config.hidden_size // config.num_attention_heads or arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":  # as llama.cpp's LlamaModel (qwen2/qwen3 files carry neither: the reader derives them)
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    if getattr(config, "sliding_window", None) and config.model_type == "mistral":
        writer.add_sliding_window(int(config.sliding_window))
    if rope_type == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        array = tensor.detach().to(torch.float32).numpy().copy()
        if name in _GLOBAL_NAMES:
            writer.add_tensor(_GLOBAL_NAMES[name], array)
            continue
        _, _, layer, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        if arch == "llama" and module == "self_attn.q_proj":
            array = permute(array, config.num_attention_heads, config.num_attention_heads)
        elif arch == "llama" and module == "self_attn.k_proj":
            array = permute(array, config.num_attention_heads, config.num_key_value_heads)
        writer.add_tensor(f"blk.{layer}.{_LAYER_NAMES[module]}.{kind}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
