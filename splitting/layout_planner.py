"""Choose a layout (1-node, tensor, pipeline, hybrid) from measured costs, by predicted time per token.

Pure: the inputs are numbers (measured by `coordinator.layout_choice.measure_cluster`), the
output is every candidate with its prediction, whether it fits memory (and why not), and the
choice. The model follows how `coordinator/tp_driver.py` executes a `splitting.layouts.Layout`
with the coordinator as the hub of every stage:

Notation. Per node r: d_r = seconds of one whole layer for a decode step (1 token against a KV
cache of about the prompt's length), p_r = seconds of one whole layer over the P-token prompt,
rho_r = round trip of a decode-sized message ([1, H] float32) over the node's Forward stream (the
coordinator's codec, the wire, the node's own handling), beta_r = the link's bytes/s, delta_r =
its disk's bytes/s, B_r its memory budget. Coordinator: c(T) = what one MORE message of T tokens
costs this process (build, send, receive, decode, add), h(T) = the hub's RMSNorm + residual per
reduction, head(T) = embedding T tokens + final norm + LM head of the last one. T = 1 for a
decode step, T = P for the prompt.

    step(T) = head(T) + sum over stages of stage(T)                    (stages run in order)

  1-node stage (node r, n_s layers; op "layers": one message, norms and residuals on the node):
    stage(T) = rho_r + wire_r(T) + n_s * layer_r(T)
    wire_r(T) = 2 (T - 1) H 4 / beta_r       the rows beyond the one rho_r already carried, both ways
    layer_r(T) = t_r(T) resident, max(t_r(T), layer file bytes / delta_r) windowed: the sliding
                 window re-reads every layer every step, its reads overlapping the compute
    t_r(1) = d_r, t_r(P) = p_r

  multi-node stage (ranks R, n_s layers): per layer two reductions, "attn" then "mlp"; the
  normed state goes to every rank holding a share (all sends first, then all receives, so the
  ranks compute in parallel) and the hub sums the partials:
    red_op(T) = max over r in R_op of [rho_r + wire_r(T) + t_r,op(T)] + (|R_op| - 1) c(T) + h(T)
    stage(T) = n_s * max(red_attn(T) + red_mlp(T), max over windowed r of share file bytes_r / delta_r)
    s_r,op = r's share of the KV heads (attn) or MLP columns (mlp), exactly as
    `tensor_parallel.plan_shards` cuts them for the stage's rank weights (whole KV heads, columns on
    32-column blocks: 3 KV heads over 2 equal nodes are 2 + 1, so attention costs 2/3, not 1/2).
    t_r,op(T) = f_op s_r,op t_r(T): the op's share of the layer by weight count, f_attn = attention
    weights / layer weights (q, k, v, o vs gate, up, down; f_mlp = 1 - f_attn). For a decode step,
    when the node timed its ops (A_op on the whole layer, F_op on its smallest shard of share s0:
    one KV-head group, or a 32-column block), the line through those two points instead:
    t_r,op(1) = F_op + (s - s0) / (1 - s0) (A_op - F_op). On small models most of an op is fixed
    cost (kernel calls, RoPE and attention glue): SmolLM2's one-KV-head attention costs about what
    all three heads do, so halving a layer's weights does not halve its time. Where the node also
    timed the shares the candidates give it (`profile_shares`: an equal cut over each stage size,
    each on a ring of its own copies), the line becomes a polyline through those points: what the
    candidates run is timed, not inferred (`benchmarks/shard_profile.py`: on a quiet host the line
    said a 1B layer's half and quarter within 0.87-1.06x of their timings, in either direction).
    Ranks compute at the same time, so t_r,op is multiplied by k_r, the node's layer time measured
    while every node computes at once over its time alone (1 on separate devices; more where
    emulated devices share a host's cores). 1-node and pipeline stages compute alone: no k_r.
    The first message of a reduction is inside rho_r; every further one costs the coordinator
    c(T) in series. Where measured, the term (|R_op| - 1) c(T) is replaced by
    X_R,op + (|R_op| - 1)(c(T) - c(1)), with X_R,op (`ClusterCosts.reduction_extra_s`) what a
    real reduction over those nodes took beyond the model's slowest rank, timed with every rank
    busy for its k_r t_r,op at once
    (`reduction_probes` lists them; `coordinator.layout_choice` times them with the echo
    executor's op "work"). It holds what per-message sums miss where devices share a host: the
    nodes' message handling on a slow CPU, their wake-ups, the hub's serial sends and receives
    while the ranks compute (4 emulated Pi-class nodes measured 7.4 ms per reduction against
    4 ms of round trip and compute). A windowed rank reads its next layer while the whole layer
    period runs (network waits included), so its reads bound the period, not each compute.

  decode prediction = step(1); first-token prediction = step(P) (prefill sends the whole prompt).

Memory (the one model of `runtime.memory_budget`, as `splitting.memory_plan` and the nodes use):
each rank pays NODE_OVERHEAD_BYTES, the KV cache of its KV heads over its stage's layers for the
planned context, and what its layer files cost held by its kernels (`held_layer_bytes`, from the
bytes `plan_shards` gives its share); `choose_window` decides all resident, a window, or not at
all (its sentence is the candidate's reason). Pipeline and hybrid stages get layers in
proportion to their speed (sum of 1/d_r of their ranks, or the capacities given), each at most
what its ranks hold resident (`layouts.split_layers`); if that cannot cover the model, at most
what they hold through a window.

Candidates: every node alone; tensor and pipeline over all nodes and over all nodes but one (each
one left out in turn, n >= 3); hybrid (equal tensor groups of g >= 2 consecutive nodes, g
dividing n, at least 2 stages) over all nodes when n >= 4. Stage order is the nodes' order.
Choice: the fastest predicted decode step among those that fit; candidates within
`TIE_TOLERANCE` of it count as tied, and a tie goes to the simpler layout (fewer nodes, then
single < pipeline < tensor < hybrid).

Can hybrid win? With n equal nodes (d, rho, c, h, exact shares, L layers) in groups of g:
    tensor   = 2L (rho + (n - 1) c + h) + L d / n
    hybrid   = 2L (rho + (g - 1) c + h) + L d / g
    pipeline = n rho + L d                          (single = rho + L d, where one node fits)
    hybrid < tensor    iff  d < 2 g n c
    hybrid < pipeline  iff  d > g / (g - 1) * (2 (rho + (g - 1) c + h) - n rho / L)
so hybrid beats both only in a band of d that exists iff
    rho (1 - n / (2L)) + h < (g - 1)(n - 1) c                   (`hybrid_band` computes it)
i.e. when a round trip (which already carries one message's c) costs less than about
(g - 1)(n - 1) of the coordinator's own per-message costs: the hub's Python per message, not the
network, is then the bottleneck, tensor's extra messages cost more than its extra parallelism
saves, and pipeline's serial compute more than hybrid's round trips. For 4 nodes in 2 x 2 that
is rho < ~3 c, which no real LAN gives (rho is a few hundred us, c tens of us); the band widens
with more nodes (8 nodes in pairs: rho < ~7 c). Hybrid never fits where tensor does not (tensor
holds less per node). Unequal nodes and lumpy shares (3 KV heads) move the band, not its cause.
This analysis takes shares as proportional (no fixed per-op cost F); F adds the same to every
reduction of tensor and hybrid, which narrows the band further against pipeline.
tests/test_layout_planner.py checks the band against the full model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from edgeweave.runtime.memory_budget import (
    NODE_OVERHEAD_BYTES,
    MemoryBudgetError,
    choose_window,
    held_layer_bytes,
    kv_cache_bytes,
    resident_layers,
)
from edgeweave.runtime.quantized import QuantizationError
from edgeweave.splitting.layouts import Layout, LayoutError, hybrid, split_layers
from edgeweave.splitting.llama_config import LlamaConfig
from edgeweave.splitting.quant_plan import TensorLayout
from edgeweave.splitting.tensor_parallel import TensorParallelPlan, plan_shards

#: decode predictions this close (relative) to the best count as a tie (measurement noise)
TIE_TOLERANCE = 0.02
#: simpler first, for ties
KIND_ORDER = ("single", "pipeline", "tensor", "hybrid")
ACTIVATION_BYTES = 4  # hidden states travel as float32


@dataclass(frozen=True)
class NodeCosts:
    """One node's measured costs (see the module docstring for how each is used)."""

    name: str
    layer_decode_s: float  # d_r: one whole layer, one token
    layer_prefill_s: float  # p_r: one whole layer, the whole P-token prompt
    memory_budget: int = 0  # bytes; 0 = unlimited
    rtt_s: float = 0.0  # rho_r
    bandwidth_Bps: float = math.inf  # beta_r
    disk_read_Bps: float = 100e6  # delta_r
    kernel: str = "float"  # what holds its quantized layers ("ort", "torch") or "float"
    #: the tensor-parallel ops for one token (0 = not measured: then f_op s d_r): on the whole layer
    #: (A_op), and on the smallest shard (F_op: one KV-head group, `shard_mlp_columns` MLP columns)
    attn_decode_s: float = 0.0
    mlp_decode_s: float = 0.0
    shard_attn_decode_s: float = 0.0
    shard_mlp_decode_s: float = 0.0
    shard_mlp_columns: int = 32
    #: (share, seconds) of the op for one token timed on shards of those shares (`profile_shares`),
    #: each on a ring of its own copies: where measured, the line through F_op and A_op becomes a
    #: polyline through these points
    attn_shares_s: tuple[tuple[float, float], ...] = ()
    mlp_shares_s: tuple[tuple[float, float], ...] = ()
    layer_file_bytes: int = 0  # measured, shown (the model takes layer bytes from the plan's cut)
    transport: str = ""  # of the measured link: "tcp" (raw data plane) or "grpc"
    #: k_r: its layer time while every node computes at once over its time alone (>= 1): what sharing
    #: a host's cores and memory bus with the other nodes costs (separate devices measure about 1)
    concurrent_slowdown: float = 1.0

    @property
    def speed(self) -> float:
        return 1.0 / self.layer_decode_s


@dataclass(frozen=True)
class HubCosts:
    """The coordinator's own costs per decode step (T = 1) and for the prompt (T = P)."""

    message_s: float = 0.0  # c(1)
    message_prefill_s: float = 0.0  # c(P)
    reduction_s: float = 0.0  # h(1)
    reduction_prefill_s: float = 0.0  # h(P)
    token_s: float = 0.0  # head(1): embed, final norm, LM head
    prefill_s: float = 0.0  # head(P)


@dataclass(frozen=True)
class ClusterCosts:
    """Everything the planner needs: the model (as `plan_shards` takes it), the nodes, the hub."""

    config: LlamaConfig
    layouts: Mapping[str, TensorLayout] | None  # the plan's quantized layouts (None = float32)
    nodes: tuple[NodeCosts, ...]
    hub: HubCosts = field(default_factory=HubCosts)
    prompt_tokens: int = 128  # P
    context: int = 4096  # tokens each node's KV cache is planned for
    itemsize: int = 4  # bytes per value of float layers in the shards
    #: X_R,op: measured decode reductions, (sorted node names, op) -> seconds beyond the slowest
    #: rank's round trip and compute (`reduction_probes`); where absent, (|R| - 1) c
    reduction_extra_s: Mapping[tuple[tuple[str, ...], str], float] = field(default_factory=dict)

    def check(self) -> ClusterCosts:
        if not self.nodes:
            raise ValueError("the planner needs at least one node")
        for node in self.nodes:
            if not (node.layer_decode_s > 0 and node.layer_prefill_s > 0 and math.isfinite(node.layer_decode_s)):
                raise ValueError(f"node {node.name}: layer times must be positive, got decode {node.layer_decode_s} "
                                 f"s and prefill {node.layer_prefill_s} s")
            if node.rtt_s < 0 or node.bandwidth_Bps <= 0 or node.disk_read_Bps <= 0 or node.memory_budget < 0:
                raise ValueError(f"node {node.name}: RTT, bandwidth, disk speed and budget must be positive")
        if self.prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be at least 1, not {self.prompt_tokens}")
        return self


@dataclass(frozen=True)
class Candidate:
    """One layout over some of the nodes, with its prediction. `nodes[rank]` is the index (into
    ClusterCosts.nodes) of the node that is `rank` in `layout`; `weights[rank]` is its relative
    capacity, what `plan_shards` takes for the ranks of a multi-node stage."""

    layout: Layout
    nodes: tuple[int, ...]
    weights: tuple[float, ...]
    decode_s: float
    first_token_s: float
    fits: bool
    reason: str = ""  # why it does not fit
    windows: tuple[int | None, ...] = ()  # per rank: None = every layer resident
    messages_per_token: int = 0

    @property
    def kind(self) -> str:
        return self.layout.kind

    def describe(self) -> str:
        return self.layout.describe()

    def simplicity(self) -> tuple[int, int]:
        return len(self.nodes), KIND_ORDER.index(self.kind)

    def to_dict(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        return {
            "layout": self.describe(), "kind": self.kind, "stages": self.layout.to_dict(),
            "nodes": [names[i] for i in self.nodes] if names else list(self.nodes), "node_indexes": list(self.nodes),
            "weights": list(self.weights), "decode_ms": _ms(self.decode_s), "first_token_ms": _ms(self.first_token_s),
            "fits": self.fits, "reason": self.reason, "windows": list(self.windows),
            "messages_per_token": self.messages_per_token,
        }


@dataclass(frozen=True)
class LayoutPlan:
    candidates: tuple[Candidate, ...]
    choice: Candidate | None  # None: nothing fits

    def to_dict(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        return {"candidates": [c.to_dict(names) for c in self.candidates],
                "choice": self.candidates.index(self.choice) if self.choice is not None else None}


def _ms(seconds: float) -> float | None:
    """Milliseconds for JSON: None where there is no prediction (a candidate that does not fit)."""
    return None if math.isnan(seconds) else seconds * 1e3


class _Unfit(Exception):
    """A candidate that cannot run; the text is its reason."""


def attention_fraction(config: LlamaConfig) -> float:
    """f_attn: the attention projections' share of a layer's weights (q, k, v, o vs gate, up, down)."""
    h, d = config.hidden_size, config.head_dim
    attention = 2 * h * config.num_heads * d + 2 * h * config.num_kv_heads * d
    return attention / (attention + 3 * h * config.intermediate_size)


class _Model:
    """The formulas of the module docstring over one ClusterCosts."""

    def __init__(self, costs: ClusterCosts, capacities: Sequence[float]) -> None:
        self.costs, self.cfg, self.capacities = costs, costs.config, list(capacities)
        self.f_attn = attention_fraction(costs.config)
        self.P = costs.prompt_tokens

    # -- memory --------------------------------------------------------------------------------
    def plan(self, weights: Sequence[float]) -> TensorParallelPlan:
        """The cut of a stage with these rank weights, exactly as the driver would make it."""
        try:
            return plan_shards(self.cfg, list(weights), dict(self.costs.layouts) if self.costs.layouts else None)
        except (QuantizationError, ValueError) as exc:
            raise _Unfit(str(exc)) from None

    def held(self, node: NodeCosts, plan: TensorParallelPlan, rank: int) -> tuple[int, int]:
        """(resident, windowed) bytes of one of this rank's layers."""
        kernel = node.kernel if self.costs.layouts is not None else "float"
        resident, windowed = held_layer_bytes([plan.layer_bytes(rank, self.costs.itemsize)], kernel)
        return resident[0], windowed[0]

    def kv_per_layer(self, plan: TensorParallelPlan, rank: int) -> int:
        return kv_cache_bytes(1, plan.shards[rank].n_kv_heads, self.cfg.head_dim, self.costs.context)

    def layer_limit(self, node: NodeCosts, plan: TensorParallelPlan, rank: int, windowed: bool) -> int:
        """Most layers a stage may get so that this node (`rank` of the stage's `plan`) still fits:
        all resident, or (windowed) through a window of at least one layer."""
        if node.memory_budget <= 0:
            return self.cfg.num_layers
        resident, window_one = self.held(node, plan, rank)
        kv = self.kv_per_layer(plan, rank)
        left = node.memory_budget - NODE_OVERHEAD_BYTES
        if windowed:
            return max(0, math.floor((left - window_one) / kv)) if kv else (self.cfg.num_layers if left >= window_one else 0)
        return resident_layers(node.memory_budget, resident, kv)

    def window(self, node: NodeCosts, plan: TensorParallelPlan, rank: int, n_layers: int) -> int | None:
        resident, windowed = self.held(node, plan, rank)
        if node.memory_budget <= 0:
            return None
        try:
            return choose_window([resident] * n_layers, node.memory_budget, self.kv_per_layer(plan, rank) * n_layers,
                                 NODE_OVERHEAD_BYTES, windowed_bytes=[windowed] * n_layers)
        except MemoryBudgetError as exc:
            raise _Unfit(f"node {node.name}: {exc}") from None

    # -- time ----------------------------------------------------------------------------------
    def wire(self, node: NodeCosts, tokens: int) -> float:
        return 2 * (tokens - 1) * self.cfg.hidden_size * ACTIVATION_BYTES / node.bandwidth_Bps

    def compute(self, node: NodeCosts, tokens: int) -> float:
        return node.layer_decode_s if tokens == 1 else node.layer_prefill_s

    def share_compute(self, node: NodeCosts, op: str, share: float, fraction: float, tokens: int) -> float:
        """t_r,op(T) of the module docstring: a rank's compute for its `share` of one op, while the
        stage's other ranks compute theirs (x k_r)."""
        return node.concurrent_slowdown * self._share_compute(node, op, share, fraction, tokens)

    def _share_compute(self, node: NodeCosts, op: str, share: float, fraction: float, tokens: int) -> float:
        whole, floor = ((node.attn_decode_s, node.shard_attn_decode_s) if op == "attn"
                        else (node.mlp_decode_s, node.shard_mlp_decode_s))
        if tokens != 1 or whole <= 0 or floor <= 0:
            return fraction * share * self.compute(node, tokens)
        floor_share = (1 / self.cfg.num_kv_heads if op == "attn"
                       else min(1.0, node.shard_mlp_columns / self.cfg.intermediate_size))
        if floor_share >= 1:
            return whole
        floor = min(floor, whole)  # a noisy floor above the whole op is no floor
        measured = node.attn_shares_s if op == "attn" else node.mlp_shares_s
        points = sorted({floor_share: floor, **{s: t for s, t in measured if floor_share < s < 1}, 1.0: whole}.items())
        return _polyline(points, max(share, floor_share))

    def op_computes(self, members: Sequence[NodeCosts], plan: TensorParallelPlan,
                    tokens: int) -> dict[str, list[tuple[int, float]]]:
        """Per op of a multi-node stage, (rank, t_r,op(T)) of every rank holding a share of it."""
        out: dict[str, list[tuple[int, float]]] = {}
        for op, fraction in (("attn", self.f_attn), ("mlp", 1.0 - self.f_attn)):
            computes = []
            for r, shard in enumerate(plan.shards):
                held = shard.n_kv_heads if op == "attn" else shard.n_columns
                if held > 0:
                    share = held / (self.cfg.num_kv_heads if op == "attn" else self.cfg.intermediate_size)
                    computes.append((r, self.share_compute(members[r], op, share, fraction, tokens)))
            if computes:
                out[op] = computes
        return out

    def read(self, node: NodeCosts, plan: TensorParallelPlan, rank: int) -> float:
        return plan.layer_bytes(rank, self.costs.itemsize) / node.disk_read_Bps

    def stage_time(self, members: Sequence[NodeCosts], plan: TensorParallelPlan, windows: Sequence[int | None],
                   n_layers: int, tokens: int) -> float:
        hub = self.costs.hub
        if len(members) == 1:
            node = members[0]
            layer = self.compute(node, tokens)
            if windows[0] is not None:
                layer = max(layer, self.read(node, plan, 0))
            return node.rtt_s + self.wire(node, tokens) + n_layers * layer
        message = hub.message_s if tokens == 1 else hub.message_prefill_s
        reduction = hub.reduction_s if tokens == 1 else hub.reduction_prefill_s
        total = 0.0
        for op, computes in self.op_computes(members, plan, tokens).items():
            slowest = max(members[r].rtt_s + self.wire(members[r], tokens) + t for r, t in computes)
            further = (len(computes) - 1) * message
            measured = self.costs.reduction_extra_s.get(reduction_key(members, computes, op))
            if measured is not None:  # X_R,op, and for a prompt what its bigger messages cost the hub more
                further = measured + (len(computes) - 1) * (message - hub.message_s)
            total += slowest + further + reduction
        reads = [self.read(members[r], plan, r) for r in range(len(members)) if windows[r] is not None]
        return n_layers * max(total, max(reads, default=0.0))

    # -- one candidate -------------------------------------------------------------------------
    def candidate(self, members: tuple[int, ...], groups: tuple[int, ...]) -> Candidate:
        """The layout of `members` (node indexes, in rank order) in stages of `groups` ranks each."""
        nodes = [self.costs.nodes[i] for i in members]
        weights = tuple(self.capacities[i] for i in members)
        bounds = [sum(groups[:k]) for k in range(len(groups) + 1)]
        stage_ranks = [list(range(bounds[k], bounds[k + 1])) for k in range(len(groups))]
        n_layers = self.cfg.num_layers
        try:
            plans = [self.plan([weights[r] for r in ranks]) for ranks in stage_ranks]
            counts = self.layer_counts(nodes, weights, stage_ranks, plans) if len(groups) > 1 else [n_layers]
            layout = hybrid(counts, groups)
            windows: list[int | None] = []
            for ranks, plan, count in zip(stage_ranks, plans, counts, strict=True):
                windows += [self.window(nodes[r], plan, k, count) for k, r in enumerate(ranks)]
        except _Unfit as exc:
            layout = hybrid(self.even_counts(len(groups)), groups)
            return Candidate(layout, members, weights, math.nan, math.nan, False, str(exc),
                             messages_per_token=self.messages(layout))
        decode = self.costs.hub.token_s
        first = self.costs.hub.prefill_s
        for ranks, plan, count in zip(stage_ranks, plans, counts, strict=True):
            stage_nodes = [nodes[r] for r in ranks]
            stage_windows = [windows[r] for r in ranks]
            decode += self.stage_time(stage_nodes, plan, stage_windows, count, 1)
            first += self.stage_time(stage_nodes, plan, stage_windows, count, self.P)
        return Candidate(layout, members, weights, decode, first, True, "", tuple(windows), self.messages(layout))

    def layer_counts(self, nodes: Sequence[NodeCosts], weights: Sequence[float], stage_ranks: Sequence[list[int]],
                     plans: Sequence[TensorParallelPlan]) -> list[int]:
        """Layers per stage: in proportion to the stages' capacities, within what their ranks hold."""
        capacity = [sum(weights[r] for r in ranks) for ranks in stage_ranks]
        problems = []
        for windowed in (False, True):
            limits = [min(self.layer_limit(nodes[r], plan, k, windowed) for k, r in enumerate(ranks))
                      for ranks, plan in zip(stage_ranks, plans, strict=True)]
            try:
                return split_layers(self.cfg.num_layers, capacity, [min(x, self.cfg.num_layers) for x in limits])
            except LayoutError as exc:
                problems.append(str(exc))
        raise _Unfit(f"even through sliding windows, {problems[-1]}")

    def even_counts(self, stages: int) -> list[int]:
        n = self.cfg.num_layers
        return [n // stages + (1 if k < n % stages else 0) for k in range(stages)]

    def messages(self, layout: Layout) -> int:
        """Round trips per decode step: one per 1-node stage, 2 per layer of a multi-node stage."""
        return sum(1 if len(s.ranks) == 1 else 2 * s.n_layers for s in layout.stages)


def candidate_groups(n: int, n_layers: int) -> list[tuple[int, ...]]:
    """Stage shapes for n nodes: tensor, pipeline, and hybrids of equal groups (n >= 4)."""
    shapes: list[tuple[int, ...]] = [(n,)]
    if n <= n_layers:
        shapes.append((1,) * n)
    if n >= 4:
        shapes += [(g,) * (n // g) for g in range(2, n // 2 + 1) if n % g == 0 and n // g <= n_layers]
    return shapes


def _model(costs: ClusterCosts, capacities: Sequence[float] | None) -> _Model:
    """The model over checked `costs`, with `capacities` (default: the measured speeds) scaled to the top one."""
    costs.check()
    n = len(costs.nodes)
    weights = list(capacities) if capacities is not None else [node.speed for node in costs.nodes]
    if len(weights) != n or any(not (w > 0 and math.isfinite(w)) for w in weights):
        raise ValueError(f"need one positive capacity per node ({n}), got {weights}")
    top = max(weights)
    return _Model(costs, [w / top for w in weights])


def plan_layouts(costs: ClusterCosts, capacities: Sequence[float] | None = None,
                 tie_tolerance: float = TIE_TOLERANCE) -> LayoutPlan:
    """Every candidate with its predictions, and the choice (module docstring). `capacities` (per
    node) replace the measured speeds 1/d_r as the rank weights and stage capacities."""
    return _plan(_model(costs, capacities), tie_tolerance)


def _plan(model: _Model, tie_tolerance: float = TIE_TOLERANCE) -> LayoutPlan:
    """`plan_layouts` over an already built model."""
    costs = model.costs
    n = len(costs.nodes)
    out = [model.candidate((i,), (1,)) for i in range(n)]
    subsets = [tuple(range(n))] if n >= 2 else []
    if n >= 3:
        subsets += [tuple(j for j in range(n) if j != i) for i in range(n)]
    for members in subsets:
        for groups in candidate_groups(len(members), costs.config.num_layers):
            if len(members) == n or groups in ((len(members),), (1,) * len(members)):
                out.append(model.candidate(members, groups))
    return LayoutPlan(tuple(out), choose(out, tie_tolerance))


def _polyline(points: Sequence[tuple[float, float]], x: float) -> float:
    """The value at x of the line through `points` (sorted by x), kept flat beyond the last."""
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x <= x1:
            return y0 + (x - x0) / (x1 - x0) * (y1 - y0)
    return points[-1][1]


def profile_shares(config: LlamaConfig, layouts: Mapping[str, TensorLayout] | None, n_nodes: int,
                   most: int = 8, close: float = 0.05) -> list[tuple[int, int]]:
    """(KV heads, MLP columns) of the shards whose ops a node should time for the candidates over
    `n_nodes` nodes: every rank's share of an equal cut over each stage size the candidates use (all
    the nodes, all but one, hybrid groups). A share within `close` (relative) of one already listed
    in both heads and columns is left to the polyline; the whole layer and the floor are timed anyway."""
    sizes = {g for groups in candidate_groups(n_nodes, config.num_layers) for g in groups if g > 1}
    if n_nodes >= 3:
        sizes.add(n_nodes - 1)  # tensor over all nodes but one
    out: list[tuple[int, int]] = []
    for g in sorted(sizes):
        try:
            plan = plan_shards(config, [1.0] * g, dict(layouts) if layouts else None)
        except (QuantizationError, ValueError):
            continue  # a cut the candidates cannot make either
        for shard in plan.shards:
            pair = (shard.n_kv_heads, shard.n_columns)
            near = any(h == pair[0] and abs(c - pair[1]) <= close * max(c, 1) for h, c in out)
            if not near and pair != (config.num_kv_heads, config.intermediate_size) and len(out) < most:
                out.append(pair)
    return out


def reduction_key(members: Sequence[NodeCosts], computes: Sequence[tuple[int, float]],
                  op: str) -> tuple[tuple[str, ...], str]:
    """The key of `ClusterCosts.reduction_extra_s` for one op over these ranks of `members`."""
    return tuple(sorted(members[r].name for r, _ in computes)), op


@dataclass(frozen=True)
class ReductionProbe:
    """One decode reduction some candidate runs: its nodes (indexes into ClusterCosts.nodes), and
    per node the compute (k_r t_r,op) and round trip the model gives it, so that a probe can keep
    each node busy that long and report what the reduction cost beyond `slowest_s`."""

    key: tuple[tuple[str, ...], str]
    nodes: tuple[int, ...]
    computes_s: tuple[float, ...]
    slowest_s: float  # max over its nodes of rho_r + k_r t_r,op: the model's reduction without X


def reduction_probes(costs: ClusterCosts, capacities: Sequence[float] | None = None) -> list[ReductionProbe]:
    """Every distinct decode reduction (node set and op) of the fitting candidates of
    `plan_layouts(costs, capacities)`, to measure their X_R,op (`reduction_extra_s`)."""
    model = _model(costs, capacities)
    plan = _plan(model)
    probes: dict[tuple[tuple[str, ...], str], ReductionProbe] = {}
    for cand in plan.candidates:
        if not cand.fits:
            continue
        for stage in cand.layout.stages:
            if len(stage.ranks) < 2:
                continue
            indexes = [cand.nodes[r] for r in stage.ranks]
            members = [costs.nodes[i] for i in indexes]
            stage_plan = model.plan([cand.weights[r] for r in stage.ranks])
            for op, computes in model.op_computes(members, stage_plan, 1).items():
                key = reduction_key(members, computes, op)
                if key not in probes:
                    probes[key] = ReductionProbe(
                        key, tuple(indexes[r] for r, _ in computes), tuple(t for _, t in computes),
                        max(members[r].rtt_s + t for r, t in computes))
    return list(probes.values())


def choose(candidates: Sequence[Candidate], tie_tolerance: float = TIE_TOLERANCE) -> Candidate | None:
    """The fastest fitting decode step; within `tie_tolerance` of it, the simplest layout."""
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        return None
    best = min(c.decode_s for c in fitting)
    tied = [c for c in fitting if c.decode_s <= best * (1 + tie_tolerance)]
    return min(tied, key=lambda c: (*c.simplicity(), c.decode_s))


def with_budgets(costs: ClusterCosts, budgets: Sequence[int]) -> ClusterCosts:
    """The same costs with other memory budgets (e.g. `edgeweave plan --memory-budget`)."""
    if len(budgets) != len(costs.nodes):
        raise ValueError(f"{len(budgets)} budgets for {len(costs.nodes)} nodes")
    return replace(costs, nodes=tuple(replace(n, memory_budget=int(b)) for n, b in zip(costs.nodes, budgets, strict=True)))


def hybrid_band(n: int, g: int, n_layers: int, rtt: float, message: float, reduction: float = 0.0,
                ) -> tuple[float, float] | None:
    """The per-layer decode times d for which g-node hybrid groups of n equal nodes beat both
    tensor over all n and an n-stage pipeline (module docstring), or None when there are none."""
    low = g / (g - 1) * (2 * (rtt + (g - 1) * message + reduction) - n * rtt / n_layers)
    high = 2 * g * n * message
    return (max(low, 0.0), high) if low < high else None
