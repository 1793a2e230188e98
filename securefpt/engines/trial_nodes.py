"""Trial nodes for a local experiment: the operator's own data, one node per language.

An experiment without a federation (`clients`) describes its data in `data.source`,
`data.root`, ... on the operator's machine. Before the simulation engine starts, this
module turns that description into one complete node configuration per language under
the run directory's `nodes/<language>/`: a data binding, a key attested by a one-off
trial authority, a trust store holding that authority, and the operator's rules (what
the experiment asks is what the operator allows; everything is released exactly, since
the data is the operator's own). From then on the trial nodes are nodes like any
other: they read only their own files.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

from securefpt.experiment.config import ExperimentConfig
from securefpt.learning.builtin_models import PACKAGED_MODELS
from securefpt.protocol.attestation import issue, new_key, public_raw, save_private, save_public

TRIAL_REGION = "local"


def trial_rules(cfg: ExperimentConfig) -> dict:
    return {"require_secure_aggregation": False, "min_cohort": max(2, cfg.secagg.min_cohort),
            "release": {"eval_metrics": True, "metric_decimals": None, "epsilon": True, "epsilon_decimals": None,
                        "training_metrics": True, "privacy_details": True}}


def write_trial_nodes(cfg: ExperimentConfig, folder: Path) -> list[Path]:
    """One node configuration per language of `cfg` under `folder`; their paths, in language order."""
    folder = Path(folder)
    authority = new_key()
    save_public(authority, folder / "trust" / "trial-authority.pub")
    expires = datetime.now(timezone.utc) + timedelta(days=30)
    data = cfg.data
    paths = []
    for language in data.languages:
        home = folder / language
        key = new_key()
        save_private(key, home / "node.key")
        attestation = issue(authority, language, TRIAL_REGION, language, public_raw(key), expires)
        manifest = {"client_id": language, "region": TRIAL_REGION, "language": language,
                    "data_location": "this machine (local trial)", "attestation": attestation.to_dict()}
        binding = {"source": data.source, "train_split": data.train_split_of(language), "eval_split": data.eval_split}
        cap = data.max_train_of(language)
        if cap is not None:  # the node's own cap: it may use less than asked, never more
            binding["max_train"] = cap
        if data.root is not None:
            binding["root"] = str(data.root)
        if data.hf is not None:
            binding["hf"] = data.hf.model_dump(mode="json")
        node = {"manifest": "manifest.yaml", "key": "node.key", "rules": trial_rules(cfg),
                "trust": {TRIAL_REGION: "../trust/trial-authority.pub"}, "data": {data.task: binding},
                "models": {} if cfg.model.name in PACKAGED_MODELS else {cfg.model.name: cfg.model.name},
                "state_dir": "."}
        (home / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
        (home / "node.yaml").write_text(yaml.safe_dump(node, sort_keys=False), encoding="utf-8")
        paths.append(home / "node.yaml")
    return paths
