"""`edgeweave cache list` and `edgeweave cache prune`: the coordinator's shard cache, and a way to shrink it.

The cache holds one folder per written plan, `<cache>/<checkpoint fingerprint>/<plan_id>-<dtype>`
(coordinator/tp_driver.py); a run touches its folder, so the folder's mtime is its last use and
pruning removes the least recently used first. Nodes bound their own stores
(`[node] shard_cache_max`); this is the coordinator's side.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from edgeweave.runtime.resources import parse_size

CACHE_DIR_HELP = ("The shard cache folder (default: [coordinator] cache_dir, else $EDGEWEAVE_CACHE/shards or "
                  "~/.cache/edgeweave/shards).")


@dataclass
class CachedPlan:
    """One plan folder: what it holds, its size and its last use."""

    path: str
    checkpoint: str
    plan_id: str
    dtype: str
    model: str
    bytes: int
    last_used: float


def resolve_cache_dir(flag: Path | None) -> Path:
    """--cache-dir (or [coordinator] cache_dir, bound by edgeweave.cli_settings), else where
    tp_driver writes by default."""
    if flag is not None:
        return Path(flag).expanduser()
    from edgeweave.coordinator.tp_driver import shard_cache_root

    return shard_cache_root()


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def scan(root: Path) -> list[CachedPlan]:
    """Every plan folder under `root`, most recently used first."""
    plans = []
    for checkpoint in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for folder in sorted(p for p in checkpoint.iterdir() if p.is_dir()):
            plan_id, _, dtype = folder.name.partition("-")
            try:
                model = json.loads((folder / "manifest.json").read_text()).get("source", "")
            except (OSError, ValueError):
                model = "(incomplete: no readable manifest)"
            plans.append(CachedPlan(str(folder), checkpoint.name, plan_id, dtype, model, _folder_bytes(folder),
                                    folder.stat().st_mtime))
    return sorted(plans, key=lambda p: -p.last_used)


def choose_victims(plans: list[CachedPlan], keep_last: int | None, max_size: int | None,
                   everything: bool) -> list[CachedPlan]:
    """What to remove from `plans` (most recent first): all, beyond the newest `keep_last`, and the
    oldest until the rest fits in `max_size` bytes."""
    if everything:
        return list(plans)
    kept, total, victims = 0, 0, []
    for plan in plans:
        over_count = keep_last is not None and kept >= keep_last
        over_size = max_size is not None and total + plan.bytes > max_size
        if over_count or over_size:
            victims.append(plan)
        else:
            kept, total = kept + 1, total + plan.bytes
    return victims


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _ago(when: float) -> str:
    seconds = max(0.0, time.time() - when)
    for unit, scale in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= scale:
            return f"{seconds / scale:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def register(app: typer.Typer) -> None:
    cache = typer.Typer(help="The coordinator's shard cache: list it, prune it.", no_args_is_help=True)
    app.add_typer(cache, name="cache")

    @cache.command("list")
    def list_(
        cache_dir: Path = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Each cached plan folder with its model, size and last use, and the total."""
        root = resolve_cache_dir(cache_dir)
        plans = scan(root)
        total = sum(p.bytes for p in plans)
        if as_json:
            typer.echo(json.dumps({"cache_dir": str(root), "plans": [asdict(p) for p in plans],
                                   "total_bytes": total}, indent=1))
            return
        table = Table(title=f"{root}: {len(plans)} plan folder(s), {_size(total)}")
        for column in ("model", "checkpoint", "plan", "dtype", "size", "last used"):
            table.add_column(column, justify="right" if column == "size" else "left")
        for p in plans:
            table.add_row(Path(p.model).name or "?", p.checkpoint[:12], p.plan_id, p.dtype, _size(p.bytes),
                          _ago(p.last_used))
        Console().print(table)

    @cache.command("prune")
    def prune(
        keep_last: int = typer.Option(None, "--keep-last", help="Keep only the N most recently used plan folders."),
        max_size: str = typer.Option(None, "--max-size", help="Remove the least recently used until the rest "
                                                              "fits, e.g. 2GiB."),
        everything: bool = typer.Option(False, "--all", help="Remove every cached plan folder."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be removed."),
        cache_dir: Path = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of lines."),
    ) -> None:
        """Remove cached plan folders, least recently used first (the next run over them writes them again)."""
        if keep_last is None and max_size is None and not everything:
            raise typer.BadParameter("say what to remove: --keep-last N, --max-size SIZE or --all")
        if keep_last is not None and keep_last < 0:
            raise typer.BadParameter(f"must be 0 or more, not {keep_last}", param_hint="--keep-last")
        try:
            limit = parse_size(max_size, "--max-size") if max_size is not None else None
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--max-size") from None
        root = resolve_cache_dir(cache_dir)
        victims = choose_victims(scan(root), keep_last, limit, everything)
        for plan in victims if not dry_run else []:
            shutil.rmtree(plan.path)
            parent = Path(plan.path).parent
            if not any(parent.iterdir()):
                parent.rmdir()
        freed = sum(p.bytes for p in victims)
        if as_json:
            typer.echo(json.dumps({"cache_dir": str(root), "dry_run": dry_run, "removed": [asdict(p) for p in victims],
                                   "bytes_freed": 0 if dry_run else freed}, indent=1))
            return
        verb = "would remove" if dry_run else "removed"
        for plan in victims:
            typer.echo(f"{verb} {plan.path} ({_size(plan.bytes)}, last used {_ago(plan.last_used)})")
        if dry_run:
            typer.echo(f"dry run: {len(victims)} plan folder(s) would free {freed} bytes ({_size(freed)})")
        else:
            typer.echo(f"removed {len(victims)} plan folder(s): {freed} bytes ({_size(freed)}) freed")
