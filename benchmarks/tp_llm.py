"""Tensor-parallel SmolLM2: one process vs 2 and 3 local node processes, measured side by side.

Prints a table and writes benchmarks/results/tp_llm.json. Medians over the decode steps of one
greedy generation per setting (plus TTFT of the prompt prefill). On one host the nodes share the
CPU cores (one torch thread per node, the 1-process baseline uses all cores), so this measures
the protocol's overhead (2 x layers round trips per token), not the speed-up of separate devices.

    python benchmarks/tp_llm.py [--tokens 32] [--nodes 2,3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgeweave.coordinator.client import NodeClient
from edgeweave.coordinator.local_cluster import LocalCluster
from edgeweave.coordinator.tp_driver import DistributedLlama
from edgeweave.runtime.llama import LlamaModel
from edgeweave.splitting.checkpoints import open_checkpoint
from edgeweave.splitting.tokenizer import Tokenizer

PROMPT = [{"role": "user", "content": "Tell me about the history of Paris in a few sentences."}]


def single_process(checkpoint, prompt_ids: list[int], n_tokens: int) -> dict:
    model = LlamaModel(checkpoint.config, checkpoint.tensor, set(checkpoint.names()))
    cache = model.new_cache()
    start = time.perf_counter()
    logits = model.forward(prompt_ids, cache, 0)[-1]
    ttft = time.perf_counter() - start
    steps, tokens, position = [], [int(logits.argmax())], len(prompt_ids)
    for _ in range(n_tokens - 1):
        start = time.perf_counter()
        logits = model.forward([tokens[-1]], cache, position)[-1]
        steps.append(time.perf_counter() - start)
        tokens.append(int(logits.argmax()))
        position += 1
    return {"setting": "1 process", "ttft_s": ttft, "per_token_s": statistics.median(steps), "comm_s_per_token": 0.0,
            "tokens": tokens}


def distributed(checkpoint, prompt_ids: list[int], n_tokens: int, n_nodes: int, cache: Path) -> dict:
    # one torch thread per node: co-located nodes share this host's cores (separate devices would not)
    with LocalCluster(n_nodes, advertise=False, env={"OMP_NUM_THREADS": "1"}) as cluster:
        clients = [NodeClient(a, cluster=cluster.identity) for a in cluster.addresses]
        with DistributedLlama(checkpoint, clients, [1.0] * n_nodes, cache_dir=cache) as llm:
            list(llm.generate(prompt_ids, 2))  # warm-up: first-call allocations on the nodes
            tokens = list(llm.generate(prompt_ids, n_tokens))
            stats = llm.last_stats
        for client in clients:
            client.close()
    return {"setting": f"{n_nodes} nodes", "ttft_s": stats.ttft_s, "per_token_s": stats.per_token_s,
            "comm_s_per_token": stats.comm_s / max(1, len(tokens)), "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--nodes", default="2,3")
    args = parser.parse_args()
    checkpoint = open_checkpoint()
    prompt_ids = Tokenizer.from_checkpoint(checkpoint).encode_chat(PROMPT)
    rows = [single_process(checkpoint, prompt_ids, args.tokens)]
    with tempfile.TemporaryDirectory() as cache:
        for n in (int(x) for x in args.nodes.split(",")):
            rows.append(distributed(checkpoint, prompt_ids, args.tokens, n, Path(cache)))
    base = rows[0]["per_token_s"]
    table = Table(title=f"SmolLM2-135M greedy, {len(prompt_ids)}-token prompt, {args.tokens} tokens (medians)")
    for column in ("setting", "TTFT ms", "per token ms", "x 1 process", "network ms/token", "same tokens"):
        table.add_column(column, justify="right")
    for row in rows:
        row["ratio_to_single"] = row["per_token_s"] / base
        row["same_tokens_as_single"] = row["tokens"] == rows[0]["tokens"]
        table.add_row(row["setting"], f"{row['ttft_s'] * 1e3:.0f}", f"{row['per_token_s'] * 1e3:.1f}",
                      f"{row['ratio_to_single']:.2f}", f"{row['comm_s_per_token'] * 1e3:.1f}",
                      str(row["same_tokens_as_single"]))
    Console().print(table)
    out = Path(__file__).parent / "results" / "tp_llm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompt_tokens": len(prompt_ids), "tokens": args.tokens, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
