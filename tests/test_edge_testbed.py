"""The edge test bed's limits are real: seen by the node itself (Info/Profile over gRPC from the
coordinator's namespace), by a process that allocates too much, and by round trips and bulk
transfers across its links. And it leaves nothing behind, however its run ends."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import edge_cgroups
import netns
import psutil
import pytest
from edge_profiles import device, link
from edge_testbed import EdgeTestbed
from host_speed import host_core_gflops

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.serial,  # it measures speeds and RTTs
              pytest.mark.skipif(os.geteuid() == 0 and edge_cgroups.available() is not None,
                                 reason=f"no usable cgroups: {edge_cgroups.available()}")]

SINK_PORT = 5201
TESTS = Path(__file__).resolve().parent

#: the two devices: a stock Pi 4 on Ethernet one switch further (1 ms: the smallest RTT the scaling
#: benchmark sweeps, at the fastest rate), and a Jetson Nano given another CPU fraction and a small
#: memory limit (so the OOM check is quick) on Wi-Fi (4 ms)
SPECS = [(device("pi4"), link("ethernet", rtt_ms=1.0)),
         (device("jetson-nano", cpu_fraction=0.4, memory="768MiB"), link("wifi"))]

#: a TCP sink/source for the bulk transfers, run in a node's namespace (outside its cgroup: it measures
#: the link, not the device). b"d"+n: read n bytes, answer b"k"; b"u"+n: send n bytes.
SINK = textwrap.dedent("""
    import socket, struct, sys
    server = socket.create_server((sys.argv[1], int(sys.argv[2])))
    print("ready", flush=True)
    buf = bytearray(1 << 20)
    while True:
        conn, _ = server.accept()
        with conn:
            head = b""
            while len(head) < 9:
                head += conn.recv(9 - len(head))
            left = struct.unpack("!Q", head[1:])[0]
            if head[:1] == b"d":
                while left:
                    left -= conn.recv_into(buf, min(left, len(buf)))
                conn.sendall(b"k")
            else:
                view = memoryview(buf)
                while left:
                    left -= conn.send(view[:min(left, len(buf))])
""")

#: the coordinator side of every measurement, one interpreter in the coordinator's namespace
DRIVER = textwrap.dedent("""
    import json, socket, struct, sys, time
    import torch
    from edgeweave.coordinator.client import NodeClient, RawForwardStream

    def ms(t0):
        return (time.perf_counter() - t0) * 1e3

    def echo_rtts(address, direct, n=60):
        # through the proxy and on the node's own address, interleaved: the VM's load drifts
        with NodeClient(address, timeout=30) as far, NodeClient(direct, timeout=30) as near:
            far.echo(b"warm"), near.echo(b"warm")
            out = ([], [])
            for _ in range(n):
                for client, times in zip((far, near), out):
                    t0 = time.perf_counter()
                    client.echo(b"x" * 64)
                    times.append(ms(t0))
            return out

    def bulk(host, port, nbytes):
        block = memoryview(bytearray(1 << 20))
        with socket.create_connection((host, port), timeout=60) as s:
            s.sendall(b"d" + struct.pack("!Q", nbytes))
            t0, left = time.perf_counter(), nbytes
            while left:
                n = min(left, len(block))
                s.sendall(block[:n])
                left -= n
            assert s.recv(1) == b"k"
            down = nbytes * 8 / (time.perf_counter() - t0) / 1e6
        with socket.create_connection((host, port), timeout=60) as s:
            t0, left = time.perf_counter(), nbytes
            s.sendall(b"u" + struct.pack("!Q", nbytes))
            while left:
                got = s.recv_into(block, min(left, len(block)))
                assert got, "the source closed early"
                left -= got
            up = nbytes * 8 / (time.perf_counter() - t0) / 1e6
        return down, up

    out = []
    for spec in json.loads(sys.argv[1]):
        row = {}
        with NodeClient(spec["address"], timeout=60) as client:
            info = client.info()
            r = info.resources
            row.update(cpu_cores=r.cpu_cores, cpu_count=r.cpu_count, total_memory=r.total_memory,
                       available_memory=r.available_memory, memory_budget=r.memory_budget, data_port=info.data_port)
            p = client.profile(budget_s=1.5)
            row.update(matmul_gflops=p.matmul_gflops, threads=p.threads)
            client.load("tb-echo", "echo", {}, {})
            x = torch.zeros(1, 64)
            with client.open_stream(reply_timeout=30) as stream:
                row["raw_data_plane"] = isinstance(stream, RawForwardStream)
                stream.call("tb-echo", "echo", [x])
                raw = []
                for _ in range(20):
                    t0 = time.perf_counter()
                    stream.call("tb-echo", "echo", [x])
                    raw.append(ms(t0))
                row["raw_rtt_ms"] = raw
            client.unload("tb-echo")
        row["echo_ms"], row["direct_echo_ms"] = echo_rtts(spec["address"], spec["direct"])
        row["down_mbit"], row["up_mbit"] = bulk(spec["sink_host"], spec["sink_port"], spec["bulk_bytes"])
        out.append(row)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    """The uncapped reference first (before any node burns CPU), then the bed with both nodes serving."""
    reference = host_core_gflops()
    folder = tmp_path_factory.mktemp("edge")
    with EdgeTestbed(SPECS, extra_ports=(SINK_PORT,)) as bed:
        started = time.perf_counter()
        addresses = bed.start_nodes(folder, args=["--memory-budget", "0.5"])
        start_s = time.perf_counter() - started
        sinks = []
        for i in bed.nodes:
            sink = bed.popen(i, [sys.executable, "-c", SINK, bed.ips[i], str(SINK_PORT)], stdout=subprocess.PIPE)
            assert sink.stdout.readline() == b"ready\n"
            sinks.append(sink)
        yield {"bed": bed, "addresses": addresses, "folder": folder, "reference": reference, "start_s": start_s}


@pytest.fixture(scope="module")
def measured(edge):
    """Everything the coordinator measures of each node, from the coordinator's namespace."""
    bed = edge["bed"]
    specs = [{"address": bed.address(i), "direct": f"{bed.ips[i]}:50551", "sink_host": bed.dial_host(i),
              "sink_port": SINK_PORT, "bulk_bytes": int(bed.links[i].rate_mbit * 1e6 / 8 * 0.5)}  # ~0.5 s each way
             for i in bed.nodes]
    result = bed.run_python(DRIVER, json.dumps(specs), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    edge["reference_after"] = host_core_gflops()  # the VM's speed drifts with its other load: bracket it
    return dict(zip(bed.nodes, rows, strict=True))


def test_nodes_advertise_their_cgroup_limits(edge, measured):
    bed = edge["bed"]
    for i in bed.nodes:
        dev, row = bed.devices[i], measured[i]
        assert row["cpu_count"] == dev.cpus == 1
        assert row["cpu_cores"] == pytest.approx(dev.cpu_fraction, abs=0.005)  # quota / period, as a float
        assert row["total_memory"] == bed.cgroups[i].memory_limit == dev.memory  # both page-aligned
        assert 0 < row["available_memory"] < row["total_memory"]
        # --memory-budget 0.5 is half of what the cgroup leaves, not of the host's 20+ GiB
        assert 0.3 * row["total_memory"] < row["memory_budget"] <= 0.5 * row["total_memory"]
        assert row["threads"] == 1 and row["raw_data_plane"] and row["data_port"] == 50552


def test_mdns_records_and_the_nodes_command_carry_the_cpu_quota(edge):
    bed = edge["bed"]
    found = bed.run_coordinator(["nodes", "--json", "--interface", bed.ips[0], "--timeout", "15", "--wait-for", "2"],
                                timeout=60)
    assert found.returncode == 0, found.stderr[-2000:]
    records = {r["name"]: r for r in json.loads(found.stdout)}
    for i in bed.nodes:
        record = records[f"{bed.devices[i].name}-{i}"]
        assert record["source"] == "mdns" and record["address"] == f"{bed.ips[i]}:50551"
        assert float(record["properties"]["cpu_cores"]) == pytest.approx(bed.devices[i].cpu_fraction, abs=0.005)
        assert int(record["properties"]["mem_total"]) == bed.devices[i].memory


def test_profiled_speed_is_the_capped_speed(edge, measured):
    """Sustained GFLOP/s of a capped node ~ fraction x one uncapped host core, within -50% / +15%.
    Above: the quota is a hard cap (the 0.6 s matmul span covers 60 CFS periods, so a span that ends
    mid-period is off by under 2%), leaving the reference's own noise (~10%); the old best-single-call
    profile measured 74 and 92 GFLOP/s under 0.25 and 0.4 quotas here: the uncapped speed, 4-6x this.
    Below: being time-sliced costs this
    VM 15-40% per CPU-second (measured: 40-60 GFLOP/s per CPU-second under a 10 ms-period quota vs
    60-80 uncapped; the vCPU idles through each throttled slice and resumes cold), and other test runs
    on the 2 shared cores can take part of a node's quota."""
    bed = edge["bed"]
    before, after = edge["reference"][0], edge["reference_after"][0]
    per_cpu_s = (before + after) / 2
    print(f"\nuncapped host core: {before:.1f} GFLOP/s per CPU-second before the nodes, {after:.1f} after "
          f"(per wall second: {edge['reference'][1]:.1f}, {edge['reference_after'][1]:.1f}); "
          f"nodes ready after {edge['start_s']:.1f} s")
    for i in bed.nodes:
        fraction, got = bed.devices[i].cpu_fraction, measured[i]["matmul_gflops"]
        print(f"node {i} ({bed.devices[i].name}, quota {fraction}): {got:.1f} GFLOP/s = "
              f"{got / per_cpu_s:.3f} of the uncapped core")
        assert 0.5 * fraction * per_cpu_s <= got <= 1.15 * fraction * per_cpu_s
        stat = dict(line.split() for line in (bed.cgroups[i].dirs["cpu"] / "cpu.stat").read_text().splitlines())
        assert int(stat["nr_throttled"]) > 0  # the kernel did hold it back
    # and the ordering the planner relies on: the 0.4 node is faster than the 0.25 one
    assert measured[2]["matmul_gflops"] > measured[1]["matmul_gflops"]


DILATED_DRIVER = textwrap.dedent("""
    import json, sys, time
    import torch
    from edgeweave.coordinator.client import NodeClient
    with NodeClient(sys.argv[1], timeout=60) as client:
        cores = client.info().resources.cpu_cores
        gflops = client.profile(budget_s=1.5).matmul_gflops
        client.load("tb-echo", "echo", {}, {})
        with client.open_stream(reply_timeout=30) as stream:
            x = torch.zeros(1, 64)
            stream.call("tb-echo", "echo", [x])
            rtts = []
            for _ in range(30):
                t0 = time.perf_counter()
                stream.call("tb-echo", "echo", [x])
                rtts.append(time.perf_counter() - t0)
    print(json.dumps({"cpu_cores": cores, "matmul_gflops": gflops, "echo_s": sorted(rtts)[len(rtts) // 2]}))
""")


def test_a_dilated_device_runs_at_its_fraction_without_a_quota(tmp_path):
    """cpu="dilation": no CFS quota in the device's cgroup (never throttled), yet the node advertises
    and profiles the device's speed: its matmul GFLOP/s are the fraction of an uncapped core's,
    closer than a quota gets them (no cold resume after a throttled slice: -30% / +15%). Up to 3
    rounds, the host core measured again around each: on a VM whose host is busy the reference
    itself moves (one CI run read 0.291 of it); a node that does not dilate is 4x off in every round."""
    ratios = []
    with EdgeTestbed([(device("pi4"), link("ethernet", rtt_ms=0))], cpu="dilation") as bed:
        address = bed.start_node(1, "dilated", tmp_path, args=["--no-advertise"])
        for _ in range(3):
            reference = host_core_gflops()[0]
            done = bed.run_python(DILATED_DRIVER, address, timeout=120)
            assert done.returncode == 0, done.stderr[-3000:]
            row = json.loads(done.stdout.strip().splitlines()[-1])
            reference = (reference + host_core_gflops()[0]) / 2
            ratios.append(round(row["matmul_gflops"] / reference, 3))
            print(f"\ndilated pi4: {row['matmul_gflops']:.1f} GFLOP/s = {ratios[-1]:.3f} of the uncapped core; "
                  f"echo {row['echo_s'] * 1e3:.2f} ms")
            assert row["cpu_cores"] == pytest.approx(0.25)
            if 0.7 * 0.25 <= ratios[-1] <= 1.15 * 0.25:
                break
        stat = dict(line.split() for line in (bed.cgroups[1].dirs["cpu"] / "cpu.stat").read_text().splitlines())
        quota = (bed.cgroups[1].dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip()
    assert quota == "-1" and int(stat["nr_throttled"]) == 0
    assert 0.7 * 0.25 <= ratios[-1] <= 1.15 * 0.25, f"the dilated node's share of the host core per round: {ratios}"


def test_allocating_past_the_memory_limit_is_killed(edge, measured):
    bed = edge["bed"]
    i = 2
    limit = bed.cgroups[i].memory_limit
    hog = bed.popen_node(i, [sys.executable, "-c", f"x = b'1' * {limit + 64 * 2**20}; print('survived')"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = hog.communicate(timeout=120)
    assert b"survived" not in out
    assert hog.returncode == -signal.SIGKILL or b"MemoryError" in err, (hog.returncode, err[-500:])
    oom = (bed.cgroups[i].dirs["memory"] / ("memory.oom_control" if bed.cgroups[i].version == 1 else "memory.events"))
    assert "oom_kill 1" in oom.read_text() or hog.returncode != -signal.SIGKILL
    # only the hog: the node in the same cgroup (the larger process before the hog grew) lives on
    node = json.loads((edge["folder"] / f"{bed.devices[i].name}-{i}.ready.json").read_text())["pid"]
    assert _alive(node) and bed.cgroups[i].pids() == {node}


def test_round_trips_carry_the_links_rtt(edge, measured):
    """Through the proxy every round trip takes at least rtt_ms (the proxy never delivers early); its
    first quartile exceeds the same call's on the node's own address (interleaved with it, so the
    node's own cost and the VM's load cancel out) by at least rtt_ms - 0.35 ms, and the quickest by
    at most rtt_ms + 0.35 ms: the relay's own cost is held back from the delay, its threads sleep to
    the due time and run real-time (docs/testbed.md). Quartiles and minima, not medians, because the
    node answers under its CPU quota: a call that meets a throttled slice waits up to 7.5 ms, in
    either series, and on a loaded VM that moved a median by more than the tolerance (one run read
    1.70 ms proxied against 2.13 ms direct)."""
    bed = edge["bed"]
    for i in bed.nodes:
        row, rtt = measured[i], bed.links[i].rtt_ms
        echo, direct, raw = (statistics.median(row[k]) for k in ("echo_ms", "direct_echo_ms", "raw_rtt_ms"))
        print(f"\nnode {i} ({bed.links[i].name}, rtt {rtt} ms{', proxied' if bed.proxied(i) else ', direct'}): "
              f"gRPC echo median {echo:.2f} ms (min {min(row['echo_ms']):.2f}), on its own address {direct:.2f} ms, "
              f"data-plane forward median {raw:.2f} ms (min {min(row['raw_rtt_ms']):.2f})")
        if bed.proxied(i):
            assert min(row["echo_ms"]) >= rtt and min(row["raw_rtt_ms"]) >= rtt
            quartile = {k: statistics.quantiles(row[k], n=4)[0] for k in ("echo_ms", "direct_echo_ms")}
            assert quartile["echo_ms"] - quartile["direct_echo_ms"] >= rtt - 0.35, quartile
            assert min(row["echo_ms"]) - min(row["direct_echo_ms"]) <= rtt + 0.35, (row["echo_ms"], row["direct_echo_ms"])
        else:
            assert bed.address(i) == f"{bed.ips[i]}:50551"


def test_bulk_transfers_run_at_the_links_rate(edge, measured):
    """TCP goodput each way ~ rate_mbit: tbf is set to rate / GOODPUT, so at most ~5% above (its 2 ms
    burst) and, on this shared 2-core VM where the Python sender, receiver and proxy compete for CPU,
    at least 70% of it."""
    bed = edge["bed"]
    for i in bed.nodes:
        rate, row = bed.links[i].rate_mbit, measured[i]
        print(f"\nnode {i} ({bed.links[i].name}, {rate:g} Mbit/s): down {row['down_mbit']:.0f}, "
              f"up {row['up_mbit']:.0f} Mbit/s")
        for direction in ("down_mbit", "up_mbit"):
            assert 0.7 * rate <= row[direction] <= 1.05 * rate, (direction, row[direction])


def _leftovers(tag: str) -> dict[str, list]:
    return {"namespaces": [ns for ns in netns._namespaces() if ns.startswith(tag)],
            "cgroups": [str(d) for d in edge_cgroups.tagged(tag)]}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_failing_with_block_leaves_nothing_behind(tmp_path):
    pids = {}
    with pytest.raises(RuntimeError, match="the test failed"), \
            EdgeTestbed([(device("pi4", cpu_fraction=1.0), "wifi")]) as bed:
        bed.start_node(1, "doomed", tmp_path)
        pids["node"] = json.loads((tmp_path / "doomed.ready.json").read_text())["pid"]
        [pids["proxy"]] = bed.proxy_pids()
        pids["extra"] = bed.popen_node(1, ["sleep", "600"]).pid
        deadline = time.monotonic() + 10
        while bed.cgroups[1].pids() != {pids["node"], pids["extra"]}:  # the wrapper joins, then execs
            assert time.monotonic() < deadline, bed.cgroups[1].pids()
            time.sleep(0.05)
        assert all(_alive(pid) for pid in pids.values()) and all(_leftovers(bed.prefix).values())
        raise RuntimeError("the test failed")
    assert _leftovers(bed.prefix) == {"namespaces": [], "cgroups": []}
    assert not [name for name, pid in pids.items() if _alive(pid)]


CHILD = textwrap.dedent(f"""
    import json, sys, time
    sys.path.insert(0, {str(TESTS)!r})
    from edge_testbed import EdgeTestbed
    bed = EdgeTestbed([("pi4", "wifi")]).__enter__()
    extra = bed.popen_node(1, ["sleep", "600"])
    print(json.dumps({{"prefix": bed.prefix, "extra": extra.pid, "proxy": bed.proxy_pids()[0]}}), flush=True)
    time.sleep(600)
""")


def test_a_sigkilled_bed_is_cleaned_by_the_next_one():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE)
    try:
        left = json.loads(child.stdout.readline())
    finally:
        child.kill()
        child.wait()
    assert all(_leftovers(left["prefix"]).values()) and _alive(left["extra"])  # SIGKILL left them behind
    with EdgeTestbed([]):
        pass
    assert _leftovers(left["prefix"]) == {"namespaces": [], "cgroups": []}
    assert not _alive(left["extra"]) and not _alive(left["proxy"])


def test_sigterm_of_the_process_running_the_bed_cleans_up():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE)
    left = json.loads(child.stdout.readline())
    child.send_signal(signal.SIGTERM)
    assert child.wait(30) == 128 + signal.SIGTERM
    assert _leftovers(left["prefix"]) == {"namespaces": [], "cgroups": []}
    assert not _alive(left["extra"]) and not _alive(left["proxy"])


def test_a_coordinator_priority_runs_the_coordinators_processes_realtime():
    """The coordinator stands for a machine of its own: with coordinator_priority its processes run
    SCHED_FIFO above the delay proxies (no emulated device's work preempts it); without, as any process."""
    show = "import os; print(os.sched_getscheduler(0) == os.SCHED_FIFO, os.sched_getparam(0).sched_priority)"
    with EdgeTestbed([], coordinator_priority=20) as bed:
        assert bed.run_python(show).stdout.split() == ["True", "20"]
        assert "version" in bed.run_coordinator(["--help"]).stdout
    with EdgeTestbed([]) as bed:
        assert bed.run_python(show).stdout.split() == ["False", "0"]
    for bad in (5, 10, 50):
        with pytest.raises(ValueError, match="coordinator_priority must be above the proxies' 10"):
            EdgeTestbed([], coordinator_priority=bad)
