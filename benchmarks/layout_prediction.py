"""Predicted vs measured ms per token: the layout planner's numbers next to real runs on local nodes.

Starts N local nodes (one torch thread each), measures them as `edgeweave plan` does
(`coordinator.layout_choice.measure_cluster`), then runs the bundled SmolLM2 on one node (its
fused 1-node plan) and tensor parallel over all nodes (the planner's weights), each `--rounds`
times, alternating, and prints the median decode ms/token and first-token ms next to the
predictions. Ad hoc: on a shared machine expect noise; nodes here share the same cores, which
the per-node measurements (taken one node at a time) do not see.

    python benchmarks/layout_prediction.py [--nodes 2] [--tokens 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from edgeweave.coordinator.client import NodeClient
from edgeweave.coordinator.layout_choice import costs_to_dict, measure_cluster, plan_cluster
from edgeweave.coordinator.local_cluster import LocalCluster
from edgeweave.coordinator.tp_driver import DistributedLlama
from edgeweave.splitting.checkpoints import open_checkpoint
from edgeweave.splitting.tokenizer import Tokenizer

PROMPT = "Tell me about the history of Paris in a few sentences."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile-seconds", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    checkpoint = open_checkpoint()
    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    prompt = tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    results: dict = {"prompt_tokens": len(prompt), "tokens": args.tokens}
    with LocalCluster(args.nodes, advertise=False, env={"OMP_NUM_THREADS": "1"}) as cluster, \
            tempfile.TemporaryDirectory() as cache:
        clients = [NodeClient(a) for a in cluster.addresses]
        costs = measure_cluster(clients, checkpoint, prompt_tokens=len(prompt), budget_s=args.profile_seconds)
        plan = plan_cluster(costs)
        single = next(c for c in plan.candidates if c.kind == "single" and c.nodes == (0,))
        tensor = next(c for c in plan.candidates if c.kind == "tensor" and len(c.nodes) == args.nodes)
        runs: dict[str, dict[str, list[float]]] = {"single": {"decode": [], "ttft": []},
                                                  "tensor": {"decode": [], "ttft": []}}
        for _ in range(args.rounds):
            for name, members, weights in (("single", clients[:1], [1.0]), ("tensor", clients, list(tensor.weights))):
                with DistributedLlama(checkpoint, members, weights, cache_dir=cache) as llm:
                    list(llm.generate(prompt, args.tokens))
                    runs[name]["decode"].append(llm.last_stats.per_token_s)
                    runs[name]["ttft"].append(llm.last_stats.ttft_s)
        for client in clients:
            client.close()
    results["measured_costs"] = costs_to_dict(costs)
    results["candidates"] = plan.to_dict([n.name for n in costs.nodes])
    print(f"{'layout':12s} {'predicted ms/token':>19s} {'measured':>9s} {'predicted first ms':>19s} {'measured':>9s}")
    for name, candidate in (("single", single), ("tensor", tensor)):
        decode = statistics.median(runs[name]["decode"]) * 1e3
        ttft = statistics.median(runs[name]["ttft"]) * 1e3
        results[name] = {"layout": candidate.describe(), "predicted_decode_ms": candidate.decode_s * 1e3,
                         "measured_decode_ms": decode, "predicted_first_token_ms": candidate.first_token_s * 1e3,
                         "measured_first_token_ms": ttft, "runs": runs[name]}
        print(f"{candidate.describe():12s} {candidate.decode_s * 1e3:19.1f} {decode:9.1f} "
              f"{candidate.first_token_s * 1e3:19.1f} {ttft:9.1f}")
    print("choice:", plan.choice.describe() if plan.choice else None)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
