"""Tensor-parallel sharding of a Llama-family checkpoint (TPI-LLM style), proportional to node capacity.

Attention is cut by KV-head groups (the query heads of a group follow their KV head), the MLP by
intermediate columns; each node's share follows its weight with largest-remainder rounding, so
uneven splits (3 KV heads over 2 nodes = 2 + 1) are normal and a node may hold no heads at all.
Per node and layer one safetensors file holds that node's slices; `coordinator.safetensors` holds
what the hub computes itself (embedding, norms, the LM head stored transposed as `lm_head_t`). A node that holds everything (a 1-node
plan) also gets `norms.safetensors`, so it can run the layers without a per-layer hub. Tensors are read one at a time, so the
peak memory of writing is about one layer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from edgeweave.runtime.shard_files import sha256_file
from edgeweave.splitting.checkpoints import Checkpoint
from edgeweave.splitting.llama_config import LlamaConfig

MANIFEST_FORMAT = 3  # 2: 1-node plans carry node0/norms.safetensors; 3: the hub's lm_head_t
SHARD_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Progress = Callable[[int, int, str], None]


def largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Split `total` integer units proportionally to `weights` (Hamilton's method; ties go to lower ranks)."""
    if not weights or any(w <= 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"node weights must be positive finite numbers, got {weights}")
    quotas = [total * w / sum(weights) for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _ranges(counts: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for n in counts:
        out.append((start, start + n))
        start += n
    return out


@dataclass(frozen=True)
class NodeShard:
    """What one node computes in every layer: [start, stop) of KV heads, query heads and MLP columns."""

    rank: int
    weight: float
    kv_heads: tuple[int, int]
    q_heads: tuple[int, int]
    columns: tuple[int, int]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def n_columns(self) -> int:
        return self.columns[1] - self.columns[0]


@dataclass(frozen=True)
class TensorParallelPlan:
    config: LlamaConfig
    shards: tuple[NodeShard, ...]

    @property
    def plan_id(self) -> str:
        """Stable id of (model shape, cut): names the cache folder and the node jobs (weights that give
        the same cut give the same id)."""
        cuts = [(s.kv_heads, s.q_heads, s.columns) for s in self.shards]
        text = json.dumps({"config": asdict(self.config), "cuts": cuts}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def layer_bytes(self, rank: int, itemsize: int = 4) -> int:
        """Bytes of one layer's shard file content for node `rank`."""
        cfg, s = self.config, self.shards[rank]
        h, hd = cfg.hidden_size, cfg.head_dim
        nq, nkv = s.q_heads[1] - s.q_heads[0], s.n_kv_heads
        attn = 2 * nq * hd * h + 2 * nkv * hd * h
        if cfg.attention_bias:
            attn += (nq + 2 * nkv) * hd
        return (attn + 3 * s.n_columns * h) * itemsize

    def describe(self, itemsize: int = 4) -> list[dict[str, Any]]:
        """Per node: weight, heads, columns and bytes of all its layers."""
        return [
            {
                "rank": s.rank,
                "weight": s.weight,
                "kv_heads": list(s.kv_heads),
                "q_heads": list(s.q_heads),
                "n_kv_heads": s.n_kv_heads,
                "n_q_heads": s.q_heads[1] - s.q_heads[0],
                "columns": list(s.columns),
                "n_columns": s.n_columns,
                "bytes": self.layer_bytes(s.rank, itemsize) * self.config.num_layers,
            }
            for s in self.shards
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"plan_id": self.plan_id, "shards": [asdict(s) for s in self.shards]}


def _column_alignment(intermediate: int, n_nodes: int) -> int:
    """The coarsest of 32/8/1 that divides the MLP width and still leaves a unit per node."""
    for align in (32, 8):
        if intermediate % align == 0 and intermediate // align >= n_nodes:
            return align
    return 1


def plan_shards(config: LlamaConfig, weights: list[float]) -> TensorParallelPlan:
    """Assign KV-head groups and MLP columns to nodes proportionally to `weights`."""
    kv_counts = largest_remainder(config.num_kv_heads, weights)
    align = _column_alignment(config.intermediate_size, len(weights))
    column_counts = [n * align for n in largest_remainder(config.intermediate_size // align, weights)]
    g = config.group_size
    shards = tuple(
        NodeShard(rank, float(w), kv, (kv[0] * g, kv[1] * g), cols)
        for rank, (w, kv, cols) in enumerate(zip(weights, _ranges(kv_counts), _ranges(column_counts), strict=True))
    )
    return TensorParallelPlan(config, shards)


def slice_layer(layer: dict[str, torch.Tensor], shard: NodeShard, head_dim: int) -> dict[str, torch.Tensor]:
    """One node's slices of one HF layer, under the shard key names the kernels use."""
    q0, q1 = (i * head_dim for i in shard.q_heads)
    k0, k1 = (i * head_dim for i in shard.kv_heads)
    c0, c1 = shard.columns
    out = {
        "wq": layer["q"][q0:q1],
        "wk": layer["k"][k0:k1],
        "wv": layer["v"][k0:k1],
        "wo": layer["o"][:, q0:q1],
        "w_gate": layer["gate"][c0:c1],
        "w_up": layer["up"][c0:c1],
        "w_down": layer["down"][:, c0:c1],
    }
    if "bq" in layer:
        out.update(bq=layer["bq"][q0:q1], bk=layer["bk"][k0:k1], bv=layer["bv"][k0:k1])
    return {k: v.contiguous() for k, v in out.items()}


def _read_layer(checkpoint: Checkpoint, i: int) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}."
    names = {
        "q": "self_attn.q_proj.weight",
        "k": "self_attn.k_proj.weight",
        "v": "self_attn.v_proj.weight",
        "o": "self_attn.o_proj.weight",
        "gate": "mlp.gate_proj.weight",
        "up": "mlp.up_proj.weight",
        "down": "mlp.down_proj.weight",
        "bq": "self_attn.q_proj.bias",
        "bk": "self_attn.k_proj.bias",
        "bv": "self_attn.v_proj.bias",
    }
    return {key: checkpoint.tensor(p + name) for key, name in names.items() if checkpoint.has(p + name)}


def coordinator_tensor_names(checkpoint: Checkpoint) -> list[str]:
    """HF names of what the hub keeps: embedding, per-layer norms (+ o_proj bias), final norm, lm_head."""
    cfg = checkpoint.config
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(cfg.num_layers):
        names += [f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"]
        if checkpoint.has(f"model.layers.{i}.self_attn.o_proj.bias"):
            names.append(f"model.layers.{i}.self_attn.o_proj.bias")
    if not cfg.tie_word_embeddings and checkpoint.has("lm_head.weight"):
        names.append("lm_head.weight")
    return names


def layer_file(rank: int, layer: int) -> str:
    return f"node{rank}/layer.{layer:03d}.safetensors"


def norms_file(rank: int) -> str:
    return f"node{rank}/norms.safetensors"


def layer_norm_tensors(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """Every layer's two norms (+ o_proj bias) under the names `runtime.tp_executor` reads."""
    out = {}
    for i in range(checkpoint.config.num_layers):
        p = f"model.layers.{i}."
        out[f"input_norm.{i}"] = checkpoint.tensor(p + "input_layernorm.weight").contiguous()
        out[f"post_norm.{i}"] = checkpoint.tensor(p + "post_attention_layernorm.weight").contiguous()
        if checkpoint.has(p + "self_attn.o_proj.bias"):
            out[f"o_bias.{i}"] = checkpoint.tensor(p + "self_attn.o_proj.bias").contiguous()
    return out


@dataclass(frozen=True)
class Manifest:
    """What `write_shards` produced: config, plan, and each file's sha256 and size."""

    root: Path
    data: dict[str, Any]

    @property
    def config(self) -> LlamaConfig:
        return LlamaConfig.from_dict(self.data["config"])

    @property
    def plan_id(self) -> str:
        return self.data["plan"]["plan_id"]

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    def path(self, relative: str) -> Path:
        return self.root / relative

    def node_files(self, rank: int) -> dict[str, Path]:
        """Logical shard names ("layer.000", ...) -> local files of node `rank`'s layers."""
        return {
            f"layer.{i:03d}": self.root / layer_file(rank, i) for i in range(self.data["config"]["num_layers"])
        }

    def shard_files(self, rank: int) -> dict[str, str]:
        """Every shard node `rank` needs, logical name -> path relative to the root: its layers,
        plus "norms" when it holds the whole model."""
        files = {f"layer.{i:03d}": layer_file(rank, i) for i in range(self.data["config"]["num_layers"])}
        if norms_file(rank) in self.data["files"]:
            files["norms"] = norms_file(rank)
        return files

    def sha256(self, relative: str) -> str:
        return self.data["files"][relative]["sha256"]

    @property
    def coordinator_file(self) -> Path:
        return self.root / "coordinator.safetensors"

    def verify(self) -> bool:
        """True when every file exists with the recorded size and sha256."""
        for relative, meta in self.data["files"].items():
            path = self.root / relative
            if not path.exists() or path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
                return False
        return True

    @classmethod
    def load(cls, root: Path) -> Manifest | None:
        path = Path(root) / "manifest.json"
        if not path.exists():
            return None
        try:
            return cls(Path(root), json.loads(path.read_text()))
        except json.JSONDecodeError:
            return None


def _save(tensors: dict[str, torch.Tensor], path: Path, files: dict[str, Any], root: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    files[str(path.relative_to(root))] = {"sha256": sha256_file(path), "size": path.stat().st_size}


def write_shards(
    checkpoint: Checkpoint,
    plan: TensorParallelPlan,
    out_dir: str | Path,
    dtype: str = "float32",
    progress: Progress | None = None,
) -> Manifest:
    """Write every node's per-layer shard files, the hub's file and manifest.json; reuse a verified match."""
    if dtype not in SHARD_DTYPES:
        raise ValueError(f"shard dtype must be one of {', '.join(SHARD_DTYPES)}, not {dtype!r}")
    if plan.config != checkpoint.config:
        raise ValueError("the plan was made for a different model configuration than this checkpoint")
    root = Path(out_dir)
    existing = Manifest.load(root)
    if (
        existing is not None
        and existing.data.get("format") == MANIFEST_FORMAT
        and existing.data.get("checkpoint") == checkpoint.fingerprint
        and existing.data.get("plan", {}).get("plan_id") == plan.plan_id
        and existing.data.get("dtype") == dtype
        and existing.verify()
    ):
        return existing
    (root / "manifest.json").unlink(missing_ok=True)
    torch_dtype = SHARD_DTYPES[dtype]
    cfg = plan.config
    files: dict[str, Any] = {}
    total = cfg.num_layers + 1
    for i in range(cfg.num_layers):
        layer = _read_layer(checkpoint, i)
        for shard in plan.shards:
            sliced = {k: v.to(torch_dtype) for k, v in slice_layer(layer, shard, cfg.head_dim).items()}
            _save(sliced, root / layer_file(shard.rank, i), files, root)
        del layer
        if progress:
            progress(i + 1, total, f"layer {i + 1}/{cfg.num_layers}")
    if len(plan.shards) == 1:
        norms = {k: v.to(torch_dtype) for k, v in layer_norm_tensors(checkpoint).items()}
        _save(norms, root / norms_file(0), files, root)
    names = coordinator_tensor_names(checkpoint)
    tied = "lm_head.weight" not in names
    hub = {name: checkpoint.tensor(name).contiguous() for name in names
           if name != "lm_head.weight" and not (tied and name == "model.embed_tokens.weight")}
    # the LM head stored as [hidden, vocab] (see runtime.tp_hub): loaded as is, never transposed in
    # memory; with tied embeddings it is also where the embedding rows are read from
    hub["lm_head_t"] = checkpoint.tensor("model.embed_tokens.weight" if tied else "lm_head.weight").t().contiguous()
    _save(hub, root / "coordinator.safetensors", files, root)
    if progress:
        progress(total, total, "coordinator tensors")
    data = {
        "format": MANIFEST_FORMAT,
        "checkpoint": checkpoint.fingerprint,
        "source": str(checkpoint.path),
        "config": asdict(cfg),
        "plan": plan.to_dict(),
        "describe": plan.describe(torch.empty((), dtype=torch_dtype).element_size()),
        "dtype": dtype,
        "files": files,
    }
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, root / "manifest.json")
    return Manifest(root, data)
