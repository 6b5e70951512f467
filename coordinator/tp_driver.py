"""Tensor-parallel generation over nodes: plan, ship shards once, and run the star allreduce hub.

The coordinator keeps the embedding, the norms and the LM head (`runtime.tp_hub`); every node
holds its KV-head groups and MLP columns of every layer. Per layer the normed hidden state goes
to all nodes on their long-lived Forward streams (all sends first, then all receives, so nodes
compute in parallel), and the partials are summed here. Prefill sends the whole prompt at once.

Faults (coordinator/recovery.py): decode replies have a deadline of max(3 s, 10 x the median
recent step) and channels use 1 s keepalive, so a dead node is noticed within ~3 s; generation
then continues on the survivors (re-plan, re-send only missing shards, re-prefill the sessions).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from edgeweave.coordinator import plan_cache, recovery
from edgeweave.coordinator.client import NodeClient, NodeError, SharedTensors
from edgeweave.coordinator.local_member import LocalMember
from edgeweave.runtime.batch import Row, SequenceStep
from edgeweave.runtime.memory_budget import fit_context
from edgeweave.runtime.sampling import Sampler, SamplingParams
from edgeweave.runtime.tp_hub import TensorParallelHub
from edgeweave.splitting import layouts
from edgeweave.splitting.checkpoints import Checkpoint
from edgeweave.splitting.layouts import Layout, LayoutError
from edgeweave.splitting.memory_plan import resident_layer_limits
from edgeweave.splitting.quant_plan import check_quantize
from edgeweave.splitting.tensor_parallel import (
    Manifest,
    TensorParallelPlan,
    cached_manifest,
    plan_shards,
    quantized_layouts,
    write_shards,
)

log = logging.getLogger(__name__)


def _addressing(rows: Sequence[Row]) -> tuple[str, int, Sequence[Row] | None]:
    """(session, position, batch rows) of a Forward message: one row travels as the message's own
    session and position (the unbatched wire format), several as its rows."""
    if len(rows) == 1:
        return rows[0].session, rows[0].position, None
    return "", 0, rows


def _new_token_indexes(sequences: Sequence[SequenceStep], rows: Sequence[Row]) -> list[int]:
    """Indexes, in a step's stacked tokens, of each sequence's tokens past `cached` (a row may
    start earlier than `cached`: a session prefilled again after a redeploy)."""
    out, end = [], 0
    for seq, row in zip(sequences, rows, strict=True):
        end += row.length
        out += range(end - (len(seq.history) - seq.cached), end)
    return out


#: a node that keeps losing files within one step is a broken disk, not a stray corruption: give up
MAX_REFETCHES_PER_STEP = 2


def shard_cache_root() -> Path:
    """Where shards are written: $EDGEWEAVE_CACHE/shards or ~/.cache/edgeweave/shards."""
    base = os.environ.get("EDGEWEAVE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "edgeweave") / "shards"


def profile_weights(nodes: list[NodeClient], budget_s: float = 0.3) -> list[float]:
    """Node weights from their measured matmul GFLOP/s (a node that cannot say counts as the slowest)."""
    speeds = []
    for client in nodes:
        try:
            speeds.append(max(client.profile(budget_s=budget_s).matmul_gflops, 0.0))
        except Exception as exc:  # a profile failure must not stop the run; equal share instead
            log.warning("profiling %s failed (%s); giving it the smallest share", client.address, exc)
            speeds.append(0.0)
    floor = min((s for s in speeds if s > 0), default=1.0)
    return [s if s > 0 else floor for s in speeds]


@dataclass
class NodeTiming:
    """Running totals for one node address (kept across redeploys, for /metrics): Forward messages
    answered, seconds from sending a step's message until its reply was read, and of those the
    seconds the node reported computing."""

    messages: int = 0
    round_trip_s: float = 0.0
    compute_s: float = 0.0


@dataclass
class GenerationStats:
    """Timing of one generate call. comm_s = time waiting on nodes minus the slowest node's compute."""

    prompt_tokens: int = 0
    ttft_s: float = 0.0
    token_s: list[float] = field(default_factory=list)
    wait_s: float = 0.0
    node_compute_s: float = 0.0
    round_trips: int = 0
    #: node failures survived during this call (coordinator/recovery.py RecoveryRecord.as_dict())
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    #: speculative decoding (coordinator/speculative.py; all 0 without it): passes over the model
    #: after the prefill, draft tokens sent in them, and of those the ones the model agreed with
    passes: int = 0
    drafted: int = 0
    accepted: int = 0
    #: tokens the passes produced (accepted drafts plus the model's own token of each pass)
    pass_tokens: int = 0

    @property
    def comm_s(self) -> float:
        return max(0.0, self.wait_s - self.node_compute_s)

    @property
    def per_token_s(self) -> float | None:
        """Median decode latency (tokens after the first)."""
        return statistics.median(self.token_s) if self.token_s else None

    @property
    def tokens_per_pass(self) -> float | None:
        """Tokens per pass over the model after the first token (1.0 is plain decoding)."""
        return self.pass_tokens / self.passes if self.passes else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "comm_s": self.comm_s, "per_token_s": self.per_token_s,
                "tokens_per_pass": self.tokens_per_pass}


#: what `layout=` accepts besides a concrete Layout: a kind, cut for whatever nodes there are
LAYOUT_KINDS = ("tensor", "pipeline")


def partition_for(request: str | Layout, n_layers: int, weights: Sequence[float],
                  limits: Sequence[int] | None = None) -> Layout | None:
    """The stages for these node weights: a given Layout as it is (when it has as many nodes), else
    its kind cut for them (a pipeline's layers in proportion to the weights, each node at most its
    `limits` entry: the layers its memory holds resident, while the nodes together hold them all;
    else by weight alone, and the short nodes stream theirs). None = plain tensor."""
    if isinstance(request, Layout):
        if request.n_nodes == len(weights):
            return request.check(n_layers, len(weights))
        request = "pipeline" if request.kind in ("pipeline", "hybrid") else "tensor"  # after a node loss
    if request == "tensor" or len(weights) == 1:
        return None
    if request == "pipeline":
        if limits is not None:
            try:
                return layouts.pipeline(layouts.split_layers(n_layers, list(weights), list(limits)))
            except LayoutError:
                log.info("the nodes' memory holds only %d of %d layers resident; splitting the pipeline by speed "
                         "alone (sliding windows)", sum(limits), n_layers)
        return layouts.pipeline(layouts.split_layers(n_layers, list(weights)))
    raise LayoutError(f"layout must be one of {', '.join(LAYOUT_KINDS)} or a Layout, not {request!r}")


class DistributedLlama:
    """A Llama-family model spread over `nodes` by a layout (splitting.layouts: tensor parallel by
    default, or pipeline stages), driven from this process."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        nodes: list[NodeClient],
        weights: list[float] | None = None,
        *,
        cache_dir: str | Path | None = None,
        dtype: str = "float32",
        window: int | None = None,
        reply_timeout: float = 120.0,
        show_progress: bool = False,
        recover: bool = True,
        fuse_single_node: bool = True,
        quantize: str | None = None,
        backend: str = "ort",
        hub_threads: int | None = None,
        batch_invariant: bool = False,
        layout: str | Layout = "tensor",
        token_invariant: bool = False,
    ) -> None:
        if not nodes:
            raise ValueError("tensor-parallel inference needs at least one node")
        #: what the caller asked for: a kind ("tensor", "pipeline") or a concrete Layout (`partition_for`)
        self.layout_request = layout
        if isinstance(layout, Layout) and layout.n_nodes != len(nodes):
            raise LayoutError(f"the layout {layout.describe()} places {layout.n_nodes} node(s), but there are {len(nodes)}")
        partition_for(layout, checkpoint.config.num_layers, [1.0] * len(nodes))  # refuse a bad request early
        self.checkpoint, self.nodes, self.config = checkpoint, nodes, checkpoint.config
        self._root = Path(cache_dir) if cache_dir else shard_cache_root()
        self.show_progress = show_progress
        self.dtype, self.window, self.reply_timeout = dtype, window, reply_timeout
        #: --quantize: None keeps the file's precision class (a Q4 GGUF stays 4-bit), "none" is float
        self.quantize, self.backend = check_quantize(quantize), backend
        self.layouts = quantized_layouts(checkpoint, quantize, dtype)
        #: where the weights came from: "given", "cached plan" or "measured" (plan_cache.py)
        self.weights_source = "given"
        self._plan_key: str | None = None  # set when the weights were chosen here: remember the plan
        self.weights = list(weights) if weights else self._automatic_weights(nodes)
        if len(self.weights) != len(nodes):
            raise ValueError(f"got {len(self.weights)} weights for {len(nodes)} nodes")
        self.recover_on_failure = recover
        #: a row's numbers never depend on the rest of its batch (`layer_compute.at_least_two_rows`):
        #: what serving many users needs; a single stream (`edgeweave run`) keeps the one-row fast path
        self.batch_invariant = batch_invariant or token_invariant
        #: and a token's never depend on how many tokens of its sequence share the pass (nodes attend
        #: token by token in rows at an offset): what makes speculative decoding exactly greedy
        #: decoding (coordinator/speculative.py); implies batch_invariant
        self.token_invariant = token_invariant
        #: with one node holding everything, run all layers there per step (no per-layer hub)
        self.fuse_single_node = fuse_single_node
        self.streams: list = []
        #: this driver's lease on the nodes (node/leases.py): every stream carries it, so a stream
        #: reopened after a refusal keeps the sessions, and they are freed soon after this process dies
        self.lease = uuid.uuid4().hex
        #: shard bytes this driver wrote into the cache (0 when a verified plan folder was reused)
        self.bytes_written = 0
        self.bytes_sent = self._deploy(nodes, self.weights)
        if self._plan_key is not None:
            plan_cache.remember_plan(self._root, self._plan_key, self.manifest.root, self.plan.plan_id, self.weights)
        # A quantized LM head is one GEMV per token, bound by memory bandwidth: one thread by default.
        # A pool of more in this process spins beside the nodes' threads when they share the cores
        # (a local cluster, --coordinator-share): 54 vs 31 ms per 1B Q4_0 token on two cores.
        self.hub = TensorParallelHub.from_file(self.config, self.manifest.coordinator_file, hub_threads or 1,
                                               self.batch_invariant)
        self.last_stats = GenerationStats()
        self._sessions: set[str] = set()
        self._closed = False
        #: bumped by every redeploy: a session whose epoch is older has no KV cache on the new jobs
        self.epoch = 0
        self._session_epoch: dict[str, int] = {}
        self._recent_steps: deque[float] = deque(maxlen=32)
        self.recoveries: list[recovery.RecoveryRecord] = []
        #: address -> NodeTiming, over every step this driver ran
        self.node_timings: dict[str, NodeTiming] = {}
        #: times a node found one of its layer files changed on disk and got it re-sent mid-run
        self.shard_refetches = 0
        #: --layout auto: the planner's candidate this runs, and what re-plans it when links move
        self.planned: Any = None
        self.replanner: Any = None
        self._replan_clients: list[NodeClient] = []
        #: layouts this driver moved to after a link moved (coordinator/replanner.py)
        self.replans: list[dict[str, Any]] = []

    def _deploy(self, nodes: list[NodeClient], weights: list[float]) -> int:
        """Plan over `nodes`, write (cached by plan id) and ship what they lack, load the jobs, open
        the streams. Returns the shard bytes sent."""
        self.nodes, self.weights = list(nodes), list(weights)
        budgets = recovery.memory_budgets(self.nodes)  # one Info round for the plan and both checks
        self.plan: TensorParallelPlan = self.make_plan(self.weights, budgets)
        # refuse a cluster that cannot hold the model before writing or sending anything
        self.memory_plan = recovery.fit_plan_to_nodes(self.plan, self.nodes, budgets=budgets)
        folder = self._root / self.checkpoint.fingerprint / f"{self.plan.plan_id}-{self.dtype}"
        self.manifest: Manifest = self._write(folder, self.dtype)
        self.bytes_written += self.manifest.bytes_written
        os.utime(folder)  # the folder's mtime is its last use: `edgeweave cache prune` drops the oldest
        # the same check with the files' real sizes: now its windows are exactly what each node picks
        self.memory_plan = recovery.fit_plan_to_nodes(self.plan, self.nodes, self._layer_file_bytes(), budgets)
        for client in self.nodes:
            if isinstance(client, LocalMember):  # computes from the files written here: nothing to send
                client.offer_files({meta["sha256"]: self.manifest.path(rel) for rel, meta in self.manifest.data["files"].items()})
        sent = self._ship()
        self.job_ids = [f"tp-{self.checkpoint.fingerprint}-{self.plan.plan_id}-r{r}" for r in range(len(nodes))]
        self.load_details = []
        for r in range(len(nodes)):
            details, resent = self._load_or_refetch(r)
            self.load_details.append(details)
            sent += resent
        for r, (details, planned) in enumerate(zip(self.load_details, self.memory_plan.windows, strict=True)):
            if self.window is None and details.get("window") != planned:
                log.warning("node %s chose window %s where the memory plan says %s", self.nodes[r].address,
                            details.get("window"), planned)
        self.streams = self._open_streams()
        self.layout = self.plan.layout_of_nodes
        self._fused_ranks = {stage.ranks[0] for stage in self.layout.stages if len(stage.ranks) == 1
                             and self.fuse_single_node and "layers" in self.load_details[stage.ranks[0]].get("ops", [])}
        self._fused = self.layout.kind == "single" and bool(self._fused_ranks)
        # a local member's share is computed in recv: receive it first, while remote nodes compute
        local_first = sorted(range(len(self.nodes)), key=lambda r: not isinstance(self.nodes[r], LocalMember))
        self._attn_ranks = [r for r in local_first if self.plan.shards[r].n_kv_heads > 0]
        self._mlp_ranks = [r for r in local_first if self.plan.shards[r].n_columns > 0]
        return sent

    def _open_streams(self) -> list:
        """One Forward stream per node, each bound to its job at once (op "hold"): the open stream is
        this coordinator's claim on the job, so a node never unloads the model of an idle coordinator."""
        streams = []
        try:
            for client, job in zip(self.nodes, self.job_ids, strict=True):
                streams.append(client.open_stream(self.reply_timeout, lease=self.lease))
                streams[-1].call(job, "hold", [])
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return streams

    def _after_refusal(self, sequences: Sequence[SequenceStep]) -> None:
        """A node refused this step (e.g. its session cap) but is healthy: a refusal ends its stream,
        and the other nodes may hold replies or half a step of these sessions. Reopen every stream
        (same lease: other sessions stay) and drop the step's sessions everywhere, so the nodes
        stay consistent and a later step of theirs starts again from a full prefill."""
        for stream in self.streams:
            stream.close()
        self.streams = self._open_streams()
        names = [seq.session for seq in sequences]
        for name in names:
            self._session_epoch.pop(name, None)
        self._sessions.difference_update(names)
        self._reset_on_nodes(names)

    def _node_ids(self, nodes: list[NodeClient]) -> list[str]:
        """Stable ids (a node's data-dir id; the address where a member reports none, e.g. "local")."""
        return [client.info().node_id or client.address for client in nodes]

    def _automatic_weights(self, nodes: list[NodeClient]) -> list[float]:
        """Weights when none were given: the cached plan's over these very nodes, else measured
        capacities stabilized (hysteresis per node id, then a 1/8 grid; see plan_cache.py)."""
        ids = self._node_ids(nodes)
        self._plan_key = plan_cache.plan_key(self.checkpoint.fingerprint, self.quantize or "file", self.dtype, ids)
        budgets = recovery.memory_budgets(nodes)
        weights, self.weights_source = plan_cache.automatic_weights(
            self._root, self._plan_key, ids, lambda: profile_weights(nodes), lambda w: self.make_plan(w, budgets).plan_id)
        return weights

    def measured_capacities(self, nodes: list[NodeClient]) -> list[float]:
        """Profiled capacities of `nodes` (joining a running model), stabilized against the cache."""
        return plan_cache.stable_capacities(self._root, self._node_ids(nodes), profile_weights(nodes))[0]

    def make_plan(self, weights: list[float], budgets: Sequence[int] | None = None) -> TensorParallelPlan:
        """The cut for these node weights in this run's layout and precision (QuantizationError if
        blocks forbid it). With the nodes' memory `budgets` (0 = none), a pipeline's ranges also
        stay within what each node holds resident (`memory_plan.resident_layer_limits`)."""
        precision = self.quantize or "file"
        partition = partition_for(self.layout_request, self.config.num_layers, weights)
        plan = plan_shards(self.config, weights, self.layouts, precision, partition)
        if partition is None or partition.kind != "pipeline" or not budgets or not any(budgets):
            return plan
        limits = resident_layer_limits(plan, budgets, context_length=fit_context(self.config.max_position_embeddings),
                                       backend=self.backend)
        fitted = partition_for(self.layout_request, self.config.num_layers, weights, limits)
        return plan if fitted == partition else plan_shards(self.config, weights, self.layouts, precision, fitted)

    def redeploy(self, nodes: list[NodeClient], weights: list[float],
                 unload_from: list[NodeClient] | None = None) -> int:
        """Move the model onto `nodes` (after a loss, a rejoin or a re-plan): close the streams, unload
        the old jobs on `unload_from` (default `nodes`: a lost node is not asked), deploy the new plan.
        Sessions are re-prefilled on their next step."""
        for stream in self.streams:
            stream.close()
        reachable = {c.address for c in (nodes if unload_from is None else unload_from)}
        for client, job in zip(self.nodes, self.job_ids, strict=True):
            if client.address in reachable:
                try:
                    client.unload(job)
                except NodeError as exc:
                    log.info("unloading %s from %s: %s", job, client.address, exc.message)
        self.epoch += 1
        self._sessions.clear()  # their caches lived on the old jobs
        sent = self._deploy(nodes, weights)
        self.bytes_sent += sent
        return sent

    def _load_or_refetch(self, rank: int) -> tuple[dict[str, Any], int]:
        """Load the job; when the node lacks shards or found one corrupt (FAILED_PRECONDITION, it
        deleted that file), re-send what it now lacks and retry once. Returns (details, bytes re-sent)."""
        try:
            return self._load(rank, self.dtype, self.window), 0
        except NodeError as exc:
            if exc.code is not grpc.StatusCode.FAILED_PRECONDITION:
                raise
            log.warning("node %s refused the load (%s); re-sending its missing shards", exc.address, exc.message)
        resent = self._ship()
        return self._load(rank, self.dtype, self.window), resent

    # -- set-up ------------------------------------------------------------------------------
    def _layer_file_bytes(self) -> list[list[int]]:
        """Per rank, the size of each of its layer files (what the node sizes its window from)."""
        sizes = []
        for rank in range(len(self.plan.shards)):
            files = self.manifest.shard_files(rank)
            sizes.append([self.manifest.data["files"][files[f"layer.{i:03d}"]]["size"]
                          for i in self.plan.shards[rank].layer_range])
        return sizes

    def _write(self, folder: Path, dtype: str) -> Manifest:
        """The plan's shard files in `folder`: written once, read back from the cache after that."""
        from edgeweave.coordinator.progress import PhaseProgress

        cached = cached_manifest(self.checkpoint, self.plan, folder, dtype)
        if cached is not None:
            log.info("plan %s: shards already written in %s", self.plan.plan_id, folder)
            return cached
        layers = self.config.num_layers + 1  # every layer, then the coordinator's embedding and LM head
        with PhaseProgress(f"writing shards of {self.checkpoint.path.name}", layers, "files",
                           bar=self.show_progress) as progress:
            manifest = write_shards(self.checkpoint, self.plan, folder, dtype,
                                    progress=lambda done, _total, _name: progress.update(done))
        return manifest

    def _ship(self) -> int:
        """Upload each node's missing layer files (nodes keep them by sha256); returns bytes sent."""
        from edgeweave.coordinator.progress import PhaseProgress

        missing: list[tuple[NodeClient, str, Path, str]] = []
        for rank, client in enumerate(self.nodes):
            files = self.manifest.shard_files(rank)
            digests = {name: self.manifest.sha256(rel) for name, rel in files.items()}
            present = client.has_shards(list(digests.values()))
            missing += [(client, n, self.manifest.path(files[n]), d) for n, d in digests.items() if d not in present]
        if not missing:
            log.info("every node already holds its shards: nothing to send")
            return 0
        total = sum(path.stat().st_size for _, _, path, _ in missing)
        sent = 0
        with PhaseProgress(f"shipping shards to {len({c.address for c, *_ in missing})} node(s)", total, "bytes",
                           bar=self.show_progress) as progress:
            for client, name, path, digest in missing:
                client.put_shard(path, name, digest, lambda done, _total, base=sent: progress.update(base + done))
                sent += path.stat().st_size
                progress.update(sent)
        return sent

    def _load(self, rank: int, dtype: str, window: int | None) -> dict[str, Any]:
        held = self.plan.shards[rank].layer_range
        config = {
            "model": self.manifest.data["config"],
            "rank": rank,
            "n_layers": len(held),
            "first_layer": held.start,
            "layer_files": [f"layer.{i:03d}" for i in held],
            "window": window,
            "dtype": "float32",  # compute in float32 whatever the file dtype (16-bit files halve transfer and disk)
            "backend": self.backend,  # the kernels for quantized projections (runtime.layer_compute)
            "batch_invariant": self.batch_invariant,
            "token_invariant": self.token_invariant,
        }
        shards = {name: self.manifest.sha256(rel) for name, rel in self.manifest.shard_files(rank).items()}
        start = time.perf_counter()
        details = self.nodes[rank].load(self.job_ids[rank], "tp_llm", config, shards)
        window = details.get("window")
        log.info("node %s loaded its share in %.1f s (%s)", self.nodes[rank].address, time.perf_counter() - start,
                 "every layer resident" if window in (None, 0) else f"a sliding window of {window} layers")
        return details

    # -- the hub -----------------------------------------------------------------------------
    def _reduce_for(self, stats: GenerationStats, stage: layouts.Stage):
        """The allreduce callback of one stage's layers in one forward pass. Hot loop (2 x layers
        calls per step): the (stream, job) pairs are bound once, all sends go out before the first
        receive, and the partials are summed in place into the first (decoded replies are fresh,
        writable tensors). One row is sent as the message's session/position, several as its batch
        rows. Nodes number their layers from their stage's first."""
        perf = time.perf_counter
        first = stage.layers[0]
        targets = {
            op: [(self.streams[r], self.job_ids[r], self._timing(r)) for r in ranks if r in stage.ranks]
            for op, ranks in (("attn", self._attn_ranks), ("mlp", self._mlp_ranks))
        }

        def reduce(op: str, layer: int, x: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
            pairs = targets[op]
            session, position, batch = _addressing(rows)
            start = perf()
            outgoing = SharedTensors([x]) if len(pairs) > 1 else [x]  # encoded once for all the stage's nodes
            for stream, job, _ in pairs:
                stream.send(job, op, outgoing, layer - first, position, session, batch)
            total, slowest = None, 0.0
            for stream, _, timing in pairs:
                tensors, reply = stream.recv()
                timing.messages += 1
                timing.round_trip_s += perf() - start
                timing.compute_s += reply.compute_s
                if total is None:
                    total = tensors[0]
                else:
                    total += tensors[0]
                if reply.compute_s > slowest:
                    slowest = reply.compute_s
            stats.wait_s += perf() - start
            stats.node_compute_s += slowest
            stats.round_trips += 1
            return total if total is not None else torch.zeros_like(x)

        return reduce

    def _stages_for(self, stats: GenerationStats):
        """The layers of one forward pass, stage after stage: a node alone in its stage runs all of
        its layers in one message, a stage of several nodes is reduced here layer by layer."""
        runs = [self._stack_for(stats, stage.ranks[0]) if stage.ranks[0] in self._fused_ranks
                else self._reduce_stage(stats, stage) for stage in self.layout.stages]
        if len(runs) == 1:
            return runs[0]

        def stages(x: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
            for run in runs:
                x = run(x, rows)
            return x

        return stages

    def _reduce_stage(self, stats: GenerationStats, stage: layouts.Stage):
        reduce, layers = self._reduce_for(stats, stage), range(*stage.layers)
        return lambda x, rows: self.hub.reduce_layers(x, rows, reduce, layers)

    def _stack_for(self, stats: GenerationStats, rank: int = 0):
        """The one-message step of a node that holds all heads and columns of its layers (a 1-node
        plan, or a pipeline stage): it runs them all (op "layers")."""
        stream, job, timing = self.streams[rank], self.job_ids[rank], self._timing(rank)

        def stack(x: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
            session, position, batch = _addressing(rows)
            start = time.perf_counter()
            stream.send(job, "layers", [x], 0, position, session, batch)
            (out,), reply = stream.recv()
            waited = time.perf_counter() - start
            timing.messages += 1
            timing.round_trip_s += waited
            timing.compute_s += reply.compute_s
            stats.wait_s += waited
            stats.node_compute_s += reply.compute_s
            stats.round_trips += 1
            return out

        return stack

    def _timing(self, rank: int) -> NodeTiming:
        return self.node_timings.setdefault(self.nodes[rank].address, NodeTiming())

    def _forward_rows(self, token_ids: list[int], rows: Sequence[Row], stats: GenerationStats | None = None,
                      last_only: bool = True) -> torch.Tensor:
        """One pass over the nodes for stacked rows (runtime.batch): [rows, vocab] with `last_only`.

        Not thread-safe: one thread drives the streams (interleave sessions from that thread)."""
        if self._closed:
            raise RuntimeError("this DistributedLlama is closed")
        for row in rows:
            if row.position + row.length > self.config.max_position_embeddings:
                raise ValueError(f"sequence of {row.position + row.length} tokens exceeds the model's "
                                 f"{self.config.max_position_embeddings}")
            self._sessions.add(row.session)
        stats = stats or GenerationStats()
        return self.hub.forward_rows(token_ids, rows, stack=self._stages_for(stats), last_only=last_only)

    def generate(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        sampling: SamplingParams | None = None,
        stop: set[int] | frozenset[int] = frozenset(),
        session: str | None = None,
        logits_out: list[torch.Tensor] | None = None,
    ) -> Iterator[int]:
        """Yield up to `max_tokens` token ids of one sequence (a stop token is yielded, then the
        stream ends): `step` with one row per call.

        Timing lands in `self.last_stats`; `logits_out`, when given, collects the logits each token was chosen from.
        """
        sampling = sampling or SamplingParams()
        sampler = Sampler(sampling)
        stop_ids = set(stop) | set(sampling.stop_token_ids)
        sequence = SequenceStep(session or uuid.uuid4().hex[:12], list(prompt_ids), 0)
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.last_stats = stats
        start = time.perf_counter()
        try:
            logits = self.step([sequence], stats)[0]
            for i in range(max_tokens):
                token = sampler.choose(logits)
                now = time.perf_counter()
                if i == 0:
                    stats.ttft_s = now - start
                else:
                    stats.token_s.append(now - start)
                if logits_out is not None:
                    logits_out.append(logits)
                yield token
                if token in stop_ids or i == max_tokens - 1:
                    return
                start = time.perf_counter()
                sequence.cached = len(sequence.history)
                sequence.history.append(token)
                logits = self.step([sequence], stats)[0]
        finally:
            self.reset(sequence.session)

    def step(self, sequences: Sequence[SequenceStep], stats: GenerationStats | None = None,
             last_only: bool = True) -> torch.Tensor:
        """One batched step: each sequence's tokens past `cached` go through the model together;
        returns each one's next-token logits [len(sequences), vocab] (without `last_only`: the
        logits of every token past `cached`, sequence after sequence, [sum of those, vocab], as
        speculative decoding verifies a draft). Survives node losses.

        A session whose KV cache was lost in a redeploy is rebuilt by prefilling its whole history
        in the same step. On a lost node, `recovery.recover` re-plans over the survivors and we retry."""
        stats = stats or GenerationStats()
        pending: tuple[recovery.RecoveryRecord, float] | None = None
        refetches = 0
        while True:
            rows, ids = [], []
            for seq in sequences:
                # a session new to these jobs (or whose cache was lost in a redeploy) is prefilled whole
                at = seq.cached if self._session_epoch.get(seq.session) == self.epoch else 0
                if at == 0:
                    self._sessions.discard(seq.session)  # any cache it had lived on the old jobs
                self._session_epoch[seq.session] = self.epoch
                rows.append(Row(seq.session, at, len(seq.history) - at))
                ids += seq.history[at:]
            decode = len(ids) == len(rows)
            deadline = recovery.step_deadline(self._recent_steps) if decode and self._recent_steps \
                else self.reply_timeout
            for stream in self.streams:
                stream.reply_timeout = deadline
            step_start = time.perf_counter()
            try:
                logits = self._forward_rows(ids, rows, stats, last_only)
                if not last_only:  # a re-prefilled row computed its whole history: keep the asked-for tail
                    logits = logits[_new_token_indexes(sequences, rows)]
            except NodeError as exc:
                if (self.recover_on_failure and exc.code is grpc.StatusCode.FAILED_PRECONDITION
                        and refetches < MAX_REFETCHES_PER_STEP and recovery.refetch_changed_shards(self, exc)):
                    refetches += 1
                    self.shard_refetches += 1
                    continue
                if not recovery.is_node_lost(exc):  # the node refused this step: this request's error
                    self._after_refusal(sequences)
                    raise
                if not self.recover_on_failure:
                    raise
                detected = time.perf_counter()
                record = recovery.recover(self, exc, detected_after_s=detected - step_start)
                self.recoveries.append(record)
                pending = pending or (record, detected)
                continue
            if decode:
                self._recent_steps.append(time.perf_counter() - step_start)
            if pending:
                recovery.finish(*pending)
                stats.recoveries.append(pending[0].as_dict())
                self.replanner = None  # its measured nodes are not these any more
            elif decode and self.replanner is not None:
                self._maybe_replan(time.perf_counter() - step_start)
            return logits

    def attach_replanner(self, replanner: Any, clients: list[NodeClient]) -> None:
        """Re-plan as links move (`coordinator.replanner.Replanner` over `clients`, the measured nodes
        in the order of its costs; the running choice names its nodes by their index there)."""
        self.replanner, self._replan_clients = replanner, list(clients)

    def _maybe_replan(self, step_s: float) -> None:
        """After a decode step: when the replanner picks another layout, move to it now (the next
        step re-prefills the sessions on the new jobs, as after a recovery)."""
        try:
            new = self.replanner.observe(step_s)
        except NodeError as exc:  # a node that fails its probe is the next step's recovery
            log.warning("re-plan probe failed (%s); keeping %s", exc.message, self.layout.describe())
            return
        if new is None:
            return
        start = time.perf_counter()
        before = self.layout.describe()
        self.layout_request = new.layout
        # every old node is alive (the step just succeeded): free the jobs of those the new choice drops too
        sent = self.redeploy([self._replan_clients[i] for i in new.nodes], list(new.weights), unload_from=self.nodes)
        self.planned = new
        self.replans.append({"from": before, "to": new.describe(), "predicted_decode_s": new.decode_s,
                             "resent_bytes": sent, "seconds": time.perf_counter() - start})

    def truncate(self, session: str, length: int) -> None:
        """Cut `session`'s KV caches to its first `length` tokens (a rejected speculative draft) on
        every node holding a KV cache, all messages sent before the first reply is read. Where that
        fails, the session is prefilled whole from its history on its next step instead: a lost
        node is found, and recovered from, by that step; after a refusal the streams are reopened
        and the session's caches dropped, as after any refusal."""
        if self._session_epoch.get(session) != self.epoch or self._closed:
            return  # no cache of it on these jobs: its next step prefills it whole anyway
        failure: NodeError | None = None
        sent = []
        for r in self._kv_ranks():
            try:
                self.streams[r].send(self.job_ids[r], "truncate", [], 0, length, session)
                sent.append(r)
            except NodeError as exc:
                failure = failure or exc
        for r in sent:
            try:
                self.streams[r].recv()
            except NodeError as exc:
                failure = failure or exc
        if failure is None:
            return
        log.warning("truncating session %s on %s failed (%s); it is prefilled again on its next step",
                    session, failure.address, failure.message)
        if recovery.is_node_lost(failure):
            self._session_epoch.pop(session, None)  # the step's recovery redeploys: fresh jobs, no caches
        else:
            self._after_refusal([SequenceStep(session, [], 0)])  # reopen the streams, drop its caches

    def _kv_ranks(self) -> list[int]:
        """The ranks holding KV caches: the ones with attention heads (in a pipeline layout, every stage)."""
        return self._attn_ranks

    def reset(self, *sessions: str) -> None:
        """Forget `sessions` (their KV caches on every node holding attention heads), in one message per node."""
        for session in sessions:
            self._session_epoch.pop(session, None)
        live = [s for s in sessions if s in self._sessions]
        if not live or self._closed:
            return
        self._sessions.difference_update(live)
        self._reset_on_nodes(live)

    def _reset_on_nodes(self, sessions: Sequence[str]) -> None:
        """One reset message per node holding attention heads, for all of `sessions`."""
        rows = [Row(s, 0, 1) for s in sessions] if len(sessions) > 1 else None
        for r in self._kv_ranks():
            try:
                self.streams[r].call(self.job_ids[r], "reset", [], session=sessions[0], rows=rows)
            except NodeError as exc:  # a lost node; the next step's recovery deals with it
                log.warning("resetting session(s) %s on %s failed: %s", ", ".join(sessions), exc.address,
                            exc.message)

    @property
    def fused(self) -> bool:
        """True when one node runs every layer per step (1 message per step instead of 2 x layers)."""
        return self._fused

    @property
    def messages_per_token(self) -> int:
        """Round trips of one decode step: one per fused stage, 2 x its layers for a reduced stage."""
        return sum(1 if s.ranks[0] in self._fused_ranks else 2 * s.n_layers for s in self.layout.stages)

    @property
    def active_sessions(self) -> int:
        """Sequences stepped and not reset yet (a redeploy for a rejoin waits until this is 0)."""
        return len(self._session_epoch)

    def describe(self) -> list[dict[str, Any]]:
        """The plan per node, with the node's address."""
        return [{**row, "address": self.nodes[row["rank"]].address} for row in self.plan.describe()]

    def node_stats(self) -> list[dict[str, Any]]:
        return [client.job_stats(job) for client, job in zip(self.nodes, self.job_ids, strict=True)]

    def close(self) -> None:
        """Close the streams and unload the jobs (nodes keep their shard files for the next run)."""
        if self._closed:
            return
        self._closed = True
        for stream in self.streams:
            stream.close()
        for client, job in zip(self.nodes, self.job_ids, strict=True):
            try:
                client.unload(job)
            except Exception as exc:  # a node that went away has nothing left to unload
                log.warning("unloading %s from %s failed: %s", job, client.address, exc)

    def __enter__(self) -> DistributedLlama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
