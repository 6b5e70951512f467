"""Quantized shards end to end: the shipped Q4_1 SmolLM2 kept 4-bit from the GGUF file to the node's
matmul, cut on block boundaries, against the single-process quantized reference (same kernels,
same weights) and against float32 (agreement, perplexity).
"""

from __future__ import annotations

import math
import subprocess
import sys
from functools import lru_cache

import gguf
import numpy as np
import pytest
import torch

from edgeweave.coordinator.cli_demo import DEMO_QUESTION
from edgeweave.runtime.layer_compute import FloatMatmuls, matmuls_factory
from edgeweave.runtime.quantized import QuantizationError, packed_weight
from edgeweave.runtime.tp_executor import TensorParallelExecutor
from edgeweave.runtime.tp_hub import TensorParallelHub
from edgeweave.splitting.checkpoints import CheckpointError, open_checkpoint
from edgeweave.splitting.gguf_quants import quantize
from edgeweave.splitting.tensor_parallel import layer_layouts, plan_shards, write_shards

pytestmark = pytest.mark.llm
N_TOKENS = 32
LOGIT_ATOL = 2e-3  # sums of partials in another order; the int8 activation blocks are the same


@lru_cache(maxsize=1)
def smollm():
    return open_checkpoint()


@lru_cache(maxsize=1)
def prompt_ids() -> list[int]:
    from edgeweave.splitting.tokenizer import Tokenizer

    return Tokenizer.from_checkpoint(smollm()).encode_chat([{"role": "user", "content": DEMO_QUESTION}])


class InProcess:
    """A plan's executors in this process, driven by the hub as the coordinator drives nodes."""

    def __init__(self, root, weights, quantize_=None, window=None, backend="ort"):
        ck = smollm()
        layouts = None if quantize_ == "none" else layer_layouts(ck, quantize_)
        self.plan = plan_shards(ck.config, weights, layouts, quantize_ or "file")
        self.manifest = write_shards(ck, self.plan, root)
        cfg = self.manifest.data["config"]
        self.executors = [
            TensorParallelExecutor({"model": cfg, "n_layers": cfg["num_layers"], "rank": r, "window": window,
                                    "threads": 1, "backend": backend},
                                   {k: self.manifest.path(v) for k, v in self.manifest.shard_files(r).items()})
            for r in range(len(weights))
        ]
        self.hub = TensorParallelHub.from_file(ck.config, self.manifest.coordinator_file, 1)

    def logits(self, ids, position, session="s", last_only=False):
        if len(self.executors) == 1 and self.executors[0].norms is not None:
            def stack(x, pos):
                return self.executors[0].forward("layers", 0, pos, session, [x])[0]

            return self.hub.forward(ids, position, stack=stack, last_only=last_only)

        def reduce(op, layer, x, pos):
            return sum(e.forward(op, layer, pos, session, [x])[0] for e in self.executors)

        return self.hub.forward(ids, position, reduce, last_only=last_only)

    def greedy(self, n=N_TOKENS):
        ids, out, rows = prompt_ids(), [], []
        logits = self.logits(ids, 0, last_only=True)[-1]
        position = len(ids)
        for _ in range(n):
            rows.append(logits)
            token = int(logits.argmax())
            out.append(token)
            logits = self.logits([token], position, last_only=True)[-1]
            position += 1
        for e in self.executors:
            e.forward("reset", 0, 0, "s", [])
        return out, torch.stack(rows)

    def close(self):
        for e in self.executors:
            e.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process quantized reference: one rank holding everything, resident, same kernels."""
    ref = InProcess(tmp_path_factory.mktemp("q-ref"), [1.0])
    tokens, logits = ref.greedy()
    yield ref, tokens, logits
    ref.close()


def test_shipped_q4_1_stays_4_bit_exactly(reference):
    ref, tokens, _ = reference
    rows = {row["tensor"]: row for row in ref.manifest.data["layouts"]}
    assert rows["mlp.down_proj"]["source"] == "Q4_1" and rows["mlp.down_proj"]["layout"].startswith("4-bit/32")
    assert "exact" in rows["self_attn.q_proj"]["layout"] and rows["model.embed_tokens"]["source"] == "Q8_0"
    shard_bytes = ref.manifest.data["describe"][0]["bytes"]
    assert shard_bytes < 95e6, f"{shard_bytes / 1e6:.0f} MB of shards for a 98 MB file"  # float32 was ~425 MB
    assert ref.executors[0].details()["quantized"]
    from edgeweave.splitting.tokenizer import Tokenizer

    assert Tokenizer.from_checkpoint(smollm()).decode(tokens).startswith("The capital of France is Paris.")


def test_exact_layout_equals_the_files_dequantized_weights():
    """The shard holds the file's Q4_1 blocks exactly (q/k rows un-permuted like the float reader)."""
    ck = smollm()
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"):
        torch.testing.assert_close(ck.block_quantized(name).dequantize(), ck.tensor(name), rtol=0, atol=1e-6)


@pytest.mark.parametrize("weights", [[1.0, 1.0], [2.0, 1.0], [1.0, 1.0, 1.0]])
def test_quantized_cuts_agree_with_the_one_rank_reference(reference, tmp_path, weights):
    """Even and uneven cuts (3 KV heads over 2 nodes; 3 nodes), on block boundaries. The kernels quantize
    activations to int8 per 32-block, so partial sums that differ in their last float bits can round
    a block differently; cuts are compared teacher-forced on the reference's tokens: top-1 agreement."""
    ref, ref_tokens, _ = reference
    run = InProcess(tmp_path, weights)
    try:
        assert all(s.columns[0] % 32 == 0 for s in run.plan.shards), "cuts must fall on block boundaries"
        sequence = prompt_ids() + ref_tokens
        start = len(prompt_ids()) - 1
        ours, theirs = run.logits(sequence, 0, "tf")[start:], ref.logits(sequence, 0, "tf")[start:]
        for r in (run, ref):
            for e in r.executors:
                e.forward("reset", 0, 0, "tf", [])
    finally:
        run.close()
    agreement = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    assert agreement >= 0.9, agreement


@pytest.mark.slow
def test_windowed_quantized_run_equals_resident(reference, tmp_path):
    """A sliding window over quantized layers changes what is resident, never the math: same tokens and logits."""
    _, ref_tokens, ref_logits = reference
    run = InProcess(tmp_path, [1.0], window=3)
    try:
        tokens, logits = run.greedy()
        stats = run.executors[0].store.stats()
        assert run.executors[0].window == 3 and stats["loads"] > 30
    finally:
        run.close()
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_quantized_run_on_real_nodes_equals_in_process_plan(local_node, tmp_path):
    """A real node process plus the coordinator's share give exactly the tokens (and logits) of the same
    plan computed in one process with the same kernels and weights: the wire changes nothing."""
    from edgeweave.coordinator.client import NodeClient
    from edgeweave.coordinator.local_member import LocalMember
    from edgeweave.coordinator.tp_driver import DistributedLlama
    from edgeweave.runtime.sampling import SamplingParams

    same_plan = InProcess(tmp_path / "in-process", [2.0, 1.0])
    want_tokens, want_logits = same_plan.greedy()
    same_plan.close()
    logits: list[torch.Tensor] = []
    with NodeClient(local_node.addresses[0]) as client, LocalMember() as local, DistributedLlama(
        smollm(), [client, local], [2.0, 1.0], cache_dir=tmp_path / "cache", hub_threads=1
    ) as llm:
        assert llm.plan.plan_id == same_plan.plan.plan_id and llm.manifest.data["precision"] == "file"
        tokens = list(llm.generate(prompt_ids(), N_TOKENS, SamplingParams(), logits_out=logits))
    assert tokens == want_tokens
    torch.testing.assert_close(torch.stack([row.reshape(-1) for row in logits]), want_logits, rtol=0, atol=1e-4)


def _perplexity_and_agreement(run, reference_run, ids):
    logits, ref = run.logits(ids, 0, session="ppl"), reference_run.logits(ids, 0, session="ppl")
    for r in (run, reference_run):
        for e in r.executors:
            e.forward("reset", 0, 0, "ppl", [])
    targets = torch.tensor(ids[1:])

    def ppl(x):
        return math.exp(torch.nn.functional.cross_entropy(x[:-1].float(), targets).item())

    agreement = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return ppl(logits), ppl(ref), agreement


@pytest.mark.slow
def test_quantized_agreement_and_perplexity_against_float32(reference, tmp_path):
    """Over 320 positions of English prose that ships with Python: the 4-bit file as is, and q8 from
    its float32 weights, against float32 (the same dequantized weights on F.linear)."""
    from pydoc_data.topics import topics

    from edgeweave.splitting.tokenizer import Tokenizer

    text = " ".join(topics[k] for k in sorted(topics)[:3])
    ids = Tokenizer.from_checkpoint(smollm()).encode(text)[:320]
    float32 = InProcess(tmp_path / "f32", [1.0], "none")
    q8 = InProcess(tmp_path / "q8", [1.0], "q8")
    try:
        for run, ppl_bound, agree_bound in ((reference[0], 0.02, 0.9), (q8, 0.01, 0.9)):
            ppl, ppl_ref, agreement = _perplexity_and_agreement(run, float32, ids)
            assert abs(ppl / ppl_ref - 1) < ppl_bound and agreement > agree_bound, (ppl, ppl_ref, agreement)
    finally:
        float32.close()
        q8.close()


def test_ort_and_torch_backends_agree_with_dequantized_float(tmp_path):
    """Both quantized backends compute what the float path computes on the dequantized weights."""
    ck = smollm()
    plan = plan_shards(ck.config, [1.0], layer_layouts(ck, None), "file")
    manifest = write_shards(ck, plan, tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(str(manifest.path("node0/layer.000.safetensors")))
    dense = {k: packed_weight(tensors, k).dequantize() for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}
    x = torch.randn(3, 576)
    want = FloatMatmuls(dense)
    for backend in ("ort", "torch"):
        got = matmuls_factory(backend)(tensors)
        for call in ("qkv", "mlp"):
            a, b = getattr(got, call)(x), getattr(want, call)(x)
            assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999, (backend, call)


def test_hf_checkpoint_quantized_q4_and_q8(tmp_path):
    """A float HF checkpoint quantized when its shards are written: 2 ranks equal 1 rank, token for token."""
    from edgeweave.splitting.llama_config import LlamaConfig
    from edgeweave.splitting.random_llama import write_random_llama

    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=32, tie_word_embeddings=False)
    folder = write_random_llama(tmp_path / "hf", config)
    ck = open_checkpoint(folder)
    ids = [5, 17, 3, 88, 42, 9, 61, 2]
    for precision in ("q4", "q8"):
        runs = []
        for weights in ([1.0], [1.0, 1.0]):
            plan = plan_shards(ck.config, weights, layer_layouts(ck, precision), precision)
            m = write_shards(ck, plan, tmp_path / f"{precision}-{len(weights)}")
            bits = {"q4": "4-bit", "q8": "8-bit"}[precision]
            assert any(row["layout"].startswith(bits) for row in m.data["layouts"])
            cfg = m.data["config"]
            exs = [TensorParallelExecutor({"model": cfg, "n_layers": cfg["num_layers"], "rank": r, "threads": 1},
                                          {k: m.path(v) for k, v in m.shard_files(r).items()}) for r in range(len(weights))]
            hub = TensorParallelHub.from_file(ck.config, m.coordinator_file)

            def reduce(op, layer, x, pos, exs=exs):
                return sum(e.forward(op, layer, pos, "s", [x])[0] for e in exs)

            runs.append(hub.forward(ids, 0, reduce))
        torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=LOGIT_ATOL)
        assert runs[1].argmax(-1).tolist() == runs[0].argmax(-1).tolist()


def test_quantize_keeps_error_within_half_a_step():
    w = torch.randn(64, 256)
    for bits in (4, 8):
        q = quantize(w, bits, 32)
        step = torch.from_numpy(q.scale).repeat_interleave(32, dim=1)
        assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_block_cut_that_cannot_be_made_is_refused():
    ck = smollm()
    with pytest.raises(QuantizationError, match="at most 48 nodes"):
        plan_shards(ck.config, [1.0] * 64, layer_layouts(ck, None), "file")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgeweave", *args], capture_output=True, text=True, timeout=120)


def test_bad_gguf_files_are_refused_in_one_sentence(tmp_path):
    """An unsupported tensor type, and a truncated file: a sentence and exit 2, never a traceback."""
    writer = gguf.GGUFWriter(str(tmp_path / "q2k.gguf"), "llama")
    for key, value in (("embedding_length", 256), ("block_count", 1), ("feed_forward_length", 512),
                       ("attention.head_count", 4), ("context_length", 64)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((300, 256), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(256, np.float32))
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q2_K][1]
    for name, (n, k) in {"attn_q": (256, 256), "attn_k": (256, 256), "attn_v": (256, 256), "attn_output": (256, 256),
                         "ffn_gate": (512, 256), "ffn_up": (512, 256), "ffn_down": (256, 512)}.items():
        writer.add_tensor(f"blk.0.{name}.weight", np.zeros((n, k // 256 * block), np.uint8), raw_shape=(n, k // 256 * block),
                          raw_dtype=gguf.GGMLQuantizationType.Q2_K)
    for name in ("attn_norm", "ffn_norm"):
        writer.add_tensor(f"blk.0.{name}.weight", np.ones(256, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = _cli("plan", str(tmp_path / "q2k.gguf"))
    assert result.returncode == 2 and "Q2_K is not supported" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr

    data = smollm().path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    result = _cli("plan", str(tmp_path / "cut.gguf"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    with pytest.raises(CheckpointError):
        open_checkpoint(tmp_path / "cut.gguf")


def test_ort_reads_the_weights_from_the_shard_file(reference):
    """A layer read from its shard file runs with ORT reading the packed weights from that file (ONNX
    external data, no copy through the graph; the offsets are re-centred, see `ort_quantized.centered`),
    and computes exactly what the copied graph computes."""
    from edgeweave.runtime.ort_quantized import OrtLinear, OrtQuantizedMatmuls
    from edgeweave.runtime.safetensors_read import read_safetensors

    manifest = reference[0].manifest
    tensors, _ = read_safetensors(manifest.path(manifest.shard_files(0)["layer.007"]))
    from_file, copied = OrtQuantizedMatmuls(tensors), OrtQuantizedMatmuls(dict(tensors))
    big = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith((".q", ".scale")))
    assert from_file.external_bytes == big and copied.external_bytes == 0
    x = torch.randn(2, 576)
    for call, arg in (("qkv", x), ("out", x[:, : from_file.n_q_rows]), ("mlp", x)):
        assert torch.equal(getattr(from_file, call)(arg), getattr(copied, call)(arg)), call
    hub, _ = read_safetensors(manifest.coordinator_file)
    head = OrtLinear(hub, "lm_head")
    assert head.external_bytes > 0.9 * hub["lm_head.q"].numel()
    assert torch.equal(head(x), OrtLinear(dict(hub), "lm_head")(x))
