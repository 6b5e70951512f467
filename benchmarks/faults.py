"""Fault tolerance and TLS cost, measured side by side in one run on a local cluster.

1. Recovery: a 3-node SmolLM2 cluster, kill -9 one node mid-generation, several times (the node
   is restarted between kills); on a local cluster, and (as root, --namespaces) with the three
   nodes and the coordinator on four network-namespace hosts joined by a bridge. Reports detection time (start of the failing step -> error), the
   stall (error -> next token) and the shard bytes re-sent. The first kill also writes the
   survivors' plan; later kills find it cached and the survivors already holding it.
2. TLS vs insecure on the Forward stream: decode-sized messages (1x576 and 1x2048 float32)
   round-tripped through the echo executor on a mutual-TLS node and a plaintext node, interleaved.
3. Decode tokens/s of a 2-node SmolLM2 cluster, secure vs --insecure, interleaved rounds.
   Goal: TLS costs < 10% on decode.
4. A hung node: SIGSTOP (not SIGKILL) of 1 of 3 nodes mid-generation. Its kernel keeps the
   connections open, so detection rests on the decode reply deadline (coordinator/recovery.py
   step_deadline: max(3 s, 10 x the median recent step)); reports detection and stall like 1.
5. Node memory over coordinator crashes: CYCLES times a coordinator process loads SmolLM2 onto 2
   nodes, opens 16 sessions and is SIGKILLed; after each, the nodes' session count (must fall to
   0 within [node] session_grace_s, node/leases.py) and RSS. Goal: RSS growth from the first
   cycle to the last below RSS_GROWTH_BOUND.

    python benchmarks/faults.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.table import Table

from edgeweave.coordinator.client import NodeClient
from edgeweave.coordinator.identity import Identity
from edgeweave.coordinator.local_cluster import LocalCluster
from edgeweave.coordinator.tp_driver import DistributedLlama
from edgeweave.security import create_secret
from edgeweave.splitting.checkpoints import open_checkpoint
from edgeweave.splitting.tokenizer import Tokenizer

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
PROMPT = [{"role": "user", "content": "Tell me about the history of Paris in a few sentences."}]
INSECURE = Identity(None, None)
#: the goal of the crash cycles: a node's RSS after the last cycle at most this much above the first's
RSS_GROWTH_BOUND = 64 * 2**20
CRASH_SESSIONS = 16


def fault_runs(checkpoint, prompt_ids: list[int], times: int, cache: Path, sig: int = signal.SIGKILL) -> list[dict]:
    """Send `sig` to node 2 of 3 after 6 tokens, `times` times (SIGKILL: a dead node; SIGSTOP: a
    hung one, SIGKILLed afterwards since a stopped process only answers that); one recovery record each."""
    records = []
    with LocalCluster(3, advertise=False, env=ONE_THREAD) as cluster:
        for _ in range(times):
            clients = [NodeClient(a, cluster=cluster.identity) for a in cluster.addresses]
            with DistributedLlama(checkpoint, clients, [1.0, 1.0, 1.0], cache_dir=cache) as llm:
                for i, _token in enumerate(llm.generate(prompt_ids, 16)):
                    if i == 5:
                        cluster.kill(2, sig)
                records += llm.last_stats.recoveries
            for client in clients:
                client.close()
            if sig != signal.SIGKILL:
                cluster.kill(2, signal.SIGKILL)
            cluster.restart(2)
    return records


#: a coordinator that crashes: loads the model, opens sessions, says "ready", idles until SIGKILLed
CRASHING_COORDINATOR = textwrap.dedent("""
    import json, sys, time
    from edgeweave.coordinator import identity
    from edgeweave.coordinator.client import NodeClient
    from edgeweave.coordinator.tp_driver import DistributedLlama
    from edgeweave.runtime.batch import SequenceStep
    from edgeweave.splitting.checkpoints import open_checkpoint
    from edgeweave.splitting.tokenizer import Tokenizer
    secret, cache, sessions, chat, *addresses = sys.argv[1:]
    identity.configure(secret)
    checkpoint = open_checkpoint()
    ids = Tokenizer.from_checkpoint(checkpoint).encode_chat(json.loads(chat))
    llm = DistributedLlama(checkpoint, [NodeClient(a) for a in addresses], [1.0] * len(addresses), cache_dir=cache)
    for i in range(int(sessions)):
        llm.step([SequenceStep(f"crash-{i}", ids, 0)])
    print("ready", flush=True)
    time.sleep(3600)
""")


def crash_cycles(cycles: int, cache: Path) -> list[dict]:
    """`cycles` coordinator crashes against the same 2 nodes; per cycle the sessions held before
    the kill, the seconds until the nodes held none, and each node's RSS after that."""
    rows = []
    with LocalCluster(2, advertise=False, env=ONE_THREAD) as cluster:
        nodes = [psutil.Process(p.pid) for p in cluster.procs if p]
        clients = [NodeClient(a, cluster=cluster.identity) for a in cluster.addresses]
        argv = [sys.executable, "-c", CRASHING_COORDINATOR, str(cluster.identity.secret_file), str(cache),
                str(CRASH_SESSIONS), json.dumps(PROMPT), *cluster.addresses]
        for cycle in range(cycles):
            coordinator = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD})
            assert coordinator.stdout is not None
            if coordinator.stdout.readline() != "ready\n":
                coordinator.kill()
                raise RuntimeError(f"crash cycle {cycle}: the coordinator failed (exit {coordinator.wait()})")
            held = [c.health().sessions for c in clients]
            coordinator.kill()
            coordinator.wait()
            killed = time.monotonic()
            while any(c.health().sessions for c in clients):
                if time.monotonic() - killed > 60:
                    raise RuntimeError(f"crash cycle {cycle}: sessions still held 60 s after the kill")
                time.sleep(0.05)
            freed_s = time.monotonic() - killed
            rows.append({"cycle": cycle + 1, "sessions_before_kill": held, "freed_after_s": freed_s,
                         "rss": [n.memory_info().rss for n in nodes], "jobs": [len(c.health().jobs) for c in clients]})
        for client in clients:
            client.close()
    return rows


def crash_table(rows: list[dict]) -> Table:
    table = Table(title=f"node RSS over {len(rows)} SIGKILLed coordinators ({CRASH_SESSIONS} sessions each)")
    for col in ("cycle", "sessions held", "freed after (s)", "RSS node0 (MB)", "RSS node1 (MB)", "jobs"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["cycle"]), "/".join(map(str, r["sessions_before_kill"])), f"{r['freed_after_s']:.2f}",
                      *(f"{b / 1e6:.0f}" for b in r["rss"]), "/".join(map(str, r["jobs"])))
    return table


#: the coordinator of the namespace run: prints one line per token, then its recovery records
NS_COORDINATOR = textwrap.dedent("""
    import json, sys
    from edgeweave.coordinator.client import NodeClient
    from edgeweave.coordinator.tp_driver import DistributedLlama
    from edgeweave.splitting.checkpoints import open_checkpoint
    from edgeweave.splitting.tokenizer import Tokenizer
    checkpoint = open_checkpoint()
    ids = Tokenizer.from_checkpoint(checkpoint).encode_chat(json.loads(sys.argv[1]))
    clients = [NodeClient(a, timeout=60) for a in sys.argv[2:]]
    with DistributedLlama(checkpoint, clients, [1.0] * len(clients), show_progress=False) as llm:
        for i, _ in enumerate(llm.generate(ids, 16)):
            print(f"token {i}", flush=True)
        print(json.dumps(llm.last_stats.recoveries), flush=True)
""")


def recovery_across_namespaces(kills: int) -> list[dict]:
    """The same kill -9 as `fault_runs`, with nodes on hosts 0-2 and the coordinator on host 3."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from netns import Testbed

    records: list[dict] = []
    with Testbed(4) as bed, tempfile.TemporaryDirectory(prefix="edgeweave-ns-faults-") as tmp:
        folder = Path(tmp)
        env = {**os.environ, **ONE_THREAD, "EDGEWEAVE_CACHE": str(folder / "cache"),
               "EDGEWEAVE_CLUSTER_SECRET_FILE": str(create_secret(folder / "cluster.secret"))}
        for _ in range(kills):
            # same names and data dirs every round: later rounds find their shards already there
            addresses = [bed.start_node(i, f"fault-node{i}", folder, ["--no-advertise"], env=env) for i in range(3)]
            coordinator = subprocess.Popen(bed.argv(3, [sys.executable, "-c", NS_COORDINATOR, json.dumps(PROMPT),
                                                        *addresses]), stdout=subprocess.PIPE, text=True, env=env)
            assert coordinator.stdout is not None
            for line in coordinator.stdout:
                if line.startswith("token 5"):
                    _signal_host(bed.hosts[2], signal.SIGKILL)
                elif line.startswith("["):
                    records += json.loads(line)
            if coordinator.wait(120) != 0:
                raise RuntimeError(f"the namespaced coordinator failed with exit code {coordinator.returncode}")
            for host in bed.hosts[:3]:
                _signal_host(host, signal.SIGTERM)
            time.sleep(1.0)
    return records


def _signal_host(namespace: str, sig: int) -> None:
    """Signal every process of a namespace host (`ip netns pids`)."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), sig)


def forward_rtts(rounds: int) -> dict[str, dict[str, float]]:
    """Median Forward round trip (echo executor) of decode-sized tensors, TLS vs plaintext."""
    shapes = {"1x576 f32": (1, 576), "1x2048 f32": (1, 2048)}
    out: dict[str, dict[str, float]] = {}
    with LocalCluster(1, advertise=False, env=ONE_THREAD) as secure, \
            LocalCluster(1, advertise=False, env=ONE_THREAD, cluster_identity=INSECURE) as plain:
        streams = {}
        for mode, cluster in (("tls", secure), ("insecure", plain)):
            client = NodeClient(cluster.addresses[0], cluster=cluster.identity)
            client.load("echo-bench", "echo", {}, {})
            streams[mode] = client.open_stream(10.0)
        for label, shape in shapes.items():
            x = torch.randn(shape)
            samples: dict[str, list[float]] = {m: [] for m in streams}
            for _ in range(rounds):
                for mode, stream in streams.items():  # interleaved: both see the same machine state
                    start = time.perf_counter()
                    stream.call("echo-bench", "echo", [x])
                    samples[mode].append(time.perf_counter() - start)
            out[label] = {m: statistics.median(s[rounds // 10:]) for m, s in samples.items()}
        for stream in streams.values():
            stream.close()
    return out


def decode_speeds(checkpoint, prompt_ids: list[int], rounds: int, tokens: int, cache: Path) -> dict[str, float]:
    """Median decode seconds/token on 2 nodes, TLS vs plaintext, alternating rounds."""
    per_token: dict[str, list[float]] = {"tls": [], "insecure": []}
    with LocalCluster(2, advertise=False, env=ONE_THREAD) as secure, \
            LocalCluster(2, advertise=False, env=ONE_THREAD, cluster_identity=INSECURE) as plain:
        llms = {}
        for mode, cluster in (("tls", secure), ("insecure", plain)):
            clients = [NodeClient(a, cluster=cluster.identity) for a in cluster.addresses]
            llms[mode] = DistributedLlama(checkpoint, clients, [1.0, 1.0], cache_dir=cache)
        try:
            for _ in range(rounds):
                for mode, llm in llms.items():
                    list(llm.generate(prompt_ids, tokens))
                    per_token[mode] += llm.last_stats.token_s
        finally:
            for llm in llms.values():
                llm.close()
    return {m: statistics.median(s) for m, s in per_token.items()}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def recovery_table(title: str, records: list[dict]) -> Table:
    table = Table(title=title)
    for col in ("kill", "detected after (s)", "stall to next token (s)", "bytes re-sent"):
        table.add_column(col, justify="right")
    for i, r in enumerate(records):
        table.add_row(str(i + 1), f"{r['detected_after_s']:.3f}", f"{r['stall_s']:.2f}", f"{r['resent_bytes']:,}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer kills, rounds and tokens")
    parser.add_argument("--namespaces", action="store_true", help="also measure recovery across network namespaces (root)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kills, rtt_rounds, rounds, tokens, cycles = (2, 300, 2, 16, 4) if args.quick else (4, 2000, 3, 32, 20)
    with open("/proc/loadavg") as f:
        loadavg = f.read().split()[:3]
    checkpoint = open_checkpoint()
    prompt_ids = Tokenizer.from_checkpoint(checkpoint).encode_chat(PROMPT)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="edgeweave-faults-") as cache_dir:
        cache = Path(cache_dir)
        records = fault_runs(checkpoint, prompt_ids, kills, cache)
        ns_records = recovery_across_namespaces(kills) if args.namespaces else []
        rtts = forward_rtts(rtt_rounds)
        decode = decode_speeds(checkpoint, prompt_ids, rounds, tokens, cache)
        hung = fault_runs(checkpoint, prompt_ids, kills, cache, signal.SIGSTOP)
        crashes = crash_cycles(cycles, cache)

    console.print(recovery_table(f"recovery after kill -9 of 1 of 3 nodes ({len(records)} kills)", records))
    if ns_records:
        console.print(recovery_table(f"the same across network namespaces ({len(ns_records)} kills)", ns_records))
    console.print(recovery_table(f"recovery after SIGSTOP (a hung node) of 1 of 3 nodes ({len(hung)} stops)", hung))
    console.print(crash_table(crashes))
    growth = [last - first for first, last in zip(crashes[0]["rss"], crashes[-1]["rss"], strict=True)]
    console.print(f"RSS growth cycle 1 -> {len(crashes)}: {', '.join(f'{g / 1e6:+.1f} MB' for g in growth)} "
                  f"(bound {RSS_GROWTH_BOUND / 1e6:.0f} MB: {'met' if max(growth) <= RSS_GROWTH_BOUND else 'MISSED'})")
    table = Table(title="TLS vs insecure (medians, same run, interleaved)")
    for col in ("measure", "TLS", "insecure", "TLS / insecure"):
        table.add_column(col, justify="right")
    for label, m in rtts.items():
        table.add_row(f"Forward RTT {label} (ms)", f"{m['tls'] * 1e3:.3f}", f"{m['insecure'] * 1e3:.3f}",
                      f"{m['tls'] / m['insecure']:.3f}")
    table.add_row("decode, 2-node SmolLM2 (tok/s)", f"{1 / decode['tls']:.2f}", f"{1 / decode['insecure']:.2f}",
                  f"{decode['tls'] / decode['insecure']:.3f} (time)")
    console.print(table)

    result = {
        "recoveries": records,
        "median_detected_after_s": statistics.median(r["detected_after_s"] for r in records),
        "median_stall_s": statistics.median(r["stall_s"] for r in records),
        "median_stall_cached_s": statistics.median(r["stall_s"] for r in records[1:]) if len(records) > 1 else None,
        "namespace_recoveries": ns_records,
        "namespace_median_stall_s": statistics.median(r["stall_s"] for r in ns_records) if ns_records else None,
        "forward_rtt_s": rtts,
        "decode_s_per_token": decode,
        "decode_tls_cost": decode["tls"] / decode["insecure"] - 1,
        "hung_recoveries": hung,
        "hung_median_detected_after_s": _median([r["detected_after_s"] for r in hung]),
        "hung_median_stall_s": _median([r["stall_s"] for r in hung]),
        "crash_cycles": crashes,
        "crash_median_freed_after_s": _median([r["freed_after_s"] for r in crashes]),
        "crash_rss_growth_bytes": growth,
        "crash_rss_growth_bound_bytes": RSS_GROWTH_BOUND,
        "crash_rss_bound_met": max(growth) <= RSS_GROWTH_BOUND,
        "loadavg_before": loadavg,
        "cpus": len(os.sched_getaffinity(0)),
        "quick": args.quick,
    }
    out = Path(__file__).resolve().parent / "results" / "faults.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
