"""What a tensor-parallel shard's ops cost against what the planner's line through the floor says.

The layout planner (splitting/layout_planner.py) used to predict a rank's attention or MLP op for
one token on the line from the smallest shard (one KV-head group, 32 MLP columns; timed on ONE copy,
so from the CPU caches) to the whole op (timed on a ring of copies past the caches). Nodes now
also time the very shares the candidates would give them, each on a ring of its own copies
(`profile_shares`, the Profile RPC's `shards`). This benchmark times, at one torch thread as a
node runs, on the random Llama 1.1B shape in q4 (ONNX Runtime kernels): the whole op, the floor
(one copy, and on a ring), and the half and quarter shards on rings; and what the line says for
the half and the quarter. Medians of sustained batches (`layer_profile.sustained_seconds`).

    .venv/bin/python benchmarks/shard_profile.py [--seconds 0.6]

Writes benchmarks/results/shard_profile.json and prints the table. Check `cat /proc/loadavg` first.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from edgeweave.runtime.layer_profile import (
    LayerShape,
    ProjectionLayout,
    _Bench,
    floor_shape,
    shard_shape,
    sustained_seconds,
)

RESULTS = Path(__file__).resolve().parent / "results" / "shard_profile.json"
Q4 = ProjectionLayout(4, 32, False)
#: TinyLlama-1.1B's layer (the random model of benchmarks/scaling.py), every projection 4-bit
SHAPE = LayerShape(2048, 5632, 32, 4, 64, tuple((kind, Q4) for kind in ("q", "k", "v", "o", "gate", "up", "down")))
KV_TOKENS = 32  # scaling.py's prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.6, help="timing per op and shard")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()
    floor = floor_shape(SHAPE)
    shards = {"whole": (SHAPE, True), "floor, one copy": (floor, False), "floor, ring": (floor, True),
              "half, ring": (shard_shape(SHAPE, 2, 2816), True), "quarter, ring": (shard_shape(SHAPE, 1, 1408), True)}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (label, (shape, ring)) in enumerate(shards.items()):
            bench = _Bench(shape, "ort", KV_TOKENS, KV_TOKENS, Path(tmp) / f"b{k}", ring=ring)
            try:
                rows[label] = {"ring": bench.ring, "attn_ms": sustained_seconds(bench.attn, args.seconds)[0] * 1e3,
                               "mlp_ms": sustained_seconds(bench.mlp, args.seconds)[0] * 1e3,
                               "kv_heads": shape.n_kv_heads, "mlp_columns": shape.intermediate}
            finally:
                bench.close()
    whole, hot = rows["whole"], rows["floor, one copy"]
    floor_share = {"attn": 1 / SHAPE.n_kv_heads, "mlp": floor.intermediate / SHAPE.intermediate}
    for label, share in (("half, ring", 0.5), ("quarter, ring", 0.25)):
        for op in ("attn", "mlp"):
            s0 = floor_share[op]
            line = hot[f"{op}_ms"] + max(share - s0, 0) / (1 - s0) * (whole[f"{op}_ms"] - hot[f"{op}_ms"])
            rows[label][f"{op}_line_ms"] = line
            rows[label][f"{op}_over_line"] = rows[label][f"{op}_ms"] / line
    report = {"meta": {"loadavg_at_start": load, "loadavg_at_end": os.getloadavg(), "threads": 1,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "kv_tokens": KV_TOKENS, "shape": "1.1B q4"},
              "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1))
    print(f"load {load[0]:.2f}; ms per op, one token, 1 thread")
    for label, row in rows.items():
        extra = "".join(f"  {op} line {row[f'{op}_line_ms']:.3f} (measured {row[f'{op}_over_line']:.2f}x)"
                        for op in ("attn", "mlp") if f"{op}_line_ms" in row)
        print(f"{label:16s} ring {row['ring']}: attn {row['attn_ms']:.3f}  mlp {row['mlp_ms']:.3f}{extra}")


if __name__ == "__main__":
    main()
