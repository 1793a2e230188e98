"""The experiment commands: `securefpt run | demo | predict | study`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from securefpt.cli.common import app, console, default_out, err, fail, folder_arg
from securefpt.errors import RunInterrupted, SecureFPTError


def _run(config: Optional[Path], out: Optional[Path], overrides: List[str], quiet: bool, verbose: bool) -> None:
    from securefpt.engines.runner import run_experiment
    from securefpt.experiment.loading import load_config

    try:
        cfg = load_config(config, overrides)
        out = out or default_out(cfg.name)
        if out.exists() and not out.is_dir():
            raise SecureFPTError(f"--out {out}: a file is there; a run directory is a folder")
        summary = run_experiment(cfg, out, show_progress=not quiet, verbose=verbose)
    except RunInterrupted as exc:
        err.print(str(exc), highlight=False, soft_wrap=True)
        raise typer.Exit(code=130) from None
    except SecureFPTError as exc:
        fail(exc)
    from securefpt.engines.report import print_summary

    print_summary(summary, out, console)
    if summary.get("stopped_by_refusals"):  # the results so far are kept; the run did not do what was asked
        err.print(f"[red]error:[/red] the run stopped before its last round: "
                  f"{summary['stopped_before_the_last_round']}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=3)


@app.command()
def run(
    config: Path = typer.Argument(..., help="experiment YAML"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<name>-<time>)"),
    set_: List[str] = typer.Option([], "--set", help="override a key: dotted.key=value (repeatable)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    verbose: bool = typer.Option(False, "--verbose", help="engine logs"),
    dry_run: bool = typer.Option(False, "--dry-run", help="say who takes part under which rules, the DP and "
                                                          "SecAgg+ plan and the traffic; train and write nothing"),
) -> None:
    """Run one experiment."""
    if dry_run:
        from securefpt.engines.dry_run import plan_run, print_plan
        from securefpt.experiment.loading import load_config

        try:
            print_plan(plan_run(load_config(config, set_)), console)
        except SecureFPTError as exc:
            fail(exc)
        return
    _run(config, out, set_, quiet, verbose)


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/demo-<time>)"),
    set_: List[str] = typer.Option([], "--set", help="override a key: dotted.key=value (repeatable)"),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Federated prompt tuning on the embedded default (multilingual e5, 4-bit origin; demo data), offline,
    under the demo federation's policy (made once in $SECUREFPT_HOME/demo-federation)."""
    from securefpt.engines.demo import demo_config, demo_overrides

    try:
        demo_sets = demo_overrides(lambda line: err.print(line, highlight=False))
    except SecureFPTError as exc:
        fail(exc)
    _run(demo_config(), out, demo_sets + list(set_), quiet, False)


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    texts: List[str] = typer.Argument(..., help="text(s) to classify; - reads one text a line from stdin"),
    language: Optional[str] = typer.Option(None, "--language", help="for monolingual runs: whose model"),
    node: Optional[str] = typer.Option(None, "--node", help="a node's personalized model: its state folder, "
                                       "or its client id under RUN/nodes/"),
    pair: List[str] = typer.Option([], "--pair", help="sentence-pair tasks: the second sentence of each text, "
                                   "in order (repeatable)"),
) -> None:
    """Classify text with a run's trained prompt encoder and head, or with one node's personalized model."""
    from securefpt.predict import predict as do_predict

    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    try:
        if pair and len(pair) != len(texts):
            raise SecureFPTError(f"--pair: {len(pair)} given for {len(texts)} texts (one each)")
        pairs = pair or None
        results = do_predict(run_dir, texts, language, pairs, node)
    except SecureFPTError as exc:
        fail(exc)
    for text, (label, prob) in zip(texts, results):
        typer.echo(f"{label}\t{prob:.3f}\t{text}")


@app.command()
def study(
    config: Path = typer.Argument(..., help="study YAML (server/masakhanews-study.yaml)"),
    out: Optional[Path] = typer.Option(None, "--out", help="study directory (default studies/<name>)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Run a study (a grid of experiments) and write its report; finished cells are kept, so the same
    command resumes an interrupted study."""
    from securefpt.experiment.loading import load_config
    from securefpt.study.config import load_study
    from securefpt.study.report import write_report
    from securefpt.study.runner import run_study

    try:
        spec = load_study(config)
        out = folder_arg(out or Path("studies") / spec.name)
        records = run_study(spec, out, show_progress=not quiet,
                            say=lambda line: err.print(line, highlight=False, soft_wrap=True))
        report = write_report(spec, load_config(spec.experiment, spec.set), records, out)
    except RunInterrupted as exc:
        err.print(f"{exc}; the finished cells are kept: run the same command to resume", highlight=False)
        raise typer.Exit(code=130) from None
    except SecureFPTError as exc:
        fail(exc)
    console.print(f"report: {report}", highlight=False)
