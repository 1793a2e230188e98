"""Command line: `securefpt run | demo | predict | study` and the operators' subcommands.

Bad input exits non-zero with a one-line reason on stderr (never a traceback).
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from securefpt.errors import ConfigError, RunInterrupted, SecureFPTError

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


def _fail(exc: BaseException) -> None:
    err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _folder(path: Path) -> Path:
    """A folder argument: one line if a file is in the way."""
    if path.exists() and not path.is_dir():
        _fail(SecureFPTError(f"{path}: a file is there, a folder is needed"))
    return path


def _default_out(name: str) -> Path:
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _run(config: Optional[Path], out: Optional[Path], overrides: List[str], quiet: bool, verbose: bool) -> None:
    from securefpt.engines.runner import run_experiment
    from securefpt.experiment.loading import load_config

    try:
        cfg = load_config(config, overrides)
        out = out or _default_out(cfg.name)
        if out.exists() and not out.is_dir():
            raise SecureFPTError(f"--out {out}: a file is there; a run directory is a folder")
        summary = run_experiment(cfg, out, show_progress=not quiet, verbose=verbose)
    except RunInterrupted as exc:
        err.print(str(exc), highlight=False, soft_wrap=True)
        raise typer.Exit(code=130) from None
    except SecureFPTError as exc:
        _fail(exc)
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
            _fail(exc)
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
        _fail(exc)
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
        _fail(exc)
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
        out = _folder(out or Path("studies") / spec.name)
        records = run_study(spec, out, show_progress=not quiet,
                            say=lambda line: err.print(line, highlight=False, soft_wrap=True))
        report = write_report(spec, load_config(spec.experiment, spec.set), records, out)
    except RunInterrupted as exc:
        err.print(f"{exc}; the finished cells are kept: run the same command to resume", highlight=False)
        raise typer.Exit(code=130) from None
    except SecureFPTError as exc:
        _fail(exc)
    console.print(f"report: {report}", highlight=False)


keys_app = typer.Typer(no_args_is_help=True, help="Keys and attestations for a federation.")
policy_app = typer.Typer(no_args_is_help=True, help="Residency policies.")
audit_app = typer.Typer(no_args_is_help=True, help="The signed audit log, and the empirical privacy audit.")
app.add_typer(keys_app, name="keys")
app.add_typer(policy_app, name="policy")
app.add_typer(audit_app, name="audit")
node_app = typer.Typer(no_args_is_help=True, help="An institution's own node.")
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
        _fail(exc)
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

    folder = _folder(folder or securefpt_home() / "demo-federation")
    try:
        written = make_federation(folder, policy=policy, force=force)
    except SecureFPTError as exc:
        _fail(exc)
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

    for role, path in make_tls(_folder(out), host).items():
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
        _fail(exc)
    table = Table(title=f"{file.name}: experiment '{cfg.name}'")
    for column in ("client", "region", "language", "included", "reason"):
        table.add_column(column)
    for cid, d in decisions.items():
        m = manifests[cid]
        table.add_row(cid, m.region, m.language, "yes" if d.included else "[red]no[/red]", d.reason)
    console.print(table)


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
        _fail(exc)
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
        _fail(SecureFPTError(f"{log}: not an audit log ({type(exc).__name__})"))
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
        folder = _folder(out or Path("runs") / f"{cfg.name}-privacy-audit")
        figures = run_privacy_audit(cfg, folder, epsilon, canaries, settings or SETTINGS, show_progress=not quiet,
                                    log=lambda line: console.print(line, highlight=False))
    except SecureFPTError as exc:
        _fail(exc)
    for s in figures["settings"]:
        claimed = "none" if s["epsilon_claimed"] is None else f"{s['epsilon_claimed']:.2f}"
        console.print(f"{s['setting']}: epsilon claimed {claimed}, lower bound {s['epsilon_lower_bound']:.2f} "
                      f"({verdict(s).strip('*')}); MIA AUC {s['mia_auc']:.3f}, TPR at 1% FPR "
                      f"{s['tpr_at_fpr_0.01']:.3f}", highlight=False)
    for name, why in figures["skipped"].items():
        console.print(f"{name}: not audited ({why})", highlight=False)
    console.print(f"report: {folder / 'privacy-audit.md'}", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
