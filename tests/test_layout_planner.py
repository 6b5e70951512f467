"""The layout planner's cost model on synthetic numbers: which layout wins where, memory limits,
the concrete layouts and weights it hands the driver, and where hybrid can (and cannot) win."""

from __future__ import annotations

import math

import pytest

from edgeweave.runtime.memory_budget import NODE_OVERHEAD_BYTES, kv_cache_bytes
from edgeweave.splitting.layout_planner import (
    ClusterCosts,
    HubCosts,
    NodeCosts,
    attention_fraction,
    hybrid_band,
    plan_layouts,
    profile_shares,
    reduction_probes,
    with_budgets,
)
from edgeweave.splitting.llama_config import LlamaConfig
from edgeweave.splitting.quant_plan import TensorLayout

MIB = 1 << 20
#: heads and columns that divide evenly over 2 and 4 nodes, so shares are exact
EVEN = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_layers=24, num_heads=8,
                   num_kv_heads=4, head_dim=32)
#: SmolLM2-135M's shape, Q4_1 projections as its GGUF ships them
SMOL = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                   num_kv_heads=3, head_dim=64, tie_word_embeddings=True, max_position_embeddings=8192)
Q4_1 = {kind: TensorLayout("Q4_1", 4, 32, True) for kind in ("q", "k", "v", "o", "gate", "up", "down")}


def node(name: str = "n", d: float = 1e-3, budget: int = 0, rtt: float = 100e-6, **kw) -> NodeCosts:
    return NodeCosts(name, d, kw.pop("prefill", d * 30), budget, rtt, **kw)


def costs(nodes, config=EVEN, layouts=None, hub=None, **kw) -> ClusterCosts:
    return ClusterCosts(config, layouts, tuple(nodes), hub or HubCosts(), **kw)


def by_layout(plan) -> dict[str, object]:
    return {(c.describe(), c.nodes): c for c in plan.candidates}


def test_single_node_prediction_is_round_trip_plus_layers_plus_head():
    hub = HubCosts(message_s=30e-6, token_s=2e-3, prefill_s=3e-3)
    n = node(d=1e-3, rtt=200e-6, bandwidth_Bps=1e8, prefill=20e-3)
    plan = plan_layouts(costs([n], hub=hub, prompt_tokens=64))
    (only,) = plan.candidates
    assert only.kind == "single" and only.fits and plan.choice is only
    assert only.decode_s == pytest.approx(2e-3 + 200e-6 + 24 * 1e-3)
    wire = 2 * 63 * 256 * 4 / 1e8  # the prompt's rows beyond the first, both ways
    assert only.first_token_s == pytest.approx(3e-3 + 200e-6 + wire + 24 * 20e-3)
    assert only.messages_per_token == 1


def test_at_near_zero_rtt_equal_nodes_choose_tensor_parallelism():
    hub = HubCosts(message_s=5e-6, reduction_s=2e-6)
    plan = plan_layouts(costs([node("a", rtt=10e-6), node("b", rtt=10e-6)], hub=hub))
    assert plan.choice.kind == "tensor" and plan.choice.nodes == (0, 1)
    assert plan.choice.weights == (1.0, 1.0)
    found = by_layout(plan)
    single = found[("single", (0,))]
    assert plan.choice.decode_s < 0.6 * single.decode_s  # half the compute, a little overhead
    assert plan.choice.messages_per_token == 2 * EVEN.num_layers


def test_at_high_rtt_pipeline_wins_when_no_node_holds_the_model():
    # each node holds about 2/3 of SmolLM2's layers: no single node, and 60 round trips of 20 ms kill tensor
    per_layer = SMOL.num_layers
    kv_all = kv_cache_bytes(per_layer, SMOL.num_kv_heads, SMOL.head_dim, 4096)
    budget = NODE_OVERHEAD_BYTES + int(kv_all * 0.7) + 50 * MIB
    nodes = [node(x, d=1.5e-3, budget=budget, rtt=20e-3, kernel="ort") for x in "ab"]
    plan = plan_layouts(costs(nodes, SMOL, Q4_1))
    assert plan.choice.kind == "pipeline", [(c.describe(), c.decode_s, c.reason) for c in plan.candidates]
    assert all(not c.fits and "missing" in c.reason for c in plan.candidates if c.kind == "single")
    tensor = next(c for c in plan.candidates if c.kind == "tensor")
    assert tensor.fits and tensor.decode_s > 10 * plan.choice.decode_s
    assert plan.choice.messages_per_token == 2


def test_at_high_rtt_a_node_that_holds_the_model_runs_it_alone():
    plan = plan_layouts(costs([node("a", rtt=20e-3), node("b", rtt=20e-3)]))
    assert plan.choice.kind == "single"
    pipeline = next(c for c in plan.candidates if c.kind == "pipeline")
    assert pipeline.decode_s == pytest.approx(plan.choice.decode_s + 20e-3)  # one more round trip, same compute


def test_a_node_too_small_for_the_model_forces_tensor_or_pipeline():
    # 512 tokens of SmolLM2's KV cache are 22.5 MiB over all layers; a windowed Q4_1 layer ~7.4 MiB
    roomy = NODE_OVERHEAD_BYTES + 40 * MIB
    plan = plan_layouts(costs([node("a", budget=roomy, kernel="ort")], SMOL, Q4_1, context=512))
    assert plan.choice.kind == "single" and plan.choice.windows[0] is not None  # alone it runs, windowed
    small = NODE_OVERHEAD_BYTES + 28 * MIB  # not the whole KV cache and a layer: never alone
    plan = plan_layouts(costs([node("a", budget=small, kernel="ort"), node("b", budget=small, kernel="ort")],
                              SMOL, Q4_1, hub=HubCosts(message_s=5e-6), context=512))
    singles = [c for c in plan.candidates if c.kind == "single"]
    assert all(not c.fits and "missing for even one layer" in c.reason for c in singles)
    assert singles[0].reason.startswith("node a: a memory budget of 428.00 MiB")
    assert plan.choice is not None and plan.choice.kind in ("tensor", "pipeline")
    assert all(w is not None for w in plan.choice.windows)  # both stream their layers
    far = [node("a", rtt=2e-3, kernel="ort"), node("b", rtt=2e-3, kernel="ort")]  # tensor's 60 round trips lose
    budgets = plan_layouts(with_budgets(costs(far, SMOL, Q4_1, context=512), [small, 0]))  # b: unlimited
    assert budgets.choice.kind == "single" and budgets.choice.nodes == (1,)


def test_windowed_layers_cost_their_disk_reads():
    layer_file = 2_764_800  # SmolLM2's Q4_1 layer (plan_shards' estimate)
    budget = NODE_OVERHEAD_BYTES + kv_cache_bytes(30, 3, 64, 512) + 20 * MIB  # a window of a few layers
    slow_disk = node("a", d=1e-3, budget=budget, rtt=0.0, disk_read_Bps=1e9 * 0.1, kernel="ort")
    (single,) = plan_layouts(costs([slow_disk], SMOL, Q4_1, context=512)).candidates
    assert single.fits and 1 <= single.windows[0] < 30
    assert single.decode_s == pytest.approx(30 * layer_file / 1e8)  # 27.6 ms read per layer > 1 ms compute
    resident = plan_layouts(costs([node("a", d=1e-3, rtt=0.0)], SMOL, Q4_1)).candidates[0]
    assert resident.windows == (None,) and resident.decode_s == pytest.approx(30e-3)


def test_a_slower_node_gets_fewer_layers_and_a_smaller_share():
    plan = plan_layouts(costs([node("fast", d=1e-3), node("slow", d=3e-3)]))
    found = by_layout(plan)
    pipeline = next(c for c in plan.candidates if c.kind == "pipeline")
    counts = [s.n_layers for s in pipeline.layout.stages]
    assert counts == [18, 6]  # 3:1
    tensor = next(c for c in plan.candidates if c.kind == "tensor")
    assert tensor.weights == pytest.approx((1.0, 1 / 3))
    assert found[("single", (0,))].decode_s < found[("single", (1,))].decode_s


def test_pipeline_layers_stay_within_what_each_node_holds():
    per_layer = 2_764_800 * 1.8 + kv_cache_bytes(1, 3, 64, 4096)  # held Q4_1 layer on ort + its KV cache
    fast_but_small = NODE_OVERHEAD_BYTES + int(per_layer * 5.5)  # 5 layers resident
    nodes = [node("a", d=1e-3, budget=fast_but_small, kernel="ort"), node("b", d=2e-3, kernel="ort")]
    pipeline = next(c for c in plan_layouts(costs(nodes, SMOL, Q4_1)).candidates if c.kind == "pipeline")
    assert pipeline.fits and [s.n_layers for s in pipeline.layout.stages] == [5, 25]
    assert pipeline.windows == (None, None)


def test_capacities_given_replace_measured_speeds():
    plan = plan_layouts(costs([node("a"), node("b")]), capacities=[1.0, 3.0])
    pipeline = next(c for c in plan.candidates if c.kind == "pipeline")
    assert [s.n_layers for s in pipeline.layout.stages] == [6, 18]
    with pytest.raises(ValueError, match="one positive capacity per node"):
        plan_layouts(costs([node("a"), node("b")]), capacities=[1.0])


def test_every_candidate_carries_a_concrete_layout_and_weights():
    nodes = [node(str(i), d=1e-3 * (1 + i / 10)) for i in range(4)]
    plan = plan_layouts(costs(nodes))
    kinds = {c.kind for c in plan.candidates}
    assert kinds == {"single", "tensor", "pipeline", "hybrid"}
    for c in plan.candidates:
        c.layout.check(EVEN.num_layers, len(c.nodes))
        assert len(c.weights) == len(c.nodes) and all(w > 0 for w in c.weights)
        assert c.fits and math.isfinite(c.decode_s) and math.isfinite(c.first_token_s)
    subsets = {c.nodes for c in plan.candidates if c.kind == "tensor"}
    assert subsets == {(0, 1, 2, 3), (1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2)}
    assert plan.to_dict(["a", "b", "c", "d"])["choice"] == plan.candidates.index(plan.choice)


def test_ties_go_to_the_simpler_layout():
    # at zero RTT a pipeline costs exactly what one node does; tensor's extra messages make it slower
    plan = plan_layouts(costs([node("a", rtt=0.0), node("b", rtt=0.0)], hub=HubCosts(message_s=1e-3)))
    pipeline = next(c for c in plan.candidates if c.kind == "pipeline")
    assert pipeline.decode_s == pytest.approx(plan.choice.decode_s)
    assert plan.choice.kind == "single" and plan.choice.nodes == (0,)


def test_uneven_kv_heads_cost_what_the_larger_share_computes():
    # SmolLM2's 3 KV heads over 2 equal nodes: 2 + 1, so attention waits for the node with 2 of 3
    plan = plan_layouts(costs([node("a", rtt=0.0), node("b", rtt=0.0)], SMOL, Q4_1))
    tensor = next(c for c in plan.candidates if c.kind == "tensor")
    f = attention_fraction(SMOL)
    assert tensor.decode_s == pytest.approx(30 * 1e-3 * (f * 2 / 3 + (1 - f) / 2))


def test_measured_op_floors_replace_proportional_shares_in_decode():
    # attention all fixed cost (its one-KV-head shard costs what every head does), MLP half fixed
    ops = {"attn_decode_s": 0.4e-3, "shard_attn_decode_s": 0.4e-3, "mlp_decode_s": 0.6e-3,
           "shard_mlp_decode_s": 0.3e-3, "shard_mlp_columns": 32}
    nodes = [node("a", rtt=0.0, **ops), node("b", rtt=0.0, **ops)]
    plan = plan_layouts(costs(nodes, SMOL, Q4_1))
    tensor = next(c for c in plan.candidates if c.kind == "tensor")
    mlp_half = 0.3e-3 + (768 / 1536 - 32 / 1536) / (1 - 32 / 1536) * 0.3e-3
    assert tensor.decode_s == pytest.approx(30 * (0.4e-3 + mlp_half))
    assert tensor.first_token_s == pytest.approx(30 * 30e-3 * (attention_fraction(SMOL) * 2 / 3
                                                                + (1 - attention_fraction(SMOL)) / 2))
    single = next(c for c in plan.candidates if c.kind == "single")
    assert 0.8 < tensor.decode_s / single.decode_s < 0.9  # two nodes save 15%, not the ~45% shares would say


def test_measured_shares_make_a_polyline_through_floor_and_whole():
    ops = {"attn_decode_s": 0.4e-3, "shard_attn_decode_s": 0.1e-3, "mlp_decode_s": 1.0e-3,
           "shard_mlp_decode_s": 0.1e-3, "shard_mlp_columns": 32}
    line = plan_layouts(costs([node("a", rtt=0.0, **ops), node("b", rtt=0.0, **ops)]))
    # the halves ran slower than the line through floor and whole says (the floor ran from cache)
    shares = {"attn_shares_s": ((0.5, 0.3e-3),), "mlp_shares_s": ((0.5, 0.7e-3), (0.9, 0.95e-3))}
    poly = plan_layouts(costs([node("a", rtt=0.0, **ops, **shares), node("b", rtt=0.0, **ops, **shares)]))
    tensor = ("tensor x2", (0, 1))
    mlp_line = 0.1e-3 + (0.5 - 32 / 1024) / (1 - 32 / 1024) * 0.9e-3
    attn_line = 0.1e-3 + (0.5 - 0.25) / 0.75 * 0.3e-3
    assert by_layout(line)[tensor].decode_s == pytest.approx(EVEN.num_layers * (attn_line + mlp_line))
    assert by_layout(poly)[tensor].decode_s == pytest.approx(EVEN.num_layers * (0.3e-3 + 0.7e-3))
    # between measured points: on the segment; pipeline and single stages do not use the ops
    # 3 equal nodes: 2 + 1 + 1 KV heads, 352 / 352 / 320 columns: a 0.34375 MLP share is 2/3 of the
    # way from the floor's (32 / 1024) to the measured half
    three = plan_layouts(costs([node(x, rtt=0.0, **ops, **shares) for x in "abc"]))
    mlp_third = 0.1e-3 + (352 / 1024 - 32 / 1024) / (0.5 - 32 / 1024) * 0.6e-3
    assert mlp_third == pytest.approx(0.5e-3)
    assert by_layout(three)[("tensor x3", (0, 1, 2))].decode_s == pytest.approx(EVEN.num_layers * (0.3e-3 + 0.5e-3))
    assert by_layout(poly)[("single", (0,))].decode_s == pytest.approx(by_layout(line)[("single", (0,))].decode_s)


def test_profile_shares_are_the_equal_cuts_the_candidates_make():
    one_b = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                        num_kv_heads=4, head_dim=64)
    q4 = {kind: TensorLayout("Q4_0", 4, 32, False) for kind in ("q", "k", "v", "o", "gate", "up", "down")}
    # 4 nodes: tensor x4 (quarters), tensor x3 over each 3 (2 + 1 + 1 heads, 1888 / 1888 / 1856
    # columns: the last is within 5% of the second), hybrid pairs (halves)
    assert profile_shares(one_b, q4, 4) == [(2, 2816), (2, 1888), (1, 1888), (1, 1408)]
    assert profile_shares(one_b, q4, 2) == [(2, 2816)]
    assert profile_shares(one_b, q4, 1) == []
    # SmolLM2 (3 KV heads) over 2: 2 + 1 heads, 768 columns each
    assert profile_shares(SMOL, Q4_1, 2) == [(2, 768), (1, 768)]


def test_a_concurrent_slowdown_scales_tensor_compute_only():
    """k_r (the node's layer time while all compute at once, over alone) multiplies what ranks
    compute side by side; 1-node and pipeline stages compute alone and keep their figures."""
    hub = HubCosts(message_s=5e-6, reduction_s=2e-6)
    alone = plan_layouts(costs([node("a", rtt=10e-6), node("b", rtt=10e-6)], hub=hub))
    shared = plan_layouts(costs([node("a", rtt=10e-6, concurrent_slowdown=2.0),
                                 node("b", rtt=10e-6, concurrent_slowdown=2.0)], hub=hub))
    before, after = by_layout(alone), by_layout(shared)
    tensor = ("tensor x2", (0, 1))
    compute = EVEN.num_layers * 1e-3 / 2  # both ranks' halves of every layer
    assert after[tensor].decode_s - before[tensor].decode_s == pytest.approx(compute)
    for key in (("single", (0,)), ("pipeline 0-11|12-23", (0, 1))):
        assert after[key].decode_s == pytest.approx(before[key].decode_s)
    assert alone.choice.kind == "tensor" and shared.choice.kind != "tensor"  # twice the compute each: no gain left


def test_a_measured_reduction_replaces_the_hubs_per_message_sum():
    """X_R,op (what a decode reduction over those nodes took beyond its slowest rank, measured with
    every rank busy) stands in for (|R| - 1) c(1); a prompt's reduction pays X_R,op and what its
    bigger messages cost more, (|R| - 1)(c(P) - c(1)); 1-node and pipeline stages have no
    reductions; a reduction over other nodes keeps the sum."""
    hub = HubCosts(message_s=5e-6, message_prefill_s=40e-6, reduction_s=2e-6)
    nodes = [node("a", rtt=10e-6), node("b", rtt=10e-6), node("c", rtt=10e-6)]
    before = plan_layouts(costs(nodes, hub=hub))
    extra = {(("a", "b", "c"), "attn"): 1e-3, (("a", "b", "c"), "mlp"): 2e-3}
    after = plan_layouts(costs(nodes, hub=hub, reduction_extra_s=extra))
    b, a = by_layout(before), by_layout(after)
    tensor = ("tensor x3", (0, 1, 2))
    per_layer = 1e-3 + 2e-3 - 2 * 2 * 5e-6  # both measured extras, in place of two further messages each
    assert a[tensor].decode_s - b[tensor].decode_s == pytest.approx(EVEN.num_layers * per_layer)
    per_layer_prompt = 1e-3 + 2e-3 - 2 * 2 * 5e-6  # c(P) - c(1) stays on top of X for each further message
    assert a[tensor].first_token_s - b[tensor].first_token_s == pytest.approx(EVEN.num_layers * per_layer_prompt)
    for key, cand in b.items():
        if key != tensor:  # singles, the pipeline, and tensor over two of the three: unmeasured, unchanged
            assert a[key].decode_s == pytest.approx(cand.decode_s), key
    choice = lambda plan: (plan.choice.describe(), plan.choice.nodes)  # noqa: E731
    assert choice(before) == tensor and choice(after) != tensor


def test_reduction_probes_list_each_reduction_once_with_the_models_compute():
    ops = {"attn_decode_s": 0.4e-3, "shard_attn_decode_s": 0.2e-3, "mlp_decode_s": 0.6e-3,
           "shard_mlp_decode_s": 0.1e-3}
    nodes = [node(name, rtt=rtt, concurrent_slowdown=1.5, **ops)
             for name, rtt in zip("abcd", (10e-6, 20e-6, 30e-6, 40e-6), strict=True)]
    probes = reduction_probes(costs(nodes, hub=HubCosts(message_s=5e-6)))
    keys = [p.key for p in probes]
    assert len(keys) == len(set(keys))
    # tensor over all 4 and over each 3 of them, and the hybrid's two pairs: attention and MLP each
    sets = {names for names, _ in keys}
    assert sets == {("a", "b", "c", "d"), ("b", "c", "d"), ("a", "c", "d"), ("a", "b", "d"), ("a", "b", "c"),
                    ("a", "b"), ("c", "d")}
    assert all((names, op) in keys for names in sets for op in ("attn", "mlp"))
    four = {p.key[1]: p for p in probes if len(p.nodes) == 4}
    assert four["attn"].nodes == (0, 1, 2, 3)
    # one KV head of four each: the attention floor; a quarter of the columns: on the line to the whole op
    assert four["attn"].computes_s == pytest.approx((1.5 * 0.2e-3,) * 4)
    mlp = 1.5 * (0.1e-3 + (0.25 - 32 / 1024) / (1 - 32 / 1024) * 0.5e-3)
    assert four["mlp"].computes_s == pytest.approx((mlp,) * 4)
    assert four["mlp"].slowest_s == pytest.approx(40e-6 + mlp)
    assert reduction_probes(costs(nodes[:1])) == []  # one node: nothing to reduce


def test_hybrid_wins_only_inside_its_band():
    hub = HubCosts(message_s=100e-6)
    band = hybrid_band(4, 2, EVEN.num_layers, rtt=100e-6, message=100e-6)
    assert band is not None
    d = sum(band) / 2
    plan = plan_layouts(costs([node(str(i), d=d, rtt=100e-6) for i in range(4)], hub=hub))
    assert plan.choice.kind == "hybrid" and plan.choice.describe() == "hybrid 0-11 x2|12-23 x2"
    for rtt_over_c in (3.5, 5, 20):  # a LAN: the round trip well above the coordinator's per-message cost
        assert hybrid_band(4, 2, EVEN.num_layers, rtt_over_c * 100e-6, 100e-6) is None
        for d in (1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 1e-1):
            plan = plan_layouts(costs([node(str(i), d=d, rtt=rtt_over_c * 100e-6) for i in range(4)], hub=hub))
            best = {kind: min(c.decode_s for c in plan.candidates if c.kind == kind and c.nodes == (0, 1, 2, 3))
                    for kind in ("tensor", "pipeline", "hybrid")}
            assert best["hybrid"] >= min(best["tensor"], best["pipeline"]), (rtt_over_c, d, best)


def test_the_band_matches_the_model_on_a_sweep():
    """hybrid_band (closed form) against the full model, equal nodes, exact shares."""
    hub = HubCosts(message_s=50e-6, reduction_s=10e-6)
    for rtt in (20e-6, 50e-6, 100e-6, 200e-6):
        band = hybrid_band(4, 2, EVEN.num_layers, rtt, 50e-6, 10e-6)
        for d in [x * 1e-5 for x in (1, 3, 10, 30, 60, 100, 150, 200, 300, 1000)]:
            plan = plan_layouts(costs([node(str(i), d=d, rtt=rtt) for i in range(4)], hub=hub))
            full = [c for c in plan.candidates if c.nodes == (0, 1, 2, 3)]
            hybrid = min(c.decode_s for c in full if c.kind == "hybrid")
            others = min(c.decode_s for c in full if c.kind in ("tensor", "pipeline"))
            inside = band is not None and band[0] < d < band[1]
            assert (hybrid < others) == inside, (rtt, d, band, hybrid, others)


def test_bad_costs_are_refused_with_a_sentence():
    with pytest.raises(ValueError, match="layer times must be positive"):
        plan_layouts(costs([node("a", d=0.0)]))
    with pytest.raises(ValueError, match="at least one node"):
        plan_layouts(costs([]))


def test_nothing_fits_means_no_choice():
    plan = plan_layouts(costs([node("a", budget=NODE_OVERHEAD_BYTES)], SMOL, Q4_1))
    assert plan.choice is None and not plan.candidates[0].fits
    report = plan.to_dict()
    assert report["choice"] is None and report["candidates"][0]["decode_ms"] is None  # JSON has no NaN


def test_plan_tables_mark_the_choice_and_say_why_a_layout_does_not_fit():
    from rich.console import Console

    from edgeweave.coordinator.cli_layouts import candidates_table, hub_line, measured_table

    small = NODE_OVERHEAD_BYTES + 28 * MIB
    c = costs([node("a", budget=small, kernel="ort"), node("b", kernel="ort")], SMOL, Q4_1,
              hub=HubCosts(message_s=5e-6, token_s=1e-3), context=512)
    plan = plan_layouts(c)
    console = Console(record=True, width=400)
    for table in (measured_table(c), candidates_table(plan, ["a", "b"])):
        console.print(table)
    console.print(hub_line(c))
    text = console.export_text()
    assert "unlimited" in text and "0.005 ms per extra message" in text
    chosen = next(line for line in text.splitlines() if "│ * │" in line)
    assert plan.choice.describe() in chosen
    assert "no: node a: a memory budget of 428.00 MiB" in text and "yes (a: window" in text
