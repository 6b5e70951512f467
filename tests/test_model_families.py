"""The model families people run, from HF folders and from GGUF files, against transformers (float32).

Tiny random Llama 3 (llama3 RoPE scaling, biases), Qwen2 (q/k/v biases, a sliding window that is
configured but off), Qwen3 (per-head q/k RMSNorm, explicit head_dim, tied embeddings) and Mistral
(sliding window shorter than the prompt) checkpoints are built with transformers, saved as
safetensors and written as GGUF the way llama.cpp's converter does (tests/gguf_export.py). Our
single-process model and a 2-shard tensor-parallel run must give transformers' logits and greedy
tokens; configurations the kernels do not implement must be refused with a sentence.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import gguf
import numpy as np
import pytest
import torch
from gguf_export import llama3_rope_factors, write_gguf
from llm_reference import single_torch_thread

from edgeweave.runtime.llama import LlamaModel, grouped_attention
from edgeweave.runtime.tp_executor import TensorParallelExecutor
from edgeweave.runtime.tp_hub import TensorParallelHub
from edgeweave.splitting.checkpoints import CheckpointError, open_checkpoint
from edgeweave.splitting.hf_reader import config_from_hf
from edgeweave.splitting.llama_config import LlamaConfig
from edgeweave.splitting.tensor_parallel import plan_shards, write_shards

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
PROMPT = [5, 17, 3, 88, 42, 9, 61, 2, 30, 77, 14, 50, 23, 8, 91, 36, 4, 70, 19, 55]  # 20 tokens
STEPS = 8


def _family(name: str):
    """(model class, config, GGUF architecture) of one family."""
    if name == "llama3":
        return transformers.LlamaForCausalLM, transformers.LlamaConfig(
            **COMMON, max_position_embeddings=256, rope_theta=10000.0, rope_scaling=LLAMA3_ROPE,
            attention_bias=True, tie_word_embeddings=False), "llama"
    if name == "qwen2":  # a window that is configured but switched off must change nothing
        return transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
            **COMMON, max_position_embeddings=256, rope_theta=10000.0, use_sliding_window=False, sliding_window=8,
            tie_word_embeddings=False), "qwen2"
    if name == "qwen3":
        return transformers.Qwen3ForCausalLM, transformers.Qwen3Config(
            **COMMON, head_dim=32, max_position_embeddings=256, rope_theta=1000000.0, tie_word_embeddings=True), "qwen3"
    assert name == "mistral"
    return transformers.MistralForCausalLM, transformers.MistralConfig(
        **COMMON, max_position_embeddings=256, rope_theta=10000.0, sliding_window=8, tie_word_embeddings=False), "llama"


def _randomize(model: torch.nn.Module) -> None:
    """Random biases and norms (HF initialises them to 0 and 1), so a mistake in any of them shows."""
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight"):
                param.normal_(1.0, 0.2)
            elif param.ndim == 1:
                param.normal_(0.0, 0.5)
            else:  # larger than HF's 0.02, so attention is far from uniform and RoPE/windows matter
                param.normal_(0.0, 0.15)


@pytest.fixture(scope="module", params=["llama3", "qwen2", "qwen3", "mistral"])
def family(request, tmp_path_factory):
    """(name, transformers model, HF folder, GGUF file, transformers' greedy tokens and their logits)."""
    model_cls, config, arch = _family(request.param)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    _randomize(model)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    gguf_file = write_gguf(model, folder.parent / f"{request.param}.gguf", arch)
    with torch.inference_mode(), single_torch_thread():
        prompt_logits = model(torch.tensor([PROMPT])).logits[0]
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(PROMPT):].tolist()
    step_logits = torch.cat([step[0:1] for step in out.logits]).float()
    return request.param, model, folder, gguf_file, tokens, prompt_logits.float(), step_logits


def _check_single_process(path, tokens, prompt_logits, step_logits):
    ckpt = open_checkpoint(path)
    ours = LlamaModel(ckpt.config, ckpt.tensor, set(ckpt.names()))
    cache = ours.new_cache()
    with single_torch_thread():
        torch.testing.assert_close(ours.forward(PROMPT, cache, 0), prompt_logits, rtol=0, atol=1e-4)
        steps = list(ours.generate(PROMPT, STEPS, lambda logits: int(logits.argmax())))
    assert [t for t, _ in steps] == tokens
    torch.testing.assert_close(torch.stack([logits for _, logits in steps]), step_logits, rtol=0, atol=1e-4)
    return ckpt


def test_hf_folder_matches_transformers(family):
    name, model, folder, _, tokens, prompt_logits, step_logits = family
    ckpt = _check_single_process(folder, tokens, prompt_logits, step_logits)
    cfg = ckpt.config
    assert cfg.qk_norm == (name == "qwen3")
    assert cfg.sliding_window == (8 if name == "mistral" else None)
    assert cfg.head_dim == (32 if name == "qwen3" else 16)
    assert set(ckpt.names()) == set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())


def test_gguf_file_matches_transformers(family):
    name, model, folder, gguf_file, tokens, prompt_logits, step_logits = family
    ckpt = _check_single_process(gguf_file, tokens, prompt_logits, step_logits)
    hf = open_checkpoint(folder)
    cfg = ckpt.config
    assert (cfg.head_dim, cfg.vocab_size, cfg.qk_norm, cfg.sliding_window, cfg.tie_word_embeddings) == (
        hf.config.head_dim, hf.config.vocab_size, hf.config.qk_norm, hf.config.sliding_window,
        hf.config.tie_word_embeddings)
    assert (cfg.rope_freq_factors is not None) == (name == "llama3")
    for tensor in hf.names():  # the un-permuted q/k (and their biases) equal HF's exactly
        assert torch.equal(ckpt.tensor(tensor), hf.tensor(tensor)), tensor


def test_two_shard_tensor_parallel_gives_transformers_tokens(family, tmp_path):
    """From the GGUF file (where the llama3 factors live): manifest, two executors, the hub."""
    _, _, _, gguf_file, tokens, prompt_logits, _ = family
    ckpt = open_checkpoint(gguf_file)
    manifest = write_shards(ckpt, plan_shards(ckpt.config, [1.0, 1.0]), tmp_path)
    assert LlamaConfig.from_dict(json.loads(json.dumps(manifest.data["config"]))) == ckpt.config
    config = {"model": manifest.data["config"], "n_layers": ckpt.config.num_layers}
    executors = [TensorParallelExecutor({**config, "rank": r}, manifest.node_files(r)) for r in range(2)]
    assert [e.n_kv_heads for e in executors] == [1, 1]
    hub = TensorParallelHub.from_file(ckpt.config, manifest.coordinator_file)

    def reduce(op, layer, x, position):
        return sum(e.forward(op, layer, position, "s", [x])[0] for e in executors)

    with single_torch_thread():
        logits = hub.forward(PROMPT, 0, reduce)
        torch.testing.assert_close(logits, prompt_logits, rtol=0, atol=1e-4)
        got, position = [int(logits[-1].argmax())], len(PROMPT)
        while len(got) < STEPS:
            got.append(int(hub.forward([got[-1]], position, reduce, last_only=True)[-1].argmax()))
            position += 1
    assert got == tokens


def test_qwen2_with_every_layer_sliding_matches_transformers(tmp_path):
    """use_sliding_window with max_window_layers=0: every layer slides, as in transformers."""
    config = transformers.Qwen2Config(**COMMON, max_position_embeddings=256, use_sliding_window=True,
                                      sliding_window=6, max_window_layers=0)
    torch.manual_seed(1)
    model = transformers.Qwen2ForCausalLM(config).eval()
    _randomize(model)
    model.save_pretrained(tmp_path, safe_serialization=True)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.config.sliding_window == 6
    ours = LlamaModel(ckpt.config, ckpt.tensor, set(ckpt.names()))
    with torch.inference_mode(), single_torch_thread():
        theirs = model(torch.tensor([PROMPT])).logits[0]
        cache = ours.new_cache()  # chunked prefill + decode over a cache longer than the window
        got = torch.cat([ours.forward(PROMPT[:7], cache, 0), ours.forward(PROMPT[7:9], cache, 7)]
                        + [ours.forward(PROMPT[i:i + 1], cache, i) for i in range(9, len(PROMPT))])
    torch.testing.assert_close(got, theirs, rtol=0, atol=1e-4)


def test_sliding_window_attention_equals_an_explicit_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(4, 5, 8), torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    window = 4
    expected = []
    for t in range(5):  # query t is absolute position 7 + t and sees keys 7+t-3 .. 7+t
        position = 7 + t
        keys, values = k[:, position - window + 1:position + 1], v[:, position - window + 1:position + 1]
        scores = q[:, t:t + 1].reshape(2, 2, 8) @ keys.transpose(1, 2) * 8**-0.5
        expected.append((torch.softmax(scores, -1) @ values).reshape(4, 1, 8))
    torch.testing.assert_close(grouped_attention(q, k, v, window), torch.cat(expected, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(grouped_attention(q[:, -1:], k, v, window), expected[-1], rtol=0, atol=1e-6)
    assert torch.equal(grouped_attention(q, k, v, 100), grouped_attention(q, k, v))


def test_llama3_gguf_factors_reproduce_the_hf_frequencies():
    from edgeweave.runtime.llama import rope_inverse_frequencies

    config = transformers.LlamaConfig(**COMMON, rope_theta=10000.0, rope_scaling=LLAMA3_ROPE)
    factors = llama3_rope_factors(config)
    assert len(set(factors.tolist())) > 2  # scaled, unscaled and smoothed frequencies all occur
    plain = rope_inverse_frequencies(16, 10000.0, None, factors.tolist())
    torch.testing.assert_close(plain, rope_inverse_frequencies(16, 10000.0, LLAMA3_ROPE), rtol=1e-6, atol=0)
    cfg = LlamaConfig(vocab_size=8, hidden_size=64, intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=16, rope_freq_factors=tuple(factors.tolist()), sliding_window=8, qk_norm=True)
    assert LlamaConfig.from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg


BASE = {"model_type": "llama", "vocab_size": 16, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize(("change", "message"), [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "'dynamic' is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial rotary"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}},
     "per-layer-type rope_parameters"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
     "mix sliding-window and full-attention layers"),
    ({"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 8,
      "layer_types": ["full_attention", "sliding_attention"]}, "mix sliding-window"),
    ({"model_type": "gemma3"}, "'gemma3' is not supported"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "pre-quantized \\(gptq\\)"),
])
def test_unsupported_hf_configs_are_refused_with_a_sentence(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **change}))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path)


def test_supported_window_settings():
    # Qwen2.5 ships sliding_window with use_sliding_window false: full attention, not refused
    qwen = {**BASE, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 131072,
            "max_window_layers": 28}
    assert config_from_hf(qwen).sliding_window is None
    # use_sliding_window, but max_window_layers covers every layer: no layer slides (as transformers builds it)
    assert config_from_hf({**qwen, "use_sliding_window": True}).sliding_window is None
    assert config_from_hf({**BASE, "model_type": "mistral", "sliding_window": 4096}).sliding_window == 4096
    assert config_from_hf({**BASE, "model_type": "mistral", "sliding_window": None}).sliding_window is None
    assert config_from_hf({**BASE, "model_type": "mistral"}).sliding_window == 4096  # transformers' default
    assert config_from_hf({**BASE, "sliding_window": 8}).sliding_window is None  # Llama has none
    assert config_from_hf({**BASE, "model_type": "qwen3"}).head_dim == 128  # Qwen3Config's default


def _gguf(path, metadata, tensors=None):
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, (kind, value) in {"llama.block_count": ("uint32", 1), "llama.embedding_length": ("uint32", 64),
                               "llama.feed_forward_length": ("uint32", 96), "llama.attention.head_count": ("uint32", 4),
                               **metadata}.items():
        getattr(writer, f"add_{kind}")(key, value)
    for name, array in (tensors or {"token_embd.weight": np.zeros((16, 64), np.float32)}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("metadata", "tensors", "message"), [
    ({"llama.rope.scaling.type": ("string", "yarn")}, None, "'yarn' RoPE scaling, which is not supported"),
    ({"llama.rope.dimension_count": ("uint32", 8)}, None, "partial RoPE"),
    ({"llama.expert_count": ("uint32", 8)}, None, "mixture-of-experts"),
    ({"llama.attention.sliding_window": ("uint32", 8),
      "llama.attention.sliding_window_pattern": ("array", [True, False])}, None, "mixes sliding-window"),
    ({}, {"token_embd.weight": np.zeros((16, 64), np.float32), "rope_freqs.weight": np.ones(5, np.float32)},
     "llama3 RoPE factors need 8 positive numbers"),
])
def test_unsupported_gguf_files_are_refused_with_a_sentence(tmp_path, metadata, tensors, message):
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(_gguf(tmp_path / "m.gguf", metadata, tensors))


def test_gguf_rope_freqs_are_read_not_refused(tmp_path):
    factors = np.linspace(1.0, 8.0, 8, dtype=np.float32)
    ckpt = open_checkpoint(_gguf(tmp_path / "m.gguf", {}, {"token_embd.weight": np.zeros((16, 64), np.float32),
                                                           "rope_freqs.weight": factors}))
    assert ckpt.config.rope_freq_factors == tuple(factors.tolist())
    assert ckpt.config.vocab_size == 16  # no tokenizer, no vocab_size: the embedding's rows
    assert "rope_freqs.weight" not in ckpt.names() and all(n.startswith("model.") for n in ckpt.names())
