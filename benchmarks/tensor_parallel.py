"""Tensor-parallel LLM: transformers vs edgeweave on 1 and 2 pinned nodes, side by side in one run.

For SmolLM2-135M (the GGUF, dequantized to float32) and a random-weight ~1.1B Llama (TinyLlama
shape, float32, written once to ~/.cache/edgeweave/models/random-1b), greedy decoding:

  (a)  HF transformers `generate` in this process, 1 torch thread pinned to core 0,
  (b)  edgeweave with 1 node pinned to core 0: the node holds the whole model and runs every
       layer per step (one message per token; the hub keeps embedding, final norm and LM head),
  (b') the same node driven layer by layer through the star allreduce (2 x layers messages per
       token, what every multi-node plan does): the communication measurement on one node,
  (c)  edgeweave with 2 nodes pinned to cores 0 and 1, one torch thread each,
  (c') the coordinator computing rank 0's half itself on core 0 (`LocalMember`, TPI-LLM's
       master) and one node on core 1: two compute members, one message pair per allreduce.

The coordinator (this process, 1 torch thread) is pinned to core 0, next to node 0: per layer
it only does a norm, the codec and a sum. Every setting so gets the same core budget as its
baseline: (a) and (b) one core, (c) two. Forward messages travel on the nodes' raw-TCP data
plane (mutual TLS), the default transport.

Per setting: time to first token (prefill + first token), median per-token decode latency, and
communication per decode token = driver wait time minus the slowest node's compute, next to its
floor 2 x layers x RTT (what the star needs per token), with RTT the median round trip of a
hidden-state-sized `echo` Forward on the same data-plane connection type, measured on the same
cluster in the same run (framing, TLS, protobuf and codec included; no model compute). The
"star floor" sends that echo to every node at once and receives from all (one allreduce's
messages). The "cold floor" is the same echo taken right after this process streamed one
layer file's bytes through the caches, as a real step does between round trips (on this VM an
echo costs 0.3-0.4 ms back to back but 1.1-1.3 ms after such a stream or a 6 ms idle: the
code that sends, receives and decodes runs from cold caches). "compute speed-up" is the 1-node compute per token over the 2-node slowest-node
compute per token: the most the 2-node run could gain if communication and the hub were free
(on this VM the two cores share memory bandwidth, and decode is bandwidth-bound).

Shard files and the nodes' stores are cached under ~/.cache/edgeweave, so only the first run
writes and ships the 1B shards. Prints a table and writes benchmarks/results/tensor_parallel.json.

    python benchmarks/tensor_parallel.py [--tokens 32] [--tokens-1b 12] [--skip-1b]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from edgeweave.coordinator.client import NodeClient
from edgeweave.coordinator.local_cluster import LocalCluster
from edgeweave.coordinator.local_member import LocalMember
from edgeweave.coordinator.tp_driver import DistributedLlama
from edgeweave.splitting.checkpoints import default_model_path, open_checkpoint
from edgeweave.splitting.random_llama import write_random_llama
from edgeweave.splitting.tokenizer import Tokenizer

CACHE = Path.home() / ".cache" / "edgeweave"
MODEL_1B = CACHE / "models" / "random-1b"
NODE_DIR = CACHE / "bench-tp-nodes"  # node shard stores survive runs: the 1B is shipped once
RESULTS = Path(__file__).parent / "results" / "tensor_parallel.json"
CHAT = [{"role": "user", "content": "Tell me about the history of Paris in a few sentences."}]
PROMPT_1B = [1, 450, 7483, 310, 3444, 338, 3681, 29889]  # 8 tokens; the weights are random anyway
COORDINATOR_CORE = 0
RTT_SAMPLES = 300
ECHO_JOB = "bench-echo"


class StepClock:
    """A transformers streamer that timestamps every token `generate` emits (the prompt comes first)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        self.tokens += value.reshape(-1).tolist()

    def end(self) -> None:
        pass


def hf_run(load, prompt_ids: list[int], n_tokens: int) -> dict:
    """(a): greedy `generate` of exactly n_tokens; TTFT and per-token from the streamer's stamps."""
    model = load().eval()
    ids = torch.tensor([prompt_ids])
    settings = dict(max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **{**settings, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        clock = StepClock()
        start = time.perf_counter()
        model.generate(ids, streamer=clock, **settings)
    del model
    gc.collect()
    stamps = clock.times[1:]  # times[0] is the prompt being echoed
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"setting": "(a) HF transformers, 1 core", "ttft_s": stamps[0] - start,
            "per_token_s": statistics.median(steps), "tokens": clock.tokens[len(prompt_ids):]}


def echo_rtt(clients: list[NodeClient], n_bytes: int, flush: torch.Tensor | None = None) -> float:
    """Median round trip of one n_bytes `echo` Forward on the data plane to every client at once
    (all sends, then all receives, like the allreduce): with one client, the transport floor.
    With `flush`, that tensor is streamed through the caches before each (untimed) sample, as a
    layer's weights are between two round trips of a real step."""
    streams = []
    for client in clients:
        client.load(ECHO_JOB, "echo", {}, {})
        streams.append(client.open_stream(reply_timeout=60))
    message, samples = torch.zeros(n_bytes // 4), []
    try:
        for i in range(RTT_SAMPLES + 30):
            if flush is not None:
                flush.sum()
            start = time.perf_counter()
            for stream in streams:
                stream.send(ECHO_JOB, "echo", [message])
            for stream in streams:
                stream.recv()
            if i >= 30:
                samples.append(time.perf_counter() - start)
    finally:
        for client, stream in zip(clients, streams, strict=True):
            stream.close()
            client.unload(ECHO_JOB)
    return statistics.median(samples)


def edgeweave_run(checkpoint, prompt_ids: list[int], n_tokens: int, cores: list[int], label: str,
                  fuse: bool = True, coordinator_share: bool = False) -> dict:
    """(b)/(b')/(c)/(c'): coordinator here on core 0, one node process per entry of `cores`, pinned;
    with `coordinator_share` the coordinator computes rank 0 itself (a LocalMember)."""
    names = [f"bench{i}" for i in range(len(cores))]
    cluster = LocalCluster(len(cores), base_dir=NODE_DIR, advertise=False, cpu_affinity=[[c] for c in cores],
                           env={"OMP_NUM_THREADS": "1"}, names=names, start_timeout=120)
    with cluster:
        clients = [NodeClient(a, cluster=cluster.identity, timeout=60) for a in cluster.addresses]
        members = [LocalMember(), *clients] if coordinator_share else clients
        with DistributedLlama(checkpoint, members, [1.0] * len(members), reply_timeout=600,
                              fuse_single_node=fuse) as llm:
            transport = type(llm.streams[0]).__name__
            list(llm.generate(prompt_ids, 2))  # warm-up: first-call allocations on the nodes
            generation = llm.generate(prompt_ids, n_tokens)
            tokens = [next(generation)]
            stats = llm.last_stats
            wait0, compute0, trips0 = stats.wait_s, stats.node_compute_s, stats.round_trips
            tokens += list(generation)
            decode_steps = len(tokens) - 1
            wait = (stats.wait_s - wait0) / decode_steps
            compute = (stats.node_compute_s - compute0) / decode_steps
            trips = (stats.round_trips - trips0) / decode_steps
            fused = llm.fused
        message_bytes = checkpoint.config.hidden_size * 4
        rtt = statistics.median(echo_rtt([c], message_bytes) for c in clients)
        star_rtt = echo_rtt(clients, message_bytes) if len(clients) > 1 else rtt
        layer_floats = max(f.stat().st_size for f in llm.manifest.node_files(0).values()) // 4
        cold_rtt = statistics.median(echo_rtt([c], message_bytes, torch.ones(layer_floats)) for c in clients)
        for client in clients:
            client.close()
    star_trips = 2 * checkpoint.config.num_layers  # the floor is the star's, whatever path ran
    comm = max(0.0, wait - compute)
    return {"setting": label, "fused": fused, "transport": transport, "ttft_s": stats.ttft_s,
            "per_token_s": stats.per_token_s, "tokens": tokens,
            "wait_s_per_token": wait, "node_compute_s_per_token": compute, "comm_s_per_token": comm,
            "round_trips_per_token": trips, "rtt_s": rtt, "floor_s_per_token": star_trips * rtt,
            "comm_over_floor": comm / (star_trips * rtt),
            "star_rtt_s": star_rtt, "star_floor_s_per_token": star_trips * star_rtt,
            "cold_rtt_s": cold_rtt, "cold_floor_s_per_token": star_trips * cold_rtt,
            "comm_over_cold_floor": comm / (star_trips * cold_rtt),
            "comm_over_star_floor": comm / (star_trips * star_rtt)}


def bench_model(name: str, checkpoint, hf_load, prompt_ids: list[int], n_tokens: int) -> dict:
    rows = [hf_run(hf_load, prompt_ids, n_tokens)]
    rows.append(edgeweave_run(checkpoint, prompt_ids, n_tokens, [0], "(b) 1 node, core 0"))
    rows.append(edgeweave_run(checkpoint, prompt_ids, n_tokens, [0], "(b') 1 node, per-layer star", fuse=False))
    rows.append(edgeweave_run(checkpoint, prompt_ids, n_tokens, [0, 1], "(c) 2 nodes, cores 0+1"))
    rows.append(edgeweave_run(checkpoint, prompt_ids, n_tokens, [1], "(c') coordinator share + 1 node",
                              coordinator_share=True))
    hf, one, star, two, share = rows
    ratios = {
        "b_over_a_per_token": one["per_token_s"] / hf["per_token_s"],
        "b_over_a_ttft": one["ttft_s"] / hf["ttft_s"],
        "b_star_over_a_per_token": star["per_token_s"] / hf["per_token_s"],
        "c_speedup_per_token": one["per_token_s"] / two["per_token_s"],
        "c_speedup_ttft": one["ttft_s"] / two["ttft_s"],
        "c_speedup_vs_star_per_token": star["per_token_s"] / two["per_token_s"],
        "c_compute_speedup": one["node_compute_s_per_token"] / two["node_compute_s_per_token"],
        "comm_over_floor_1_node_star": star["comm_over_floor"],
        "comm_over_floor_2_nodes": two["comm_over_floor"],
        "c_share_speedup_per_token": one["per_token_s"] / share["per_token_s"],
        "c_share_compute_speedup": one["node_compute_s_per_token"] / share["node_compute_s_per_token"],
        "comm_over_floor_share": share["comm_over_floor"],
        "comm_over_star_floor_2_nodes": two["comm_over_star_floor"],
        "comm_over_cold_floor_1_node_star": star["comm_over_cold_floor"],
        "comm_over_cold_floor_2_nodes": two["comm_over_cold_floor"],
    }
    for row in rows:
        row["same_tokens_as_hf"] = row["tokens"] == hf["tokens"]
    return {"model": name, "prompt_tokens": len(prompt_ids), "new_tokens": n_tokens, "rows": rows, "ratios": ratios}


def smollm(n_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    checkpoint = open_checkpoint(path)
    prompt = Tokenizer.from_checkpoint(checkpoint).encode_chat(CHAT)
    load = lambda: AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)  # noqa: E731
    return bench_model("SmolLM2-135M f32", checkpoint, load, prompt, n_tokens)


def random_1b(n_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    write_random_llama(MODEL_1B, "1b", seed=0, dtype="float32")  # reused when already there
    checkpoint = open_checkpoint(MODEL_1B)
    load = lambda: AutoModelForCausalLM.from_pretrained(MODEL_1B, dtype=torch.float32)  # noqa: E731
    return bench_model("random Llama-1.1B f32", checkpoint, load, PROMPT_1B, n_tokens)


def table(results: list[dict]) -> Table:
    out = Table(title="tensor-parallel greedy decoding, 1 torch thread per core (medians)")
    columns = ("model", "setting", "TTFT ms", "ms/token", "node compute ms/token", "comm ms/token", "floor ms/token",
               "comm/floor", "star floor ms/token", "cold floor ms/token", "= HF tokens")
    for column in columns:
        out.add_column(column, justify="left" if column in ("model", "setting") else "right")
    for result in results:
        for row in result["rows"]:
            comm = "comm_s_per_token" in row
            def ms(key: str, row: dict = row) -> str:
                return f"{row[key] * 1e3:.1f}" if key in row else "-"

            out.add_row(result["model"], row["setting"], f"{row['ttft_s'] * 1e3:.0f}", ms("per_token_s"),
                        ms("node_compute_s_per_token"), ms("comm_s_per_token"), ms("floor_s_per_token"),
                        f"{row['comm_over_floor']:.2f}x" if comm else "-", ms("star_floor_s_per_token"),
                        ms("cold_floor_s_per_token"),
                        str(row["same_tokens_as_hf"]))
    return out


def goals(results: list[dict]) -> list[str]:
    lines = []
    for result in results:
        r, model = result["ratios"], result["model"]
        lines.append(f"{model}: (b)/(a) per token {r['b_over_a_per_token']:.2f}x "
                     f"[goal <= 1.0: {'met' if r['b_over_a_per_token'] <= 1.0 else 'NOT met'}], "
                     f"TTFT {r['b_over_a_ttft']:.2f}x; (b')/(a) {r['b_star_over_a_per_token']:.2f}x")
        lines.append(f"  2-node speed-up {r['c_speedup_per_token']:.2f}x per token over (b), "
                     f"{r['c_speedup_vs_star_per_token']:.2f}x over (b'), {r['c_speedup_ttft']:.2f}x TTFT; "
                     f"compute alone {r['c_compute_speedup']:.2f}x")
        lines.append(f"  comm/floor {r['comm_over_floor_1_node_star']:.2f}x (1 node, star), "
                     f"{r['comm_over_floor_2_nodes']:.2f}x (2 nodes) [goal <= 1.5: "
                     f"{'met' if max(r['comm_over_floor_1_node_star'], r['comm_over_floor_2_nodes']) <= 1.5 else 'NOT met'}]"
                     f"; 2 nodes vs the star floor {r['comm_over_star_floor_2_nodes']:.2f}x; vs the cold-cache "
                     f"floor {r['comm_over_cold_floor_1_node_star']:.2f}x (1 node), {r['comm_over_cold_floor_2_nodes']:.2f}x (2)")
        lines.append(f"  (c') coordinator share + 1 node: {r['c_share_speedup_per_token']:.2f}x per token over (b), "
                     f"compute alone {r['c_share_compute_speedup']:.2f}x, comm/floor {r['comm_over_floor_share']:.2f}x")
        if "1.1B" in model:
            best = max(r["c_speedup_per_token"], r["c_share_speedup_per_token"])
            lines.append(f"  1B speed-up goal >= 1.6x: {'met' if best >= 1.6 else 'NOT met'} (best of (c), (c'): {best:.2f}x)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens on SmolLM2")
    parser.add_argument("--tokens-1b", type=int, default=12, help="new tokens on the 1B model")
    parser.add_argument("--skip-1b", action="store_true")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("this benchmark pins nodes to cores 0 and 1: it needs 2 cores")
    os.sched_setaffinity(0, {COORDINATOR_CORE})  # the coordinator (and the HF baseline) on core 0
    torch.set_num_threads(1)
    started, load_before = time.perf_counter(), os.getloadavg()
    results = [smollm(args.tokens)]
    if not args.skip_1b:
        results.append(random_1b(args.tokens_1b))
    console = Console(width=240)
    console.print(table(results))
    for line in goals(results):
        console.print(line, markup=False)
    meta = {"load_average_before": load_before, "load_average_after": os.getloadavg(),
            "wall_s": time.perf_counter() - started, "coordinator_core": COORDINATOR_CORE, "torch": torch.__version__}
    console.print(f"load average before {load_before[0]:.2f}, after {meta['load_average_after'][0]:.2f}; "
                  f"{meta['wall_s']:.0f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
