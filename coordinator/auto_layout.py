"""`--layout auto`: measure the nodes, run the planner's choice, and keep re-planning as links move.

`edgeweave plan` shows the same measurement and choice (`coordinator.layout_choice`); here the
choice becomes a running `DistributedLlama` over the chosen nodes (a candidate may leave a slow
node out), with a `Replanner` attached that re-probes the links when decode steps drift and
redeploys on the planner's new choice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from edgeweave.coordinator.client import NodeClient
from edgeweave.coordinator.layout_choice import MeasureError, measure_cluster, plan_cluster
from edgeweave.coordinator.replanner import Replanner, node_probe
from edgeweave.coordinator.tp_driver import DistributedLlama
from edgeweave.splitting.checkpoints import Checkpoint

log = logging.getLogger(__name__)


class NothingFitsError(RuntimeError):
    """No candidate layout fits the nodes' memory."""


def open_auto(checkpoint: Checkpoint, clients: Sequence[NodeClient], *, quantize: str | None = None,
              prompt_tokens: int = 128, replan: bool = True, profile_seconds: float = 1.0,
              **driver_options: Any) -> DistributedLlama:
    """The planner's best layout over `clients`, deployed and ready (MeasureError, NothingFitsError)."""
    costs = measure_cluster(list(clients), checkpoint, quantize, prompt_tokens=prompt_tokens, budget_s=profile_seconds)
    choice = plan_cluster(costs).choice
    if choice is None:
        raise NothingFitsError("no layout of the model fits these nodes' memory; see `edgeweave plan` for why")
    log.info("layout %s over %d of %d node(s): predicted %.1f ms/token, first token %.0f ms", choice.describe(),
             len(choice.nodes), len(clients), choice.decode_s * 1e3, choice.first_token_s * 1e3)
    llm = DistributedLlama(checkpoint, [clients[i] for i in choice.nodes], list(choice.weights), quantize=quantize,
                           layout=choice.layout, **driver_options)
    llm.planned = choice
    if replan:
        llm.attach_replanner(Replanner(costs, choice, node_probe(clients, checkpoint.config.hidden_size),
                                       plan_cluster), list(clients))
    return llm


__all__ = ["open_auto", "NothingFitsError", "MeasureError"]
