"""One decode step's attention on a quantized shard: fused (runtime/ort_attention.py, one ONNX
Runtime call) against the unfused kernels (two MatMulNBits calls with RoPE, the cache append and
the attention in torch between them), on the same weights.

A random Llama at TinyLlama-1.1B's shape (22 layers, hidden 2048, 32 heads, 4 KV heads), 4-bit
q4 shards for 1 node (whole layers) and for rank 0 of 4 (one KV head, 8 query heads: what a
tensor-parallel node of `benchmarks/scaling.py` holds). One thread, a KV cache of ~64 tokens.
Every decode step visits all 22 layers in order, as a node does, so the weights stream from
memory as they would; fused and unfused alternate in rounds. Per call: median over the rounds,
and the whole step's attention (22 calls).

    .venv/bin/python benchmarks/attention_kernel.py [--rounds 15]

Writes benchmarks/results/attention_kernel.json and prints the table. Check `cat /proc/loadavg` first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results" / "attention_kernel.json"
CACHE = Path.home() / ".cache" / "edgeweave"
CONTEXT = 64  # tokens cached before the measured steps


def _shards(n: int):
    from edgeweave.splitting.checkpoints import open_checkpoint
    from edgeweave.splitting.random_llama import write_random_llama
    from edgeweave.splitting.tensor_parallel import plan_shards, quantized_layouts, write_shards

    ck = open_checkpoint(write_random_llama(CACHE / "models" / "random-1b", "1b", dtype="float16"))
    plan = plan_shards(ck.config, [1.0] * n, quantized_layouts(ck, "q4"), "q4")
    return ck.config, write_shards(ck, plan, CACHE / "attention-kernel" / f"q4-x{n}")


def measure(n: int, rounds: int) -> dict:
    from edgeweave.runtime.llama import LayerKV, Rotary, batched_attention
    from edgeweave.runtime.ort_quantized import OrtQuantizedMatmuls
    from edgeweave.runtime.safetensors_read import read_safetensors

    config, manifest = _shards(n)
    files = manifest.shard_files(0)
    tensors = [read_safetensors(manifest.path(files[f"layer.{i:03d}"]))[0] for i in range(config.num_layers)]
    kinds = {"fused": [OrtQuantizedMatmuls(t, fused_head_dim=config.head_dim) for t in tensors],
             "unfused": [OrtQuantizedMatmuls(t) for t in tensors]}
    del tensors
    rotary = Rotary(config.head_dim, config.rope_theta, config.rope_scaling)
    n_kv = kinds["unfused"][0].n_kv_rows // config.head_dim
    caches = {k: [LayerKV(n_kv, config.head_dim, torch.float32) for _ in range(config.num_layers)] for k in kinds}
    x = torch.randn(CONTEXT, config.hidden_size)
    calls: dict[str, list[float]] = {k: [] for k in kinds}
    steps: dict[str, list[float]] = {k: [] for k in kinds}
    with torch.inference_mode():
        for kind, layers in kinds.items():  # the prompt, then one warm-up step
            for i, w in enumerate(layers):
                batched_attention(x, w, [caches[kind][i]], [0], [CONTEXT], rotary, config.head_dim)
        one = x[:1]
        for r in range(rounds + 1):
            for kind in (("fused", "unfused") if r % 2 else ("unfused", "fused")):
                times = []
                for i, w in enumerate(kinds[kind]):
                    kv = caches[kind][i]
                    start = time.perf_counter()
                    batched_attention(one, w, [kv], [kv.length], [1], rotary, config.head_dim)
                    times.append(time.perf_counter() - start)
                if r:  # round 0 is the warm-up
                    calls[kind] += times
                    steps[kind].append(sum(times))
    row = {"shard": "whole layers (1 node)" if n == 1 else f"rank 0 of {n}", "q_heads": kinds["unfused"][0].n_q_rows
           // config.head_dim, "kv_heads": n_kv, "rounds": rounds}
    for kind in kinds:
        row[f"{kind}_call_us"] = statistics.median(calls[kind]) * 1e6
        row[f"{kind}_step_ms"] = statistics.median(steps[kind]) * 1e3
    row["step_ratio"] = row["unfused_step_ms"] / row["fused_step_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()
    rows = [measure(n, args.rounds) for n in (4, 1)]
    report = {"meta": {"loadavg_at_start": load, "loadavg_at_end": os.getloadavg(), "threads": 1,
                       "context_tokens": CONTEXT, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1))
    table = Table(title="decode-step attention of a q4 1.1B-shape shard, 1 thread (medians)")
    for col in ("shard", "heads q/kv", "unfused us/call", "fused us/call", "unfused ms/step", "fused ms/step",
                "unfused / fused"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["shard"], f"{r['q_heads']}/{r['kv_heads']}", f"{r['unfused_call_us']:.0f}",
                      f"{r['fused_call_us']:.0f}", f"{r['unfused_step_ms']:.2f}", f"{r['fused_step_ms']:.2f}",
                      f"{r['step_ratio']:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
