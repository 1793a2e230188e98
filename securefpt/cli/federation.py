"""A federation's operators and institutions: keys and TLS material, residency policies, a node's own report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from securefpt.cli.common import app, console, err, fail, folder_arg
from securefpt.errors import SecureFPTError

keys_app = typer.Typer(no_args_is_help=True, help="Keys and attestations for a federation.")
policy_app = typer.Typer(no_args_is_help=True, help="Residency policies.")
node_app = typer.Typer(no_args_is_help=True, help="An institution's own node.")
app.add_typer(keys_app, name="keys")
app.add_typer(policy_app, name="policy")
app.add_typer(node_app, name="node")


@node_app.command("report")
def node_report(
    config: Path = typer.Argument(..., help="the node's node.yaml"),
    state: Optional[Path] = typer.Option(None, "--state", help="its state folder (default: node.yaml's state_dir; "
                                                               "without one, the newest runs/*/nodes/<client id>)"),
) -> None:
    """What this node has spent and witnessed, from its own state (none of it leaves the node)."""
    from securefpt.node.report import node_report as report

    try:
        figures = report(config, state)
    except SecureFPTError as exc:
        fail(exc)
    console.print(f"{figures['client_id']} ({figures['region']}, {figures['language']}); state in "
                  f"{figures['state_dir']}", highlight=False)
    for dataset, d in figures["datasets"].items():
        budget = f" of {d['budget']:g}" if d["budget"] is not None else " (no lifetime budget)"
        console.print(f"dataset {dataset}: lifetime epsilon {d['lifetime_epsilon']:.3f}{budget} "
                      f"(delta {d['delta']:g}, {d['accountant']})", highlight=False)
        share = f" of its share {d['per_federation']:g}" if d["per_federation"] is not None else ""
        for federation, spent in d["federations"].items():
            console.print(f"  federation {federation}: epsilon {spent:.3f}{share}", highlight=False)
        for key, e in d["experiments"].items():
            alone = f" ({e['epsilon_alone']:.3f} from its own noise shares alone)" if e["epsilon_alone"] else ""
            console.print(f"  experiment {key} ({e['mode']} DP): epsilon {e['epsilon']:.3f}{alone}, {e['steps']} "
                          f"steps, noise multiplier "
                          f"{', '.join(f'{s:.3f}' for s in e['noise_multipliers'])}, sample rate "
                          f"{', '.join(f'{q:.4f}' for q in e['sample_rates'])}", highlight=False)
    console.print(f"{figures['runs']} runs, {figures['rounds_trained']} rounds trained, "
                  f"{figures['audit_heads_witnessed']} audit heads witnessed", highlight=False)


@keys_app.command("demo")
def keys_demo(
    folder: Optional[Path] = typer.Argument(None, help="where the federation goes "
                                                        "(default $SECUREFPT_HOME/demo-federation)"),
    policy: str = typer.Option("masakhanews", "--policy", help="which of policies/*.yaml the nodes agree to"),
    force: bool = typer.Option(False, "--force", help="replace existing private keys"),
) -> None:
    """A demo federation: authorities, the coordinator's audit key, each institution's keys,
    manifest and node configuration (see securefpt/operators/keys.py for the layout)."""
    from securefpt.home import securefpt_home
    from securefpt.operators.keys import make_federation

    folder = folder_arg(folder or securefpt_home() / "demo-federation")
    try:
        written = make_federation(folder, policy=policy, force=force)
    except SecureFPTError as exc:
        fail(exc)
    for path in written:
        console.print(f"node configuration: {path}", highlight=False)
    console.print(f"policy: {folder / 'policies' / (policy + '.yaml')}; coordinator audit key: "
                  f"{folder / 'coordinator' / 'audit.key'}", highlight=False)


@app.command()
def certs(
    out: Path = typer.Argument(..., help="folder for ca.crt, ca.key, server.pem, server.key"),
    host: List[str] = typer.Option(["127.0.0.1", "localhost"], "--host", help="names the SuperLink is reached by"),
) -> None:
    """TLS material for a test federation: a CA and a SuperLink certificate."""
    from securefpt.operators.certs import make_tls

    for role, path in make_tls(folder_arg(out), host).items():
        console.print(f"{role}: {path}")


@policy_app.command("validate")
def policy_validate(file: Path) -> None:
    """Exit 0 for a valid policy, 1 with the reason otherwise."""
    from securefpt.protocol.policy import load_policy

    try:
        policy = load_policy(file)
    except SecureFPTError as exc:
        err.print(f"invalid: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    console.print(f"valid: {file} (server in {policy.server.region}, {len(policy.regions)} regions)")


@policy_app.command("explain")
def policy_explain(
    file: Path,
    clients: Path = typer.Option(..., "--clients", help="folder of client manifests"),
    config: Optional[Path] = typer.Option(None, "--config", help="experiment YAML (default: the defaults)"),
    set_: List[str] = typer.Option([], "--set", help="override a key of the experiment: dotted.key=value"),
) -> None:
    """Who may take part in this experiment under this policy, and why not."""
    from securefpt.coordinator.eligibility import decide_eligibility
    from securefpt.experiment.loading import load_config
    from securefpt.protocol.policy import load_manifests, load_policy

    try:
        cfg = load_config(config, set_)
        manifests = load_manifests(clients)
        decisions = decide_eligibility(load_policy(file), cfg, manifests)
    except SecureFPTError as exc:
        fail(exc)
    table = Table(title=f"{file.name}: experiment '{cfg.name}'")
    for column in ("client", "region", "language", "included", "reason"):
        table.add_column(column)
    for cid, d in decisions.items():
        m = manifests[cid]
        table.add_row(cid, m.region, m.language, "yes" if d.included else "[red]no[/red]", d.reason)
    console.print(table)
