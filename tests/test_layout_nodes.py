"""Layout planning against real node processes: the per-layer Profile, its refusals, the link probe,
and `edgeweave plan --peer ... --json` listing every candidate with its prediction and the choice."""

from __future__ import annotations

import json
import math

import pytest
from llm_reference import local_cluster_fixture

from edgeweave.coordinator.client import NodeClient, NodeError
from edgeweave.coordinator.layout_choice import layer_shape_message
from edgeweave.coordinator.link_probe import EchoReductions, probe_link
from edgeweave.proto import pb
from edgeweave.runtime.memory_budget import held_layer_bytes
from edgeweave.splitting.llama_config import LlamaConfig
from edgeweave.splitting.quant_plan import TensorLayout
from edgeweave.splitting.random_llama import write_random_llama
from edgeweave.splitting.tensor_parallel import plan_shards

pytestmark = pytest.mark.slow
cluster = local_cluster_fixture(2)
#: SmolLM2-135M's layer shape and its GGUF's Q4_1 projections (no 100 MB file parsed for a shape)
SMOL = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                   num_kv_heads=3, head_dim=64, tie_word_embeddings=True, max_position_embeddings=8192)
Q4_1 = {kind: TensorLayout("Q4_1", 4, 32, True) for kind in ("q", "k", "v", "o", "gate", "up", "down")}


@pytest.fixture(scope="module")
def clients(cluster):
    made = [NodeClient(address) for address in cluster.addresses]
    yield made
    for client in made:
        client.close()


@pytest.fixture(scope="module")
def smol_shape():
    return SMOL, Q4_1, layer_shape_message(SMOL, Q4_1)


def test_a_layer_profile_answers_sane_numbers_and_leaves_nothing_behind(clients, smol_shape, cluster):
    config, layouts, shape = smol_shape
    client = clients[0]
    first = client.profile(budget_s=0.3, layer=shape, prompt_tokens=32)
    rss = client.health().rss
    reply = client.profile(budget_s=0.3, layer=shape, prompt_tokens=32)
    assert client.health().rss - rss < 16 << 20  # the synthetic layer, its KV caches and ORT sessions are freed
    assert client.info().jobs == [] and not list((cluster.base_dir / cluster.names[0]).rglob(".layer-profile-*"))
    for r in (first, reply):
        assert 1e-5 < r.layer_decode_s < 0.5 and r.layer_decode_s < r.layer_prefill_s < 5.0
        assert (r.prompt_tokens, r.kv_tokens, r.layer_kernel) == (32, 32, "ort") and r.layer_runs >= 6
        assert 1 <= r.layer_ring <= 8  # copies of the layer cycled through, past the CPU caches
        assert r.matmul_gflops > 0 and r.disk_read_mbps > 0  # the micro-benchmarks still run alongside
        ops = (r.layer_attn_decode_s, r.layer_mlp_decode_s, r.shard_attn_decode_s, r.shard_mlp_decode_s)
        # each op is a fraction of a decode step; bounded like the whole layer's decode, not by the prefill
        # (one noisy sample of an op can outlast a 32-token prefill on a loaded 2-core machine)
        assert all(0 < t < 0.5 for t in ops) and r.shard_mlp_columns == 32
    # the file of the whole layer is the plan's layer (Q4_1 blocks) plus a safetensors header
    planned = plan_shards(config, [1.0], layouts).layer_bytes(0)
    assert planned <= reply.layer_file_bytes < planned + 8192
    assert reply.layer_held_bytes == held_layer_bytes([reply.layer_file_bytes], "ort")[0][0]
    assert reply.layer_profile_s < 3.0
    floats = client.profile(budget_s=0.2, layer=layer_shape_message(config, None), prompt_tokens=8)
    assert floats.layer_kernel == "float" and floats.layer_file_bytes >= 4 * config.layer_parameter_count() - 8 * 576


@pytest.mark.parametrize(("change", "sentence"), [
    ({"n_kv_heads": 4}, "n_q_heads (9) must be a multiple of n_kv_heads (4)"),
    ({"hidden": 0}, "layer shape hidden must be between 1 and 32768, not 0"),
    ({"head_dim": 63}, "head_dim must be even"),
    ({"projections": [pb.ProjectionLayout(kind="q", bits=3, block=32)]}, "projection q: bits must be 4 or 8"),
    ({"projections": [pb.ProjectionLayout(kind="down", bits=4, block=100)]}, "block 100 must be a power of two"),
    ({"projections": [pb.ProjectionLayout(kind="lm_head", bits=4, block=32)]}, "unknown projection 'lm_head'"),
    ({"hidden": 32768, "intermediate": 131072}, "more than the"),
])
def test_a_bad_layer_shape_is_invalid_argument_with_a_sentence(clients, smol_shape, change, sentence):
    config, _, _ = smol_shape
    fields = {"hidden": config.hidden_size, "intermediate": config.intermediate_size, "n_q_heads": config.num_heads,
              "n_kv_heads": config.num_kv_heads, "head_dim": config.head_dim, **change}
    with pytest.raises(NodeError) as refused:
        clients[1].profile(budget_s=0.1, layer=pb.LayerShape(**fields))
    assert refused.value.code.name == "INVALID_ARGUMENT" and sentence in refused.value.message


def test_a_bad_backend_or_prompt_is_refused(clients, smol_shape):
    _, _, shape = smol_shape
    with pytest.raises(NodeError, match="matmul backend must be one of ort, torch, not 'cuda'"):
        clients[1].profile(budget_s=0.1, layer=shape, backend="cuda")
    with pytest.raises(NodeError, match="prompt_tokens must be between 1 and 8192, not 9000"):
        clients[1].profile(budget_s=0.1, layer=shape, prompt_tokens=9000)


def test_a_profile_times_the_shards_asked_in_order_on_rings(clients, smol_shape, cluster):
    _, _, shape = smol_shape
    reply = clients[0].profile(budget_s=0.3, layer=shape, prompt_tokens=16, shards=[(2, 768), (1, 0), (0, 32)])
    got = [(t.n_kv_heads, t.mlp_columns) for t in reply.shard_timings]
    assert got == [(2, 768), (1, 0), (0, 32)]
    two, heads_only, columns_only = reply.shard_timings
    assert 0 < two.attn_decode_s < 0.5 and 0 < two.mlp_decode_s < 0.5
    assert heads_only.attn_decode_s > 0 and heads_only.mlp_decode_s == 0  # no columns: not timed
    assert columns_only.attn_decode_s == 0 and columns_only.mlp_decode_s > 0
    assert clients[0].info().jobs == [] and not list((cluster.base_dir / cluster.names[0]).rglob(".layer-profile-*"))


@pytest.mark.parametrize(("shards", "sentence"), [
    ([(4, 768)], "a shard of 4 KV heads and 768 MLP columns is not a share of a layer with 3 KV heads"),
    ([(0, 0)], "a shard of 0 KV heads and 0 MLP columns"),
    ([(1, 100)], "block 32 must be a power of two >= 16 that divides its 100 input columns"),
    ([(1, 32)] * 9, "a profile times at most 8 shards, not 9"),
])
def test_a_bad_shard_to_profile_is_refused_with_a_sentence(clients, smol_shape, shards, sentence):
    _, _, shape = smol_shape
    with pytest.raises(NodeError) as refused:
        clients[1].profile(budget_s=0.1, layer=shape, shards=shards)
    assert refused.value.code.name == "INVALID_ARGUMENT" and sentence in refused.value.message


def test_the_link_probe_times_the_data_plane_and_unloads_its_echo_job(clients):
    link = probe_link(clients[0], 576, budget_s=0.3)
    assert link.transport == "tcp" and 1e-6 < link.rtt_s < 0.05 and link.round_trips >= 5
    assert link.bandwidth_Bps > 1e6 and link.bulk_bytes >= 256 << 10
    assert clients[0].info().jobs == []


def test_a_timed_reduction_waits_for_its_busiest_rank_and_unloads_its_echo_jobs(clients):
    with EchoReductions(clients, 576) as echoes:
        plain = echoes.median_s([0, 1], None, budget_s=0.1)
        busy = echoes.median_s([0, 1], [0.03, 0.005], budget_s=0.2)
        one = echoes.median_s([1], [0.01], budget_s=0.1)
    assert plain < 0.03 and 0.03 <= busy < 0.03 + plain + 0.05 and 0.01 <= one < 0.06
    assert all(c.info().jobs == [] for c in clients)
    with EchoReductions(clients[:1], 576) as echoes, pytest.raises(NodeError, match="0 to 1.0 s"):
        echoes.median_s([0], [5.0])


def test_plan_json_lists_every_candidate_with_predictions_and_the_choice(cluster, tmp_path):
    from typer.testing import CliRunner

    from edgeweave.cli import app

    model = write_random_llama(tmp_path / "tiny", "tiny")  # a float HF checkpoint, read in no time
    peers = [arg for address in cluster.addresses for arg in ("--peer", address)]
    result = CliRunner().invoke(app, ["plan", str(model), *peers, "--json", "--profile-seconds", "0.2",
                                      "--prompt-tokens", "16", "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output[-3000:]
    report = json.loads(result.stdout)
    measured = report["measured"]["nodes"]
    assert [n["address"] for n in measured] == list(cluster.addresses)
    assert all(n["layer_decode_ms"] > 0 and n["rtt_ms"] > 0 and n["transport"] == "tcp" for n in measured)
    assert report["measured"]["coordinator"]["head_ms"] > 0
    # tensor x2's two decode reductions, each timed with both ranks busy (never below the model's)
    reductions = report["measured"]["reductions"]
    assert sorted(r["op"] for r in reductions) == ["attn", "mlp"]
    assert all(r["nodes"] == sorted(cluster.addresses) and r["extra_ms"] >= 0 for r in reductions)
    kinds = sorted((c["kind"], c["node_indexes"]) for c in report["candidates"])
    assert kinds == [("pipeline", [0, 1]), ("single", [0]), ("single", [1]), ("tensor", [0, 1])]
    for c in report["candidates"]:
        assert c["fits"] and math.isfinite(c["decode_ms"]) and c["decode_ms"] > 0
        assert c["first_token_ms"] > c["decode_ms"] * 0.5 and len(c["weights"]) == len(c["nodes"])
    choice = report["candidates"][report["choice"]]
    assert choice["decode_ms"] <= min(c["decode_ms"] for c in report["candidates"]) * 1.02 + 1e-9
