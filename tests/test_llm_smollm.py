"""SmolLM2 end to end in one process: GGUF reader, tokenizer, reference model, sharded executors.

Every expectation comes from HF transformers loading the same GGUF file (see llm_reference).
"""

from __future__ import annotations

import pytest
import torch
from llm_reference import CHAT, hf_model, hf_reference, hf_tokenizer, single_torch_thread, smollm, smollm_in_memory

from edgeweave.runtime.llama import LlamaModel
from edgeweave.runtime.sampling import Sampler, SamplingParams
from edgeweave.runtime.tp_executor import TensorParallelExecutor
from edgeweave.runtime.tp_hub import TensorParallelHub
from edgeweave.splitting.tensor_parallel import Manifest, plan_shards, write_shards
from edgeweave.splitting.tokenizer import Tokenizer

pytestmark = [pytest.mark.llm, pytest.mark.slow]

TEXTS = [
    "Hello world",
    "  leading spaces,   runs of spaces\n\n\ttabs and newlines\r\n",
    "digits 1234567890 and 3.14159, 1e-5",
    "héllo wörld — naïve café ✓ 日本語のテキスト 🤖👍🏽",
    "<|im_start|>user\ncode: def f(x): return x**2<|im_end|>",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def reference_model() -> LlamaModel:
    ckpt = smollm_in_memory()
    return LlamaModel(ckpt.config, ckpt.tensor, set(ckpt.names()))


@pytest.fixture(scope="module")
def reference_logits(reference_model) -> torch.Tensor:
    """Our single-process logits over prompt + HF's 32 tokens, in one prefill."""
    ref = hf_reference()
    return reference_model.forward(ref.prompt_ids + ref.tokens, reference_model.new_cache(), 0)


def test_gguf_tensors_equal_transformers_state_dict():
    ckpt, state = smollm_in_memory(), hf_model().state_dict()
    expected = {k for k in state if k != "lm_head.weight"}  # tied: lm_head is embed_tokens
    assert set(ckpt.names()) == expected
    assert ckpt.config.tie_word_embeddings
    for name in ckpt.names():
        ours = ckpt.tensor(name)
        assert ours.shape == state[name].shape, name
        torch.testing.assert_close(ours, state[name].float(), rtol=0, atol=1e-6, msg=name)


def test_tokenizer_matches_transformers():
    ours, theirs = Tokenizer.from_checkpoint(smollm()), hf_tokenizer()
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=True).input_ids, text
        assert ours.decode(ids) == theirs.decode(ids), text
    rendered = ours.render_chat(CHAT)
    assert rendered == theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert ours.encode_chat(CHAT) == hf_reference().prompt_ids
    assert ours.eos_token_ids == (theirs.eos_token_id,)


def test_incremental_decoding_emits_whole_characters():
    tok = Tokenizer.from_checkpoint(smollm())
    text = TEXTS[3]
    decoder = tok.stream_decoder()
    pieces = [decoder.feed(i) for i in tok.encode(text)]
    assert "".join(pieces) + decoder.flush() == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # some emoji/CJK bytes span tokens and were held back


def test_reference_model_matches_transformers(reference_model):
    ref = hf_reference()
    greedy = Sampler(SamplingParams(temperature=0.0))
    generated = reference_model.generate(ref.prompt_ids, len(ref.tokens), greedy)
    tokens, last_logits = [], None
    for token, logits in generated:
        tokens.append(token)
        last_logits = logits
    assert tokens == ref.tokens
    # the logits that chose the last token, from the incremental (KV-cached) path
    torch.testing.assert_close(last_logits, ref.logits[-2], rtol=0, atol=1e-3)


def test_reference_prefill_matches_transformers(reference_logits):
    """One prefill over the whole sequence: every position within 1e-3 of transformers."""
    torch.testing.assert_close(reference_logits, hf_reference().logits, rtol=0, atol=1e-3)


@pytest.mark.parametrize("weights", [[1.0], [2.0, 1.0], [1.0, 1.0, 1.0], [3.0, 1.0]])
def test_sharded_executors_equal_reference(reference_logits, tmp_path, weights):
    """Prefill, a multi-token chunk at position > 0, then decode, summing partials like the hub does."""
    ckpt, ref = smollm_in_memory(), hf_reference()
    plan = plan_shards(ckpt.config, weights)
    manifest = write_shards(ckpt, plan, tmp_path)
    executors = [
        TensorParallelExecutor(
            {"model": manifest.data["config"], "rank": r, "n_layers": ckpt.config.num_layers, "window": None},
            manifest.node_files(r),
        )
        for r in range(len(weights))
    ]
    assert [e.n_kv_heads for e in executors] == [s.n_kv_heads for s in plan.shards]
    hub = TensorParallelHub.from_file(ckpt.config, manifest.coordinator_file)

    def reduce(op, layer, x, position):
        return sum(e.forward(op, layer, position, "s", [x])[0] for e in executors)

    sequence = ref.prompt_ids + ref.tokens
    p = len(ref.prompt_ids)
    expected = reference_logits
    got = torch.cat([
        hub.forward(sequence[:p], 0, reduce),
        hub.forward(sequence[p:-1], p, reduce),
        hub.forward(sequence[-1:], len(sequence) - 1, reduce),
    ])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert got[p - 1 : -1].argmax(-1).tolist() == ref.tokens
    stats = executors[0].stats()
    assert stats["sessions"] == {"s": len(sequence)} and stats["tokens_computed"] == len(sequence)


def test_write_shards_round_trip_and_reuse(tmp_path):
    ckpt = smollm_in_memory()
    plan = plan_shards(ckpt.config, [2.0, 1.0])
    calls = []
    manifest = write_shards(ckpt, plan, tmp_path, dtype="bfloat16", progress=lambda d, t, _: calls.append((d, t)))
    assert calls[-1] == (ckpt.config.num_layers + 1, ckpt.config.num_layers + 1)
    assert manifest.verify()
    loaded = Manifest.load(tmp_path)
    assert loaded.plan_id == plan.plan_id and loaded.dtype == "bfloat16" and loaded.config == ckpt.config
    from safetensors import safe_open

    hd, i = ckpt.config.head_dim, 7
    with safe_open(str(manifest.node_files(1)[f"layer.{i:03d}"]), framework="pt") as f:
        wk, w_down = f.get_tensor("wk"), f.get_tensor("w_down")
    kv0, kv1 = plan.shards[1].kv_heads
    c0, c1 = plan.shards[1].columns
    full_k = ckpt.tensor(f"model.layers.{i}.self_attn.k_proj.weight")
    full_down = ckpt.tensor(f"model.layers.{i}.mlp.down_proj.weight")
    assert wk.dtype == torch.bfloat16
    assert torch.equal(wk, full_k[kv0 * hd : kv1 * hd].to(torch.bfloat16))
    assert torch.equal(w_down, full_down[:, c0:c1].to(torch.bfloat16))
    stamp = manifest.node_files(0)["layer.000"].stat().st_mtime_ns
    write_shards(ckpt, plan, tmp_path, dtype="bfloat16")  # same checkpoint, plan, dtype: nothing rewritten
    assert manifest.node_files(0)["layer.000"].stat().st_mtime_ns == stamp
