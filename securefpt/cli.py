"""Command line: `securefpt run | demo | predict`.

Bad input exits non-zero with a one-line reason on stderr (never a traceback).
"""

from __future__ import annotations

import sys
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from securefpt.errors import SecureFPTError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Privacy-hardened federated prompt tuning.")
console = Console()
err = Console(stderr=True)


def _fail(exc: BaseException) -> None:
    err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _default_out(name: str) -> Path:
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _print_summary(summary: dict, out: Path) -> None:
    table = Table(title=f"{summary['name']}: {summary['paradigm']} {summary['peft_method']} "
                        f"(round {summary['final']['round']})")
    table.add_column("language")
    table.add_column("accuracy", justify="right")
    for lang, acc in summary["final"]["accuracy"].items():
        style = "bold" if lang == "avg" else None
        table.add_row(lang, f"{acc:.3f}", style=style)
    console.print(table)
    comm = summary["communication"]
    console.print(
        f"trainable {summary['trainable_params']:,} of {summary['total_params']:,} parameters; "
        f"{comm['bytes_up']:,} bytes up, {comm['bytes_down']:,} bytes down"
    )
    console.print(f"run directory: {out}  (summary.json, metrics.csv, accuracy.png, prompt_encoder*.safetensors)")


def _run(config: Optional[Path], out: Optional[Path], overrides: List[str], quiet: bool, verbose: bool) -> None:
    from securefpt.config import load_config
    from securefpt.runner import run_experiment

    try:
        cfg = load_config(config, overrides)
        out = out or _default_out(cfg.name)
        summary = run_experiment(cfg, out, show_progress=not quiet, verbose=verbose)
    except SecureFPTError as exc:
        _fail(exc)
    _print_summary(summary, out)


@app.command()
def run(
    config: Path = typer.Argument(..., help="experiment YAML"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<name>-<time>)"),
    set_: List[str] = typer.Option([], "--set", help="override a key: dotted.key=value (repeatable)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    verbose: bool = typer.Option(False, "--verbose", help="engine logs"),
) -> None:
    """Run one experiment."""
    _run(config, out, set_, quiet, verbose)


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/demo-<time>)"),
    set_: List[str] = typer.Option([], "--set", help="override a key: dotted.key=value (repeatable)"),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Federated prompt tuning on the embedded default (packaged MiniLM, demo data), offline."""
    config = Path(str(resources.files("securefpt") / "configs" / "demo.yaml"))
    _run(config, out, set_, quiet, False)


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    texts: List[str] = typer.Argument(..., help="text(s) to classify"),
    language: Optional[str] = typer.Option(None, "--language", help="for monolingual runs: whose model"),
) -> None:
    """Classify text with a run's trained prompt encoder and head."""
    from securefpt.predict import predict as do_predict

    try:
        results = do_predict(run_dir, texts, language)
    except SecureFPTError as exc:
        _fail(exc)
    for text, (label, prob) in zip(texts, results):
        typer.echo(f"{label}\t{prob:.3f}\t{text}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
