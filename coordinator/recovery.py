"""What the tensor-parallel driver does when a node dies mid-generation.

Detection bound: a node killed outright is noticed at once (its kernel resets the TCP
connection, the pending Forward recv fails); a node that vanishes silently is noticed by TCP
keepalive on the data plane within ~3 s (proto/framing.py DEAD_PEER_S; HTTP/2 keepalive on gRPC
channels, coordinator/client.py KEEPALIVE_MS); a node that is
connected but hangs misses its reply deadline, `step_deadline` = max(3 s, 10 x the median of the
recent decode steps). So a lost node is detected within ~3 s of its death in decode.

Recovery (`recover`): mark the node lost, re-plan over the survivors with their old weights
(renormalized by the planner), check with `splitting.memory_plan` that they can hold the model
(else `ClusterLostError` naming the lost node and the missing memory), then let the driver
redeploy: write the new plan's shards (cached by plan id), send each survivor only the shards it
lacks, load the new jobs, and rebuild each session's KV cache by one prefill of its tokens so far.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import grpc

from edgeweave.coordinator.client import NodeClient, NodeError
from edgeweave.runtime.memory_budget import fit_context
from edgeweave.splitting.memory_plan import MemoryPlan, MemoryPlanError, plan_memory
from edgeweave.splitting.tensor_parallel import TensorParallelPlan

if TYPE_CHECKING:
    from edgeweave.coordinator.tp_driver import DistributedLlama

log = logging.getLogger(__name__)

#: reply deadline floor, and how many median decode steps a reply may take before the node counts as hung
DEADLINE_FLOOR_S = 3.0
DEADLINE_FACTOR = 10.0
#: statuses that mean "the node (or the way to it) is gone", as opposed to a request the node refused
LOST_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED,
})
UNLIMITED = 1 << 62


class ClusterLostError(RuntimeError):
    """Nodes were lost and the rest cannot run the model; the text names the lost nodes and what is missing."""

    def __init__(self, lost: Sequence[str], message: str) -> None:
        super().__init__(message)
        self.lost = list(lost)


@dataclass
class RecoveryRecord:
    """One recovery: who was lost, how long detection and the whole stall (failure -> next token) took."""

    lost_node: str
    detected_after_s: float  # from the start of the step that failed to the error
    stall_s: float  # from the error to the next token (filled in when that token arrives)
    resent_bytes: int
    nodes_left: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_node_lost(exc: NodeError) -> bool:
    """True when the error says the node or the link died (worth recovering), not that it refused a request."""
    return exc.code in LOST_CODES


def step_deadline(recent_steps: Sequence[float]) -> float:
    """Reply deadline for one decode step's receives: max(3 s, 10 x the median recent step)."""
    if not recent_steps:
        return DEADLINE_FLOOR_S
    return max(DEADLINE_FLOOR_S, DEADLINE_FACTOR * statistics.median(recent_steps))


def memory_budgets(nodes: Sequence[NodeClient]) -> list[int]:
    """What each node announces it may hold (0 = no budget): the limits a pipeline's ranges keep to."""
    return [client.info().resources.memory_budget for client in nodes]


def fit_plan_to_nodes(plan: TensorParallelPlan, nodes: Sequence[NodeClient],
                      layer_file_bytes: Sequence[Sequence[int]] | None = None,
                      budgets: Sequence[int] | None = None) -> MemoryPlan:
    """Check each node's announced memory budget (0 = no budget) against its share of `plan`; the
    window each node will use (the node's own accounting: `runtime.memory_budget`), or
    MemoryPlanError saying how much memory is missing where. With the written files' sizes the
    windows are exactly the nodes' own. `budgets`: what `memory_budgets(nodes)` returned, if the
    caller already asked."""
    budgets = [budget or UNLIMITED for budget in (memory_budgets(nodes) if budgets is None else budgets)]
    return plan_memory(plan, budgets, names=[c.address for c in nodes],
                       context_length=fit_context(plan.config.max_position_embeddings), coordinator_rank=None,
                       layer_file_bytes=layer_file_bytes)


def check_survivors_fit(plan: TensorParallelPlan, nodes: Sequence[NodeClient], lost: Sequence[str],
                        budgets: Sequence[int] | None = None) -> None:
    """Raise ClusterLostError unless every survivor's memory budget holds its share."""
    try:
        fit_plan_to_nodes(plan, nodes, budgets=budgets)
    except MemoryPlanError as exc:
        raise ClusterLostError(
            lost, f"lost node(s) {', '.join(lost)} and the {len(nodes)} remaining node(s) cannot hold the model: {exc}"
        ) from None


def recover(llm: DistributedLlama, error: NodeError, detected_after_s: float) -> RecoveryRecord:
    """Drop the failed node (and any survivor that fails while we redeploy) and redeploy on the rest."""
    lost = [error.address]
    log.warning("node %s failed (%s); recovering on the remaining nodes", error.address, error.code.name)
    while True:
        keep = [r for r, c in enumerate(llm.nodes) if c.address not in lost]
        nodes = [llm.nodes[r] for r in keep]
        weights = [llm.weights[r] for r in keep]
        if not nodes:
            raise ClusterLostError(lost, f"lost node(s) {', '.join(lost)}: no node is left to run the model")
        try:
            budgets = memory_budgets(nodes)
            check_survivors_fit(llm.make_plan(weights, budgets), nodes, lost, budgets)
            resent = llm.redeploy(nodes, weights)
            break
        except NodeError as exc:
            if not is_node_lost(exc) or exc.address in lost:
                raise
            log.warning("node %s failed too during recovery (%s)", exc.address, exc.code.name)
            lost.append(exc.address)
    return RecoveryRecord(", ".join(lost), detected_after_s, 0.0, resent, len(nodes))


def finish(record: RecoveryRecord, detected_at: float) -> None:
    """Close a recovery when its next token arrives: fill in the stall and say what happened."""
    record.stall_s = time.perf_counter() - detected_at
    log.warning(
        "recovered from losing node %s: detected after %.2f s, next token %.2f s after detection, "
        "%d bytes of shards re-sent, %d node(s) left",
        record.lost_node, record.detected_after_s, record.stall_s, record.resent_bytes, record.nodes_left,
    )


def refetch_changed_shards(llm: DistributedLlama, error: NodeError) -> bool:
    """After a step's FAILED_PRECONDITION: when that node now lacks some of its shards (it found a
    layer file changed on disk, deleted it and unloaded its job), re-send what it lacks and load
    again, on the same nodes with the same plan (sessions are re-prefilled from their history).
    True when that happened; False when the refusal had another cause (left to the caller)."""
    rank = next((r for r, c in enumerate(llm.nodes) if c.address == error.address), None)
    if rank is None:
        return False
    digests = {llm.manifest.sha256(rel) for rel in llm.manifest.shard_files(rank).values()}
    try:
        present = set(llm.nodes[rank].has_shards(sorted(digests)))
    except NodeError:
        return False
    if present >= digests:
        return False
    log.warning("node %s lost %d shard file(s) (%s); re-sending and reloading", error.address,
                len(digests - present), error.message)
    start = time.perf_counter()
    resent = llm.redeploy(list(llm.nodes), list(llm.weights))
    log.info("node %s has its shards again: %.1f MB re-sent, %.1f s", error.address, resent / 1e6,
             time.perf_counter() - start)
    return True
