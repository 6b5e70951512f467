"""Sessions and jobs are leases held by open Forward streams, so a crashed coordinator frees them.

Why: a KV session lives until its coordinator resets it; a coordinator killed with SIGKILL never
does, so its sessions (and the model it loaded) used to stay on the node for good, and a few
crashes filled the session cap. Here every Forward stream (gRPC or raw TCP) is a `StreamLease`.
A request's `lease` field names the coordinator's lease (one id per driver; a stream that sends
none holds a lease of its own). A lease is held while at least one stream carrying it is open.
When its last stream closes, its sessions are freed `session_grace_s` later unless a stream with
the same lease id opens first (a coordinator that reconnects keeps its sessions). Keepalive on
both transports closes the stream of a coordinator that vanished without a FIN within seconds.

A job is held by the open streams that sent it a request (a driver sends op "hold" right after
opening a stream, so an idle coordinator holds its job with no traffic). A job that no open
stream holds and that saw no call for `job_idle_s` is unloaded.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from edgeweave.node.jobs import JobNotFound, JobTable

log = logging.getLogger(__name__)

#: defaults of [node] session_grace_s and job_idle_s (edgeweave/config.py says why)
SESSION_GRACE_S = 5.0
JOB_IDLE_S = 300.0
#: how often the sweeper looks for expired leases and idle jobs (bounded by the grace)
SWEEP_S = 0.5


@dataclass
class Lease:
    """One coordinator's claim: its sessions per job, how many open streams carry it."""

    name: str
    streams: int = 0
    released_at: float | None = None  # when the last stream closed (None while one is open)
    sessions: dict[str, set[str]] = field(default_factory=dict)  # job_id -> session names


class StreamLease:
    """What one open Forward stream holds; `touch` on every request, `close` when the stream ends."""

    def __init__(self, table: LeaseTable, anonymous: str) -> None:
        self._table = table
        self._anonymous = anonymous
        self.lease: Lease | None = None
        self.jobs: set[str] = set()
        self.closed = False

    def touch(self, lease: str, job_id: str, op: str, sessions: Iterable[str]) -> None:
        """Record that this stream's lease holds `sessions` of `job_id` (op "reset" gives them up)."""
        self._table.touch(self, lease or self._anonymous, job_id, op, sessions)

    def close(self) -> None:
        self._table.close_stream(self)


class LeaseTable:
    """The node's leases; a daemon thread frees what expired (`start`), `sweep` does one pass."""

    def __init__(self, jobs: JobTable, session_grace_s: float = SESSION_GRACE_S, job_idle_s: float = JOB_IDLE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.jobs = jobs
        self.session_grace_s = session_grace_s
        self.job_idle_s = job_idle_s
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._job_streams: dict[str, int] = {}  # job_id -> open streams that sent it a request
        self._owner: dict[tuple[str, str], Lease] = {}  # (job_id, session) -> the lease holding it
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-sweeper", daemon=True)

    def start(self) -> LeaseTable:
        self._thread.start()
        return self

    def open_stream(self) -> StreamLease:
        return StreamLease(self, f"stream-{next(self._ids)}")

    def touch(self, stream: StreamLease, name: str, job_id: str, op: str, sessions: Iterable[str]) -> None:
        with self._lock:
            if stream.closed:
                return
            if stream.lease is None or stream.lease.name != name:
                self._attach(stream, name)
            if job_id not in stream.jobs:
                stream.jobs.add(job_id)
                self._job_streams[job_id] = self._job_streams.get(job_id, 0) + 1
            lease = stream.lease
            assert lease is not None
            held = lease.sessions.setdefault(job_id, set())
            for session in sessions:
                key = (job_id, session)
                owner = self._owner.pop(key, None)
                if owner is not None and owner is not lease:
                    owner.sessions.get(job_id, set()).discard(session)  # taken over by another lease
                if op == "reset":
                    held.discard(session)
                else:
                    held.add(session)
                    self._owner[key] = lease

    def _attach(self, stream: StreamLease, name: str) -> None:
        """Move `stream` onto lease `name` (a stream normally carries one lease all its life)."""
        if stream.lease is not None:
            self._detach(stream.lease)
        lease = self._leases.get(name)
        if lease is None:
            lease = self._leases[name] = Lease(name)
        elif lease.released_at is not None:
            log.info("lease %s reconnected within its grace: its sessions stay", name)
        lease.streams += 1
        lease.released_at = None
        stream.lease = lease

    def _detach(self, lease: Lease) -> None:
        lease.streams -= 1
        if lease.streams == 0:
            lease.released_at = self._clock()

    def close_stream(self, stream: StreamLease) -> None:
        with self._lock:
            if stream.closed:
                return
            stream.closed = True
            if stream.lease is not None:
                self._detach(stream.lease)
            for job_id in stream.jobs:
                self._job_streams[job_id] -= 1
                if self._job_streams[job_id] == 0:
                    del self._job_streams[job_id]
                    self.jobs.mark_used(job_id)  # the idle clock starts when its last stream closes

    def sweep(self) -> None:
        """Free the sessions of leases past their grace, and unload jobs idle past job_idle_s."""
        now = self._clock()
        expired: list[Lease] = []
        with self._lock:
            for name, lease in list(self._leases.items()):
                if lease.released_at is not None and now - lease.released_at >= self.session_grace_s:
                    expired.append(lease)
                    del self._leases[name]
                    for job_id, sessions in lease.sessions.items():
                        for session in sessions:
                            self._owner.pop((job_id, session), None)
                elif lease.streams == 0 and not any(lease.sessions.values()):
                    del self._leases[name]  # nothing held: no need to wait out the grace
            held = set(self._job_streams)
        for lease in expired:
            for job_id, sessions in lease.sessions.items():
                if sessions:
                    self._free(job_id, sessions, lease.name)
        for job_id in self.jobs.idle_jobs(self.job_idle_s, exclude=held):
            if self.jobs.unload_idle(job_id, self.job_idle_s, self.holds_job):
                log.warning("job %s unloaded: no coordinator held it for %.0f s (node job_idle_s)", job_id,
                            self.job_idle_s)

    def holds_job(self, job_id: str) -> bool:
        """True while an open stream holds `job_id`."""
        with self._lock:
            return job_id in self._job_streams

    def _free(self, job_id: str, sessions: set[str], lease: str) -> None:
        try:
            job = self.jobs.get(job_id)
        except JobNotFound:
            return  # the job (and its caches) went already
        with job.lock:
            freed = job.executor.drop_sessions(sessions)
        log.warning("lease %s expired (its coordinator is gone): freed %d session(s) of job %s", lease, freed, job_id)

    def _run(self) -> None:
        interval = min(SWEEP_S, max(0.05, self.session_grace_s / 4))
        while not self._stop.wait(interval):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the sweeper must outlive one bad pass; it is logged
                log.exception("lease sweep failed")

    def close(self) -> None:
        self._stop.set()
