"""What every command shares: the Typer app, the consoles, one-line failures."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console

from securefpt.errors import SecureFPTError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Privacy-hardened federated prompt tuning.")
console = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from securefpt import __version__

        typer.echo(f"securefpt {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Privacy-hardened federated prompt tuning."""


def fail(exc: BaseException) -> None:
    err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def folder_arg(path: Path) -> Path:
    """A folder argument: one line if a file is in the way."""
    if path.exists() and not path.is_dir():
        fail(SecureFPTError(f"{path}: a file is there, a folder is needed"))
    return path


def default_out(name: str) -> Path:
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
