"""What the HTTP layer needs from a model: the `TextEngine` protocol and the engines behind it.

The serving stack (scheduler + HTTP API) only ever sees token ids going in and coming out, one
step per `next()`: that is what lets one scheduler thread interleave the decode steps of many
requests (round robin) over a cluster whose nodes keep one KV cache per `session`.

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from edgeweave.coordinator.client import NodeClient, NodeError
from edgeweave.coordinator.recovery import ClusterLostError
from edgeweave.coordinator.tp_driver import DistributedLlama, profile_weights
from edgeweave.runtime.llama import KVCache, LlamaModel
from edgeweave.runtime.sampling import Sampler, SamplingParams
from edgeweave.splitting.checkpoints import Checkpoint, open_checkpoint
from edgeweave.splitting.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@runtime_checkable
class TextEngine(Protocol):
    """A model that generates token ids, one step per `next()`, with a KV cache per session."""

    model_id: str
    tokenizer: Tokenizer
    #: longest sequence (prompt + completion) the model accepts
    max_context: int

    def generate(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams, session: str) -> Iterator[int]:
        """Yield up to `max_tokens` ids; the first `next()` prefills. A stop id in
        `sampling.stop_token_ids` is yielded and ends the stream. Closing the iterator early is allowed."""
        ...

    def reset(self, session: str) -> None:
        """Forget the session's KV cache everywhere it lives (after a finish or a cancel)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What `/v1/status` shows about the model and where it runs (plan, nodes)."""
        ...

    def close(self) -> None: ...


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

    def generate(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams, session: str) -> Iterator[int]:
        if session in self.caches:
            raise ValueError(f"session {session!r} is already generating")
        cache = self.caches[session] = self.model.new_cache()
        sampler = Sampler(sampling)
        try:
            logits = self.model.forward(prompt_ids, cache, 0)[-1]
            position = len(prompt_ids)
            for _ in range(max_tokens):
                token = sampler.choose(logits)
                yield token
                if sampler.is_stop(token):
                    return
                logits = self.model.forward([token], cache, position)[-1]
                position += 1
        finally:
            self.reset(session)

    def reset(self, session: str) -> None:
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

    def close(self) -> None:
        self.caches.clear()


class DistributedEngine:
    """Adapter over `tp_driver.DistributedLlama`: the model tensor-parallel over nodes.

    The driver's `generate(..., session=...)` is already a one-step-per-`next()` iterator whose
    KV caches live on the nodes under `session`, and it resets that session when closed; this
    adapter only adds what the HTTP layer needs (tokenizer, model id, a status description).
    Use it from one thread (the scheduler's): the driver's Forward streams are not shared.
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
             quantize: str | None = None,
             ) -> DistributedEngine:
        """Connect to the nodes, cut and ship the model (cached on both sides), load the jobs.

        `weights` are the nodes' relative capacities; None = measured by the driver (GFLOP/s).
        `watcher` (a discovery.NodeWatcher) lets nodes that (re)appear on mDNS join the next request."""
        if not addresses:
            raise ValueError("a distributed engine needs at least one node address")
        clients = [NodeClient(address) for address in addresses]
        try:
            llm = DistributedLlama(checkpoint, clients, weights, cache_dir=cache_dir, dtype=dtype, quantize=quantize)
        except BaseException:
            for client in clients:
                client.close()
            raise
        return cls(llm, clients, addresses=list(addresses), weights=weights, watcher=watcher)

    def generate(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams, session: str) -> Iterator[int]:
        self.refresh_membership()
        return self._guard(self.llm.generate(prompt_ids, max_tokens, sampling, session=session))

    def _guard(self, tokens: Iterator[int]) -> Iterator[int]:
        """Pass tokens through; remember a cluster loss so the next request rebuilds from whoever answers."""
        try:
            yield from tokens
        except ClusterLostError:
            self._broken = True
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
        for client, weight in zip(missing, profile_weights(missing) if missing else [], strict=True):
            self._weights[client.address] = weight
        sent = self.llm.redeploy(nodes, [self._weights[c.address] for c in nodes])
        self._clients += joined
        self._broken = False
        event = {"joined": sorted(joined_addresses), "nodes": len(nodes), "resent_bytes": sent}
        self.rejoins.append(event)
        log.warning("node(s) %s (re)joined: the model now runs on %d nodes (%d shard bytes sent)",
                    ", ".join(event["joined"]), len(nodes), sent)
        return True

    def reset(self, session: str) -> None:
        self.llm.reset(session)  # a no-op when the driver's generator has reset it already

    def describe(self) -> dict[str, Any]:
        return {
            "engine": f"tensor parallel over {len(self.llm.nodes)} node(s)",
            "model": self.model_id,
            "checkpoint": str(self.checkpoint.path),
            "layers": self.llm.config.num_layers,
            "plan_id": self.llm.plan.plan_id,
            "recoveries": [r.as_dict() for r in self.llm.recoveries],
            "rejoins": list(self.rejoins),
            "nodes": [
                {"name": f"rank {row['rank']}", "address": row["address"], "job_id": job_id,
                 "weight": row["weight"], "kv_heads": row["n_kv_heads"], "q_heads": row["n_q_heads"],
                 "columns": row["n_columns"], "weight_bytes": row["bytes"]}
                for row, job_id in zip(self.llm.describe(), self.llm.job_ids, strict=True)
            ],
        }

    def close(self) -> None:
        self.llm.close()
        for client in self._clients:
            client.close()
