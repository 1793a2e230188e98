"""What a node trusts: its own configuration file, never anything the coordinator sends.

An institution starts its node with `node.yaml` (Flower node config `config="..."` on
the deployment engine; one file per virtual node on the simulation engine). It names:
- `manifest` and `key`: who the node is (its registered manifest and attestation) and
  the attested private key it signs with;
- `policy` (its own copy of the federation's policy: its region's rules, the trust store
  of authority keys, the coordinator's region and pinned audit key), or, for a node
  outside any federation (local trials), inline `rules` and `trust`;
- `data`: the node's own data binding per task; the coordinator names only a task;
- `models`: the models it loads, by name (the packaged ones are always allowed);
- `budget`: its lifetime privacy budget per dataset;
- `state_dir`: where its ledger, replay records and witnessed audit heads live.

`load_node` reads and checks all of it, including the node's own attestation, and
returns the `Node` that every handler works with.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field, ValidationError, model_validator

from securefpt.errors import ConfigError
from securefpt.learning.builtin_models import PACKAGED_MODELS
from securefpt.learning.data_source import DataSource, SourceKind
from securefpt.protocol.attestation import (
    Attestation,
    attested_key,
    check_attestation,
    load_private,
    load_public,
    public_raw,
)
from securefpt.protocol.policy import ClientManifest, NodeRules, load_manifest, load_policy
from securefpt.protocol.request import Strict
from securefpt.protocol.yaml_files import first_error, read_yaml_mapping

STATE_ENV = "SECUREFPT_NODE_STATE"  # engine-given base folder of nodes without a `state_dir`
SIM_NODES_ENV = "SECUREFPT_SIM_NODES"  # simulation engine: a JSON list of node.yaml paths, by partition id


class DataBinding(DataSource):
    """Where this node's data for one task lives (a DataSource: source, root, splits, hf) and how to read it."""

    source: SourceKind  # required: a node names its own source
    language: Optional[str] = None  # the language folder / filter value (default: the node's language)
    label_map: dict[str, str] = Field(default_factory=dict)  # the node's label -> the task's label
    max_train: Optional[int] = Field(None, ge=1)
    max_eval: Optional[int] = Field(None, ge=1)
    dataset: Optional[str] = None  # what the lifetime budget is kept for (default: the task's name)
    # The task's labels this node declares it holds (after label_map). Declared, a request's label
    # space is judged against this configuration, never against the rows: no label-set oracle.
    labels: Optional[list[str]] = Field(None, min_length=1)
    # A privacy audit's canaries (`securefpt audit privacy`): records (jsonl: text, label) this node trains
    # on besides its split, past any row cap; never evaluated. Which canaries are in was decided by coins
    # the auditing institution keeps: nothing of them is in this file's records or leaves the node.
    canaries: Optional[Path] = None


class Budget(Strict):
    """The node's lifetime privacy budget per dataset, accounted over every experiment it joins."""

    epsilon: Optional[float] = Field(None, gt=0)  # None: no lifetime cap (each request's target still binds)
    # the most of it one federation (one pinned coordinator key) may spend, whatever its experiments: a
    # coordinator starting throwaway experiments drains its own share, never the others' (None: no share)
    per_federation: Optional[float] = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["prv", "rdp"] = "prv"

    @model_validator(mode="after")
    def _share_within_lifetime(self) -> "Budget":
        if self.per_federation is not None and self.epsilon is not None and self.per_federation > self.epsilon:
            raise ValueError(f"budget.per_federation {self.per_federation} above budget.epsilon {self.epsilon}")
        return self


class NodeConfig(Strict):
    manifest: Path
    key: Path
    policy: Optional[Path] = None
    rules: Optional[NodeRules] = None
    trust: dict[str, Path] = Field(default_factory=dict)  # region -> authority public key (without a policy)
    data: dict[str, DataBinding]
    models: dict[str, str] = Field(default_factory=dict)  # model name -> local folder or cached hub id
    budget: Budget = Budget()
    state_dir: Optional[Path] = None
    # the newest experiments whose personalized model (and local head) the node keeps; older ones are
    # removed, so a coordinator starting run after run cannot grow the node's state without bound
    keep_personalized: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _one_source_of_rules(self) -> "NodeConfig":
        if (self.policy is None) == (self.rules is None):
            raise ValueError("set exactly one of policy (a federation's policy) or rules (a node outside one)")
        if self.rules is not None and not self.trust:
            raise ValueError("trust: a node without a policy needs its own trust store (region: authority key)")
        if not self.data:
            raise ValueError("data: bind at least one task")
        return self


@dataclass(frozen=True)
class Node:
    """A node's checked configuration: everything its handlers may rely on."""

    path: Path
    client_id: str
    region: str
    language: str
    attestation: Attestation  # its own, verified against its own trust store
    key: Ed25519PrivateKey
    rules: NodeRules
    authorities: dict[str, Ed25519PublicKey]  # the trust store
    coordinator_region: Optional[str]  # None outside a federation
    audit_key: Optional[Ed25519PublicKey]  # the coordinator's pinned audit key
    data: dict[str, DataBinding]
    models: dict[str, str]
    budget: Budget
    state_dir: Path
    keep_personalized: int = 10

    @property
    def federation(self) -> str:
        """Who spends this node's budget: its pinned coordinator key's fingerprint ("local" outside a federation)."""
        if self.audit_key is None:
            return "local"
        return hashlib.sha256(public_raw(self.audit_key)).hexdigest()[:16]

    def model_source(self, name: str) -> Optional[str]:
        """Where this node loads model `name` from (None: it does not load it)."""
        if name in PACKAGED_MODELS:
            return name
        return self.models.get(name)


def _resolve(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path).resolve()


def _resolve_optional(base: Path, path: Optional[Path]) -> Optional[Path]:
    return None if path is None else _resolve(base, path)


def _binding(base: Path, binding: DataBinding) -> DataBinding:
    return binding.model_copy(update={"root": _resolve_optional(base, binding.root)})


def load_node(path: Path, now: Optional[datetime] = None, state_base: Optional[Path] = None) -> Node:
    """Read and check a node configuration (ConfigError: the node cannot start). Without its own
    `state_dir` the node keeps its state in `<state_base>/<client id>`, the base given by its engine."""
    path = Path(path).resolve()
    try:
        cfg = NodeConfig.model_validate(read_yaml_mapping(path))
    except ValidationError as exc:
        raise ConfigError(f"{path}: {first_error(exc)}") from None
    base = path.parent
    manifest: ClientManifest = load_manifest(_resolve(base, cfg.manifest))
    key = load_private(_resolve(base, cfg.key))
    if cfg.policy is not None:
        policy = load_policy(_resolve(base, cfg.policy))
        rule = policy.regions.get(manifest.region)
        if rule is None:
            raise ConfigError(f"{path}: region '{manifest.region}' is not in {cfg.policy}")
        rules = NodeRules.model_validate(rule.model_dump(exclude={"authority_key"}))
        authorities, coordinator_region = policy.authorities(), policy.server.region
        audit_key: Optional[Ed25519PublicKey] = load_public(policy.server.audit_key)
    else:
        assert cfg.rules is not None  # NodeConfig requires exactly one of policy and rules
        rules = cfg.rules
        authorities = {region: load_public(_resolve(base, p)) for region, p in cfg.trust.items()}
        coordinator_region, audit_key = None, None
    attestation = manifest.attestation
    why = check_attestation(attestation, manifest.client_id, manifest.region,
                            authorities.get(manifest.region), now or datetime.now(timezone.utc), manifest.language)
    if why is None and attestation is not None and public_raw(attested_key(attestation)) != public_raw(key):
        why = "the key is not the one the attestation names"
    if why is not None or attestation is None:
        raise ConfigError(f"{path}: the node's own identity does not verify: {why}")
    state = _resolve_optional(base, cfg.state_dir)
    if state is None:
        engine_base = state_base or os.environ.get(STATE_ENV)
        if engine_base is None:
            raise ConfigError(f"{path}: state_dir is required (no engine gives this node a state folder)")
        state = Path(engine_base) / manifest.client_id
    return Node(path=path, client_id=manifest.client_id, region=manifest.region, language=manifest.language,
                attestation=attestation, key=key, rules=rules, authorities=authorities,
                coordinator_region=coordinator_region,
                audit_key=audit_key, data={task: _binding(base, b) for task, b in cfg.data.items()},
                models=dict(cfg.models), budget=cfg.budget, state_dir=state, keep_personalized=cfg.keep_personalized)


@lru_cache(maxsize=16)
def _cached(path: str, mtime: float, state_base: Optional[str]) -> Node:
    return load_node(Path(path), state_base=Path(state_base) if state_base else None)


FLWR_SIM_ENV = "SECUREFPT_FLWR_SIMULATION"  # the node's own opt-in to Flower's simulation's partition list
PARTITIONS = "partitions.json"  # Flower's own simulation (`flwr run .`): the virtual nodes' files, by partition id


def _where(context) -> tuple[Path, Optional[str]]:
    """This node's configuration file and the engine-given base of its state folder, named only by
    the node's own side: its SuperNode's node config or its process environment.

    - deployment: the SuperNode's node config names them (`config`, `state-dir`);
    - securefpt's simulation engine: the operator's own process environment;
    - Flower's simulation (`flwr run .` on one machine): a virtual node has only its partition
      id. Only where the node's environment opts in (FLWR_SIM_ENV=1, which scripts/setup.sh puts
      in the virtual environment's activate) does it read the list the ServerApp wrote under the
      run's `out-dir`: the run config is the coordinator's, and may not name a node's identity.
    """
    node_config = context.node_config
    if "config" in node_config:
        return Path(str(node_config["config"])), node_config.get("state-dir")
    listed = os.environ.get(SIM_NODES_ENV)
    if listed is not None and "partition-id" in node_config:
        return Path(json.loads(listed)[int(node_config["partition-id"])]), os.environ.get(STATE_ENV)
    out = context.run_config.get("out-dir") if "partition-id" in node_config else None
    if out is not None and os.environ.get(FLWR_SIM_ENV) == "1":
        index = Path(str(out)) / "nodes" / PARTITIONS
        for _ in range(50):  # the ServerApp writes it before its first message; allow a slow disk
            if index.is_file():
                break
            time.sleep(0.1)
        paths = json.loads(index.read_text(encoding="utf-8")) if index.is_file() else []
        pid = int(node_config["partition-id"])
        if pid < len(paths):
            return Path(paths[pid]), str(Path(str(out)) / "nodes")
    raise ConfigError("this node has no configuration: start it with --node-config 'config=\"node.yaml\"'"
                      + (f" (or, for flwr run . on one machine, set {FLWR_SIM_ENV}=1 in the node's environment)"
                         if "partition-id" in node_config else ""))


def this_node(context) -> Node:
    """The node's checked configuration, read once per process (and again if the file changes)."""
    path, base = _where(context)
    path = path.resolve()
    return _cached(str(path), path.stat().st_mtime if path.is_file() else 0.0, str(base) if base else None)
