"""What the HTTP layer needs from a model: the `TextEngine` protocol and the engines behind it.

The serving stack (scheduler + HTTP API) only ever sees token ids going in and coming out, one
step per `next()`: that is what lets one scheduler thread interleave the decode steps of many
requests (round robin) over a cluster whose nodes keep one KV cache per `session`.

Engines here:
- `ReferenceEngine`: the single-process reference model (`runtime.llama.LlamaModel`), for quick
  runs and as the "1 process" baseline.
- `DistributedEngine`: the model tensor-parallel over nodes, stepped per session (built on
  `splitting.tensor_parallel` + `runtime.tp_hub` + the node client's Forward streams).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from edgeweave.coordinator.client import ForwardStream, NodeClient, NodeError
from edgeweave.runtime.llama import KVCache, LlamaModel
from edgeweave.runtime.sampling import Sampler, SamplingParams
from edgeweave.runtime.tp_hub import TensorParallelHub
from edgeweave.splitting.checkpoints import Checkpoint, open_checkpoint
from edgeweave.splitting.tensor_parallel import Manifest, plan_shards, write_shards
from edgeweave.splitting.tokenizer import Tokenizer


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


def default_shard_cache() -> Path:
    """Where the coordinator keeps the shard files it cuts (reused across runs)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeweave" / "tp"


class DistributedEngine:
    """The model spread over nodes (tensor parallel), driven step by step for the scheduler.

    Built from the shared pieces: `splitting.tensor_parallel` cuts the checkpoint, each node gets
    its shards once and loads a "tp_llm" job, and `runtime.tp_hub` runs embedding/norms/LM head
    here while the nodes compute their heads and columns; one long-lived Forward stream per node
    carries the 2 x layers round trips per token, each tagged with the request's session.
    Use it from one thread (the scheduler's).
    """

    def __init__(self, checkpoint: Checkpoint, addresses: list[str], manifest: Manifest, job_id: str,
                 clients: list[NodeClient], streams: list[ForwardStream], reply_timeout: float) -> None:
        self.checkpoint = checkpoint
        self.model_id = model_id_of(checkpoint)
        self.tokenizer = Tokenizer.from_checkpoint(checkpoint)
        self.max_context = checkpoint.config.max_position_embeddings
        self.addresses = addresses
        self.manifest = manifest
        self.job_id = job_id
        self.clients = clients
        self.streams = streams
        self.reply_timeout = reply_timeout
        self.hub = TensorParallelHub.from_file(checkpoint.config, manifest.coordinator_file)
        self.sessions: set[str] = set()

    @classmethod
    def open(cls, checkpoint: Checkpoint, addresses: list[str], weights: list[float] | None = None,
             cache_dir: Path | None = None, reply_timeout: float = 60.0) -> DistributedEngine:
        """Cut the model for these nodes (cached), ship what they lack, load the job, open the streams."""
        if not addresses:
            raise ValueError("a distributed engine needs at least one node address")
        plan = plan_shards(checkpoint.config, weights or [1.0] * len(addresses))
        root = Path(cache_dir or default_shard_cache()) / checkpoint.fingerprint / plan.plan_id
        manifest = write_shards(checkpoint, plan, root)
        job_id = f"serve-{plan.plan_id}"
        clients: list[NodeClient] = []
        streams: list[ForwardStream] = []
        try:
            for rank, address in enumerate(addresses):
                client = NodeClient(address, timeout=30.0)
                clients.append(client)
                digests = client.ensure_shards(manifest.node_files(rank))
                config = {"model": manifest.data["config"], "rank": rank,
                          "n_layers": checkpoint.config.num_layers, "window": None}
                client.load(job_id, "tp_llm", config, digests)
                streams.append(client.open_stream(reply_timeout=reply_timeout))
        except BaseException:
            for stream in streams:
                stream.close()
            for client in clients:
                client.close()
            raise
        return cls(checkpoint, list(addresses), manifest, job_id, clients, streams, reply_timeout)

    def _reduce(self, session: str):
        def reduce(op: str, layer: int, x: torch.Tensor, position: int) -> torch.Tensor:
            for stream in self.streams:  # send to every node first: they compute in parallel
                stream.send(self.job_id, op, [x], layer=layer, position=position, session=session)
            total = None
            for stream in self.streams:
                (partial,), _ = stream.recv()
                total = partial if total is None else total + partial
            return total

        return reduce

    def generate(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams, session: str) -> Iterator[int]:
        if session in self.sessions:
            raise ValueError(f"session {session!r} is already generating")
        self.sessions.add(session)
        sampler, reduce = Sampler(sampling), self._reduce(session)
        try:
            logits = self.hub.forward(prompt_ids, 0, reduce)[-1]
            position = len(prompt_ids)
            for _ in range(max_tokens):
                token = sampler.choose(logits)
                yield token
                if sampler.is_stop(token):
                    return
                logits = self.hub.forward([token], position, reduce)[-1]
                position += 1
        finally:
            self.sessions.discard(session)

    def reset(self, session: str) -> None:
        for stream in self.streams:
            stream.send(self.job_id, "reset", [], session=session)
        for stream in self.streams:
            stream.recv()

    def describe(self) -> dict[str, Any]:
        plan = self.manifest.data["describe"]
        return {
            "engine": f"tensor parallel over {len(self.addresses)} node(s)",
            "model": self.model_id,
            "checkpoint": str(self.checkpoint.path),
            "layers": self.checkpoint.config.num_layers,
            "job_id": self.job_id,
            "plan_id": self.manifest.plan_id,
            "nodes": [
                {"name": f"rank {d['rank']}", "address": address, "kv_heads": d["n_kv_heads"],
                 "q_heads": d["n_q_heads"], "columns": d["n_columns"], "weight_bytes": d["bytes"]}
                for d, address in zip(plan, self.addresses, strict=True)
            ],
            "sessions": len(self.sessions),
        }

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
        for client in self.clients:
            try:
                client.unload(self.job_id)
            except NodeError:
                pass  # the node is gone already
            client.close()
