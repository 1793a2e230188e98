"""`securefpt audit`: the signed audit log (verify, report) and the empirical privacy audit."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from securefpt.cli.common import app, console, err, fail, folder_arg
from securefpt.errors import ConfigError, SecureFPTError

audit_app = typer.Typer(no_args_is_help=True, help="The signed audit log, and the empirical privacy audit.")
app.add_typer(audit_app, name="audit")


def _pinned_key(log: Path, policy: Optional[Path], public_key: Optional[Path]) -> tuple[Path, str]:
    """The key to verify with, and where it came from: a key the verifier holds (given, or pinned in
    its own copy of the policy). The run directory's files are the coordinator's: a key found through
    them would verify a log the coordinator re-signed, so they only decide what to ask for. Without a
    flag, a local trial (no federation policy) verifies with the operator's own key."""
    from securefpt.home import securefpt_home
    from securefpt.protocol.policy import load_policy
    from securefpt.protocol.yaml_files import read_yaml_mapping

    if public_key is not None:
        return public_key, "the given key"
    if policy is not None:
        return load_policy(policy).server.audit_key, f"the key pinned in {policy}"
    config = log.parent / "config.yaml"
    federated = config.is_file() and read_yaml_mapping(config).get("policy") is not None
    own = securefpt_home() / "coordinator" / "audit.pub"
    if federated or not own.is_file():
        raise ConfigError(f"{log}: name a key you hold: --policy YOUR_COPY_OF_THE_POLICY (it pins the "
                          "coordinator's key) or --public-key KEY; the run directory's own files are the "
                          "coordinator's and cannot vouch for its log")
    return own, "the operator's own audit key"


@audit_app.command("verify")
def audit_verify(
    log: Path,
    policy: Optional[Path] = typer.Option(None, "--policy", help="your copy of the federation's policy: verify "
                                                                 "with the coordinator key it pins (required for "
                                                                 "a federation's run, or --public-key)"),
    public_key: Optional[Path] = typer.Option(None, "--public-key", help="verify with this Ed25519 key instead"),
    witness: List[Path] = typer.Option([], "--witness", help="a node's state folder, or a folder of them "
                                                            "(a simulation run's nodes/); repeatable"),
    head: Optional[str] = typer.Option(None, "--head", help="a head hash known from elsewhere"),
) -> None:
    """Exit 0 only for an intact log that every witness agrees with; name the first problem otherwise."""
    from securefpt.protocol.attestation import load_public
    from securefpt.protocol.audit import check_witnesses, load_witnesses, read_entries, verify_log

    try:
        key_path, source = _pinned_key(log, policy, public_key)
        verdict = verify_log(log, load_public(key_path), head)
        entries = read_entries(log) if verdict.ok else []
        records, problems = load_witnesses(witness, entries[0]["hash"] if entries else "")
    except (SecureFPTError, OSError, ValueError) as exc:
        fail(exc)
    if not verdict.ok:
        err.print(f"TAMPERED: line {verdict.bad_line}: {verdict.reason} (checked with {source})", highlight=False,
                  soft_wrap=True)
        raise typer.Exit(code=1)
    why = problems[0] if problems else check_witnesses(entries, records)
    if why is None and witness and not records:
        why = "no node witnessed this log in the given folders"
    if why is not None:
        err.print(f"TAMPERED: {why}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)
    seen = f"; {len({r['client_id'] for r in records})} witnesses agree up to entry " \
           f"{max(r['seq'] for r in records)}" if records else ""
    console.print(f"intact: {verdict.entries} entries, head {verdict.head} (checked with {source}){seen}",
                  highlight=False)


@audit_app.command("report")
def audit_report(log: Path) -> None:
    """A per-round table of the decisions in an audit log."""
    from securefpt.protocol.audit import read_entries

    try:
        entries = read_entries(log)
    except (OSError, ValueError) as exc:
        fail(SecureFPTError(f"{log}: not an audit log ({type(exc).__name__})"))
    table = Table(title=str(log))
    for column in ("round", "participants", "dropouts / declined", "epsilon (max)", "avg accuracy", "aborted"):
        table.add_column(column)
    for e in entries:
        if e.get("event") == "eligibility" and "clients" in e:
            excluded = {k: v["reason"] for k, v in e["clients"].items() if not v["included"]}
            console.print(f"eligibility: {sum(v['included'] for v in e['clients'].values())} included"
                          + "".join(f"\n  excluded {k}: {why}" for k, why in excluded.items()), highlight=False)
        elif e.get("event") == "eligibility":
            console.print(f"round {e['round']}: {e['client']} left out: {e['reason']}", highlight=False)
        if e.get("event") == "round":
            eps = [v for v in (e.get("epsilon") or {}).values() if v is not None]
            out = sorted(e.get("failures", [])) + [f"{k}: {v}" for k, v in (e.get("declined") or {}).items()]
            table.add_row(str(e["round"]), ", ".join(e.get("participants", [])), "\n".join(out) or "-",
                          f"{max(eps):.3f}" if eps else "-", f"{e['accuracy'].get('avg', float('nan')):.3f}",
                          "yes" if e.get("aborted") else "no")
    console.print(table)
    alone = [e for e in entries if e.get("event") == "privacy" and e.get("epsilon_alone")]
    if alone:  # distributed DP: the guarantee each node keeps were every other contributor to collude
        console.print(f"distributed DP, round {alone[-1]['round']}: epsilon from each node's own noise shares alone: "
                      + ", ".join(f"{k} {v:g}" for k, v in alone[-1]["epsilon_alone"].items()), highlight=False)
    for e in entries:
        if e.get("event") == "artifact":
            where = f" in region {e['storage_region']}" if e.get("storage_region") else ""
            console.print(f"artifact {e['path']} sha256 {e['sha256'][:16]}...{where}", highlight=False)


@audit_app.command("privacy")
def audit_privacy(
    config: Path = typer.Argument(..., help="experiment YAML (federated, on the operator's own data)"),
    out: Optional[Path] = typer.Option(None, "--out", help="audit folder (default runs/<name>-privacy-audit); "
                                                          "finished settings in it are read back, not retrained"),
    epsilon: float = typer.Option(8.0, "--epsilon", min=0.01, help="the target epsilon of the DP settings"),
    canaries: int = typer.Option(200, "--canaries", min=10, help="canaries a node (each in by a fair coin)"),
    settings: List[str] = typer.Option([], "--setting", help="no-dp, local-dp, distributed-dp (repeatable; "
                                                             "default: all that the config allows)"),
    shadows: int = typer.Option(0, "--shadows", min=0, help="reference (shadow) runs a setting, trained the same "
                                                          "way without canaries, for the LiRA and RMIA attacks; "
                                                          "each costs one more run"),
    set_: List[str] = typer.Option([], "--set", help="override a key: dotted.key=value (repeatable)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Train with canaries and measure what an attacker learns, with and without DP: empirical epsilon
    lower bounds and membership inference (privacy-audit.json, privacy-audit.md and plots)."""
    from securefpt.engines.privacy_audit import SETTINGS, run_privacy_audit
    from securefpt.engines.privacy_report import verdict
    from securefpt.experiment.loading import load_config

    try:
        cfg = load_config(config, set_)
        folder = folder_arg(out or Path("runs") / f"{cfg.name}-privacy-audit")
        figures = run_privacy_audit(cfg, folder, epsilon, canaries, settings or SETTINGS, show_progress=not quiet,
                                    log=lambda line: console.print(line, highlight=False), references=shadows)
    except SecureFPTError as exc:
        fail(exc)
    for s in figures["settings"]:
        claimed = "none" if s["epsilon_claimed"] is None else f"{s['epsilon_claimed']:.2f}"
        console.print(f"{s['setting']}: epsilon claimed {claimed}, lower bound {s['epsilon_lower_bound']:.2f} "
                      f"({verdict(s).strip('*')}); MIA AUC {s['mia_auc']:.3f}, TPR at 1% FPR "
                      f"{s['tpr_at_fpr_0.01']:.3f}", highlight=False)
        for name, a in s["personalized"].items():
            console.print(f"  {name} models (never sent): MIA AUC {a['mia_auc']:.3f}, lower bound "
                          f"{a['epsilon_lower_bound']:.2f}", highlight=False)
    for name, why in figures["skipped"].items():
        console.print(f"{name}: not audited ({why})", highlight=False)
    console.print(f"report: {folder / 'privacy-audit.md'}", highlight=False)
