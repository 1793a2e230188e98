"""What a finished run tells its operator on the terminal: the table, who was left out, how to verify."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def released(value: float) -> str:
    """A figure as the node released it: 0.2 stays 0.2 (a node that rounds to one decimal), never 0.200."""
    text = format(round(value, 3), "g") if value == round(value, 2) else f"{value:.3f}"
    return text if "." in text else text + ".0"


def print_summary(summary: dict, out: Path, console: Console) -> None:
    table = Table(title=f"{summary['name']}: {summary['paradigm']} {summary['peft_method']} "
                        f"(round {summary['final']['round']})")
    table.add_column("language")
    table.add_column("accuracy", justify="right")
    personal = summary["final"].get("personalized_accuracy")
    if personal is not None:  # each node's own model, kept on the node (released figures only)
        table.add_column("personalized", justify="right")
    for lang, acc in summary["final"]["accuracy"].items():
        extra = [] if personal is None else [released(personal[lang]) if personal.get(lang) is not None else "-"]
        table.add_row(lang, released(acc) if lang != "avg" else f"{acc:.3f}", *extra,
                      style="bold" if lang == "avg" else None)
    console.print(table)
    backbone = summary.get("backbone")
    if backbone:
        outside = backbone["languages_outside_pretraining"]
        console.print(f"model: {backbone['name']} ({backbone['origin']}; {backbone['weights']})"
                      + (f"; not in its pretraining: {', '.join(outside)}" if outside else ""), highlight=False)
    comm = summary["communication"]
    console.print(f"trainable {summary['trainable_params']:,} of {summary['total_params']:,} parameters; "
                  f"{comm['bytes_up']:,} bytes up, {comm['bytes_down']:,} bytes down")
    for cid, c in summary["clients"].items():
        if not c["included"]:
            console.print(f"[yellow]excluded[/yellow] {cid} ({c['region'] or c['language']}): {c['reason']}",
                          highlight=False)
    eps = {k: v for k, v in summary["privacy"]["epsilon"].items() if v is not None}
    privacy = summary["privacy"]
    if eps and privacy.get("mode") == "distributed":
        alone = {k: v for k, v in (privacy.get("epsilon_alone") or {}).items() if v is not None}
        console.print(f"DP: distributed under SecAgg+ (noise multiplier of the sum "
                      f"{privacy['sum_noise_multiplier']:.3g}, delta {privacy['delta']:g}); "
                      "epsilon each node released: " + ", ".join(f"{k} {v:.2f}" for k, v in eps.items())
                      + "; from its own noise shares alone: "
                      + (", ".join(f"{k} {v:.2f}" for k, v in alone.items()) or "not released"), highlight=False)
    elif eps:
        console.print(f"DP: epsilon each node released (delta {privacy['delta']:g}): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in eps.items()))
    if summary.get("stopped_before_the_last_round"):
        console.print(f"[yellow]stopped before the last round:[/yellow] {summary['stopped_before_the_last_round']}",
                      highlight=False)
    if summary["secure_aggregation"].get("enabled"):
        aborted = summary["secure_aggregation"].get("aborted_rounds", [])
        console.print(f"SecAgg+: on, aborted rounds: {aborted or 'none'}")
    witnesses = f" --witness {Path(out) / 'nodes'}" if (Path(out) / "nodes").is_dir() else ""
    console.print(f"audit log: {summary['audit_log']} (verify: securefpt audit verify {summary['audit_log']} "
                  f"--public-key {summary['audit_public_key']}{witnesses})", highlight=False, soft_wrap=True)
    console.print(f"run directory: {out}  (summary.json, metrics.csv, accuracy.png, the PEFT adapter and head)",
                  highlight=False)
