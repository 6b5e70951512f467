"""`edgeweave init`: create the cluster secret that every device of one cluster shares."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeweave import security


def register(app: typer.Typer) -> None:
    @app.command("init")
    def init(
        secret_file: Path = typer.Option(None, help="Where to write the secret (default: ~/.config/edgeweave/cluster.secret)."),
        force: bool = typer.Option(False, help="Replace an existing secret (every device then needs the new one)."),
    ) -> None:
        """Create a cluster secret. Copy the file to every device of the cluster (mode 600)."""
        try:
            path = security.create_secret(secret_file, overwrite=force)
        except security.SecretError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        fingerprint = security.cluster_fingerprint(security.load_secret(path))
        typer.echo(f"cluster secret written to {path} (cluster fingerprint {fingerprint})")
        typer.echo("copy it to the same path on every device: nodes and coordinators refuse anyone without it")
