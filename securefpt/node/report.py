"""The privacy report an institution runs on its own node's state (`securefpt node report`).

Everything a coordinator may not be told stays readable here: per dataset, the lifetime
epsilon against the node's budget; per experiment, its epsilon, steps, noise multiplier
and sampling rate; the runs the node answered and the audit heads it witnessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from securefpt.node.budget import Ledger, epsilon_of
from securefpt.node.config import Node, load_node
from securefpt.node.state import read_json
from securefpt.protocol.audit import WITNESS_FILE


def node_report(config: Path, state_dir: Optional[Path] = None) -> dict:
    """The node's own figures, read from its state folder (its `state_dir`, or the one given)."""
    node: Node = load_node(config, state_base=Path("unused") if state_dir else None)
    folder = Path(state_dir) if state_dir else node.state_dir
    datasets = {}
    for path in sorted(folder.glob("ledger-*.json")):
        dataset = path.stem.removeprefix("ledger-")
        ledger = Ledger(folder, dataset, node.budget)
        experiments = {}
        for entry in ledger.entries:
            item = experiments.setdefault(entry["experiment"], {"history": [], "steps": 0})
            item["history"].append((entry["sigma"], entry["q"], entry["steps"]))
            item["steps"] += entry["steps"]
        datasets[dataset] = {
            "lifetime_epsilon": ledger.lifetime_epsilon(), "budget": node.budget.epsilon,
            "delta": node.budget.delta, "accountant": node.budget.accountant,
            "experiments": {key[:12]: {"epsilon": epsilon_of(item["history"], node.budget.delta,
                                                             node.budget.accountant),
                                       "steps": item["steps"],
                                       "noise_multipliers": sorted({s for s, _, _ in item["history"]}),
                                       "sample_rates": sorted({q for _, q, _ in item["history"]})}
                            for key, item in experiments.items()},
        }
    runs = [read_json(p, {}) for p in sorted((folder / "runs").glob("*.json"))]
    witnessed = [json.loads(x) for x in (folder / WITNESS_FILE).read_text().splitlines()] \
        if (folder / WITNESS_FILE).is_file() else []
    return {"client_id": node.client_id, "region": node.region, "language": node.language, "state_dir": str(folder),
            "datasets": datasets, "runs": len(runs), "rounds_trained": sum(len(r.get("trained", [])) for r in runs),
            "audit_heads_witnessed": len(witnessed),
            "last_witnessed": max(witnessed, key=lambda r: r["seq"])["head"] if witnessed else None}
