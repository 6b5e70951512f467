"""The node's gRPC service: resources, shard store, job lifecycle and the Forward hot path."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import psutil

import edgeweave
from edgeweave.node.jobs import Job, JobNotFound, JobTable, MissingShard
from edgeweave.node.leases import JOB_IDLE_S, SESSION_GRACE_S, LeaseTable, StreamLease
from edgeweave.node.limits import Limits
from edgeweave.node.shard_store import ShardCorrupt, ShardNoSpace, ShardRejected, ShardStore
from edgeweave.proto import pb, pb_grpc
from edgeweave.runtime import cpu_dilation, layer_profile, resources
from edgeweave.runtime.batch import Row
from edgeweave.runtime.codec import TensorDecodeError, decode, decode_quantized, encode
from edgeweave.runtime.executor import ExecutorInputError, ExecutorStateError
from edgeweave.runtime.layer_compute import BACKENDS
from edgeweave.runtime.shard_files import ShardChangedOnDisk
from edgeweave.runtime.tp_executor import SessionLimitError

log = logging.getLogger(__name__)

#: what the node may send: its own replies (a long prompt's activations), not a peer's say-so
MAX_SEND_BYTES = 1 << 30


def server_options(max_receive_bytes: int) -> list[tuple[str, int]]:
    """gRPC server options; the receive cap is the node's [node] max_frame_bytes (node/limits.py),
    the same bound as the data plane's frames (gRPC's 4 MiB default is below a long prompt's
    activations, 1 GiB let any peer make the node buffer 1 GiB per message)."""
    return [
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", MAX_SEND_BYTES),
        ("grpc.so_reuseport", 0),  # a second node on the same port must fail, not share it
        ("grpc.keepalive_permit_without_calls", 1),
        # coordinators ping every second (coordinator/client.py KEEPALIVE_MS) to notice a vanished
        # node within ~2 s; a stricter server would answer those pings with GOAWAY (too_many_pings)
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.http2.max_pings_without_data", 0),
        # the node pings too, so the Forward stream (the lease, node/leases.py) of a coordinator that
        # vanished without a FIN (power loss) ends within ~10 s, like the data plane's TCP keepalive
        ("grpc.keepalive_time_ms", 5_000),
        ("grpc.keepalive_timeout_ms", 5_000),
    ]


#: ops whose sessions a lease records (at layer 0: every pass over a session starts there)
_SESSION_OPS = frozenset({"attn", "layers", "reset"})


def _status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status a request error maps to (INTERNAL for anything unexpected)."""
    if isinstance(exc, SessionLimitError):  # a full node refusing one request; it is healthy
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, (TensorDecodeError, ExecutorInputError, ShardRejected)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, (ExecutorStateError, MissingShard, ShardChangedOnDisk)):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, JobNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, ShardCorrupt):
        return grpc.StatusCode.DATA_LOSS
    if isinstance(exc, ShardNoSpace):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


def error_status(rpc: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status, sentence) for a failed request, logged; shared by gRPC aborts and the raw data plane."""
    code = _status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed unexpectedly", rpc)
        return code, f"{rpc} failed on the node: {type(exc).__name__}: {exc}"
    log.info("%s refused (%s): %s", rpc, code.name, exc)
    return code, str(exc)


def _abort(context: grpc.ServicerContext, rpc: str, exc: BaseException) -> None:
    context.abort(*error_status(rpc, exc))


def layer_shape(message: pb.LayerShape) -> layer_profile.LayerShape:
    """The runtime's LayerShape of a Profile request's (bits 0 = float); not yet checked."""
    projections = tuple((p.kind, layer_profile.ProjectionLayout(p.bits or None, p.block or 32, p.offset))
                        for p in message.projections)
    return layer_profile.LayerShape(
        message.hidden, message.intermediate, message.n_q_heads, message.n_kv_heads, message.head_dim, projections,
        message.attention_bias, message.qk_norm, message.float_dtype or "float32")


def _node_id(data_dir: Path) -> str:
    """A stable id per data dir, so a restarted node is recognised as the same one."""
    path = data_dir / "node_id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        node_id = uuid.uuid4().hex
        path.write_text(node_id)
        return node_id


class NodeServicer(pb_grpc.NodeServicer):
    def __init__(
        self,
        name: str,
        data_dir: Path,
        memory_budget: int = 0,
        max_shard_bytes: int | None = None,
        secure: bool = False,
        shard_cache_max: int = 0,
        cluster: str = "",
        session_grace_s: float = SESSION_GRACE_S,
        job_idle_s: float = JOB_IDLE_S,
    ) -> None:
        self.name = name
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.node_id = _node_id(self.data_dir)
        self.memory_budget = memory_budget
        self.secure = secure
        self.cluster = cluster  # the public fingerprint of this node's cluster (security.material_fingerprint)
        self.data_port = 0  # set by the daemon once the raw-TCP data plane listens
        self.store = ShardStore(self.data_dir, **({"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}),
                                max_bytes=shard_cache_max)
        self.jobs = JobTable(self.store, memory_budget)
        #: every Forward stream is a lease on its sessions and jobs; the sweeper frees expired ones
        self.leases = LeaseTable(self.jobs, session_grace_s, job_idle_s).start()
        self.started = time.time()
        self._static = resources.snapshot(self.data_dir, memory_budget)  # accelerators/backends probed once
        self._process = psutil.Process(os.getpid())

    def resources(self) -> resources.ResourceSnapshot:
        return resources.snapshot(self.data_dir, self.memory_budget, static=self._static)

    # -- resources ---------------------------------------------------------------------------
    def Info(self, request, context):
        r = self.resources()
        return pb.InfoReply(
            name=self.name, node_id=self.node_id, version=edgeweave.__version__,
            resources=pb.Resources(**vars(r)), uptime_s=time.time() - self.started,
            jobs=self.jobs.ids(), secure=self.secure, data_port=self.data_port, cluster=self.cluster,
        )

    def Health(self, request, context):
        r = self.resources()
        return pb.HealthReply(
            status="SERVING", cpu_load=r.cpu_load, available_memory=r.available_memory,
            rss=self._process.memory_info().rss, jobs=self.jobs.ids(),
            shard_store_bytes=self.store.used_bytes, shard_store_max=self.store.max_bytes,
            sessions=self.jobs.session_count(),
        )

    def Profile(self, request, context):
        budget = min(request.budget_s, 30.0) if request.budget_s > 0 else 0.0
        size = min(request.matmul_size, 8192)
        if not request.HasField("layer"):
            return pb.ProfileReply(**vars(resources.profile(self.data_dir, size, budget)))
        # a layer timing shares the budget: 40% for the micro-benchmarks, 60% for the layer
        whole = budget or 1.0
        backend = request.backend or BACKENDS[0]
        prompt = request.prompt_tokens or layer_profile.DEFAULT_PROMPT_TOKENS
        kv = request.kv_tokens or prompt
        try:
            shape = layer_shape(request.layer)
            layer_profile.check_request(shape, backend, prompt, kv)  # before spending any time
            p = resources.profile(self.data_dir, size, whole * 0.4)
            t = layer_profile.profile_layer(shape, backend, prompt, kv, whole * 0.6, self.data_dir,
                                            [(s.n_kv_heads, s.mlp_columns) for s in request.shards])
        except ExecutorInputError as exc:
            _abort(context, "Profile", exc)
        return pb.ProfileReply(
            **vars(p), layer_decode_s=t.decode_s, layer_prefill_s=t.prefill_s, prompt_tokens=t.prompt_tokens,
            kv_tokens=t.kv_tokens, layer_file_bytes=t.file_bytes, layer_held_bytes=t.held_bytes,
            layer_kernel=t.kernel, layer_runs=t.decode_runs + t.prefill_runs, layer_profile_s=t.elapsed_s,
            layer_attn_decode_s=t.attn_decode_s, layer_mlp_decode_s=t.mlp_decode_s,
            shard_attn_decode_s=t.shard_attn_decode_s, shard_mlp_decode_s=t.shard_mlp_decode_s,
            shard_mlp_columns=t.shard_mlp_columns, layer_ring=t.ring,
            shard_timings=[pb.ShardTiming(**vars(timing)) for timing in t.shards],
        )

    # -- shards ------------------------------------------------------------------------------
    def HasShards(self, request, context):
        return pb.HasShardsReply(present=self.store.present(list(request.sha256)))

    def PutShard(self, request_iterator, context):
        start = time.perf_counter()
        try:
            sha256, size, already = self.store.receive(request_iterator)
        except (ShardRejected, ShardCorrupt, ShardNoSpace) as exc:
            _abort(context, "PutShard", exc)
        log.info("shard %s %s (%.1f MB, %.2f s)", sha256[:12], "already present" if already else "stored",
                 size / 1e6, time.perf_counter() - start)
        return pb.PutShardReply(sha256=sha256, size=size, already_present=already)

    # -- jobs --------------------------------------------------------------------------------
    def Load(self, request, context):
        shards = {ref.name: ref.sha256 for ref in request.shards}
        try:
            job, _ = self.jobs.load(request.job_id, request.kind, request.config_json, shards, request.memory_budget)
            details = job.executor.details()
        except Exception as exc:
            _abort(context, f"Load of job {request.job_id!r}", exc)
        return pb.LoadReply(job_id=job.job_id, details_json=json.dumps(details))

    def Unload(self, request, context):
        try:
            stats = self.jobs.unload(request.job_id)
        except Exception as exc:
            _abort(context, "Unload", exc)
        return pb.UnloadReply(job_id=request.job_id, stats_json=json.dumps(stats, default=str))

    def JobStats(self, request, context):
        try:
            stats = self.jobs.get(request.job_id).stats()
            self.jobs.mark_used(request.job_id)
        except Exception as exc:
            _abort(context, "JobStats", exc)
        return pb.JobStatsReply(job_id=request.job_id, stats_json=json.dumps(stats, default=str))

    def handle_forward(self, req: pb.ForwardRequest, lease: StreamLease) -> pb.ForwardReply:
        """One Forward message on the stream holding `lease`: decode, compute, encode. Shared by the
        gRPC stream and the raw TCP data plane (node/dataplane.py), so both compute, account and
        lease exactly alike."""
        job = self.jobs.get(req.job_id)
        if req.job_id not in lease.jobs:  # the stream's first message for this job: it now holds it
            lease.touch(req.lease, req.job_id, req.op, ())
        if req.op == "hold":
            return pb.ForwardReply(seq=req.seq)
        tensors = [decode_quantized(t) if t.quantized else decode(t) for t in req.tensors]
        # `if req.rows` first: iterating even an empty protobuf list costs a formatted IndexError
        rows = [Row(r.session, r.position, r.length) for r in req.rows] if req.rows else None
        executor = job.executor
        with job.lock:
            clock = cpu_dilation.DeviceClock()  # the wall time, or the emulated device's
            try:
                outputs = executor.forward(req.op, req.layer, req.position, req.session, tensors, rows)
            except ShardChangedOnDisk as exc:
                changed = exc
            else:
                changed = None
            compute_s = clock.elapsed()
            stall_s = getattr(executor, "last_stall_s", 0.0)
            job.requests += 1
            job.compute_s += compute_s
            job.stall_s += stall_s
        if changed is not None:
            raise self._drop_changed_shard(job, changed)
        if req.op in _SESSION_OPS and req.layer == 0:  # after success: the lease holds real caches only
            lease.touch(req.lease, req.job_id, req.op, [r.session for r in req.rows] if req.rows else [req.session])
        reply = pb.ForwardReply(seq=req.seq, compute_s=compute_s, stall_s=stall_s)
        for t in outputs:  # built in place: a finished pb.Tensor passed in would be copied once more
            reply.tensors.add(**encode(t))
        return reply

    def _drop_changed_shard(self, job: Job, exc: ShardChangedOnDisk) -> ShardChangedOnDisk:
        """A layer file's bytes changed under a loaded job: never compute with them. Delete the
        file (HasShards then reports it missing) and unload the job, so the coordinator re-sends
        that one file and loads again; returns the error to answer (FAILED_PRECONDITION)."""
        digest = exc.path.name
        name = next((n for n, d in job.shards.items() if d == digest), digest)
        log.error("job %s: shard %s (%s) changed on disk while loaded; deleting it and unloading the job",
                  job.job_id, name, digest)
        self.store.discard(digest)
        with contextlib.suppress(JobNotFound):
            self.jobs.unload(job.job_id)
        return ShardChangedOnDisk(exc.path, f"shard {name} (sha256 {digest}) of job {job.job_id!r} changed on disk "
                                            "since Load; the node deleted it and unloaded the job: send it again "
                                            "and Load")

    def Forward(self, request_iterator, context):
        """The hot path: one long-lived stream, messages handled in order."""
        handle = self.handle_forward
        lease = self.leases.open_stream()
        context.add_callback(lease.close)  # however the stream ends (a vanished peer included)
        pacer = cpu_dilation.Pacer()  # an emulated slower device (runtime/cpu_dilation.py); else a no-op
        try:
            pacer.idle()
            for req in request_iterator:
                pacer.begin()
                reply = handle(req, lease)
                pacer.pay()
                yield reply
                pacer.idle()
        except Exception as exc:
            if context.is_active():
                _abort(context, "Forward", exc)
        finally:
            lease.close()

    # -- transport floor ---------------------------------------------------------------------
    def Echo(self, request, context):
        return request

    def EchoStream(self, request_iterator, context):
        yield from request_iterator

    def close(self) -> None:
        self.leases.close()
        self.jobs.close_all()


def build_server(
    servicer: pb_grpc.NodeServicer, host: str, port: int, credentials: grpc.ServerCredentials | None = None,
    limits: Limits | None = None,
) -> tuple[grpc.Server, int]:
    """A ready (not yet started) gRPC server bound to host:port; returns (server, bound port).

    The one place where node servers are created, so TLS (credentials) plugs in here, and the
    receive cap is `limits.max_frame_bytes` (the node's [node] max_frame_bytes).
    """
    limits = limits or Limits()
    workers = max(16, 4 * resources.usable_cores())  # each open Forward stream holds one thread
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
                         options=server_options(limits.max_frame_bytes))
    pb_grpc.add_NodeServicer_to_server(servicer, server)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_secure_port(target, credentials) if credentials else server.add_insecure_port(target)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"could not bind the node's gRPC server to {target} (port in use or address not local)")
    return server, bound
