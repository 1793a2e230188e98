"""Data-residency policies (policies/*.yaml) and client manifests (clients/*.yaml), validated.

A policy has a server block (the server's region, where the final artifact may be
stored) and one rule set per region. Errors name the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from securefpt.attestation import Attestation, load_public
from securefpt.config import first_error, read_yaml_mapping
from securefpt.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DPRequirement(_Strict):
    required: bool = False
    max_epsilon: Optional[float] = Field(None, gt=0)
    max_delta: Optional[float] = Field(None, gt=0, lt=1)


class RegionRule(_Strict):
    """What one region allows for the data of its institutions."""

    authority_key: Path  # PEM public key of the region's attestation authority
    export_to: list[str]  # regions its masked updates and artifacts may go to
    require_secure_aggregation: bool = True
    dp: DPRequirement = DPRequirement()
    min_cohort: int = Field(2, ge=1)  # fewest contributors in any aggregate holding this region's update
    release_eval_metrics: bool = False  # per-client evaluation metrics may leave in the clear


class ServerBlock(_Strict):
    region: str
    artifact_regions: list[str]
    # a node must prove, at setup, that it holds the private key its attestation names
    # (see identity.py); required wherever nodes are separate machines (deployment engine)
    require_key_proof: bool = False


class Policy(_Strict):
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


class ClientManifest(_Strict):
    """An institution's client: who it is, where it is, what it serves, its attestation."""

    client_id: str
    region: str
    language: str
    data_location: Optional[str] = None  # informational: the data stays there
    attestation: Optional[Attestation] = None
    key: Optional[Path] = None  # the attested private key; present on the institution's own node only


def load_policy(path: Path) -> Policy:
    """Load and validate a policy; authority key paths resolve against the file's folder."""
    path = Path(path)
    try:
        policy = Policy.model_validate(read_yaml_mapping(path))
    except ValidationError as exc:
        raise ConfigError(f"{path}: {first_error(exc)}") from None
    regions = {}
    for name, rule in policy.regions.items():
        key = rule.authority_key if rule.authority_key.is_absolute() else (path.parent / rule.authority_key).resolve()
        if not key.is_file():
            raise ConfigError(f"{path}: regions.{name}.authority_key: {key} not found")
        load_public(key)  # fail now on a bad key, not mid-run
        regions[name] = rule.model_copy(update={"authority_key": key})
    return policy.model_copy(update={"regions": regions})


def load_manifests_file(path: Path) -> dict[str, ClientManifest]:
    """One manifest file, by client id; a relative `key` resolves against the file's folder."""
    try:
        manifest = ClientManifest.model_validate(read_yaml_mapping(Path(path)))
    except ValidationError as exc:
        raise ConfigError(f"{path}: {first_error(exc)}") from None
    if manifest.key is not None and not manifest.key.is_absolute():
        manifest = manifest.model_copy(update={"key": (Path(path).parent / manifest.key).resolve()})
    return {manifest.client_id: manifest}


def load_manifests(folder: Path) -> dict[str, ClientManifest]:
    """All `*.yaml` manifests of a clients folder, by client id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: clients folder not found")
    manifests: dict[str, ClientManifest] = {}
    for path in sorted(folder.glob("*.yaml")):
        [(_, manifest)] = load_manifests_file(path).items()
        if manifest.client_id in manifests:
            raise ConfigError(f"{path}: client_id '{manifest.client_id}' is declared twice")
        manifests[manifest.client_id] = manifest
    if not manifests:
        raise ConfigError(f"{folder}: no client manifests (*.yaml)")
    return manifests
