"""Stable plans: the same nodes get the same cut (and so reuse the same shards) run after run.

Measured matmul GFLOP/s are noisy (10-30% between runs on a busy device), and every different cut
is another set of shards to write and ship. Two files in the coordinator's shard cache fix that:

- `capacities.json`: node id -> the capacity last accepted for it. A new measurement within
  TOLERANCE (±25%) of the stored one keeps the stored value (hysteresis); only a real change (a
  different device behind the id, a throttled board) replaces it.
- `plans.json`: (checkpoint, precision, dtype, node ids in rank order) -> the weights and plan id
  that run used. A re-run over the same nodes takes those weights without profiling at all, as
  long as the plan's folder is still in the cache (`edgeweave cache prune` may have removed it).

Weights are then snapped to a grid of 1/GRID of the fastest node, so near-equal nodes get equal
shares. Both files are written atomically (temp file + rename): a crash never leaves half a file,
and a corrupt one is ignored with a warning (it only costs a re-measurement).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CAPACITIES_FILE = "capacities.json"
PLANS_FILE = "plans.json"
#: a measurement this close (relative) to the stored capacity keeps the stored one
TOLERANCE = 0.25
#: weights are multiples of 1/GRID of the fastest node's capacity
GRID = 8


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; {} when missing, or unreadable (warned: it is only a cache)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring the unreadable cache file %s (%s)", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace `path` atomically, so a concurrent reader or a crash never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def stabilize(stored: float | None, measured: float, tolerance: float = TOLERANCE) -> tuple[float, bool]:
    """(capacity to use, whether it is the stored one): the stored value unless `measured` left the band."""
    if stored is not None and stored > 0 and abs(measured - stored) <= tolerance * stored:
        return stored, True
    return measured, False


def grid_weights(capacities: list[float], grid: int = GRID) -> list[float]:
    """Capacities snapped to multiples of 1/grid of the largest (at least one step each), so that
    near-equal nodes get equal weights; the units (GFLOP/s) stay those of the input."""
    if not capacities or any(c <= 0 for c in capacities):
        raise ValueError(f"capacities must be positive, got {capacities}")
    top = max(capacities)
    return [top * max(1, round(grid * c / top)) / grid for c in capacities]


def stable_capacities(root: Path, node_ids: list[str], measured: list[float],
                      tolerance: float = TOLERANCE, update: bool = True) -> tuple[list[float], list[bool]]:
    """Each node's capacity after hysteresis against `root/capacities.json` (updated for the nodes
    whose measurement left the band, unless `update` is False); also which values came from the file."""
    path = Path(root) / CAPACITIES_FILE
    stored = read_json(path)
    values, cached, changed = [], [], False
    for node_id, speed in zip(node_ids, measured, strict=True):
        entry = stored.get(node_id)
        previous = entry.get("capacity") if isinstance(entry, dict) else None
        value, hit = stabilize(float(previous) if isinstance(previous, (int, float)) else None, speed, tolerance)
        if not hit:
            stored[node_id] = {"capacity": value}
            changed = True
        values.append(value)
        cached.append(hit)
    if changed and update:
        write_json(path, stored)
    return values, cached


def plan_key(fingerprint: str, precision: str, dtype: str, node_ids: list[str]) -> str:
    """What makes two runs the same for plan reuse: the model file, its precision and dtype, and the
    nodes in rank order."""
    return "/".join([fingerprint, precision, dtype, ",".join(node_ids)])


def remembered_plan(root: Path, key: str) -> dict[str, Any] | None:
    """{"folder", "plan_id", "weights"} of the last automatic plan for `key`, if its folder is still cached."""
    entry = read_json(Path(root) / PLANS_FILE).get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("weights"), list):
        return None
    if not (Path(root) / str(entry.get("folder", "")) / "manifest.json").is_file():
        return None  # pruned since: measure again
    return entry


def remember_plan(root: Path, key: str, folder: Path, plan_id: str, weights: list[float]) -> None:
    """Record the plan a run chose automatically, for the next run over the same nodes."""
    path = Path(root) / PLANS_FILE
    plans = read_json(path)
    plans[key] = {"folder": str(Path(folder).relative_to(root)), "plan_id": plan_id, "weights": list(weights)}
    write_json(path, plans)


def automatic_weights(root: Path, key: str, node_ids: list[str], measure: Callable[[], list[float]],
                      plan_id_for: Callable[[list[float]], str], update: bool = True) -> tuple[list[float], str]:
    """(weights, where they came from) when none were given: the remembered plan's over these
    very nodes (no profiling), else `measure()` stabilized per node id and snapped to the grid.
    `edgeweave run`/`serve` (update=True) and `edgeweave plan` (update=False, read-only) share it,
    so plan shows the cut a run would make."""
    entry = remembered_plan(root, key)
    if entry is not None and len(entry["weights"]) == len(node_ids):
        weights = [float(w) for w in entry["weights"]]
        if plan_id_for(weights) == entry.get("plan_id"):
            log.info("node weights %s from the cached plan %s over the same nodes (no profiling)",
                     _fmt(weights), entry["plan_id"])
            return weights, "cached plan"
    measured = measure()
    capacities, cached = stable_capacities(root, node_ids, measured, update=update)
    weights = grid_weights(capacities)
    log.info("node weights %s: measured %s GFLOP/s, %d of %d kept at their cached capacity (within ±%.0f%%), "
             "rounded to 1/%d of the fastest", _fmt(weights), _fmt(measured), sum(cached), len(cached),
             TOLERANCE * 100, GRID)
    return weights, "measured"


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"
