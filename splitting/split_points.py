"""Where a model can be cut so that exactly one tensor crosses, and the cutting itself.

The model is traced with torch.fx; walking the graph in topological order, a cut after
node k is valid when the values produced at or before k and still needed after k are a
single tensor (the model input counts as produced at k = 0). Inside a residual block two
tensors are alive (the branch and the shortcut), so cuts land between blocks, as in
Neurosurgeon and BottleFit. Each candidate carries what the planner needs: the size of
the crossing activation and the parameters and FLOPs on either side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp


@dataclass(frozen=True)
class SplitPoint:
    """A valid cut after graph node `index` (0 = right after the input: full offload)."""

    index: int
    node: str
    shape: tuple[int, ...]  # crossing activation for a batch of one
    nbytes: int  # float32 bytes of that activation
    head_params: int
    tail_params: int
    head_flops: int  # per image, from conv/linear shapes
    tail_flops: int
    is_input: bool = False
    is_output: bool = False

    @property
    def label(self) -> str:
        if self.is_input:
            return "input (offload all)"
        if self.is_output:
            return "output (all local)"
        return self.node


def trace(model: nn.Module) -> fx.GraphModule:
    """torch.fx trace of a model; raises a clear error for untraceable models."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many exception types for dynamic control flow
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx ({exc}); only static graphs can be split") from exc


def _compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op not in ("output", "get_attr")]


def _live_after(nodes: list[fx.Node], k: int) -> list[fx.Node]:
    """Values produced at or before position k that a later node (or the output) still reads."""
    position = {n: i for i, n in enumerate(nodes)}
    live = []
    for n in nodes[: k + 1]:
        for user in n.users:
            if user.op == "output" or position.get(user, -1) > k:
                live.append(n)
                break
    return live


def _node_cost(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int]:
    """(parameters, FLOPs per image) of one node; FLOPs count conv and linear multiply-adds x2."""
    if node.op != "call_module":
        return 0, 0
    module = gm.get_submodule(str(node.target))
    params = sum(p.numel() for p in module.parameters(recurse=False))
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return params, 0
    out_numel = int(torch.Size(meta.shape).numel())
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return params, 2 * out_numel * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return params, 2 * out_numel * module.in_features
    return params, 0


def split_points(model: nn.Module, example: torch.Tensor) -> list[SplitPoint]:
    """Every valid cut of `model` for inputs shaped like `example` (batch of one), in graph order."""
    gm = trace(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example[:1])
    finally:
        model.train(was_training)
    nodes = _compute_nodes(gm)
    costs = [_node_cost(gm, n) for n in nodes]
    total_params = sum(p.numel() for p in model.parameters())
    total_flops = sum(f for _, f in costs)
    points, head_params, head_flops = [], 0, 0
    for k, node in enumerate(nodes):
        head_params += costs[k][0]
        head_flops += costs[k][1]
        live = _live_after(nodes, k)
        if len(live) != 1 or live[0] is not node and k > 0:
            continue
        meta = live[0].meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            continue  # a tuple or non-tensor crosses: not a single-tensor cut
        shape = tuple(int(d) for d in meta.shape)
        points.append(
            SplitPoint(
                index=k,
                node=node.name,
                shape=shape,
                nbytes=int(torch.Size(shape).numel()) * meta.dtype.itemsize,
                head_params=head_params,
                tail_params=total_params - head_params,
                head_flops=head_flops,
                tail_flops=total_flops - head_flops,
                is_input=node.op == "placeholder",
                is_output=k == len(nodes) - 1,
            )
        )
    return points


def _copy_nodes(graph: fx.Graph, nodes: list[fx.Node], env: dict[fx.Node, fx.Node]) -> None:
    def lookup(arg: fx.Node) -> fx.Node:
        if arg not in env and arg.op == "get_attr":  # constants are copied wherever they are read
            env[arg] = graph.node_copy(arg, lambda a: env[a])
        return env[arg]

    for node in nodes:
        env[node] = graph.node_copy(node, lookup)


def split_model(
    model: nn.Module, cut: int | SplitPoint, traced: fx.GraphModule | None = None
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(head, tail) GraphModules with tail(head(x)) == model(x) bit for bit. Shares the model's weights.

    `traced` (from `trace(model)`) saves re-tracing when cutting one model many times.
    """
    gm = traced if traced is not None else trace(model)
    nodes = _compute_nodes(gm)
    k = cut.index if isinstance(cut, SplitPoint) else int(cut)
    if not 0 <= k < len(nodes):
        raise ValueError(f"cut {k} is outside the graph (0..{len(nodes) - 1})")
    live = _live_after(nodes, k)
    if len(live) != 1:
        names = ", ".join(n.name for n in live)
        raise ValueError(f"cut after node {nodes[k].name!r} is not a split point: {len(live)} tensors cross it ({names})")
    crossing = live[0]
    output = next(n for n in gm.graph.nodes if n.op == "output")

    head_graph, env = fx.Graph(), {}
    _copy_nodes(head_graph, nodes[: k + 1], env)
    head_graph.output(env[crossing])

    tail_graph = fx.Graph()
    tail_env = {crossing: tail_graph.placeholder("activation")}
    _copy_nodes(tail_graph, nodes[k + 1 :], tail_env)
    tail_graph.node_copy(output, lambda a: tail_env[a])

    head = fx.GraphModule(gm, head_graph, class_name="Head")
    tail = fx.GraphModule(gm, tail_graph, class_name="Tail")
    head.train(model.training)
    tail.train(model.training)
    return head, tail
