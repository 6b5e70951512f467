"""Runs one node: gRPC server + optional mDNS advertiser, until SIGINT/SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

import edgeweave
from edgeweave import security
from edgeweave.node.advertiser import Advertiser, choose_interfaces
from edgeweave.node.dataplane import DataPlane
from edgeweave.node.leases import JOB_IDLE_S, SESSION_GRACE_S
from edgeweave.node.limits import Limits
from edgeweave.node.server import NodeServicer, build_server
from edgeweave.runtime import cpu_dilation

log = logging.getLogger(__name__)


@dataclass
class NodeOptions:
    name: str
    host: str = "0.0.0.0"
    port: int = 50551
    data_port: int = -1  # the raw-TCP data plane: -1 = port + 1 (ephemeral when port is 0), 0 = ephemeral
    data_dir: Path = Path(".")
    interface: str | None = None
    memory_budget: int = 0
    shard_cache_max: int = 0  # bytes the shard store may hold (LRU eviction beyond); 0 = unlimited
    advertise: bool = True
    ready_file: Path | None = None
    credentials: grpc.ServerCredentials | None = None
    tls: security.TlsMaterial | None = None  # the material behind `credentials`; secures the raw-TCP data plane
    limits: Limits = field(default_factory=Limits)  # what one peer may cost: message size, connections, timeouts
    session_grace_s: float = SESSION_GRACE_S  # a dead coordinator's sessions are freed this long after its streams close
    job_idle_s: float = JOB_IDLE_S  # a job no open stream holds is unloaded after this long unused
    #: an inherited pipe's read end (LocalCluster): its EOF means the launcher died, so this node stops
    watch_fd: int | None = None
    #: emulate a device this fraction as fast as the host's core (runtime/cpu_dilation.py; test beds)
    emulate_cpu_fraction: float = 1.0


def write_ready_file(path: Path, info: dict) -> None:
    """Atomically publish the bound address, so a launcher never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def watch_launcher(fd: int, stop: threading.Event) -> threading.Thread:
    """Set `stop` once `fd` reads EOF: the launcher (the only holder of the pipe's write end) exited,
    however it died (SIGKILL included). A pipe cannot be fooled by pid reuse, and unlike
    PR_SET_PDEATHSIG it does not fire when the thread that spawned us exits."""

    def wait() -> None:
        try:
            while os.read(fd, 4096):
                pass  # the launcher never writes; tolerate it anyway
        except OSError as exc:
            log.warning("launcher pipe (fd %d) failed: %s; stopping as if the launcher exited", fd, exc)
        if not stop.is_set():
            log.warning("the process that launched this node exited; stopping")
            stop.set()

    thread = threading.Thread(target=wait, name="launcher-watch", daemon=True)
    thread.start()
    return thread


def serve(opts: NodeOptions, stop: threading.Event | None = None) -> None:
    """Serve until `stop` is set or a SIGINT/SIGTERM arrives; then withdraw, drain and close."""
    stop = stop or threading.Event()
    if opts.emulate_cpu_fraction != 1.0:
        cpu_dilation.set_fraction(opts.emulate_cpu_fraction)
        torch.set_num_threads(1)  # what is dilated is the handling thread's CPU time
        log.info("emulating a CPU %.3g x as fast as this host's core (time dilation, one torch thread)",
                 opts.emulate_cpu_fraction)
    secure = opts.credentials is not None
    # without the material (a caller that passed bare credentials) the cluster is unknown: announce none
    cluster = security.material_fingerprint(opts.tls) if opts.tls is not None or not secure else ""
    servicer = NodeServicer(opts.name, opts.data_dir, opts.memory_budget, secure=secure,
                            shard_cache_max=opts.shard_cache_max, cluster=cluster,
                            session_grace_s=opts.session_grace_s, job_idle_s=opts.job_idle_s)
    server, port = build_server(servicer, opts.host, opts.port, opts.credentials, opts.limits)
    dataplane = None
    if opts.credentials is not None and opts.tls is None:
        log.warning("no TLS material for the raw-TCP data plane (NodeOptions.tls); serving Forward over gRPC only")
    else:  # a secure node never opens a plaintext data plane
        data_port = opts.data_port if opts.data_port >= 0 else (opts.port + 1 if opts.port else 0)
        dataplane = DataPlane(servicer.handle_forward, servicer.leases.open_stream, opts.host, opts.tls,
                              key_dir=opts.data_dir, limits=opts.limits, port=data_port).start()
        servicer.data_port = dataplane.port
    server.start()
    interfaces = choose_interfaces(opts.host, opts.interface)
    advertiser = None
    if opts.advertise:
        r = servicer.resources()
        advertiser = Advertiser(opts.name, port, interfaces, {
            "name": opts.name, "node_id": servicer.node_id, "version": edgeweave.__version__,
            "mem_total": str(r.total_memory), "mem_avail": str(r.available_memory), "cores": str(r.cpu_count),
            "cpu_cores": f"{r.cpu_cores:.3g}", "arch": r.arch, "accel": ",".join(r.accelerators),
            "backends": ",".join(r.backends),
            "budget": str(opts.memory_budget), "secure": "1" if servicer.secure else "0", "cluster": cluster,
        })
        advertiser.start()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    if opts.watch_fd is not None:
        watch_launcher(opts.watch_fd, stop)
    address = f"{interfaces[0]}:{port}"
    if opts.ready_file:
        write_ready_file(Path(opts.ready_file), {"address": address, "port": port, "pid": os.getpid(), "name": opts.name})
    bound = f"{opts.shard_cache_max} bytes" if opts.shard_cache_max else "unlimited"
    limits = opts.limits
    log.info("node %s serving on %s:%d (shard store %d bytes, bound %s; messages up to %d bytes, %d data-plane "
             "connections, idle timeout %g s, frame timeout %g s)", opts.name, opts.host, port,
             servicer.store.used_bytes, bound, limits.max_frame_bytes, limits.max_data_connections,
             limits.data_idle_timeout_s, limits.data_frame_timeout_s)
    try:
        stop.wait()
    finally:
        log.info("node %s stopping", opts.name)
        if advertiser:
            advertiser.close()
        if dataplane:
            dataplane.close()
        server.stop(grace=2.0).wait()
        servicer.close()
