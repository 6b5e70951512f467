"""How exact is the test bed's emulated RTT? Target vs measured, from the coordinator's namespace.

One EdgeTestbed with one uncapped node per target RTT (0 = the delay proxy with no delay, to see its
own cost), each on a wifi-rate link. For each node, interleaved (so load drift hits both alike):
gRPC Echo (64 bytes) through the proxy and on the node's own address, and a data-plane Forward
(1x64 float32, the echo executor) both ways. Medians; "added" = proxied - direct, which should be
the target. Needs root (namespaces, cgroups).

    python benchmarks/link_rtt.py [--rtts 0,0.5,1,3,10] [--rounds 200] [--proxy tests/delay_proxy.py]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import edge_testbed  # noqa: E402
from edge_profiles import device, link  # noqa: E402

from edgeweave.security import create_secret  # noqa: E402

DRIVER = textwrap.dedent("""
    import json, statistics, sys, time
    import torch
    from edgeweave.coordinator.client import NodeClient

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    rounds, out = int(sys.argv[2]), []
    for spec in json.loads(sys.argv[1]):
        x, got = torch.zeros(1, 64), {"echo": [], "direct_echo": [], "forward": [], "direct_forward": []}
        with NodeClient(spec["address"], timeout=30) as far, NodeClient(spec["direct"], timeout=30) as near:
            far.load("bench-echo", "echo", {}, {})
            with far.open_stream(reply_timeout=30) as fs, near.open_stream(reply_timeout=30) as ns:
                for _ in range(3):
                    far.echo(b"warm"), near.echo(b"warm"), fs.call("bench-echo", "echo", [x]), \\
                        ns.call("bench-echo", "echo", [x])
                for _ in range(rounds):
                    got["echo"].append(timed(lambda: far.echo(b"x" * 64)))
                    got["direct_echo"].append(timed(lambda: near.echo(b"x" * 64)))
                    got["forward"].append(timed(lambda: fs.call("bench-echo", "echo", [x])))
                    got["direct_forward"].append(timed(lambda: ns.call("bench-echo", "echo", [x])))
            far.unload("bench-echo")
        out.append({k: statistics.median(v) for k, v in got.items()} | {"echo_min": min(got["echo"]),
                                                                         "forward_min": min(got["forward"])})
    print(json.dumps(out))
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtts", default="0,0.5,1,3,10", help="Target RTTs in ms, comma-separated.")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--proxy", type=Path, default=edge_testbed.PROXY_SCRIPT, help="The delay proxy script.")
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    args = parser.parse_args()
    rtts = [float(r) for r in args.rtts.split(",")]
    edge_testbed.PROXY_SCRIPT, edge_testbed.PROXY_MIN_RTT_MS = args.proxy.resolve(), 0.0  # proxy every link
    specs = [(device("pi4", cpu_fraction=1.0, memory="1GiB"), link("wifi", rtt_ms=r)) for r in rtts]
    with tempfile.TemporaryDirectory() as folder, edge_testbed.EdgeTestbed(specs) as bed:
        if "EDGEWEAVE_CLUSTER_SECRET_FILE" not in os.environ:  # mutual TLS as in production, a throw-away secret
            os.environ["EDGEWEAVE_CLUSTER_SECRET_FILE"] = str(create_secret(Path(folder) / "cluster.secret"))
        bed.start_nodes(Path(folder), args=["--no-advertise"])
        peers = [{"address": bed.address(i), "direct": f"{bed.ips[i]}:{edge_testbed.NODE_PORT}"} for i in bed.nodes]
        load_before = os.getloadavg()
        result = bed.run_python(DRIVER, json.dumps(peers), str(args.rounds), timeout=600)
        load_after = os.getloadavg()
    if result.returncode != 0:
        sys.exit(f"the driver failed: {result.stderr[-2000:]}")
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"proxy {args.proxy}; loadavg (1/5/15 min) {load_before} before, {load_after} after; medians of "
          f"{args.rounds} rounds, ms")
    print("target | echo direct | echo proxied (min) | echo added | forward direct | forward proxied (min) | "
          "forward added")
    for rtt, r in zip(rtts, rows, strict=True):
        r["target_ms"] = rtt
        print(f"{rtt:6g} | {r['direct_echo']:.3f} | {r['echo']:.3f} ({r['echo_min']:.3f}) | "
              f"{r['echo'] - r['direct_echo']:+.3f} | {r['direct_forward']:.3f} | {r['forward']:.3f} "
              f"({r['forward_min']:.3f}) | {r['forward'] - r['direct_forward']:+.3f}")
    if args.json:
        args.json.write_text(json.dumps({"loadavg": [load_before, load_after], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
