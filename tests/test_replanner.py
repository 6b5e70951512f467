"""Re-planning when links move: the Replanner on synthetic costs (drift -> probe -> moved links
-> the planner again), and on real nodes: a running generation moves to the planner's new choice
and still gives exactly the tokens it would have given."""

from __future__ import annotations

import dataclasses

import pytest
from llm_reference import local_cluster_fixture

from edgeweave.coordinator.replanner import Replanner
from edgeweave.splitting.layout_planner import ClusterCosts, HubCosts, NodeCosts, plan_layouts
from edgeweave.splitting.llama_config import LlamaConfig

EVEN = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_layers=24, num_heads=8,
                   num_kv_heads=4, head_dim=32)
HUB = HubCosts(message_s=5e-6, reduction_s=2e-6)


def cluster(rtt: float) -> ClusterCosts:
    return ClusterCosts(EVEN, None, tuple(NodeCosts(n, 1e-3, 30e-3, 0, rtt) for n in ("a", "b")), HUB)


def choose(costs):
    return plan_layouts(costs).choice


def replanner(probed: dict[int, tuple[float, float]], **kw) -> Replanner:
    planned = cluster(10e-6)
    start = choose(planned)
    assert start.kind == "tensor"  # at ~0 RTT two equal nodes split every layer
    return Replanner(planned, start, lambda i: probed[i], plan_layouts, window=4, **kw)


def test_a_link_that_slows_down_moves_tensor_parallelism_to_fewer_messages():
    probed = {0: (10e-6, float("inf")), 1: (10e-6, float("inf"))}
    watch = replanner(probed)
    for _ in range(4):
        assert watch.observe(0.030) is None  # the baseline window
    probed[1] = (20e-3, float("inf"))  # node b's link went to 20 ms
    results = [watch.observe(0.5) for _ in range(4)]
    found = [r for r in results if r is not None]
    assert len(found) == 1 and results[0] is None  # the window's median moves on the second slow step
    new = found[0]
    assert new is not None and new.kind in ("single", "pipeline") and new.messages_per_token <= 2
    assert watch.costs.nodes[1].rtt_s == pytest.approx(20e-3)
    [record] = watch.history
    assert record["moved"][0]["node"] == "b" and record["layout"] == new.describe()


def test_a_drift_with_unchanged_links_costs_one_probe_and_keeps_the_layout():
    probes = []
    planned = cluster(10e-6)
    watch = Replanner(planned, choose(planned), lambda i: probes.append(i) or (12e-6, float("inf")), plan_layouts,
                      window=4)
    for step in [0.03] * 4 + [0.09] * 4:
        assert watch.observe(step) is None
    assert probes == [0, 1] and watch.history[0]["moved"] == []
    for step in [0.09] * 7:  # the slower steps are the new baseline: no second probe
        assert watch.observe(step) is None
    assert probes == [0, 1]


def test_periodic_probe_and_bandwidth_factor():
    probed = {0: (10e-6, float("inf")), 1: (10e-6, float("inf"))}
    watch = replanner(probed, every=6)
    for _ in range(6):
        assert watch.observe(0.03) is None
    assert len(watch.history) == 1  # probed after `every` steps even without drift
    assert not watch._moved(watch.costs.nodes[0], 10e-6 + 0.4e-3, float("inf"))  # under the floor
    slow = dataclasses.replace(watch.costs.nodes[0], bandwidth_Bps=100e6)
    assert watch._moved(slow, 10e-6, 30e6) and not watch._moved(slow, 10e-6, 60e6)


def test_a_move_must_beat_staying_by_min_gain():
    """Two near-equal layouts do not trade places on a probe's noise: one node runs alone, the
    other node's link improves a little, and the planner's choice flips to it only when it is
    predicted `min_gain` faster than staying."""
    slow = cluster(2e-3)  # tensor parallel loses at 2 ms: one node alone
    alone = choose(slow)
    assert alone.kind == "single"
    other = 1 - alone.nodes[0]
    probed = {alone.nodes[0]: (2e-3, float("inf")), other: (0.5e-3, float("inf"))}
    for gain, moves in ((0.1, False), (0.0, True)):
        watch = Replanner(slow, alone, lambda i: probed[i], plan_layouts, window=2, every=2, min_gain=gain)
        results = [watch.observe(0.03) for _ in range(4)]
        assert any(r is not None for r in results) == moves
        assert watch.history and watch.history[0]["moved"][0]["node"] == "ab"[other]


def test_bad_settings_are_refused():
    planned = cluster(10e-6)
    with pytest.raises(ValueError, match="window"):
        Replanner(planned, choose(planned), lambda i: (0, 1), plan_layouts, window=1)
    with pytest.raises(ValueError, match="min_gain"):
        Replanner(planned, choose(planned), lambda i: (0, 1), plan_layouts, min_gain=1)


cluster_of_two = local_cluster_fixture(2)


@pytest.mark.slow
def test_a_running_generation_moves_to_the_new_choice_with_the_same_tokens(cluster_of_two, tmp_path):
    """Real nodes: the plan was made when the links looked instant (tensor parallel over both);
    the periodic probe finds their real RTT, the planner picks again (on this machine: one node),
    the driver redeploys mid-generation and the tokens are exactly those of a run that never moved."""
    from edgeweave.coordinator.client import NodeClient
    from edgeweave.coordinator.layout_choice import choose_layout, measure_cluster, plan_cluster
    from edgeweave.coordinator.replanner import node_probe
    from edgeweave.coordinator.tp_driver import DistributedLlama
    from edgeweave.splitting.checkpoints import open_checkpoint
    from edgeweave.splitting.random_llama import write_random_llama

    checkpoint = open_checkpoint(write_random_llama(tmp_path / "model", "tiny"))
    clients = [NodeClient(a, cluster=cluster_of_two.identity) for a in cluster_of_two.addresses]
    prompt = list(range(3, 19))
    with DistributedLlama(checkpoint, clients[:1], [1.0], cache_dir=tmp_path / "cache") as alone:
        expected = list(alone.generate(prompt, 24))
    measured = measure_cluster(clients, checkpoint, budget_s=0.3)
    instant = dataclasses.replace(measured, nodes=tuple(dataclasses.replace(n, rtt_s=1e-6) for n in measured.nodes))
    tensor = next(c for c in plan_cluster(instant).candidates if c.kind == "tensor" and c.nodes == (0, 1))
    real_choice = choose_layout(measured)
    assert (real_choice.layout, real_choice.nodes) != (tensor.layout, tensor.nodes)
    with DistributedLlama(checkpoint, clients, list(tensor.weights), cache_dir=tmp_path / "cache",
                          layout=tensor.layout) as llm:
        llm.attach_replanner(Replanner(instant, tensor, node_probe(clients, checkpoint.config.hidden_size, 0.1),
                                       plan_cluster, window=4, every=6, rtt_floor_s=50e-6), clients)
        assert list(llm.generate(prompt, 24)) == expected
        [move] = llm.replans
        assert move["from"] == "tensor x2" and move["to"] == real_choice.describe()
        assert llm.layout.describe() == real_choice.describe()
        moved = llm.replanner.history[0]["moved"]
        assert {m["node"] for m in moved} == set(cluster_of_two.addresses)
        assert all(m["rtt_after_s"] > 50e-6 for m in moved)
    for client in clients:
        client.close()
