"""Scaling on emulated edge devices: tensor-parallel speed-up, layouts against link RTT next to the
planner's prediction, and prompt-lookup speculation. One run, medians, ratios.

Every node is a Raspberry Pi 4 class device of the emulated test bed (tests/edge_testbed.py,
tests/edge_profiles.py): its own network namespace and cgroup, 0.25 of one host core (so four
of them and the coordinator fit this 2-core VM's memory bus and cores without being its limit),
a 2 GiB memory limit, and a token-bucket link with the RTT added by a delay proxy. The
coordinator runs unconstrained in a namespace of its own, real-time above the devices and their
proxies (`COORDINATOR_PRIORITY`: on a real cluster no device's work delays the hub's sends).

  (1) speed-up: a random Llama at TinyLlama-1.1B's shape (22 layers, hidden 2048, 4-bit q4
      shards), tensor parallel on 1, 2 and 4 nodes over Ethernet-class links: median time per
      decode token and first-token time, each over 1 node of the same class; ROUNDS rounds (the
      second reversed), each node count's mean over them (`_pooled_speedups`). Twice: with the CPU
      fraction as a CFS quota, and as time dilation (runtime/cpu_dilation.py: the node idles after
      each message for the rest of its time on the slow device; no quota stalls at period
      boundaries, and the node's per-message overhead is as slow as its compute).
  (2) layouts x RTT: the same model on 4 nodes at 0.2, 1, 3 and 10 ms link RTT; per setting the
      planner measures the cluster (coordinator/layout_choice.py) and predicts every candidate,
      and we measure 1 node, tensor x4, pipeline x4, hybrid 2x2 and the planner's choice, in
      ROUNDS rounds (the second in reverse order). The planner's ratio is its choice's mean time
      over the best layout's, each layout's runs pooled (`_pooled_choice`); its worst over the
      settings is `planner_worst_ratio` (one run against one: `planner_worst_ratio_one_run`).
  (3) speculation: SmolLM2-135M (the bundled GGUF) on 2 nodes at 3 ms RTT, greedy, two
      text-editing prompts (proofread a paragraph: the answer copies it; rewrite it formally: the
      answer paraphrases): plain decoding against prompt-lookup drafts verified up to 8 at a
      time; the speculative tokens must equal plain decoding's on the same (token-invariant)
      kernels. `speculative_gain` is the proofreading prompt's, tensor parallel.

Needs root (namespaces, cgroups, tc). Check `cat /proc/loadavg` first: the figures are only as
quiet as the machine. Writes benchmarks/results/scaling.json (top level: speedup_2, speedup_4,
planner_worst_ratio, speculative_gain) and prints the tables.

    sudo .venv/bin/python benchmarks/scaling.py [--tokens 8] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scaling.json"
RTTS_MS = (0.2, 1.0, 3.0, 10.0)
ROUNDS = 2  # the layouts section measures each layout this many times per setting (see _pooled_choice)
PROMPT_1B = list(range(100, 132))  # 32 prompt tokens of the random model
#: the coordinator's processes run SCHED_FIFO at this priority (tests/edge_testbed.py): it stands for
#: a machine of its own, which the emulated devices sharing the host's 2 cores must not preempt
COORDINATOR_PRIORITY = 20
#: exo's reported tensor-parallel speed-ups (2 and 4 devices), the peer figure to stand next to ours
EXO_SPEEDUP = {2: 1.8, 4: 3.2}
PARAGRAPH = (
    "The node daemon runs on every device and tells the coordinator what it has: how much memory, "
    "how many cores, and how fast it can multiply matrices. The coordinator then cuts the model so "
    "that every device gets a share it can hold, sends each device its share once, and after that "
    "only sends small hidden states for every token. When a device goes away the coordinator cuts "
    "the model again over the devices that are left and carries on where it stopped."
)
#: text-editing prompts: proofreading (the answer copies most of the paragraph: what prompt lookup
#: is for) and a free rewrite (the answer paraphrases: drafts mostly fail, the cost of trying)
EDIT_PROMPTS = {
    "proofread": "Correct the spelling mistakes in this paragraph and return the whole corrected paragraph:\n\n"
                 + PARAGRAPH.replace("device", "devcie").replace("model", "modle"),
    "rewrite formally": "Rewrite the following paragraph so that it reads more formally, keeping every fact:\n\n"
                        + PARAGRAPH,
}


# -- inside the coordinator's namespace ---------------------------------------------------------
def _generate(llm: Any, prompt_ids: list[int], tokens: int, speculate: int = 0) -> dict[str, Any]:
    """One greedy generation (after a warm-up): its tokens, first-token and median decode time, and
    per node what a decode step's messages cost (a prefill-only generation's totals subtracted)."""
    list(llm.generate(prompt_ids, 1))
    before = _node_totals(llm)
    list(llm.generate(prompt_ids, 1))  # the prefill's share of the totals, to take out below
    prefill = _node_totals(llm)
    start = time.perf_counter()
    if speculate:
        from edgeweave.coordinator import speculative

        out = list(speculative.generate(llm, prompt_ids, tokens, speculate))
    else:
        out = list(llm.generate(prompt_ids, tokens))
    stats = llm.last_stats
    # a speculative pass yields several tokens at once, so its per-token figure is the mean over
    # the decode (wall time after the first token / tokens after it), for plain runs too
    mean = (time.perf_counter() - start - stats.ttft_s) / max(len(out) - 1, 1)
    passes = max(len(stats.token_s), 1) + 1  # the prefill and every decode step
    row = {"tokens": out, "ttft_s": stats.ttft_s, "per_token_s": stats.per_token_s, "mean_token_s": mean,
           "messages_per_token": llm.messages_per_token,
           # where a pass's time goes: waiting on nodes, of which the slowest node's own compute
           "wait_per_pass_s": stats.wait_s / passes, "node_compute_per_pass_s": stats.node_compute_s / passes}
    after = _node_totals(llm)
    row["decode_per_node"] = {
        address: _per_message(*(after[address][k] - 2 * prefill[address][k] + before[address][k] for k in range(3)))
        for address in after}
    for key in ("passes", "drafted", "accepted", "tokens_per_pass"):
        if speculate and hasattr(stats, key):
            row[key] = getattr(stats, key)
    return row


def _node_totals(llm: Any) -> dict[str, tuple[int, float, float]]:
    """Per node address: (messages, seconds from send to reply, seconds the node reported computing) so far."""
    return {a: (t.messages, t.round_trip_s, t.compute_s) for a, t in llm.node_timings.items()}


def _per_message(messages: int, round_trip_s: float, compute_s: float) -> dict[str, float]:
    """A node's decode messages: how many, and per message the wait for its reply (from the step's
    first send: a later reply includes the earlier ones' reading) and the compute it reported."""
    n = max(messages, 1)
    return {"messages": messages, "round_trip_ms": round_trip_s / n * 1e3, "compute_ms": compute_s / n * 1e3}


def inner(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in the coordinator's namespace: measure the cluster for the planner, then each requested
    layout on its nodes. `spec`: peers, model, quantize, runs [{layout, nodes}], tokens, prompt_ids."""
    from edgeweave.coordinator.client import NodeClient
    from edgeweave.coordinator.layout_choice import costs_to_dict, measure_cluster, plan_cluster
    from edgeweave.coordinator.tp_driver import DistributedLlama
    from edgeweave.splitting.checkpoints import open_checkpoint
    from edgeweave.splitting.layouts import Layout, parse_layout

    checkpoint = open_checkpoint(spec["model"])
    clients = [NodeClient(a, timeout=120) for a in spec["peers"]]
    prompt_ids = spec["prompt_ids"]
    out: dict[str, Any] = {"runs": []}
    planned = None
    if spec.get("plan"):
        costs = measure_cluster(clients, checkpoint, spec["quantize"], prompt_tokens=len(prompt_ids))
        planned = plan_cluster(costs, [1.0] * len(clients))
        out["costs"] = costs_to_dict(costs)
        out["candidates"] = [c.to_dict() for c in planned.candidates]
        out["choice"] = planned.choice.to_dict() if planned.choice else None
    runs = list(spec["runs"])
    if planned is not None and planned.choice is not None:
        choice = planned.choice
        runs.append({"label": "planner's choice", "layout": choice.layout.to_dict(), "nodes": list(choice.nodes),
                     "weights": list(choice.weights)})
    # rounds: every run again, in reverse order (ABC CBA: a drift of the host over the setting
    # weighs on every layout alike); rows carry their round
    ordered = [(r, run) for r in range(spec.get("rounds", 1)) for run in (runs if r % 2 == 0 else runs[::-1])]
    for round_, run in ordered:
        nodes = [clients[i] for i in run["nodes"]]
        layout = run["layout"]
        request = parse_layout(layout) if isinstance(layout, str) else Layout.from_dict(layout)
        weights = run.get("weights") or [1.0] * len(nodes)
        with DistributedLlama(checkpoint, nodes, weights, quantize=spec["quantize"], layout=request,
                              show_progress=False, token_invariant=run.get("token_invariant", False)) as llm:
            row = {"label": run.get("label", llm.layout.describe()), "layout": llm.layout.describe(),
                   "nodes": run["nodes"], "round": round_,
                   **_generate(llm, prompt_ids, spec["tokens"], run.get("speculate", 0))}
        if planned is not None:
            row["predicted"] = _prediction(planned, llm.layout.describe(), run["nodes"])
        out["runs"].append(row)
    for client in clients:
        client.close()
    return out


def _prediction(planned: Any, described: str, nodes: list[int]) -> dict[str, float] | None:
    """The planner's prediction for this layout over these nodes (None: not among its candidates)."""
    for cand in planned.candidates:
        if cand.describe() == described and list(cand.nodes) == list(nodes):
            return {"decode_s": cand.decode_s, "first_token_s": cand.first_token_s, "fits": cand.fits}
    return None


# -- outside: the test bed ------------------------------------------------------------------------
def _bed_run(profiles: list[tuple[Any, Any]], folder: Path, env: dict[str, str], spec: dict[str, Any],
             cpu: str = "quota") -> dict:
    from edge_testbed import EdgeTestbed

    with EdgeTestbed(profiles, cpu=cpu, coordinator_priority=COORDINATOR_PRIORITY) as bed:
        (folder / "nodes").mkdir(parents=True, exist_ok=True)
        spec = {**spec, "peers": bed.start_nodes(folder / "nodes", args=["--no-advertise"], env=env,
                                                 names={i: f"pi4-{i}" for i in bed.nodes})}
        start = time.perf_counter()
        done = bed.run_python(Path(__file__), "--inner", json.dumps(spec), timeout=3600, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"the coordinator failed ({done.returncode}):\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["wall_s"] = time.perf_counter() - start
        result["cpu_emulation"] = cpu
        result["coordinator_priority"] = COORDINATOR_PRIORITY
        result["devices"] = {str(i): {"device": bed.devices[i].name, "cpu_fraction": bed.devices[i].cpu_fraction,
                                      "memory": bed.devices[i].memory, "link": bed.links[i].name,
                                      "rate_mbit": bed.links[i].rate_mbit, "rtt_ms": bed.links[i].rtt_ms}
                             for i in bed.nodes}
        return result


def speedup_section(model: Path, folder: Path, env: dict, tokens: int, cpu: str = "quota") -> dict[str, Any]:
    """(1): 1, 2 and 4 Pi-class nodes, tensor parallel, Ethernet-class links; `cpu`: how the bed
    emulates their CPUs (tests/edge_testbed.py CPU_MODES)."""
    from edge_profiles import link

    runs = [{"layout": "tensor", "nodes": list(range(n)), "label": f"tensor x{n}"} for n in (1, 2, 4)]
    spec = {"model": str(model), "quantize": "q4", "runs": runs, "tokens": tokens, "prompt_ids": PROMPT_1B,
            "rounds": ROUNDS}
    result = _bed_run([("pi4", link("ethernet"))] * 4, folder, env, spec, cpu)
    result["summary"] = _pooled_speedups(result["runs"])
    return result


def _pooled_speedups(runs: list[dict]) -> list[dict]:
    """Per node count, the mean over its rounds of the median time per decode token and of the
    first-token time, and their speed-ups over 1 node; every run's tokens must equal 1 node's."""
    by_label: dict[str, list[dict]] = {}
    for row in runs:
        by_label.setdefault(row["label"], []).append(row)
    one = by_label["tensor x1"]
    one_token, one_first = (statistics.mean(r[k] for r in one) for k in ("per_token_s", "ttft_s"))
    summary = []
    for label, rows in by_label.items():
        per_token, first = (statistics.mean(r[k] for r in rows) for k in ("per_token_s", "ttft_s"))
        per_node = [p for r in rows for p in r.get("decode_per_node", {}).values()]
        summary.append({
            "label": label, "nodes": rows[0]["nodes"], "runs": len(rows), "per_token_s": per_token,
            "per_token_runs_s": [r["per_token_s"] for r in rows], "ttft_s": first,
            "speedup": one_token / per_token, "first_token_speedup": one_first / first,
            "messages_per_token": rows[0]["messages_per_token"],
            # the slowest node's, per decode message, averaged over the rounds
            "node_compute_ms": statistics.mean(max(p["compute_ms"] for p in r["decode_per_node"].values()) for r in rows)
            if per_node else None,
            "reply_wait_ms": statistics.mean(max(p["round_trip_ms"] for p in r["decode_per_node"].values()) for r in rows)
            if per_node else None,
            "same_tokens_as_1_node": all(r["tokens"] == one[0]["tokens"] for r in rows),
        })
    return summary


def layouts_section(model: Path, folder: Path, env: dict, tokens: int, rtts: tuple[float, ...],
                    cpu: str = "quota") -> list[dict]:
    """(2): per RTT, the planner's candidates and the measured layouts on 4 Pi-class nodes."""
    from edge_profiles import link

    runs = [{"layout": "tensor", "nodes": [0], "label": "1 node"},
            {"layout": "tensor", "nodes": [0, 1, 2, 3]},
            {"layout": "pipeline", "nodes": [0, 1, 2, 3]},
            {"layout": "hybrid:11x2,11x2", "nodes": [0, 1, 2, 3]}]
    settings = []
    for rtt in rtts:
        spec = {"model": str(model), "quantize": "q4", "runs": runs, "tokens": tokens, "prompt_ids": PROMPT_1B,
                "plan": True, "rounds": ROUNDS}
        result = _bed_run([("pi4", link("ethernet", rtt_ms=rtt))] * 4, folder, env, spec, cpu)
        for row in result["runs"]:
            pred = row.get("predicted")
            if pred:
                row["prediction_error"] = pred["decode_s"] / row["per_token_s"] - 1
        first = [r for r in result["runs"] if r["round"] == 0]
        best_run = min(first, key=lambda r: r["per_token_s"])
        chosen_run = next(r for r in first if r["label"] == "planner's choice")
        result.update(rtt_ms=rtt, choice=chosen_run["layout"], **_pooled_choice(result["runs"]),
                      choice_ratio_one_run=chosen_run["per_token_s"] / best_run["per_token_s"])
        settings.append(result)
    return settings


def _pooled_choice(runs: list[dict]) -> dict[str, Any]:
    """The planner's choice against the best layout, each layout's runs pooled: per distinct layout
    (description and nodes) the mean of its runs, over every round, and the choice's run counts
    as one more run of the layout it is. Why pooled: one run of a layout against one of another
    compares noise as much as layouts here (4 nodes, the coordinator and their proxies on 2 cores:
    the same layout ran 335 and 376 ms/token in one setting), so `choice_ratio_one_run` (the
    choice's own first-round run over the best first-round run) is kept beside it, not headlined."""
    pooled: dict[tuple[str, tuple[int, ...]], list[float]] = {}
    for row in runs:
        pooled.setdefault((row["layout"], tuple(row["nodes"])), []).append(row["per_token_s"])
    means = {key: statistics.mean(times) for key, times in pooled.items()}
    chosen = next(r for r in runs if r["label"] == "planner's choice")
    best = min(means, key=means.get)
    return {"best": best[0], "best_nodes": list(best[1]), "best_s": means[best],
            "layout_means": [{"layout": k[0], "nodes": list(k[1]), "per_token_s": v, "runs": len(pooled[k])}
                             for k, v in means.items()],
            "choice_ratio": means[(chosen["layout"], tuple(chosen["nodes"]))] / means[best]}


def speculative_section(folder: Path, env: dict, tokens: int, cpu: str = "quota") -> dict[str, Any]:
    """(3): SmolLM2 on 2 Pi-class nodes at 3 ms RTT, plain vs prompt-lookup speculation."""

    from edgeweave.splitting.checkpoints import open_checkpoint
    from edgeweave.splitting.tokenizer import Tokenizer

    checkpoint = open_checkpoint()
    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    sections = {}
    for name, text in EDIT_PROMPTS.items():
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": text}])
        sections[name] = _speculative_runs(checkpoint, prompt_ids, folder, env, tokens, cpu)
    return sections


def _speculative_runs(checkpoint: Any, prompt_ids: list[int], folder: Path, env: dict, tokens: int,
                      cpu: str) -> dict[str, Any]:
    from edge_profiles import link

    runs = []
    for layout in ("tensor", "pipeline"):
        # plain: what `run --speculate 0` does (one-row kernels); the token-invariant plain run is the
        # reference the speculative tokens must equal exactly (the same kernels, one token per pass)
        runs += [{"layout": layout, "nodes": [0, 1], "label": f"{layout} plain"},
                 {"layout": layout, "nodes": [0, 1], "label": f"{layout} plain, token-invariant",
                  "token_invariant": True},
                 {"layout": layout, "nodes": [0, 1], "label": f"{layout} speculative", "speculate": 8,
                  "token_invariant": True}]
    spec = {"model": str(checkpoint.path), "quantize": None, "runs": runs, "tokens": tokens, "prompt_ids": prompt_ids}
    result = _bed_run([("pi4", link("ethernet", rtt_ms=3.0))] * 2, folder, env, spec, cpu)
    rows = {r["label"]: r for r in result["runs"]}
    for layout in ("tensor", "pipeline"):
        plain, spec_row = rows[f"{layout} plain"], rows[f"{layout} speculative"]
        spec_row["identical_tokens"] = spec_row["tokens"] == rows[f"{layout} plain, token-invariant"]["tokens"]
        spec_row["identical_to_plain_fast_path"] = spec_row["tokens"] == plain["tokens"]
        spec_row["gain"] = 1 - spec_row["mean_token_s"] / plain["mean_token_s"]
    return result


def _print(report: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    if "speedup" in report:
        _print_speedup(console, report["speedup"], "CFS quota")
        _print_speedup(console, report["speedup_dilation"], "time dilation")
    if "layouts" in report:
        _print_layouts(console, report)
    if "speculative" in report:
        _print_speculative(console, report)
    console.print({k: report.get(k) for k in ("speedup_2", "speedup_4", "speedup_2_dilation", "speedup_4_dilation",
                                              "planner_worst_ratio", "planner_worst_ratio_one_run", "speculative_gain")})


def _print_speedup(console: Any, section: dict[str, Any], emulation: str) -> None:
    from rich.table import Table

    table = Table(title=f"tensor parallel on Pi-4-class nodes (random Llama 1.1B shape, q4; CPU by {emulation})")
    for col in ("nodes", "ms/token (rounds)", "first token ms", "speed-up", "first-token speed-up", "exo reports",
                "messages/token", "node compute ms/msg", "reply wait ms/msg"):
        table.add_column(col, justify="right")
    for row in section["summary"]:
        n = len(row["nodes"])
        runs = " / ".join(f"{t * 1e3:.0f}" for t in row["per_token_runs_s"])
        table.add_row(str(n), f"{row['per_token_s'] * 1e3:.0f} ({runs})", f"{row['ttft_s'] * 1e3:.0f}",
                      f"{row['speedup']:.2f}x", f"{row['first_token_speedup']:.2f}x",
                      f"{EXO_SPEEDUP[n]:.1f}x" if n in EXO_SPEEDUP else "", str(row["messages_per_token"]),
                      f"{row['node_compute_ms'] or float('nan'):.2f}", f"{row['reply_wait_ms'] or float('nan'):.2f}")
    console.print(table)


def _print_layouts(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="layouts against link RTT (4 Pi-4-class nodes): measured vs predicted ms/token")
    for col in ("RTT ms", "round", "layout", "measured", "predicted", "error", "first token ms", "msgs/token"):
        table.add_column(col, justify="right")
    for setting in report["layouts"]:
        for row in setting["runs"]:
            pred = row.get("predicted")
            mark = " *" if row["label"] == "planner's choice" else ""
            table.add_row(f"{setting['rtt_ms']:g}", str(row.get("round", 0)), row["layout"] + mark,
                          f"{row['per_token_s'] * 1e3:.0f}",
                          f"{pred['decode_s'] * 1e3:.0f}" if pred else "-",
                          f"{row['prediction_error']:+.0%}" if "prediction_error" in row else "-",
                          f"{row['ttft_s'] * 1e3:.0f}", str(row["messages_per_token"]))
    console.print(table)


def _print_speculative(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="prompt-lookup speculation, SmolLM2 on 2 Pi-4-class nodes at 3 ms RTT")
    for col in ("prompt", "run", "mean ms/token", "tokens/pass", "identical", "gain"):
        table.add_column(col, justify="right")
    for prompt, section in report["speculative"].items():
        for row in section["runs"]:
            per_pass = row.get("tokens_per_pass")
            table.add_row(prompt, row["label"], f"{row['mean_token_s'] * 1e3:.1f}", f"{per_pass:.2f}" if per_pass else "-",
                          str(row.get("identical_tokens", "")), f"{row['gain']:.0%}" if "gain" in row else "")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8, help="decode tokens per measured run")
    parser.add_argument("--spec-tokens", type=int, default=48, help="tokens of the speculation runs")
    parser.add_argument("--quick", action="store_true", help="only 1 and 10 ms RTT")
    parser.add_argument("--rtts", type=lambda text: tuple(float(x) for x in text.split(",")),
                        help="the layouts section's link RTTs in ms, comma-separated (default: 0.2,1,3,10)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="where to write the JSON; the sections skipped are carried over from the file there")
    parser.add_argument("--skip", action="append", default=[], choices=["speedup", "layouts", "speculative"])
    parser.add_argument("--cpu", default="dilation", choices=["quota", "dilation"],
                        help="how the layouts and speculation sections emulate the devices' CPUs (the speed-up "
                             "section measures both)")
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(inner(json.loads(args.inner))), flush=True)
        return
    if os.geteuid() != 0:
        sys.exit("error: the emulated test bed needs root (network namespaces, cgroups, tc)")
    sys.path.insert(0, str(ROOT / "tests"))
    from edgeweave.security import create_secret
    from edgeweave.splitting.random_llama import write_random_llama

    load = os.getloadavg()
    model = write_random_llama(Path.home() / ".cache" / "edgeweave" / "models" / "random-1b", "1b", dtype="float16")
    cache = Path.home() / ".cache" / "edgeweave" / "scaling"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeweave-scaling-") as tmp:
        folder = Path(tmp)
        # nodes keep their shards across beds (same names, same data dirs under the cache)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "EDGEWEAVE_CACHE": str(cache / "coordinator"),
               "EDGEWEAVE_CLUSTER_SECRET_FILE": str(create_secret(folder / "cluster.secret"))}
        nodes = cache / "beds"
        report: dict[str, Any] = {"meta": {"loadavg_at_start": load, "cpu_count": os.cpu_count(),
                                           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "tokens": args.tokens,
                                           "cpu_emulation": args.cpu}}
        if "speedup" not in args.skip:
            # the goal's figures under CFS quotas; beside them, the same under time dilation (a device
            # at a constant fraction of the speed, runtime/cpu_dilation.py), the closer emulation of a
            # slow CPU for work that synchronises every layer
            report["speedup"] = speedup_section(model, nodes, env, args.tokens)
            report["speedup_dilation"] = speedup_section(model, nodes, env, args.tokens, "dilation")
            for key, suffix in (("speedup", ""), ("speedup_dilation", "_dilation")):
                by_n = {len(r["nodes"]): r for r in report[key]["summary"]}
                report["speedup_2" + suffix], report["speedup_4" + suffix] = by_n[2]["speedup"], by_n[4]["speedup"]
        if "layouts" not in args.skip:
            rtts = args.rtts or ((1.0, 10.0) if args.quick else RTTS_MS)
            report["layouts"] = layouts_section(model, nodes, env, args.tokens, rtts, args.cpu)
            report["planner_worst_ratio"] = max(s["choice_ratio"] for s in report["layouts"])
            report["planner_worst_ratio_one_run"] = max(s["choice_ratio_one_run"] for s in report["layouts"])
            errors = [abs(r["prediction_error"]) for s in report["layouts"] for r in s["runs"] if "prediction_error" in r]
            report["prediction_error_median"] = statistics.median(errors) if errors else None
            report["prediction_error_max"] = max(errors) if errors else None
        if "speculative" not in args.skip:
            report["speculative"] = speculative_section(nodes, env, args.spec_tokens, args.cpu)
            runs = {r["label"]: r for r in report["speculative"]["proofread"]["runs"]}
            report["speculative_gain"] = runs["tensor speculative"]["gain"]
            report["speculative_identical"] = all(r["identical_tokens"] for s in report["speculative"].values()
                                                  for r in s["runs"] if "identical_tokens" in r)
        report["meta"]["loadavg_at_end"] = os.getloadavg()
    _carry_over(report, args.out, args.skip)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    _print(report)


#: what each section writes at the JSON's top level
SECTION_KEYS = {
    "speedup": ("speedup", "speedup_dilation", "speedup_2", "speedup_4", "speedup_2_dilation", "speedup_4_dilation"),
    "layouts": ("layouts", "planner_worst_ratio", "planner_worst_ratio_one_run", "prediction_error_median",
                "prediction_error_max"),
    "speculative": ("speculative", "speculative_gain", "speculative_identical"),
}


def _carry_over(report: dict[str, Any], path: Path, skipped: list[str]) -> None:
    """The skipped sections' figures from the JSON already at `path` (a section rerun alone keeps the
    others' last figures, and says when each was measured in meta.sections_started); None where none."""
    previous = json.loads(path.read_text()) if path.exists() else {}
    started = dict(previous.get("meta", {}).get("sections_started", {}))
    for section, keys in SECTION_KEYS.items():
        if section in skipped:
            for key in keys:
                if key in previous:
                    report[key] = previous[key]
            if section in started or "meta" in previous:
                started[section] = started.get(section, previous.get("meta", {}).get("started"))
        else:
            started[section] = report["meta"]["started"]
    report["meta"]["sections_started"] = started
    for key in ("speedup_2", "speedup_4", "planner_worst_ratio", "speculative_gain"):
        report.setdefault(key, None)


if __name__ == "__main__":
    main()
