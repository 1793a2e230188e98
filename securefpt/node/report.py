"""The privacy report an institution runs on its own node's state (`securefpt node report`).

Everything a coordinator may not be told stays readable here: per dataset, the lifetime
epsilon against the node's budget; per experiment, its mode, epsilon (and in distributed mode
the epsilon of the node's own noise shares alone), steps, noise multiplier and sampling rate;
the runs the node answered and the audit heads it witnessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from securefpt.errors import ConfigError
from securefpt.node.budget import Ledger, epsilon_of
from securefpt.node.config import Node, load_node
from securefpt.node.state import read_json
from securefpt.protocol.audit import WITNESS_FILE

ENGINE = Path("<engine-given>")  # stands for the base an engine would give a node without state_dir


def node_report(config: Path, state_dir: Optional[Path] = None, runs: Path = Path("runs")) -> dict:
    """The node's own figures, read from its state folder: the one given, its `state_dir`, or for a
    node without one the newest folder the simulation engine gave it (RUN/nodes/<client id> under `runs`)."""
    node: Node = load_node(config, state_base=ENGINE)
    folder = Path(state_dir) if state_dir else node.state_dir
    if folder.parent == ENGINE:
        found = [p for p in Path(runs).glob(f"*/nodes/{node.client_id}") if p.is_dir()]
        if not found:
            raise ConfigError(f"{config}: names no state_dir and no run under {runs}/ holds its state "
                              f"({runs}/*/nodes/{node.client_id}): --state FOLDER")
        folder = max(found, key=lambda p: p.stat().st_mtime)
    datasets = {}
    for path in sorted(folder.glob("ledger-*.json")):
        dataset = path.stem.removeprefix("ledger-")
        ledger = Ledger(folder, dataset, node.budget)
        experiments = {key[:12]: _experiment(ledger, key, node) for key in dict.fromkeys(
            e["experiment"] for e in ledger.entries)}
        federations = sorted({e["federation"] for e in ledger.entries if "federation" in e})
        datasets[dataset] = {
            "lifetime_epsilon": ledger.lifetime_epsilon(), "budget": node.budget.epsilon,
            "per_federation": node.budget.per_federation,
            "federations": {f: ledger.federation_epsilon(federation=f) for f in federations},
            "delta": node.budget.delta, "accountant": node.budget.accountant, "experiments": experiments,
        }
    records = [read_json(p, {}) for p in sorted((folder / "runs").glob("*.json"))]
    witnessed = [json.loads(x) for x in (folder / WITNESS_FILE).read_text().splitlines()] \
        if (folder / WITNESS_FILE).is_file() else []
    return {"client_id": node.client_id, "region": node.region, "language": node.language, "state_dir": str(folder),
            "datasets": datasets, "runs": len(records),
            "rounds_trained": sum(len(r.get("trained", [])) for r in records),
            "audit_heads_witnessed": len(witnessed),
            "last_witnessed": max(witnessed, key=lambda r: r["seq"])["head"] if witnessed else None}


def _experiment(ledger: Ledger, key: str, node: Node) -> dict:
    """One experiment's spend; distributed mode adds the guarantee of this node's own shares alone."""
    history = ledger.history(key)
    distributed = any(len(entry) == 5 for entry in history)
    delta, accountant = node.budget.delta, node.budget.accountant
    return {"mode": "distributed" if distributed else "local",
            "epsilon": epsilon_of(history, delta, accountant),
            "epsilon_alone": epsilon_of(ledger.history(key, alone=True), delta, accountant) if distributed else None,
            "steps": ledger.steps(key), "noise_multipliers": sorted({entry[0] for entry in history}),
            "sample_rates": sorted({entry[1] for entry in history})}
