"""A layout says which node holds which layers, and which heads and columns of them.

Tensor parallelism, pipeline (layer-split) and hybrid are all layouts: a sequence of stages, each
a contiguous range of whole layers computed by one or more nodes. Inside a stage the nodes split
every layer's KV-head groups and MLP columns (tensor parallel, summed at the coordinator); across
stages the hidden state goes from one stage to the next. A 1-node stage runs its whole range in
one message (op "layers"); so a pipeline pays one round trip per stage and token, tensor
parallelism 2 x layers. The driver executes whatever layout it is handed; the planner
(`splitting.layout_planner`) chooses one from measured costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

KINDS = ("single", "tensor", "pipeline", "hybrid")


class LayoutError(ValueError):
    """A layout that does not cover the model's layers exactly once, or names a node twice."""


@dataclass(frozen=True)
class Stage:
    """Layers [start, stop), computed by the nodes `ranks` (tensor parallel among them when several)."""

    layers: tuple[int, int]
    ranks: tuple[int, ...]

    @property
    def n_layers(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass(frozen=True)
class Layout:
    """Stages in order; every rank 0..n-1 appears in exactly one stage."""

    stages: tuple[Stage, ...]

    @property
    def kind(self) -> str:
        if len(self.stages) == 1:
            return "single" if len(self.stages[0].ranks) == 1 else "tensor"
        return "pipeline" if all(len(s.ranks) == 1 for s in self.stages) else "hybrid"

    @property
    def n_nodes(self) -> int:
        return sum(len(s.ranks) for s in self.stages)

    @property
    def n_layers(self) -> int:
        return self.stages[-1].layers[1]

    def stage_of(self, rank: int) -> Stage:
        for stage in self.stages:
            if rank in stage.ranks:
                return stage
        raise LayoutError(f"rank {rank} is in no stage of this layout")

    def layers_of(self, rank: int) -> tuple[int, int]:
        return self.stage_of(rank).layers

    def check(self, n_layers: int, n_nodes: int) -> Layout:
        """This layout, if it covers layers 0..n_layers-1 once, in order, with nodes 0..n_nodes-1 once each."""
        at = 0
        for stage in self.stages:
            if stage.layers[0] != at or stage.n_layers < 1:
                raise LayoutError(f"stage {stage.layers} does not continue at layer {at} with at least one layer")
            if not stage.ranks:
                raise LayoutError(f"stage {stage.layers} has no node")
            at = stage.layers[1]
        if at != n_layers:
            raise LayoutError(f"the stages cover layers 0..{at - 1}, but the model has {n_layers}")
        ranks = sorted(r for s in self.stages for r in s.ranks)
        if ranks != list(range(n_nodes)):
            raise LayoutError(f"the stages name nodes {ranks}; each of 0..{n_nodes - 1} must appear exactly once")
        return self

    def describe(self) -> str:
        """e.g. "pipeline 0-14|15-29" or "tensor x2" or "hybrid 0-14 x2|15-29 x2"."""
        if len(self.stages) == 1:
            return "single" if len(self.stages[0].ranks) == 1 else f"tensor x{len(self.stages[0].ranks)}"
        parts = [f"{s.layers[0]}-{s.layers[1] - 1}" + (f" x{len(s.ranks)}" if len(s.ranks) > 1 else "")
                 for s in self.stages]
        return f"{self.kind} " + "|".join(parts)

    def to_dict(self) -> list[dict]:
        return [{"layers": list(s.layers), "ranks": list(s.ranks)} for s in self.stages]

    @classmethod
    def from_dict(cls, data: Sequence[dict]) -> Layout:
        try:
            return cls(tuple(Stage((int(d["layers"][0]), int(d["layers"][1])), tuple(int(r) for r in d["ranks"]))
                             for d in data))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise LayoutError(f"a layout is a list of {{layers: [start, stop], ranks: [...]}}, not {data!r}") from exc


def tensor(n_layers: int, n_nodes: int) -> Layout:
    """Every node holds its heads and columns of every layer."""
    return Layout((Stage((0, n_layers), tuple(range(n_nodes))),)).check(n_layers, n_nodes)


def pipeline(layer_counts: Sequence[int]) -> Layout:
    """Node i holds the next `layer_counts[i]` whole layers (in rank order)."""
    return hybrid(layer_counts, [1] * len(layer_counts))


def hybrid(layer_counts: Sequence[int], group_sizes: Sequence[int]) -> Layout:
    """Stage i: the next `layer_counts[i]` layers, tensor parallel over the next `group_sizes[i]` ranks."""
    if len(layer_counts) != len(group_sizes):
        raise LayoutError(f"{len(layer_counts)} stage lengths for {len(group_sizes)} groups")
    stages, layer, rank = [], 0, 0
    for count, size in zip(layer_counts, group_sizes, strict=True):
        stages.append(Stage((layer, layer + count), tuple(range(rank, rank + size))))
        layer, rank = layer + count, rank + size
    return Layout(tuple(stages)).check(layer, rank)


def split_layers(n_layers: int, capacities: Sequence[float], limits: Sequence[int] | None = None) -> list[int]:
    """Layers per stage in proportion to `capacities` (faster stages take more), each at least one
    and at most its `limits` entry (the layers its memory holds resident); LayoutError when even
    the limits cannot cover the model.

    Water-filling: give the proportional share, clamp to limits, and hand what is left to the
    stages still below their limit, largest remainder first."""
    n = len(capacities)
    if n == 0 or n > n_layers:
        raise LayoutError(f"cannot split {n_layers} layers into {n} stages of at least one layer")
    if any(c <= 0 for c in capacities):
        raise LayoutError(f"stage capacities must be positive, got {list(capacities)}")
    caps = list(limits) if limits is not None else [n_layers] * n
    if sum(caps) < n_layers or min(caps) < 1:
        raise LayoutError(f"the stages hold at most {sum(caps)} of {n_layers} layers (limits {caps})")
    counts = [1] * n
    while sum(counts) < n_layers:
        open_ = [i for i in range(n) if counts[i] < caps[i]]
        total = sum(capacities[i] for i in open_)
        remaining = n_layers - sum(counts)
        # the stage furthest below its proportional share of all layers takes the next one
        best = max(open_, key=lambda i: (capacities[i] / total * (remaining + sum(counts[j] for j in open_))
                                         - counts[i], -i))
        counts[best] += 1
    return counts


def parse_layout(text: str) -> str | Layout:
    """`--layout`: a kind ("tensor", "pipeline", "auto") cut for whatever nodes there are, or stages
    given exactly: "pipeline:12,18" (layers per node, in node order) or "hybrid:12x2,18x1" (layers
    per stage x nodes in it). LayoutError says what is wrong."""
    value = text.strip().lower()
    if value in ("tensor", "pipeline", "auto"):
        return value
    kind, _, spec = value.partition(":")
    if kind not in ("pipeline", "hybrid") or not spec:
        raise LayoutError(f"layout {text!r} is not understood; use tensor, pipeline, auto, "
                          "pipeline:12,18 (layers per node) or hybrid:12x2,18x1 (layers x nodes per stage)")
    counts, sizes = [], []
    for part in spec.split(","):
        layers, _, group = part.strip().partition("x")
        if not layers.isdigit() or (group and not group.isdigit()) or (kind == "pipeline" and group):
            raise LayoutError(f"stage {part!r} of layout {text!r} is not "
                              + ("a number of layers" if kind == "pipeline" else "<layers>x<nodes>"))
        counts.append(int(layers))
        sizes.append(int(group) if group else 1)
    if min(counts) < 1 or min(sizes) < 1:
        raise LayoutError(f"every stage of layout {text!r} needs at least one layer and one node")
    return hybrid(counts, sizes)
