"""Write a random-weight Llama checkpoint in Hugging Face layout, one layer at a time.

Benchmarks of memory scheduling and tensor parallelism need a model several GB large, and no
weights may be downloaded; the numbers do not depend on the values, only on shapes. The
checkpoint is config.json + one safetensors shard per layer (+ one for embedding/norm/head) +
model.safetensors.index.json, exactly what transformers and `splitting.hf_reader` read. Each
shard is generated, written and dropped before the next, so writing needs one layer of memory.
Values are normal(0, 0.02) (HF's init), norms are ones; seeded per tensor, so the same seed
gives the same bytes on any machine.

`python -m edgeweave.splitting.random_llama OUT_DIR --preset 1b --dtype float16`
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from edgeweave.splitting.llama_config import LlamaConfig

PRESETS: dict[str, LlamaConfig] = {
    # small enough for unit tests: a few MB
    "tiny": LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=2048,
        bos_token_id=1, eos_token_ids=(2,),
    ),
    # TinyLlama-1.1B's shape: 1.10 B parameters, 4.4 GB in float32, 2.2 GB in float16
    "1b": LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
        head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=2048,
        bos_token_id=1, eos_token_ids=(2,),
    ),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_INIT_STD = 0.02


def parameter_count(config: LlamaConfig) -> int:
    """Total parameters (embedding and untied LM head included)."""
    head = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return config.vocab_size * config.hidden_size + head + config.hidden_size + config.num_layers * config.layer_parameter_count()


def hf_config(config: LlamaConfig, dtype: str) -> dict:
    """config.json for transformers' LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": False,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids[0] if config.eos_token_ids else None,
        "torch_dtype": dtype,
    }


def _normal(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * _INIT_STD).to(dtype)


def _layer_tensors(config: LlamaConfig, layer: int, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    h, hd, inter = config.hidden_size, config.head_dim, config.intermediate_size
    shapes = {
        "self_attn.q_proj.weight": (config.num_heads * hd, h),
        "self_attn.k_proj.weight": (config.num_kv_heads * hd, h),
        "self_attn.v_proj.weight": (config.num_kv_heads * hd, h),
        "self_attn.o_proj.weight": (h, config.num_heads * hd),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }
    if config.attention_bias:
        shapes.update({
            "self_attn.q_proj.bias": (config.num_heads * hd,),
            "self_attn.k_proj.bias": (config.num_kv_heads * hd,),
            "self_attn.v_proj.bias": (config.num_kv_heads * hd,),
        })
    prefix = f"model.layers.{layer}."
    out = {prefix + name: _normal(shape, seed * 1_000_003 + layer * 101 + k, dtype) for k, (name, shape) in enumerate(shapes.items())}
    out[prefix + "input_layernorm.weight"] = torch.ones(h, dtype=dtype)
    out[prefix + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
    return out


def _outer_tensors(config: LlamaConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    shape = (config.vocab_size, config.hidden_size)
    out = {"model.embed_tokens.weight": _normal(shape, seed * 1_000_003 - 1, dtype),
           "model.norm.weight": torch.ones(config.hidden_size, dtype=dtype)}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = _normal(shape, seed * 1_000_003 - 2, dtype)
    return out


def write_random_llama(
    out_dir: str | Path, config: LlamaConfig | str = "tiny", seed: int = 0, dtype: str = "float32"
) -> Path:
    """Write (or reuse, when config, seed and dtype match) a random checkpoint; returns the folder."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown preset {config!r}; choose one of {', '.join(PRESETS)}")
        config = PRESETS[config]
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    stamp = {"seed": seed, "config": hf_config(config, dtype)}
    stamp_path = root / "random_llama.json"
    if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        return root
    stamp_path.unlink(missing_ok=True)
    torch_dtype = DTYPES[dtype]
    total = config.num_layers + 1
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for index in range(total):
        tensors = _outer_tensors(config, seed, torch_dtype) if index == config.num_layers else _layer_tensors(
            config, index, seed, torch_dtype
        )
        name = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
        tmp = root / (name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, root / name)
        weight_map.update(dict.fromkeys(tensors, name))
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=1)
    )
    (root / "config.json").write_text(json.dumps(hf_config(config, dtype), indent=1))
    stamp_path.write_text(json.dumps(stamp))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a random-weight Llama checkpoint (HF layout).")
    parser.add_argument("out_dir")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args()
    config = PRESETS[args.preset]
    path = write_random_llama(args.out_dir, config, args.seed, args.dtype)
    print(f"{path}: {parameter_count(config) / 1e6:.1f} M parameters, {args.dtype}")


if __name__ == "__main__":
    main()

