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

from edgeweave.runtime.quantized import QuantizationError, slice_packed, to_shard_tensors
from edgeweave.runtime.safetensors_write import save_safetensors
from edgeweave.runtime.shard_files import sha256_file
from edgeweave.splitting.checkpoints import Checkpoint
from edgeweave.splitting.layouts import Layout, Stage
from edgeweave.splitting.layouts import tensor as tensor_layout
from edgeweave.splitting.llama_config import LlamaConfig
from edgeweave.splitting.quant_plan import CUT_ALIGNMENT, TensorLayout, check_quantize, choose_layout, layout_summary

MANIFEST_FORMAT = 5  # 2: 1-node plans carry node0/norms.safetensors; 3: the hub's lm_head_t; 4: data in safetensors_write order; 5: shards name their layers (pipeline stages)
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
    """What one node computes in each of its layers [start, stop): [start, stop) of KV heads, query
    heads and MLP columns (all of them for a node alone in its pipeline stage)."""

    rank: int
    weight: float
    kv_heads: tuple[int, int]
    q_heads: tuple[int, int]
    columns: tuple[int, int]
    layers: tuple[int, int] = (0, 0)

    @property
    def n_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def layer_range(self) -> range:
        return range(*self.layers)

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
    #: layout of every layer projection, by kind (q_proj, ...): None = float32 everywhere
    layouts: tuple[tuple[str, TensorLayout], ...] | None = None
    #: what `--quantize` asked for (part of the id: the same cut in another precision is another plan)
    precision: str = "float32"

    @property
    def layout_of_nodes(self) -> Layout:
        """The stages of this plan, from the layers each shard holds (one stage of every rank for
        plain tensor parallelism)."""
        ranges = sorted({s.layers for s in self.shards})
        return Layout(tuple(Stage(r, tuple(s.rank for s in self.shards if s.layers == r)) for r in ranges))

    @property
    def plan_id(self) -> str:
        """Stable id of (model shape, cut, precision): names the cache folder and the node jobs
        (weights that give the same cut give the same id)."""
        cuts = [(s.kv_heads, s.q_heads, s.columns) for s in self.shards]
        body: dict[str, Any] = {"config": asdict(self.config), "cuts": cuts}
        if self.layout_of_nodes.kind not in ("tensor", "single"):  # tensor plans keep the ids they always had
            body["stages"] = self.layout_of_nodes.to_dict()
        if self.layouts is not None:
            body["precision"] = self.precision
            body["layouts"] = [(kind, asdict(layout)) for kind, layout in self.layouts]
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]

    def layout(self, kind: str) -> TensorLayout:
        return dict(self.layouts or ()).get(kind, TensorLayout("float32", None))

    def layer_bytes(self, rank: int, itemsize: int = 4) -> int:
        """Bytes of one layer's shard file content for node `rank` (`itemsize` for float layouts)."""
        cfg, s = self.config, self.shards[rank]
        h, hd = cfg.hidden_size, cfg.head_dim
        nq, nkv = (s.q_heads[1] - s.q_heads[0]) * hd, s.n_kv_heads * hd
        shapes = {"q": (nq, h), "k": (nkv, h), "v": (nkv, h), "o": (h, nq),
                  "gate": (s.n_columns, h), "up": (s.n_columns, h), "down": (h, s.n_columns)}
        total = 0
        for kind, shape in shapes.items():
            layout = self.layout(kind)
            total += layout.nbytes(*shape) if layout.quantized else shape[0] * shape[1] * itemsize
        if cfg.attention_bias:
            total += (nq + 2 * nkv) * 4
        if cfg.qk_norm and nkv:
            total += 2 * hd * 4
        return total

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
                "layers": list(s.layers),
                "bytes": self.layer_bytes(s.rank, itemsize) * s.n_layers,
            }
            for s in self.shards
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"plan_id": self.plan_id, "shards": [asdict(s) for s in self.shards]}


def _column_alignment(intermediate: int, n_nodes: int, quantized: bool = False) -> int:
    """The coarsest of 32/8/1 that divides the MLP width and still leaves a unit per node.

    Quantized down_proj weights are cut along their input (the MLP columns), so a cut must fall on
    a block boundary: then only `CUT_ALIGNMENT` (a multiple of every block size) will do."""
    for align in (CUT_ALIGNMENT,) if quantized else (32, 8):
        if intermediate % align == 0 and intermediate // align >= n_nodes:
            return align
    if quantized:
        raise QuantizationError(
            f"the MLP's {intermediate} columns cannot be cut into whole {CUT_ALIGNMENT}-column quantization blocks "
            f"for {n_nodes} nodes; use at most {intermediate // CUT_ALIGNMENT} nodes or --quantize none"
        )
    return 1


def plan_shards(
    config: LlamaConfig, weights: list[float], layouts: dict[str, TensorLayout] | None = None,
    precision: str = "float32", partition: Layout | None = None,
) -> TensorParallelPlan:
    """Assign layers to stages (`partition`, default: one stage of all nodes) and, inside each
    stage, KV-head groups and MLP columns to its nodes proportionally to their `weights`.

    With quantized `layouts` (per projection kind, from `layer_layouts`), every cut falls on a
    block boundary, or QuantizationError says why it cannot."""
    stages = (partition or tensor_layout(config.num_layers, len(weights))).check(config.num_layers, len(weights))
    shards: list[NodeShard] = []
    for stage in stages.stages:
        cut = _cut_layer(config, [weights[r] for r in stage.ranks], layouts)
        shards += [NodeShard(rank, s.weight, s.kv_heads, s.q_heads, s.columns, stage.layers)
                   for rank, s in zip(stage.ranks, cut, strict=True)]
    ordered = tuple(sorted(layouts.items())) if layouts is not None else None
    return TensorParallelPlan(config, tuple(sorted(shards, key=lambda s: s.rank)), ordered,
                              precision if layouts is not None else "float32")


def _cut_layer(config: LlamaConfig, weights: list[float], layouts: dict[str, TensorLayout] | None) -> list[NodeShard]:
    """One layer's heads and columns over nodes of `weights` (ranks 0.. of this group)."""
    quantized = layouts is not None and any(layout.quantized for layout in layouts.values())
    kv_counts = largest_remainder(config.num_kv_heads, weights)
    align = _column_alignment(config.intermediate_size, len(weights), quantized)
    if quantized and (config.intermediate_size % CUT_ALIGNMENT or (config.group_size * config.head_dim) % CUT_ALIGNMENT):
        raise QuantizationError(
            f"this model's KV-head groups ({config.group_size} x {config.head_dim} columns of o_proj) or MLP width "
            f"({config.intermediate_size}) are not whole {CUT_ALIGNMENT}-column blocks, so it cannot be cut quantized; "
            "use --quantize none"
        )
    column_counts = [n * align for n in largest_remainder(config.intermediate_size // align, weights)]
    g = config.group_size
    return [
        NodeShard(rank, float(w), kv, (kv[0] * g, kv[1] * g), cols)
        for rank, (w, kv, cols) in enumerate(zip(weights, _ranges(kv_counts), _ranges(column_counts), strict=True))
    ]


#: layer projection kind -> (shard key, HF name after "model.layers.N.")
PROJECTION_KINDS = {
    "q": ("wq", "self_attn.q_proj.weight"),
    "k": ("wk", "self_attn.k_proj.weight"),
    "v": ("wv", "self_attn.v_proj.weight"),
    "o": ("wo", "self_attn.o_proj.weight"),
    "gate": ("w_gate", "mlp.gate_proj.weight"),
    "up": ("w_up", "mlp.up_proj.weight"),
    "down": ("w_down", "mlp.down_proj.weight"),
}
LayerTensor = torch.Tensor | dict[str, torch.Tensor]  # float, or a quantized weight's packed tensors


def slice_layer(layer: dict[str, LayerTensor], shard: NodeShard, head_dim: int) -> dict[str, torch.Tensor]:
    """One node's slices of one HF layer, under the shard key names the kernels use.

    Quantized weights (packed dicts from `runtime.quantized.to_shard_tensors`) are cut along rows,
    or along whole blocks of their input for o_proj and down_proj."""
    q0, q1 = (i * head_dim for i in shard.q_heads)
    k0, k1 = (i * head_dim for i in shard.kv_heads)
    c0, c1 = shard.columns
    cuts = {"q": ((q0, q1), None), "k": ((k0, k1), None), "v": ((k0, k1), None), "o": (None, (q0, q1)),
            "gate": ((c0, c1), None), "up": ((c0, c1), None), "down": (None, (c0, c1))}
    out: dict[str, torch.Tensor] = {}
    for kind, (rows, columns) in cuts.items():
        key, value = PROJECTION_KINDS[kind][0], layer[kind]
        if isinstance(value, dict):
            out.update(slice_packed(value, key, rows, columns))
            continue
        if rows is not None:
            value = value[rows[0]:rows[1]]
        if columns is not None:
            value = value[:, columns[0]:columns[1]]
        out[key] = value
    if "bq" in layer:
        out.update(bq=layer["bq"][q0:q1], bk=layer["bk"][k0:k1], bv=layer["bv"][k0:k1])
    if "q_norm" in layer and k1 > k0:  # Qwen3's per-head norms: [head_dim], whole in every shard with heads
        out.update(q_norm=layer["q_norm"], k_norm=layer["k_norm"])
    return {k: v.contiguous() for k, v in out.items()}


def layer_layouts(checkpoint: Checkpoint, quantize: str | None, dtype: str = "float32") -> dict[str, TensorLayout]:
    """The layout of each projection kind (q, k, ..., down) of the layers, from layer 0's file types.

    A file whose layers disagree (llama.cpp's Q4_K_M gives some layers' v and down Q6_K, others Q4_K)
    gets, per kind, the layout of its widest type, so every layer of a rank has one file size."""
    check_quantize(quantize)
    out = {}
    for kind, (_, hf) in PROJECTION_KINDS.items():
        candidates = [choose_layout(checkpoint.source_type(f"model.layers.{i}.{hf}"), quantize, float_dtype=dtype)
                      for i in range(checkpoint.config.num_layers)]
        out[kind] = max(candidates, key=lambda lay: (lay.bits or 99, lay.offset, -(lay.block or 0)))
    return out


def quantized_layouts(checkpoint: Checkpoint, quantize: str | None, dtype: str = "float32") -> dict[str, TensorLayout] | None:
    """`layer_layouts`, or None when no projection ends up quantized: then the plan is the float one
    (the same plan id, shard files and kernels as before quantization existed)."""
    if check_quantize(quantize) == "none":
        return None
    layouts = layer_layouts(checkpoint, quantize, dtype)
    return layouts if any(layout.quantized for layout in layouts.values()) else None


def _layer_weight(checkpoint: Checkpoint, name: str, layout: TensorLayout, key: str) -> LayerTensor:
    """One projection in `layout`: a float tensor, or the packed tensors of its blocks. A tensor whose
    own exact layout differs from its kind's (a mixed file) is requantized to the kind's layout."""
    own = choose_layout(checkpoint.source_type(name), None)
    if layout.quantized and layout.exact and (own.bits, own.block, own.offset) != (layout.bits, layout.block, layout.offset):
        layout = TensorLayout(layout.source, layout.bits, layout.block, layout.offset, exact=False)
    weight = checkpoint.weight(name, layout)
    if isinstance(weight, torch.Tensor):
        return weight
    return to_shard_tensors(key, weight)


def _read_layer(checkpoint: Checkpoint, i: int, layouts: dict[str, TensorLayout] | None = None) -> dict[str, LayerTensor]:
    p = f"model.layers.{i}."
    out: dict[str, LayerTensor] = {}
    for kind, (key, hf) in PROJECTION_KINDS.items():
        layout = (layouts or {}).get(kind)
        out[kind] = checkpoint.tensor(p + hf) if layout is None else _layer_weight(checkpoint, p + hf, layout, key)
    names = {
        "bq": "self_attn.q_proj.bias",
        "bk": "self_attn.k_proj.bias",
        "bv": "self_attn.v_proj.bias",
        "q_norm": "self_attn.q_norm.weight",
        "k_norm": "self_attn.k_norm.weight",
    }
    out.update({key: checkpoint.tensor(p + name) for key, name in names.items() if checkpoint.has(p + name)})
    return out


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


def layer_norm_tensors(checkpoint: Checkpoint, layers: range | None = None) -> dict[str, torch.Tensor]:
    """The two norms (+ o_proj bias) of `layers` (default all), under the names `runtime.tp_executor`
    reads (global layer numbers)."""
    out = {}
    for i in layers if layers is not None else range(checkpoint.config.num_layers):
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
    #: bytes `write_shards` wrote to produce it (0: a verified folder was reused as it was)
    bytes_written: int = 0

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

    def layers(self, rank: int) -> range:
        """The layers node `rank` holds (every layer in a tensor-parallel plan)."""
        held = self.data["plan"]["shards"][rank].get("layers")
        return range(*held) if held and held[1] > held[0] else range(self.data["config"]["num_layers"])

    def node_files(self, rank: int) -> dict[str, Path]:
        """Logical shard names ("layer.000", ...) -> local files of node `rank`'s layers."""
        return {f"layer.{i:03d}": self.root / layer_file(rank, i) for i in self.layers(rank)}

    def shard_files(self, rank: int) -> dict[str, str]:
        """Every shard node `rank` needs, logical name -> path relative to the root: its layers,
        plus "norms" when it holds all heads and columns of its layers (runs them in one message)."""
        files = {f"layer.{i:03d}": layer_file(rank, i) for i in self.layers(rank)}
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
    save_safetensors(tensors, tmp)
    os.replace(tmp, path)
    files[str(path.relative_to(root))] = {"sha256": sha256_file(path), "size": path.stat().st_size}


def hub_layouts(checkpoint: Checkpoint, plan: TensorParallelPlan, dtype: str = "float32") -> dict[str, TensorLayout]:
    """Layouts of the embedding and LM head the hub keeps (float32 on a float plan)."""
    names = ["model.embed_tokens.weight"] + ([] if checkpoint.config.tie_word_embeddings else ["lm_head.weight"])
    if plan.layouts is None:
        return {name: TensorLayout(checkpoint.source_type(name), None) for name in names}
    quantize = None if plan.precision == "file" else plan.precision
    return {name: choose_layout(checkpoint.source_type(name), quantize, hub=True, float_dtype=dtype) for name in names}


def tensor_layouts(checkpoint: Checkpoint, plan: TensorParallelPlan, dtype: str = "float32") -> list[dict[str, Any]]:
    """What the plan output shows: per tensor kind, its source type, layout, count and bytes."""
    cfg = checkpoint.config
    layouts, shapes = {}, {}
    for i in range(cfg.num_layers):
        for kind, (_, hf) in PROJECTION_KINDS.items():
            name = f"model.layers.{i}.{hf}"
            layouts[name], shapes[name] = plan.layout(kind), checkpoint.shape(name)
    for name, layout in hub_layouts(checkpoint, plan, dtype).items():
        layouts[name], shapes[name] = layout, checkpoint.shape(name)
    return layout_summary(layouts, shapes)


def _hub_tensors(checkpoint: Checkpoint, plan: TensorParallelPlan, dtype: str) -> dict[str, torch.Tensor]:
    """coordinator.safetensors: norms (+ o_proj biases), and the embedding / LM head, float or quantized."""
    names = coordinator_tensor_names(checkpoint)
    tied = "lm_head.weight" not in names
    hub = {name: checkpoint.tensor(name).contiguous() for name in names
           if name not in ("lm_head.weight", "model.embed_tokens.weight")}
    head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    layouts = hub_layouts(checkpoint, plan, dtype)
    if layouts[head_name].quantized:
        # the LM head as blocks ("lm_head.*"); with tied embeddings the embedding rows are read from it
        hub.update(to_shard_tensors("lm_head", checkpoint.weight(head_name, layouts[head_name])))
        if not tied:
            embed = checkpoint.weight("model.embed_tokens.weight", layouts["model.embed_tokens.weight"])
            if isinstance(embed, torch.Tensor):
                hub["model.embed_tokens.weight"] = embed.float().contiguous()
            else:
                hub.update(to_shard_tensors("embed", embed))
        return hub
    if not tied:
        hub["model.embed_tokens.weight"] = checkpoint.tensor("model.embed_tokens.weight").contiguous()
    # the LM head stored as [hidden, vocab] (see runtime.tp_hub): loaded as is, never transposed in
    # memory; with tied embeddings it is also where the embedding rows are read from
    hub["lm_head_t"] = checkpoint.tensor(head_name).t().contiguous()
    return hub


def _to_dtype(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Float tensors in the shard dtype; the integer parts of quantized weights as they are."""
    return {k: v.to(dtype) if v.is_floating_point() and not k.endswith((".scale", ".offset")) else v
            for k, v in tensors.items()}


def cached_manifest(checkpoint: Checkpoint, plan: TensorParallelPlan, out_dir: str | Path,
                    dtype: str = "float32") -> Manifest | None:
    """The verified shards of exactly this checkpoint, plan and dtype in `out_dir`, or None."""
    existing = Manifest.load(Path(out_dir))
    if (
        existing is not None
        and existing.data.get("format") == MANIFEST_FORMAT
        and existing.data.get("checkpoint") == checkpoint.fingerprint
        and existing.data.get("plan", {}).get("plan_id") == plan.plan_id
        and existing.data.get("dtype") == dtype
        and existing.verify()
    ):
        return existing
    return None


def write_shards(
    checkpoint: Checkpoint,
    plan: TensorParallelPlan,
    out_dir: str | Path,
    dtype: str = "float32",
    progress: Progress | None = None,
) -> Manifest:
    """Write every node's per-layer shard files, the hub's file and manifest.json; reuse a verified match.

    Layer projections take the plan's layouts (float `dtype`, or block-quantized); tensors are read
    one layer at a time, so the peak memory is about one layer whatever the model's size."""
    if dtype not in SHARD_DTYPES:
        raise ValueError(f"shard dtype must be one of {', '.join(SHARD_DTYPES)}, not {dtype!r}")
    if plan.config != checkpoint.config:
        raise ValueError("the plan was made for a different model configuration than this checkpoint")
    root = Path(out_dir)
    existing = cached_manifest(checkpoint, plan, root, dtype)
    if existing is not None:
        return existing
    (root / "manifest.json").unlink(missing_ok=True)
    torch_dtype = SHARD_DTYPES[dtype]
    cfg = plan.config
    layouts = dict(plan.layouts) if plan.layouts is not None else None
    files: dict[str, Any] = {}
    total = cfg.num_layers + 1
    for i in range(cfg.num_layers):
        layer = _read_layer(checkpoint, i, layouts)
        for shard in plan.shards:
            if i in shard.layer_range:
                sliced = _to_dtype(slice_layer(layer, shard, cfg.head_dim), torch_dtype)
                _save(sliced, root / layer_file(shard.rank, i), files, root)
        del layer
        if progress:
            progress(i + 1, total, f"layer {i + 1}/{cfg.num_layers}")
    for stage in plan.layout_of_nodes.stages:
        if len(stage.ranks) == 1:  # a node alone in its stage runs its layers in one message: it needs their norms
            norms = {k: v.to(torch_dtype) for k, v in layer_norm_tensors(checkpoint, range(*stage.layers)).items()}
            _save(norms, root / norms_file(stage.ranks[0]), files, root)
    _save(_hub_tensors(checkpoint, plan, dtype), root / "coordinator.safetensors", files, root)
    if progress:
        progress(total, total, "coordinator tensors")
    describe = plan.describe(torch.empty((), dtype=torch_dtype).element_size())
    for row in describe:  # what the files really hold, headers included
        row["bytes"] = sum(files[layer_file(row["rank"], i)]["size"] for i in range(*row["layers"]))
    data = {
        "format": MANIFEST_FORMAT,
        "checkpoint": checkpoint.fingerprint,
        "source": str(checkpoint.path),
        "config": asdict(cfg),
        "plan": plan.to_dict(),
        "layout": plan.layout_of_nodes.to_dict(),
        "describe": describe,
        "dtype": dtype,
        "precision": plan.precision,
        "layouts": tensor_layouts(checkpoint, plan, dtype),
        "files": files,
    }
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, root / "manifest.json")
    written = sum(meta["size"] for meta in files.values()) + (root / "manifest.json").stat().st_size
    return Manifest(root, data, written)
