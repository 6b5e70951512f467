"""What the HTTP layer needs from a model: the `TextEngine` protocol and the engines behind it.

The serving stack (scheduler + HTTP API) hands an engine a batch of sequences per step (continuous
batching: decode rows and prefill chunks of many requests together, `runtime.batch.SequenceStep`)
and gets back each one's next-token logits; sampling stays with the scheduler. The engine keeps a
KV cache per `session` (on the nodes, for a cluster) until `reset`.

Engines here:
- `ReferenceEngine`: the single-process reference model (`runtime.llama.LlamaModel`), for quick
  runs and as the "1 process" baseline.
- `DistributedEngine`: an adapter over the tensor-parallel driver (`coordinator.tp_driver`).
  It survives node failures: a node lost mid-request is handled by the driver's recovery
  (coordinator/recovery.py), and before each new request the engine re-checks membership, so a
  restarted node (same address, shards still on disk) is used again by the next request.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from edgeweave.coordinator.client import NodeClient, NodeError
from edgeweave.coordinator.recovery import ClusterLostError
from edgeweave.coordinator.tp_driver import DistributedLlama, NodeTiming
from edgeweave.runtime.batch import SequenceStep
from edgeweave.runtime.llama import KVCache, LlamaModel
from edgeweave.splitting.checkpoints import Checkpoint, open_checkpoint
from edgeweave.splitting.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@runtime_checkable
class TextEngine(Protocol):
    """A model that runs batched steps over sequences, with a KV cache per session."""

    model_id: str
    tokenizer: Tokenizer
    #: longest sequence (prompt + completion) the model accepts
    max_context: int

    def step(self, sequences: Sequence[SequenceStep]) -> torch.Tensor:
        """Run every sequence's uncached tokens in one batched pass: next-token logits [len(sequences), vocab].
        A session not seen before (or reset) starts from an empty cache."""
        ...

    def reset(self, *sessions: str) -> None:
        """Forget the sessions' KV caches everywhere they live (after a finish or a cancel)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What `/v1/status` shows about the model and where it runs (plan, nodes)."""
        ...

    def telemetry(self) -> Telemetry:
        """Running totals for /metrics (per-node timings, recoveries); cheap, read at every scrape."""
        ...

    def close(self) -> None: ...


@dataclass
class Telemetry:
    #: node address -> its Forward totals (tp_driver.NodeTiming)
    nodes: dict[str, NodeTiming] = field(default_factory=dict)
    recoveries: int = 0
    rejoins: int = 0


def model_id_of(checkpoint: Checkpoint) -> str:
    """The name clients pass as `model`: the checkpoint file or folder name without suffix."""
    return checkpoint.path.stem if checkpoint.path.suffix == ".gguf" else checkpoint.path.name


class ReferenceEngine:
    """The whole model in this process (no nodes): quick tests, and the single-process baseline."""

    def __init__(self, checkpoint: Checkpoint | None = None, model_id: str | None = None) -> None:
        self.checkpoint = checkpoint or open_checkpoint()
        self.model_id = model_id or model_id_of(self.checkpoint)
        self.tokenizer = Tokenizer.from_checkpoint(self.checkpoint)
        self.model = LlamaModel(self.checkpoint.config, self.checkpoint.tensor, set(self.checkpoint.names()))
        self.max_context = self.checkpoint.config.max_position_embeddings
        self.caches: dict[str, KVCache] = {}

    def step(self, sequences: Sequence[SequenceStep]) -> torch.Tensor:
        caches, positions, lengths, ids = [], [], [], []
        for seq in sequences:
            cache = self.caches.get(seq.session)
            if cache is None:
                cache = self.caches[seq.session] = self.model.new_cache()
            at = max(cache.lengths())
            if at != seq.cached:  # the caller's view and ours differ: rebuild from its history
                cache.truncate(0)
                at = 0
            caches.append(cache)
            positions.append(at)
            lengths.append(len(seq.history) - at)
            ids += seq.history[at:]
        return self.model.forward_rows(ids, caches, positions, lengths)

    def reset(self, *sessions: str) -> None:
        for session in sessions:
            self.caches.pop(session, None)

    def describe(self) -> dict[str, Any]:
        cfg = self.checkpoint.config
        return {
            "engine": "reference (single process)",
            "model": self.model_id,
            "checkpoint": str(self.checkpoint.path),
            "layers": cfg.num_layers,
            "nodes": [{"name": "local", "address": "in-process", "kv_heads": cfg.num_kv_heads,
                       "q_heads": cfg.num_heads, "columns": cfg.intermediate_size}],
            "sessions": len(self.caches),
        }

    def telemetry(self) -> Telemetry:
        return Telemetry()

    def close(self) -> None:
        self.caches.clear()


#: how /v1/status and the web page name a layout kind (splitting.layouts)
LAYOUT_NAMES = {"single": "one node", "tensor": "tensor parallel", "pipeline": "pipeline", "hybrid": "hybrid"}


class DistributedEngine:
    """Adapter over `tp_driver.DistributedLlama`: the model tensor-parallel over nodes.

    The driver's `step` runs a batch of sequences whose KV caches live on the nodes under their
    sessions (batch-invariant: see `layer_compute.at_least_two_rows`); this adapter adds what the
    HTTP layer needs (tokenizer, model id, a status description) and lets nodes rejoin between
    requests. Use it from one thread (the scheduler's): the driver's Forward streams are not shared.
    """

    def __init__(self, llm: DistributedLlama, clients: list[NodeClient] | None = None, *,
                 addresses: list[str] | None = None, weights: list[float] | None = None,
                 watcher: Any | None = None, probe_timeout: float = 1.0) -> None:
        self.llm = llm
        self.checkpoint = llm.checkpoint
        self.model_id = model_id_of(llm.checkpoint)
        self.tokenizer = Tokenizer.from_checkpoint(llm.checkpoint)
        self.max_context = llm.config.max_position_embeddings
        self._clients = clients or []
        #: every node this engine may use (address -> weight, None = measure): lost ones rejoin from here
        addresses = addresses or [c.address for c in llm.nodes]
        self._weights: dict[str, float | None] = dict.fromkeys(addresses)
        for address, weight in zip(addresses, weights or llm.weights, strict=False):
            self._weights[address] = weight
        self.watcher = watcher  # optional discovery.NodeWatcher: nodes it sees join like peers
        self.probe_timeout = probe_timeout
        self._broken = False
        self.rejoins: list[dict[str, Any]] = []

    @classmethod
    def open(cls, checkpoint: Checkpoint, addresses: list[str], weights: list[float] | None = None,
             cache_dir: str | Path | None = None, dtype: str = "float32", watcher: Any | None = None,
             quantize: str | None = None, layout: Any = "tensor",
             ) -> DistributedEngine:
        """Connect to the nodes, cut and ship the model (cached on both sides), load the jobs.

        `weights` are the nodes' relative capacities; None = measured by the driver (GFLOP/s).
        `watcher` (a discovery.NodeWatcher) lets nodes that (re)appear on mDNS join the next request."""
        if not addresses:
            raise ValueError("a distributed engine needs at least one node address")
        clients = [NodeClient(address) for address in addresses]
        try:
            if layout == "auto":  # the planner's layout over the nodes it measures (coordinator/auto_layout.py)
                from edgeweave.coordinator.auto_layout import open_auto

                llm = open_auto(checkpoint, clients, quantize=quantize, cache_dir=cache_dir, dtype=dtype,
                                batch_invariant=True)
            else:
                llm = DistributedLlama(checkpoint, clients, weights, cache_dir=cache_dir, dtype=dtype,
                                       quantize=quantize, batch_invariant=True,  # answers never depend on the load
                                       layout=layout)
        except BaseException:
            for client in clients:
                client.close()
            raise
        if layout == "auto":  # the planner may leave a slow node out: membership is what it chose
            addresses, weights = [c.address for c in llm.nodes], list(llm.weights)
        return cls(llm, clients, addresses=list(addresses), weights=weights, watcher=watcher)

    def step(self, sequences: Sequence[SequenceStep]) -> torch.Tensor:
        if not self.llm.active_sessions:  # between requests: let restarted or new nodes join
            self.refresh_membership()
        try:
            return self.llm.step(sequences)
        except ClusterLostError:
            self._broken = True  # the next request rebuilds from whoever answers
            raise

    # -- membership --------------------------------------------------------------------------
    def _known(self) -> list[str]:
        if self.watcher is not None:
            for record in list(self.watcher.nodes.values()):
                self._weights.setdefault(record.address, None)
        return list(self._weights)

    def _probe(self, address: str) -> NodeClient | None:
        """A fresh channel (no reconnect backoff left over from the node's death) if the node answers Health."""
        client = NodeClient(address, timeout=self.probe_timeout)
        try:
            client.health()
            return client
        except NodeError:
            client.close()
            return None

    def refresh_membership(self) -> bool:
        """Between requests: if a known node answers that the model does not use (a restarted or newly
        discovered node), or the cluster was lost, redeploy over the healthy nodes. True if it did."""
        if self.llm.active_sessions:
            return False  # other requests still hold KV caches on the current jobs
        current = {c.address for c in self.llm.nodes}
        candidates = self._known() if self._broken else [a for a in self._known() if a not in current]
        joined = [client for address in candidates if (client := self._probe(address)) is not None]
        if not joined:
            return False
        joined_addresses = {c.address for c in joined}
        nodes = joined if self._broken else [c for c in self.llm.nodes if c.address not in joined_addresses] + joined
        missing = [c for c in nodes if self._weights.get(c.address) is None]
        for client, weight in zip(missing, self.llm.measured_capacities(missing) if missing else [], strict=True):
            self._weights[client.address] = weight
        sent = self.llm.redeploy(nodes, [self._weights[c.address] for c in nodes])
        self._clients += joined
        self._broken = False
        event = {"joined": sorted(joined_addresses), "nodes": len(nodes), "resent_bytes": sent}
        self.rejoins.append(event)
        log.warning("node(s) %s (re)joined: the model now runs on %d nodes (%d shard bytes sent)",
                    ", ".join(event["joined"]), len(nodes), sent)
        return True

    def reset(self, *sessions: str) -> None:
        self.llm.reset(*sessions)

    def describe(self) -> dict[str, Any]:
        return {
            "engine": f"{LAYOUT_NAMES[self.llm.layout.kind]} over {len(self.llm.nodes)} node(s)",
            "layout": self.llm.layout.describe(),
            "model": self.model_id,
            "checkpoint": str(self.checkpoint.path),
            "layers": self.llm.config.num_layers,
            "plan_id": self.llm.plan.plan_id,
            "recoveries": [r.as_dict() for r in self.llm.recoveries],
            "rejoins": list(self.rejoins),
            "nodes": [
                {"name": f"rank {row['rank']}", "address": row["address"], "job_id": job_id,
                 "weight": row["weight"], "kv_heads": row["n_kv_heads"], "q_heads": row["n_q_heads"],
                 "columns": row["n_columns"], "layers": row["layers"], "weight_bytes": row["bytes"]}
                for row, job_id in zip(self.llm.describe(), self.llm.job_ids, strict=True)
            ],
        }

    def telemetry(self) -> Telemetry:
        return Telemetry(dict(self.llm.node_timings), len(self.llm.recoveries), len(self.rejoins))

    def close(self) -> None:
        self.llm.close()
        for client in self._clients:
            client.close()
