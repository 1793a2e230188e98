"""Residency policies (policies/*.yaml) and institutions' manifests (clients/<id>/manifest.yaml).

A policy is the agreement of a federation: where the coordinator runs and stores the
artifact, the coordinator's pinned audit key, and one rule set per region. Every
institution holds its own copy and its node enforces its region's rules from that copy
(securefpt.node.config); the coordinator evaluates the same rules to decide who is
eligible (securefpt.coordinator.eligibility). Errors name the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationError, model_validator

from securefpt.errors import ConfigError
from securefpt.protocol.attestation import Attestation, load_public
from securefpt.protocol.request import DP_MODES, DPMode, Strict
from securefpt.protocol.yaml_files import first_error, read_yaml_mapping


class DPRequirement(Strict):
    required: bool = False
    max_epsilon: Optional[float] = Field(None, gt=0)
    max_delta: Optional[float] = Field(None, gt=0, lt=1)
    # local: the node adds all its own noise; distributed: only its share of the sum's noise
    modes: list[DPMode] = Field(default_factory=lambda: list(DP_MODES), min_length=1)
    # distributed mode: the fewest honest noise shares the node counts on (it sizes its share for them,
    # and refuses a round whose SecAgg+ threshold is lower)
    min_noise_contributors: int = Field(3, ge=2)


class DifferencingRules(Strict):
    """How a node answers a coordinator that differences its updates: offers of an encoder close to
    one it trained on (any run), and trainings whose randomness the coordinator would choose."""

    # request: each training's data order and dropout follow the request's seed (reproducible runs);
    # node: from the node's own entropy, so two trainings on one encoder differ by SGD's noise
    randomness: Literal["request", "node"] = "request"
    # refuse an encoder within this L2 distance of one it trained on (node/sketches.py); 0: exact copies only
    min_encoder_distance: float = Field(0.0, ge=0)


class ReleaseRules(Strict):
    """What may leave a node in the clear, and in what form (None decimals: exact)."""

    eval_metrics: bool = False  # accuracy of the global encoder on the node's held-out data
    metric_decimals: Optional[int] = Field(2, ge=0, le=6)
    epsilon: bool = False  # the node's cumulative epsilon in this experiment
    epsilon_decimals: Optional[int] = Field(1, ge=0, le=6)
    training_metrics: bool = False  # loss and steps of a plaintext round
    privacy_details: bool = False  # sample rate, steps, noise multiplier: functions of |D_k|
    # Each released accuracy answers a question about the node's evaluation labels on parameters the
    # coordinator chose: the lifetime number it releases per dataset, across runs and experiments (None: no cap).
    max_metric_releases: Optional[int] = Field(None, ge=0)


class NodeRules(Strict):
    """What a node allows for its data, whoever asks."""

    export_to: Optional[list[str]] = None  # regions its masked updates may go to (None: any)
    require_secure_aggregation: bool = True
    dp: DPRequirement = DPRequirement()
    min_cohort: int = Field(2, ge=2)  # fewest contributors in any aggregate holding this node's update
    release: ReleaseRules = ReleaseRules()
    differencing: DifferencingRules = DifferencingRules()


class RegionRule(NodeRules):
    """One region's rules in a policy, and the authority that attests its institutions."""

    authority_key: Path  # PEM public key of the region's attestation authority
    export_to: list[str]


class ServerBlock(Strict):
    region: str
    artifact_regions: list[str]
    audit_key: Path  # the coordinator's pinned Ed25519 audit key (public); its log must verify with it
    # a node must prove, at setup, that it holds the private key its attestation names
    require_key_proof: bool = True


class Policy(Strict):
    version: Literal[1] = 1
    server: ServerBlock
    regions: dict[str, RegionRule]

    @model_validator(mode="after")
    def _references(self) -> "Policy":
        known = set(self.regions)
        if self.server.region not in known:
            raise ValueError(f"server.region: unknown region '{self.server.region}'")
        for region in self.server.artifact_regions:
            if region not in known:
                raise ValueError(f"server.artifact_regions: unknown region '{region}'")
        for name, rule in self.regions.items():
            for target in rule.export_to:
                if target not in known:
                    raise ValueError(f"regions.{name}.export_to: unknown region '{target}'")
        return self

    def authorities(self) -> dict:
        """Region -> the authority public key it trusts (the trust store)."""
        return {region: load_public(rule.authority_key) for region, rule in self.regions.items()}


class ClientManifest(Strict):
    """An institution, as registered with the federation: who, where, what it serves, its attestation."""

    client_id: str
    region: str
    language: str
    data_location: Optional[str] = None  # informational: the data stays there
    attestation: Optional[Attestation] = None


def _resolve(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path).resolve()


def load_policy(path: Path) -> Policy:
    """Load and validate a policy; key paths resolve against the file's folder and must load."""
    path = Path(path)
    try:
        policy = Policy.model_validate(read_yaml_mapping(path))
    except ValidationError as exc:
        raise ConfigError(f"{path}: {first_error(exc)}") from None
    regions = {}
    for name, rule in policy.regions.items():
        key = _resolve(path.parent, rule.authority_key)
        if not key.is_file():
            raise ConfigError(f"{path}: regions.{name}.authority_key: {key} not found")
        load_public(key)  # fail now on a bad key, not mid-run
        regions[name] = rule.model_copy(update={"authority_key": key})
    audit_key = _resolve(path.parent, policy.server.audit_key)
    if not audit_key.is_file():
        raise ConfigError(f"{path}: server.audit_key: {audit_key} not found")
    load_public(audit_key)
    server = policy.server.model_copy(update={"audit_key": audit_key})
    return policy.model_copy(update={"regions": regions, "server": server})


def load_manifest(path: Path) -> ClientManifest:
    try:
        return ClientManifest.model_validate(read_yaml_mapping(Path(path)))
    except ValidationError as exc:
        raise ConfigError(f"{path}: {first_error(exc)}") from None


def load_manifests(folder: Path) -> dict[str, ClientManifest]:
    """Every institution's manifest of a federation folder (`<id>/manifest.yaml`), by client id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: clients folder not found")
    manifests: dict[str, ClientManifest] = {}
    for path in sorted(folder.glob("*/manifest.yaml")):
        manifest = load_manifest(path)
        if manifest.client_id in manifests:
            raise ConfigError(f"{path}: client_id '{manifest.client_id}' is declared twice")
        manifests[manifest.client_id] = manifest
    if not manifests:
        raise ConfigError(f"{folder}: no institution manifests (<id>/manifest.yaml)")
    return manifests
