"""Serving under load: `edgeweave serve` (continuous batching) on a local 2-node cluster vs.
single-process HF transformers, both behind the same HTTP layer (scheduler + OpenAI API), one run.

For 1, 4, 8 and 16 concurrent clients, each client sends one streamed chat completion (greedy,
`--tokens` tokens) at the same moment. Reported per engine and load: aggregate throughput (all
tokens / wall time), p50/p99 time per token (gaps between a request's consecutive tokens, pooled
over the requests) and p50/p99 time to first token. The HF engine has no batched step (one
DynamicCache per request, its rows run one after another), as a single-process server would.

    python benchmarks/serving.py [--tokens 32] [--loads 1,4,8,16]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn
from rich.console import Console
from rich.table import Table

from edgeweave.coordinator.engine import DistributedEngine, Telemetry, model_id_of
from edgeweave.coordinator.http_api import create_app
from edgeweave.coordinator.local_cluster import LocalCluster
from edgeweave.coordinator.scheduler import Scheduler
from edgeweave.runtime.batch import SequenceStep
from edgeweave.splitting.checkpoints import Checkpoint, default_model_path, open_checkpoint
from edgeweave.splitting.tokenizer import Tokenizer

TOPICS = ["Paris", "the ocean", "honey bees", "Jupiter", "the Roman empire", "volcanoes", "the piano", "rainforests"]
QUESTIONS = [f"Tell me about {topic} in a few sentences." for topic in TOPICS]
#: co-located nodes share the 2 cores: one thread each (separate devices would each have their own)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


class HFEngine:
    """HF transformers in this process as a `TextEngine`: one DynamicCache per session, rows one by one."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        from transformers import AutoModelForCausalLM

        path = default_model_path() if checkpoint.path.suffix != ".gguf" else checkpoint.path
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        self.model_id = model_id_of(checkpoint)
        self.tokenizer = Tokenizer.from_checkpoint(checkpoint)
        self.max_context = checkpoint.config.max_position_embeddings
        self.caches: dict[str, Any] = {}

    def step(self, sequences: list[SequenceStep]) -> torch.Tensor:
        from transformers import DynamicCache

        rows = []
        for seq in sequences:
            cache = self.caches.setdefault(seq.session, DynamicCache())
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([seq.history[seq.cached:]]), past_key_values=cache,
                                 use_cache=True)
            rows.append(out.logits[0, -1])
        return torch.stack(rows)

    def reset(self, *sessions: str) -> None:
        for session in sessions:
            self.caches.pop(session, None)

    def describe(self) -> dict[str, Any]:
        return {"engine": "HF transformers (single process)", "model": self.model_id, "nodes": []}

    def telemetry(self) -> Telemetry:
        return Telemetry()

    def close(self) -> None:
        self.caches.clear()


def serve_in_thread(engine: Any) -> tuple[str, uvicorn.Server, Scheduler]:
    scheduler = Scheduler(engine, max_active=16)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, scheduler), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, scheduler


def one_request(url: str, model: str, question: str, tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals: list[float] = []
    completion = 0
    with httpx.Client(timeout=600) as http, http.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                completion = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
    return {"ttft_s": (arrivals[0] if arrivals else time.perf_counter()) - start,
            "gaps_s": [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)], "tokens": completion}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def run_load(url: str, model: str, clients: int, tokens: int) -> dict[str, float]:
    one_request(url, model, "Hi", 2)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda q: one_request(url, model, q, tokens), (QUESTIONS * 2)[:clients]))
    wall = time.perf_counter() - start
    gaps = [g for r in results for g in r["gaps_s"]]
    ttfts = [r["ttft_s"] for r in results]
    return {
        "clients": clients,
        "aggregate_tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "p50_time_per_token_s": statistics.median(gaps) if gaps else float("nan"),
        "p99_time_per_token_s": percentile(gaps, 0.99),
        "p50_ttft_s": statistics.median(ttfts),
        "p99_ttft_s": percentile(ttfts, 0.99),
        "tokens": sum(r["tokens"] for r in results),
        "wall_s": wall,
    }


def serve_and_measure(engine: Any, loads: list[int], tokens: int) -> tuple[list[dict[str, float]], dict]:
    url, server, scheduler = serve_in_thread(engine)
    try:
        rows = [run_load(url, engine.model_id, c, tokens) for c in loads]
        return rows, scheduler.snapshot()
    finally:
        server.should_exit = True
        scheduler.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="completion tokens per request")
    parser.add_argument("--loads", default="1,4,8,16", help="concurrent clients, comma-separated")
    args = parser.parse_args()
    loads = [int(x) for x in args.loads.split(",")]
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    checkpoint = open_checkpoint()
    results: dict[str, list[dict[str, float]]] = {}

    with LocalCluster(2, advertise=False, env=ONE_THREAD) as cluster:
        engine = DistributedEngine.open(checkpoint, list(cluster.addresses), weights=[1.0, 1.0])
        try:
            results["edgeweave 2 nodes (Q4_1)"], _ = serve_and_measure(engine, loads, args.tokens)
        finally:
            engine.close()
    torch.set_num_threads(os.cpu_count() or 1)
    hf = HFEngine(checkpoint)
    results["HF transformers 1 process (float32)"], _ = serve_and_measure(hf, loads, args.tokens)

    table = Table(title=f"serving: streamed chat, {args.tokens} tokens per request, greedy (loadavg {' '.join(loadavg)})")
    for column in ("engine", "clients", "aggregate tok/s", "p50 ms/token", "p99 ms/token", "p50 TTFT ms",
                   "p99 TTFT ms", "wall s"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for name, rows in results.items():
        for row in rows:
            table.add_row(name, str(row["clients"]), f"{row['aggregate_tokens_per_s']:.1f}",
                          f"{row['p50_time_per_token_s'] * 1e3:.1f}", f"{row['p99_time_per_token_s'] * 1e3:.1f}",
                          f"{row['p50_ttft_s'] * 1e3:.0f}", f"{row['p99_ttft_s'] * 1e3:.0f}", f"{row['wall_s']:.1f}")
    ours = results["edgeweave 2 nodes (Q4_1)"]
    theirs = results["HF transformers 1 process (float32)"]
    base = ours[0]
    scaling = {f"aggregate_{r['clients']}_over_1": r["aggregate_tokens_per_s"] / base["aggregate_tokens_per_s"]
               for r in ours[1:]}
    scaling.update({f"p50_time_per_token_{r['clients']}_over_1": r["p50_time_per_token_s"] / base["p50_time_per_token_s"]
                    for r in ours[1:]})
    ratios = Table(title="same run: scaling over 1 client, and edgeweave / HF")
    for column in ("clients", "aggregate / 1 client", "p50 ms/token / 1 client", "aggregate vs HF"):
        ratios.add_column(column, justify="right")
    for a, b in zip(ours, theirs, strict=True):
        ratios.add_row(str(a["clients"]), f"{a['aggregate_tokens_per_s'] / base['aggregate_tokens_per_s']:.2f}x",
                       f"{a['p50_time_per_token_s'] / base['p50_time_per_token_s']:.2f}x",
                       f"{a['aggregate_tokens_per_s'] / b['aggregate_tokens_per_s']:.2f}x")
    console = Console(width=150)
    console.print(table)
    console.print(ratios)
    out = Path(__file__).parent / "results" / "serving.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "tokens_per_request": args.tokens, "loadavg_before": loadavg, "scaling": scaling, "results": results,
        "goals": {"aggregate_8_over_1 >= 4": scaling.get("aggregate_8_over_1"),
                  "p50_time_per_token_8_over_1 < 2": scaling.get("p50_time_per_token_8_over_1")},
        "note": "2-core shared machine; both nodes and the coordinator on one host (loopback), one thread per node",
    }, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
