"""The `edgeweave` command: one Typer app composed from the node's and the coordinator's commands.

It lives above `node` and `coordinator` so that neither has to import the other.
Each area registers its commands from its own module (`register(app)`).
"""

from __future__ import annotations

import logging
import os

import typer

#: plain Click help: rich markup would eat "[coordinator]" in help texts and print flags as "<bool>"
HELP_STYLE: dict = {"rich_markup_mode": None, "add_completion": False, "pretty_exceptions_enable": False}

app = typer.Typer(
    name="edgeweave",
    help="Run one model across several small devices on a LAN.",
    no_args_is_help=True,
    **HELP_STYLE,
)


def _print_version(value: bool) -> None:
    if value:
        import edgeweave

        typer.echo(f"edgeweave {edgeweave.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug details."),
    secret_file: str = typer.Option(
        None, "--secret-file", help="Cluster secret for every channel (default ~/.config/edgeweave/cluster.secret)."
    ),
    insecure: bool = typer.Option(False, "--insecure", help="Plaintext, unauthenticated gRPC: local trials only."),
) -> None:
    # Exported as settings overrides so node and coordinator code read them the same way.
    if secret_file:
        os.environ["EDGEWEAVE_CLUSTER_SECRET_FILE"] = secret_file
    if insecure:
        os.environ["EDGEWEAVE_CLUSTER_INSECURE"] = "1"
    level = logging.DEBUG if verbose else getattr(logging, os.environ.get("EDGEWEAVE_LOG", "INFO").upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # every command's bound options default to defaults < config.toml < EDGEWEAVE_* (flags win)
    from edgeweave.cli_settings import default_map
    from edgeweave.config import load_settings

    ctx.default_map = {**(ctx.default_map or {}), **default_map(load_settings(), ctx.command)}


def _register_all() -> None:
    from edgeweave.coordinator import cli_cluster
    from edgeweave.node import cli as node_cli

    node_cli.register(app)
    cli_cluster.register(app)
    for module in ("cli_llm", "cli_split", "cli_serve", "cli_security", "cli_demo", "cli_model", "cli_cache"):
        try:
            mod = __import__(f"edgeweave.coordinator.{module}", fromlist=["register"])
        except ModuleNotFoundError as exc:  # an area not built yet in this checkout
            if exc.name != f"edgeweave.coordinator.{module}":
                raise
            continue
        mod.register(app)


_register_all()


def main() -> None:
    from edgeweave.config import ConfigError
    from edgeweave.coordinator.client import NodeError
    from edgeweave.coordinator.local_cluster import ClusterStartError
    from edgeweave.coordinator.recovery import ClusterLostError
    from edgeweave.runtime.memory_budget import MemoryBudgetError
    from edgeweave.security import SecretError

    try:
        app()
    except (SecretError, ConfigError, MemoryBudgetError) as exc:  # a setup problem: one sentence, no traceback
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except (NodeError, ClusterLostError, ClusterStartError) as exc:  # the cluster failed us: say which node and why
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None
