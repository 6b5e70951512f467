"""Serving under load: `edgeweave serve` on a local 2-node cluster vs. single-process HF transformers,
both behind the same HTTP layer (scheduler + OpenAI API), measured in one run.

For 1, 4 and 8 concurrent clients, each client sends one streamed chat completion (greedy, a few
tokens). Reported per engine and load: median time to first token, median per-request decode
rate (tokens after the first / their time) and aggregate throughput (all tokens / wall time).

    python benchmarks/serving.py [--tokens 8] [--loads 1,4,8]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn
from rich.console import Console
from rich.table import Table

from edgeweave.coordinator.engine import DistributedEngine, model_id_of
from edgeweave.coordinator.http_api import create_app
from edgeweave.coordinator.local_cluster import LocalCluster
from edgeweave.coordinator.scheduler import Scheduler
from edgeweave.runtime.sampling import Sampler, SamplingParams
from edgeweave.splitting.checkpoints import Checkpoint, default_model_path, open_checkpoint
from edgeweave.splitting.tokenizer import Tokenizer

QUESTIONS = [
    "What is the capital of France?", "Name a primary color.", "What is 2 + 2?", "Say hello in Spanish.",
    "What do bees make?", "Which planet is the largest?", "What is the opposite of hot?", "Name a fruit.",
]


class HFEngine:
    """HF transformers in this process as a `TextEngine`: one DynamicCache per session, one step per next()."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        from transformers import AutoModelForCausalLM

        path = default_model_path() if checkpoint.path.suffix != ".gguf" else checkpoint.path
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        self.model_id = model_id_of(checkpoint)
        self.tokenizer = Tokenizer.from_checkpoint(checkpoint)
        self.max_context = checkpoint.config.max_position_embeddings

    def generate(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams, session: str) -> Iterator[int]:
        from transformers import DynamicCache

        cache, sampler = DynamicCache(), Sampler(sampling)
        inputs = torch.tensor([prompt_ids])
        for _ in range(max_tokens):
            with torch.inference_mode():
                out = self.model(input_ids=inputs, past_key_values=cache, use_cache=True)
            token = sampler.choose(out.logits[0, -1])
            yield token
            if sampler.is_stop(token):
                return
            inputs = torch.tensor([[token]])

    def reset(self, session: str) -> None:
        pass  # the cache lives in the generator and goes with it

    def describe(self) -> dict[str, Any]:
        return {"engine": "HF transformers (single process)", "model": self.model_id, "nodes": []}

    def close(self) -> None:
        pass


def serve_in_thread(engine: Any) -> tuple[str, uvicorn.Server, Scheduler]:
    scheduler = Scheduler(engine, max_active=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, scheduler), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, scheduler


def one_request(url: str, model: str, question: str, tokens: int) -> dict[str, float]:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    completion = 0
    with httpx.Client(timeout=600) as http, http.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                completion = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
    ttft = (first or time.perf_counter()) - start
    rate = (completion - 1) / (last - first) if first and last and last > first and completion > 1 else float("nan")
    return {"ttft_s": ttft, "tokens_per_s": rate, "tokens": completion, "end_s": time.perf_counter() - start}


def run_load(url: str, model: str, clients: int, tokens: int) -> dict[str, float]:
    one_request(url, model, "Hi", 2)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda q: one_request(url, model, q, tokens), (QUESTIONS * 2)[:clients]))
    wall = time.perf_counter() - start
    rates = [r["tokens_per_s"] for r in results if r["tokens_per_s"] == r["tokens_per_s"]]
    return {
        "clients": clients,
        "median_ttft_s": statistics.median(r["ttft_s"] for r in results),
        "median_tokens_per_s": statistics.median(rates) if rates else float("nan"),
        "aggregate_tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8, help="completion tokens per request")
    parser.add_argument("--loads", default="1,4,8", help="concurrent clients, comma-separated")
    args = parser.parse_args()
    loads = [int(x) for x in args.loads.split(",")]
    checkpoint = open_checkpoint()
    results: dict[str, list[dict[str, float]]] = {}

    with LocalCluster(2, advertise=False) as cluster:
        engine = DistributedEngine.open(checkpoint, list(cluster.addresses), weights=[1.0, 1.0])
        url, server, scheduler = serve_in_thread(engine)
        try:
            results["edgeweave 2 nodes"] = [run_load(url, engine.model_id, c, args.tokens) for c in loads]
        finally:
            server.should_exit = True
            scheduler.close()
            engine.close()

    hf = HFEngine(checkpoint)
    url, server, scheduler = serve_in_thread(hf)
    try:
        results["HF transformers 1 process"] = [run_load(url, hf.model_id, c, args.tokens) for c in loads]
    finally:
        server.should_exit = True
        scheduler.close()

    table = Table(title=f"serving: streamed chat, {args.tokens} tokens per request, greedy")
    for column in ("engine", "clients", "median TTFT ms", "median tok/s per request", "aggregate tok/s", "wall s"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for name, rows in results.items():
        for row in rows:
            table.add_row(name, str(row["clients"]), f"{row['median_ttft_s'] * 1e3:.0f}",
                          f"{row['median_tokens_per_s']:.2f}", f"{row['aggregate_tokens_per_s']:.2f}", f"{row['wall_s']:.1f}")
    ratios = Table(title="edgeweave / HF ratios (same run)")
    for column in ("clients", "TTFT ratio", "aggregate throughput ratio"):
        ratios.add_column(column, justify="right")
    ours, theirs = results["edgeweave 2 nodes"], results["HF transformers 1 process"]
    for a, b in zip(ours, theirs, strict=True):
        ratios.add_row(str(a["clients"]), f"{a['median_ttft_s'] / b['median_ttft_s']:.2f}x",
                       f"{a['aggregate_tokens_per_s'] / b['aggregate_tokens_per_s']:.2f}x")
    console = Console(width=130)
    console.print(table)
    console.print(ratios)
    out = Path(__file__).parent / "results" / "serving.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"tokens_per_request": args.tokens, "results": results,
                               "note": "2-core shared machine; nodes and coordinator on one host (loopback)"}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
